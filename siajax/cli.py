"""``siajax`` command line: ``python -m siajax <command>``."""

from __future__ import annotations

import argparse
import sys
import time


def _cmd_sample(args) -> int:
    import jax

    from siajax.models import from_pretrained
    from siajax.sampling import generate

    model, tokenizer = from_pretrained(args.model, dtype=args.dtype)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)["input_ids"]
        for p in args.prompt
    ]
    start = time.perf_counter()
    result = generate(
        model, prompts, key=jax.random.key(args.seed), max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        stop_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
    )
    jax.block_until_ready(result.tokens)
    seconds = time.perf_counter() - start
    for prompt, tokens, length, logprobs in zip(args.prompt, result.tokens, result.lengths, result.logprobs):
        n = int(length)
        text = tokenizer.decode([int(t) for t in tokens[:n]], skip_special_tokens=True)
        print(f"> {prompt}\n{text!r}\n  ({n} tokens, mean logprob {float(logprobs[:n].mean()):.3f})")
    print(f"{int(result.lengths.sum())} tokens in {seconds:.2f}s (compile included)")
    return 0


def _progress_printer(config):
    """Rich progress for a run: one bar over generations, one over training steps."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    generations = progress.add_task("generations", total=config.generations)
    training = progress.add_task("training", total=config.updates_per_generation, visible=False)

    def on_event(kind, event):
        if kind == "rollouts":
            progress.update(generations, description=f"gen {event['generation']}: rollouts")
        elif kind == "training":
            progress.reset(training, total=config.updates_per_generation, visible=True,
                           description=f"gen {event['generation']}: {event['recipe']} updates")
        elif kind == "train_step":
            progress.advance(training)
        elif kind == "generation":
            progress.update(training, visible=False)
            progress.update(generations, completed=event["generation"] + 1)
            d = event["decision"]
            progress.console.print(
                f"gen {event['generation']}: score {event['score']:.3f} -> {d['lever']}"
                f"{' (' + d['recipe'] + ')' if d['recipe'] else ''}: {d['rationale']}")
    return progress, on_event


def _run_with_progress(config, run_dir, resume: bool):
    from siajax import loop, report

    progress, on_event = _progress_printer(config)
    with progress:
        if resume:
            loop.resume(run_dir, on_event=on_event)
        else:
            loop.run(config, run_dir, on_event=on_event)
    png = report.report(run_dir)
    print(f"run directory: {run_dir}\nplot: {png}")
    return 0


def _cmd_run(args) -> int:
    import dataclasses
    import datetime

    from siajax.loop import RunConfig

    fields = {f.name for f in dataclasses.fields(RunConfig)}
    config = RunConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    run_dir = args.run_dir or f"runs/{config.task}-{config.levers}-s{config.seed}-" \
                              f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return _run_with_progress(config, run_dir, resume=False)


def _cmd_resume(args) -> int:
    import dataclasses
    import json
    from pathlib import Path

    from siajax.loop import RunConfig

    config = RunConfig(**json.loads((Path(args.run_dir) / "config.json").read_text()))
    if args.mesh is not None:
        config = dataclasses.replace(config, mesh=args.mesh or None)
    return _run_with_progress(config, args.run_dir, resume=True)


def _cmd_report(args) -> int:
    from siajax.report import report

    print(f"plot: {report(args.run_dir)}")
    return 0


def _cmd_tasks(args) -> int:
    from siajax.tasks import TaskError, find_tasks

    status = 0
    for name, task in find_tasks().items():
        if isinstance(task, TaskError):
            print(f"{name:16s} INVALID: {task}")
            status = 1
        else:
            first = next((line for line in task.description.splitlines() if line and not line.startswith("#")), "")
            print(f"{name:16s} {task.root}  reward={task.reward_kind}  {first[:70]}")
    return status


def _cmd_serve(args) -> int:
    import json
    from pathlib import Path

    from siajax.agents import LocalPolicyBackend
    from siajax.serve import make_server

    if args.run:
        from siajax.loop import Policy, RunConfig, read_ledger

        run_dir = Path(args.run)
        policy = Policy(RunConfig(**json.loads((run_dir / "config.json").read_text())))
        policy.restore(run_dir, read_ledger(run_dir))
        backend = policy.backend()
    else:
        from siajax.models import from_pretrained

        backend = LocalPolicyBackend(*from_pretrained(args.model, dtype=args.dtype))
    server = make_server(backend, host=args.host, port=args.port, model_name=args.name)
    print(f"serving {args.name} on http://{server.server_address[0]}:{server.server_address[1]}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="siajax", description="Self-improving AI in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    sample = sub.add_parser("sample", help="sample from a policy model (bundled tiny model by default)")
    sample.add_argument("--model", default=None, help="HF-format directory or hub id")
    sample.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    sample.add_argument("--prompt", action="append", default=None)
    sample.add_argument("--max-new-tokens", type=int, default=48)
    sample.add_argument("--temperature", type=float, default=0.8)
    sample.add_argument("--top-k", type=int, default=0)
    sample.add_argument("--top-p", type=float, default=0.95)
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=_cmd_sample)

    run = sub.add_parser("run", help="run the SIA loop on a task")
    run.add_argument("--task", default=None, help="task name (see `siajax tasks`) or directory")
    run.add_argument("--model", default=None, help="HF-format directory or hub id (default: bundled tiny model)")
    run.add_argument("--levers", default=None, choices=["harness", "weights", "both"],
                     help="harness = SIA-H, both = SIA-W+H (default)")
    run.add_argument("--generations", type=int, default=None)
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--items-per-generation", type=int, default=None)
    run.add_argument("--updates-per-generation", type=int, default=None)
    run.add_argument("--learning-rate", type=float, default=None)
    run.add_argument("--lora-rank", type=int, default=None)
    run.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    run.add_argument("--feedback", default=None, choices=["heuristic", "llm"])
    run.add_argument("--feedback-model", default=None)
    run.add_argument("--feedback-base-url", default=None)
    run.add_argument("--mesh", default=None, help="shard over this process's devices, e.g. data=2,fsdp=2,tensor=2")
    run.add_argument("--run-dir", default=None)
    run.set_defaults(func=_cmd_run)

    resume = sub.add_parser("resume", help="continue a run after a crash or stop")
    resume.add_argument("run_dir")
    resume.add_argument("--mesh", default=None, help="continue on another mesh ('' for one device)")
    resume.set_defaults(func=_cmd_resume)

    report = sub.add_parser("report", help="per-generation table and score plot of a run")
    report.add_argument("run_dir")
    report.set_defaults(func=_cmd_report)

    tasks = sub.add_parser("tasks", help="list the tasks found (bundled and $SIAJAX_TASKS_PATH)")
    tasks.set_defaults(func=_cmd_tasks)

    serve = sub.add_parser("serve", help="OpenAI-compatible chat endpoint over a local policy")
    serve.add_argument("--model", default=None)
    serve.add_argument("--run", default=None, help="serve a run's policy with its latest LoRA")
    serve.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--name", default="siajax-policy")
    serve.set_defaults(func=_cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("sample", "serve") and args.model is None:
        from siajax.models import BUNDLED_TINY_MODEL

        args.model = BUNDLED_TINY_MODEL
    if getattr(args, "prompt", "unset") is None:
        args.prompt = ["Name the charge for this case.", "Write a fast kernel."]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
