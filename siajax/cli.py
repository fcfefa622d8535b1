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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "model", "unset") is None:
        from siajax.models import BUNDLED_TINY_MODEL

        args.model = BUNDLED_TINY_MODEL
    if getattr(args, "prompt", "unset") is None:
        args.prompt = ["Name the charge for this case.", "Write a fast kernel."]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
