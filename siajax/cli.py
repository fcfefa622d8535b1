"""``siajax`` command line: ``python -m siajax <command>``.

Errors a user can fix (a bad option, a missing task or run directory, a broken
config file) print one line and exit with status 2; ``--debug`` (or
SIAJAX_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EXIT_USAGE = 2


class CliError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""


def _user_errors():
    """The exception types that mean "the input is wrong", not "siajax is broken"."""
    import tomllib

    from siajax.harness import HarnessError
    from siajax.health import RunHalted
    from siajax.tasks import TaskError

    return (CliError, ValueError, KeyError, FileNotFoundError, NotADirectoryError, PermissionError, TaskError,
            HarnessError, tomllib.TOMLDecodeError, RunHalted)


def _cmd_sample(args) -> int:
    import jax

    from siajax.models import decoding_ids, from_pretrained
    from siajax.sampling import generate

    model, tokenizer = from_pretrained(args.model, dtype=args.dtype)
    decoding = decoding_ids(tokenizer)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)["input_ids"]
        for p in args.prompt
    ]
    start = time.perf_counter()
    result = generate(
        model, prompts, key=jax.random.key(args.seed), max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        stop_token_ids=decoding.stop_token_ids, pad_token_id=decoding.pad_token_id,
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
    """A live display for a run: generations with ETA, and the current step (evaluation,
    candidate harnesses, rollouts and updates, checkpoint) with its own bar."""
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
    )

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("eta"), TimeRemainingColumn(), transient=True)
    generations = progress.add_task("generations", total=config.generations)
    step = progress.add_task("", total=1, visible=False)

    def show_step(description, completed, total):
        progress.update(step, description=description, completed=completed, total=total, visible=True)

    def on_event(kind, event):
        generation = event.get("generation")
        if kind == "evaluation":
            label = "initial" if generation == -1 else f"gen {generation}"
            show_step(f"{label}: evaluating dev and test", 0, 1)
        elif kind == "deciding":
            progress.update(generations, description=f"gen {generation}: deciding")
        elif kind == "candidate":
            show_step(f"harness candidate {event['index'] + 1} ({event['kind']}) on dev", event["index"], event["of"])
        elif kind == "rollouts":
            show_step(f"gen {generation}: rollouts for update {event['update'] + 1}", event["update"],
                      config.updates_per_generation)
        elif kind == "train_step":
            show_step(f"gen {generation}: update {event['update'] + 1}/{event['of']}", event["update"] + 1,
                      event["of"])
        elif kind == "checkpoint":
            show_step(f"gen {generation}: checkpoint", 1, 1)
        elif kind == "warning":
            progress.console.print(f"warning: gen {generation}: {event['message']}")
        elif kind == "generation":
            progress.update(step, visible=False)
            progress.update(generations, completed=generation + 1, description="generations")
            progress.console.print(_generation_line(event))
    return progress, on_event


def _generation_line(entry: dict) -> str:
    d, before, after = entry["decision"], entry["before"], entry["after"]
    lever = d["lever"] + (f" ({d['recipe']})" if d["recipe"] else "")
    from siajax.report import verdict

    failed = f": {entry['failed']}" if entry.get("failed") else ""
    return (f"gen {entry['generation']}: {lever}: dev {before['dev']['score']:.3f} -> {after['dev']['score']:.3f} "
            f"({verdict(entry)}{failed}), test {after['test']['score']:.3f} | {d['rationale']}")


EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # the shell's 128 + SIGINT / SIGTERM
EXIT_IO = 74  # sysexits' EX_IOERR: the disk refused a file (full, over quota, read-only, not ours)


def _disk_refusal(err: BaseException) -> str | None:
    """One line for an OSError that means the disk refused a file, else None."""
    import errno

    refusals = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
    if not isinstance(err, OSError) or err.errno not in refusals:
        return None
    return f"{err.filename}: {err.strerror}" if err.filename else (err.strerror or str(err))


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop), raised on the main thread so a run stops as on Ctrl-C."""


