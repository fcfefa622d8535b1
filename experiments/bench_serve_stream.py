"""What streaming costs and buys: ``siajax.sampling.generate`` (one decode program, the result at the
end) vs ``siajax.sampling.stream`` (the same program in chunks, tokens read after each), side by side
in one process on a random SmolLM2-135M-shaped Llama (30 layers, d=576, V=49,152), float32.

Reports, per batch size, the median over ``--repeats`` of: generate's completion time, stream's
completion time (their ratio is the cost of reading tokens as they come), and stream's time to the
first token (what a streaming client waits before text appears). No stop token: every row decodes
``--new-tokens`` tokens. Compile and warm-up are excluded.

    python experiments/bench_serve_stream.py [--layers 30] [--new-tokens 64] [--rows 1 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: experiments.* imports

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from experiments.benchmarking import smollm2_135m_config  # noqa: E402
from siajax.models import Transformer  # noqa: E402
from siajax.sampling import generate, stream  # noqa: E402


def timed_generate(model, prompts, new_tokens: int) -> float:
    start = time.perf_counter()
    result = generate(model, prompts, key=jax.random.key(0), max_new_tokens=new_tokens, temperature=1.0)
    jax.block_until_ready(result.tokens)
    return time.perf_counter() - start


def timed_stream(model, prompts, new_tokens: int, chunk_tokens: int) -> tuple[float, float]:
    """-> (seconds to the first token, seconds to the last)."""
    start, first = time.perf_counter(), None
    for chunk in stream(model, prompts, key=jax.random.key(0), max_new_tokens=new_tokens, temperature=1.0,
                        chunk_tokens=chunk_tokens):
        if first is None and any(chunk.tokens):
            first = time.perf_counter() - start
    return first, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--chunk-tokens", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    model = Transformer(smollm2_135m_config(args.layers), rngs=nnx.Rngs(0))
    rng = np.random.RandomState(0)
    report = {"platform": platform.platform(), "devices": str(jax.devices()), "layers": args.layers,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "chunk_tokens": args.chunk_tokens,
              "rows": {}}
    for rows in args.rows:
        prompts = rng.randint(3, 49152, size=(rows, args.prompt_tokens)).tolist()
        timed_generate(model, prompts, args.new_tokens)
        timed_stream(model, prompts, args.new_tokens, args.chunk_tokens)  # compile both
        whole = statistics.median(timed_generate(model, prompts, args.new_tokens) for _ in range(args.repeats))
        streamed = [timed_stream(model, prompts, args.new_tokens, args.chunk_tokens) for _ in range(args.repeats)]
        first = statistics.median(s[0] for s in streamed)
        last = statistics.median(s[1] for s in streamed)
        report["rows"][rows] = {"generate_s": whole, "stream_first_token_s": first, "stream_last_token_s": last,
                                "stream_over_generate": last / whole, "first_token_over_completion": first / last}
        print(f"rows {rows}: generate {whole:.3f} s | stream first token {first:.3f} s, last {last:.3f} s "
              f"({last / whole:.2f}x generate; first token at {100 * first / last:.1f}% of the completion)",
              flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
