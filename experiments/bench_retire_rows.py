"""Rows that finish leave the batch vs one decode program for the whole call, side by side in one
process, on a random SmolLM2-135M-shaped Llama.

A call mixes short and long answers (``--short`` 24 and ``--long`` 512 tokens by default; a
quarter of the rows long). With one decode program every row computes until the longest stops;
with ``generate(..., retire_finished_rows=N)`` the sampler decodes N tokens at a time and the rows
that stopped leave the batch between chunks (the batch cut to the next power of two).

The lengths are made, not hoped for: both paths sample at temperature 1 with per-row keys (a row
draws the same tokens whoever shares its batch; checked), and each short row's stop id is the
latest token it draws between steps ``--short`` / 2 and ``--short`` in one unstopped pass that no
long row draws and no short row draws before step ``--short`` / 2.

Each path runs once per batch; its decode seconds exclude compile time (``siajax.timing``).

    python experiments/bench_retire_rows.py [--batches 8 32] [--every 32] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: experiments.* imports

import jax
import numpy as np
from flax import nnx

from experiments.benchmarking import smollm2_135m_config
from siajax import timing
from siajax.models import Transformer
from siajax.sampling import generate


def smollm2_shaped(layers: int) -> Transformer:
    config = smollm2_135m_config(layers)
    return Transformer(config, rngs=nnx.Rngs(0))


def sample(model, prompts, max_new_tokens: int, every: int, stops=()):
    """Temperature-1 samples with per-row keys (``retire_finished_rows``): a row draws the same tokens
    whoever shares its batch, so both paths answer alike. ``every`` >= ``max_new_tokens`` is one
    decode program over the whole call (no row leaves before the end)."""
    out = generate(model, prompts, key=jax.random.key(0), max_new_tokens=max_new_tokens, temperature=1.0,
                   stop_token_ids=stops, pad_token_id=0, retire_finished_rows=every)
    return jax.block_until_ready(out)


def mixed_call(model, batch: int, short: int, long: int, seed: int = 0):
    """-> (prompts, stop ids) whose answers are ``short`` / 2 to ``short`` tokens for 3/4 of the rows and
    ``long`` for the rest: each short row stops on the latest token it draws by step ``short`` that no
    long row draws at all and no short row draws before step ``short`` / 2 (from one unstopped pass)."""
    rng = np.random.RandomState(seed)
    prompts = [list(rng.randint(3, 49152, 24 + rng.randint(8))) for _ in range(batch)]
    drawn = np.asarray(sample(model, prompts, long, every=long).tokens)
    long_rows, short_rows = drawn[: batch // 4], drawn[batch // 4:]
    never = set(long_rows.ravel().tolist()) | set(short_rows[:, : short // 2].ravel().tolist())
    stops = []
    for row in short_rows:
        late = [int(t) for t in row[short - 1:short // 2 - 1:-1] if int(t) not in never]
        if not late:
            raise SystemExit("a short row draws no token of its own late enough; try another --seed")
        stops.append(late[0])
    return prompts, sorted(set(stops))


def timed(model, prompts, long: int, every: int, stops) -> tuple[object, dict]:
    """-> (result, seconds by phase): the sampler's decode seconds exclude compiling (siajax.timing
    moves JAX's compile events out), so one call per path is a warm figure."""
    with timing.measuring() as clock:
        result = sample(model, prompts, long, every, stops)
    return result, dict(clock.seconds)


def compare(model, batch: int, short: int, long: int, every: int) -> dict:
    prompts, stops = mixed_call(model, batch, short, long)
    (whole, whole_s), (retired, retired_s) = (timed(model, prompts, long, e, stops) for e in (long, every))
    np.testing.assert_array_equal(np.asarray(whole.tokens), np.asarray(retired.tokens))  # same answers
    lengths = np.asarray(whole.lengths)
    tokens = int(lengths.sum())
    decode = {"one_program": whole_s["decode"], "retiring": retired_s["decode"]}
    return {"batch": batch, "every": every, "short_rows_lengths": sorted(set(lengths[batch // 4:].tolist())),
            "long_rows_lengths": sorted(set(lengths[: batch // 4].tolist())), "generated_tokens": tokens,
            "decode_seconds": decode, "compile_seconds": {"one_program": whole_s.get("compile", 0.0),
                                                          "retiring": retired_s.get("compile", 0.0)},
            "tokens_per_s": {k: tokens / v for k, v in decode.items()},
            "ratio": decode["one_program"] / decode["retiring"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--short", type=int, default=24)
    parser.add_argument("--long", type=int, default=512)
    parser.add_argument("--every", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("experiments/out/bench_retire_rows.json"))
    args = parser.parse_args()
    model = smollm2_shaped(args.layers)
    report = {"layers": args.layers, "device": str(jax.devices()[0]), "machine": platform.processor() or
              platform.machine(), "date": time.strftime("%Y-%m-%d"), "results": []}
    for batch in args.batches:
        result = compare(model, batch, args.short, args.long, args.every)
        report["results"].append(result)
        print(json.dumps(result), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