def _stop_exception(signum: int) -> KeyboardInterrupt:
    import signal

    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _run_with_progress(config, run_dir, command: str = "run") -> int:
    """The loop with a live display; Ctrl-C or SIGTERM end it with 130 / 143 and the resume command
    (a generation counts once its ledger line is written, so a resume redoes the interrupted one).

    The signal is remembered as well as raised: raised inside a garbage-collection callback (JAX
    registers one) the exception is printed and swallowed, so the next progress event raises it again."""
    import signal

    from siajax import loop, report
    from siajax.parallel.distributed import is_primary

    progress, on_event = _progress_printer(config)
    received: list[int] = []

    def stop(signum, frame):
        received.append(signum)
        raise _stop_exception(signum)

    def on_event_or_stop(kind, event):
        if received:
            raise _stop_exception(received[0])
        on_event(kind, event)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with progress:  # a resume too: with the stored config, its mesh or length changed as asked
            loop.run(config, run_dir, on_event=on_event_or_stop)
    except KeyboardInterrupt as interrupt:
        terminated = isinstance(interrupt, Terminated)
        hint = f"; continue with: siajax resume {run_dir}" if Path(run_dir, "config.json").exists() else ""
        print(f"{'terminated' if terminated else 'interrupted'}{hint}", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except OSError as err:
        refusal = _disk_refusal(err)
        if refusal is None:
            raise
        kept = Path(run_dir, "config.json").exists()
        hint = f" (the run so far is kept; once the disk takes it, continue with: siajax resume {run_dir})"
        print(f"siajax {command}: error: {refusal}{hint if kept else ''}", file=sys.stderr)
        return EXIT_IO
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if is_primary():  # every process ran the loop; process 0 wrote the run
        print(f"run directory: {run_dir}\nplot: {report.report(run_dir)}")
    return 0


RUN_OPTION_GROUPS = {
    "what to run": [
        ("--task", str, "task name (see `siajax tasks`) or a task directory"),
        ("--model", str, "HF-format directory, .gguf file or hub id (default: the embedded model)"),
        ("--levers", ["harness", "weights", "both"], "harness = SIA-H, both = SIA-W+H (default)"),
        ("--generations", int, "generations to run"),
        ("--seed", int, "seed of every key and item draw"),
    ],
    "weight lever": [
        ("--recipe", str, "force the RL recipe: ppo_gae, grpo, entropic or one a recipe_modules module "
                          "registers (default: the Feedback-Agent's rule)"),
        ("--items-per-generation", int, "train prompts per update"),
        ("--updates-per-generation", int, "updates in a weights generation"),
        ("--samples-per-prompt", int, "group size of the training rollouts (default: the harness's)"),
        ("--epochs", int, "passes over each update's samples (default: the recipe's)"),
        ("--minibatches", int, "optimiser steps per pass (default: the recipe's)"),
        ("--micro-batches", int, "split each step for memory (exact)"),
        ("--target-kl", float, "stop an update's steps early past 1.5x this approx-KL"),
        ("--learning-rate", float, "LoRA learning rate (default: by the model's depth)"),
        ("--lr-schedule", ["constant", "cosine"], "learning-rate schedule (cosine decays over the run)"),
        ("--warmup-steps", int, "linear warm-up steps"),
        ("--lora-rank", int, "LoRA rank (alpha = 2 x rank)"),
        ("--loss", str, "package.module:function replacing the recipe's loss (the loss signature)"),
        ("--dtype", ["float32", "bfloat16"], "parameter and activation dtype"),
    ],
    "harness and evaluation": [
        ("--temperature", float, "sampling temperature of the initial harness"),
        ("--dev-items", int, "evaluate at most this many dev items"),
        ("--retire-finished-rows", int, "decode N tokens at a time, rows that finished leaving the batch "
                                        "(one device; 0: one decode program per call)"),
        ("--test-items", int, "evaluate at most this many test items"),
    ],
    "feedback agent": [
        ("--feedback", ["heuristic", "llm"], "who decides each generation"),
        ("--feedback-model", str, "model name at the OpenAI-compatible endpoint"),
        ("--feedback-base-url", str, "the endpoint, e.g. http://127.0.0.1:8000/v1"),
    ],
    "meta agent": [
        ("--meta", ["default", "llm"], "who writes harness v0: the task's harness.json or an LLM from task.md"),
        ("--meta-model", str, "the Meta-Agent's model name at its OpenAI-compatible endpoint"),
        ("--meta-base-url", str, "the Meta-Agent's endpoint"),
    ],
    "placement": [
        ("--mesh", str, "shard over the devices (of every process, when several run), e.g. data=2,fsdp=2,tensor=2"),
        ("--trackers", str, "comma-separated metric writers beside the ledger: tensorboard, wandb"),
    ],
}


def _add_run_options(parser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="a TOML file of run settings (field names as in RunConfig); flags override it")
    parser.add_argument("--run-dir", default=None, help="where the run writes (default: runs/<task>-<levers>-...)")
    for title, options in RUN_OPTION_GROUPS.items():
        group = parser.add_argument_group(title)
        for flag, kind, help_text in options:
            if isinstance(kind, list):
                group.add_argument(flag, default=None, choices=kind, help=help_text)
            else:
                group.add_argument(flag, type=kind, default=None, help=help_text)


def run_config_from(args):
    """RunConfig from the TOML file (if any), then every flag that was given."""
    import dataclasses

    from siajax.config import RunConfig, load_settings

    settings = {}
    if args.config is not None:
        if not args.config.is_file():
            raise CliError(f"config file {args.config} does not exist")
        settings = load_settings(args.config)
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    settings.update({k: v for k, v in vars(args).items() if k in fields and v is not None})
    return RunConfig.from_dict(settings)


def _cmd_run(args) -> int:
    import datetime

    config = run_config_from(args)
    run_dir = args.run_dir or f"runs/{Path(config.task).name}-{config.levers}-s{config.seed}-" \
                              f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return _run_with_progress(config, run_dir)


def _require_run(run_dir) -> Path:
    path = Path(run_dir)
    if not (path / "config.json").is_file():
        raise CliError(f"{run_dir} is not a siajax run directory (no config.json); start one with `siajax run`")
    return path


def _cmd_resume(args) -> int:
    import dataclasses

    from siajax.rundir import extended_config, load_config, read_ledger, replace_task_copy

    config = load_config(_require_run(args.run_dir))
    if args.update_task:
        print(f"the run's task copy so far: {replace_task_copy(config, args.run_dir)}")
    if args.generations is not None:
        config = extended_config(config, args.generations, read_ledger(Path(args.run_dir)))
    if args.mesh is not None:
        config = dataclasses.replace(config, mesh=args.mesh or None)
    return _run_with_progress(config, args.run_dir, "resume")


def _cmd_eval(args) -> int:
    from siajax.rundir import evaluate_saved

    result = evaluate_saved(_require_run(args.run_dir), args.generation, args.split)
    print(json.dumps(result, indent=1))
    return 0


def _cmd_export(args) -> int:
    from siajax.export import export_run

    out = args.out or Path(args.run_dir) / f"export-{args.format}"
    print(f"wrote {export_run(_require_run(args.run_dir), out, args.generation, args.format)}")
    return 0


def _cmd_report(args) -> int:
    from siajax.report import report

    print(f"plot: {report(_require_run(args.run_dir))}")
    if args.html:
        from siajax.html_report import write_html_report

        print(f"html: {write_html_report(args.run_dir)}")
    return 0


def _cmd_tasks(args) -> int:
    from siajax.tasks import TaskError, find_tasks

    if args.check:
        return _check_tasks(args.check)
    status = 0
    for name, task in find_tasks().items():
        if isinstance(task, TaskError):
            print(f"{name:16s} INVALID: {task}")
            status = 1
        else:
            first = next((line for line in task.description.splitlines() if line and not line.startswith("#")), "")
            print(f"{name:16s} {task.root}  reward={task.reward_kind}  {first[:70]}")
    return status


def _check_tasks(names: list[str]) -> int:
    """``siajax tasks --check``: every split, slot and demonstration of each task; exit 1 on any problem."""
    from siajax.taskcheck import check_task

    status = 0
    for name in names:
        problems = check_task(name)
        print(f"{name}: " + ("OK" if not problems else f"{len(problems)} problem(s)"))
        for problem in problems:
            print(f"  - {problem}")
        status = status or (1 if problems else 0)
    return status


def _cmd_serve(args) -> int:
    from siajax.serve import serve_from_args

    return serve_from_args(args)


def _add_run_dir_commands(sub) -> None:
    """The commands that read a finished run: eval, export, report."""
    evaluate = sub.add_parser("eval", help="re-score a saved generation on dev or test")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--generation", type=int, default=None, help="default: the last one")
    evaluate.add_argument("--split", default="test", choices=["dev", "test"])
    evaluate.set_defaults(func=_cmd_eval)

    export = sub.add_parser("export", help="a run's weights as a PEFT adapter or a merged HF checkpoint")
    export.add_argument("run_dir")
    export.add_argument("--generation", type=int, default=None, help="default: the last one")
    export.add_argument("--format", default="peft", choices=["peft", "merged"])
    export.add_argument("--out", default=None, help="default: <run_dir>/export-<format>")
    export.set_defaults(func=_cmd_export)

    report = sub.add_parser("report", help="per-generation table and score plot of a run")
    report.add_argument("run_dir")
    report.add_argument("--html", action="store_true",
                        help="also write report.html: one self-contained page (plot, table, harness diffs, "
                             "candidates, updates, failures with examples, time)")
    report.set_defaults(func=_cmd_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="siajax", description="Self-improving AI in JAX.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also SIAJAX_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    sample = sub.add_parser("sample", help="sample from a policy model")
    sample.add_argument("--model", default=None, help="HF-format directory, .gguf file or hub id")
    sample.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    sample.add_argument("--prompt", action="append", default=None)
    sample.add_argument("--max-new-tokens", type=int, default=48)
    sample.add_argument("--temperature", type=float, default=0.8)
    sample.add_argument("--top-k", type=int, default=0)
    sample.add_argument("--top-p", type=float, default=0.95)
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=_cmd_sample)

    run = sub.add_parser("run", help="run the SIA loop on a task")
    _add_run_options(run)
    run.set_defaults(func=_cmd_run)

    resume = sub.add_parser("resume", help="continue a run after a crash or stop")
    resume.add_argument("run_dir")
    resume.add_argument("--mesh", default=None, help="continue on another mesh ('' for one device)")
    resume.add_argument("--update-task", action="store_true",
                        help="go on with the task as it is now (e.g. a fixed verifier), not the run's copy")
    resume.add_argument("--generations", type=int, default=None,
                        help="run to this many generations in all (extends a finished run)")
    resume.set_defaults(func=_cmd_resume)

    _add_run_dir_commands(sub)

    tasks = sub.add_parser("tasks", help="list the tasks found (bundled and $SIAJAX_TASKS_PATH)")
    tasks.add_argument("--check", nargs="+", metavar="NAME", default=None,
                       help="read every split of these tasks (names or directories) and check their items, "
                            "template slots and demonstrations; exit 1 on any problem")
    tasks.set_defaults(func=_cmd_tasks)

    serve = sub.add_parser(
        "serve", help="OpenAI-compatible chat endpoint over a local policy",
        description="Serves POST /v1/chat/completions (streamed as tokens are decoded) and GET /v1/models on "
                    "loopback for the openai client and tools built on it. With --run: the run's policy with its "
                    "latest LoRA, and its harness around every chat (its system prompt before the client's, its "
                    "few-shot turns, the template, its sampling settings as defaults). One line per request on "
                    "stderr.")
    source = serve.add_mutually_exclusive_group()
    source.add_argument("--model", default=None,
                        help="HF-format directory, .gguf file or hub id (default: the embedded SmolLM2)")
    source.add_argument("--run", default=None, help="a run directory: serve its policy and harness")
    serve.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                       help="parameters and activations (with --model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on, checked before loading (0: any free)")
    serve.add_argument("--name", default="siajax-policy",
                       help="the model name clients ask for; other names get 404")
    serve.add_argument("--context", type=int, default=None,
                       help="most prompt + completion tokens a request may take (default: the checkpoint's "
                            "max_position_embeddings; larger relies on RoPE extrapolating)")
    serve.add_argument("--quiet", action="store_true", help="no request log")
    serve.set_defaults(func=_cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("SIAJAX_DEBUG") == "1"
    if args.command in ("sample", "serve") and args.model is None and not getattr(args, "run", None):
        from siajax.models.hf_import import EMBEDDED_DEFAULT  # RunConfig's default model too

        args.model = EMBEDDED_DEFAULT
    if getattr(args, "prompt", "unset") is None:
        args.prompt = ["Name the charge for this case.", "Write a fast kernel."]
    # Not for serve: it compiles on its handler threads, where a cache write once crashed (CI, 2026-12-04).
    if args.command in ("run", "resume"):  # several processes (hosts) run the same command: join them first
        from siajax.parallel.distributed import initialize_from_env

        initialize_from_env()
    if args.command in ("sample", "run", "resume", "eval"):
        from siajax.cache import enable_compilation_cache

        enable_compilation_cache()  # a second run of the same config compiles nothing
    _one_line_warnings()
    try:
        return args.func(args)
    except BrokenPipeError:  # `siajax tasks | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:
        refusal = _disk_refusal(err)  # a full or read-only disk: one line, not a traceback
        if debug or (refusal is None and not isinstance(err, _user_errors())):
            raise
        if refusal is not None:
            print(f"siajax {args.command}: error: {refusal}", file=sys.stderr)
            return EXIT_IO
        message = str(err).strip()
        message = (message.strip("'\"") if isinstance(err, KeyError) else message) or type(err).__name__  # KeyError quotes
        print(f"siajax {args.command}: error: {message.splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE


def _one_line_warnings() -> None:
    """siajax's own warnings (e.g. a run's task changed since) as one line, without the source line."""
    import warnings

    from siajax.tasks import TaskChanged

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, TaskChanged):
            print(f"siajax: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def entry() -> None:
    """The ``siajax`` command: an interrupted run leaves without the interpreter's teardown, where
    JAX's and orbax's threads segfaulted in 3 of 6 Ctrl-C tries (its files are closed and fsynced)."""
    code = main()
    if code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
