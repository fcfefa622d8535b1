"""The sampler's per-step token draw: the Gumbel trick against one uniform per row on the running sum.

Both draw one token per row from random float32 logits over SmolLM2's vocabulary (49,152), jitted, in
one process, alternating calls; reported as median milliseconds and their ratio. The decode step of a
135M model at batch 32 takes ~150 ms on 2 CPU cores, so the draw is a visible part of it.

    python experiments/bench_draw.py [--batches 1 8 32] [--vocab 49152] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root

import jax

from experiments.benchmarking import median_seconds
from siajax.sampling import categorical_by_inverse_cdf

DRAWS = {
    "gumbel": jax.jit(lambda key, logits: jax.random.categorical(key, logits, axis=-1)),
    "inverse_cdf": jax.jit(categorical_by_inverse_cdf),
}


def measure(batch: int, vocab: int, repeats: int) -> dict:
    logits = jax.random.normal(jax.random.key(1), (batch, vocab))
    keys = iter(jax.random.split(jax.random.key(2), 10 * repeats + 10))
    row = {"batch": batch, "vocab": vocab}
    for name, draw in DRAWS.items():
        seconds = median_seconds(lambda: draw(next(keys), logits).block_until_ready(), repeats, warmup=2)
        row[f"{name}_ms"] = round(seconds * 1e3, 2)
    row["speedup"] = round(row["gumbel_ms"] / row["inverse_cdf_ms"], 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("experiments/out/bench_draw.json"))
    args = parser.parse_args()
    rows = [measure(batch, args.vocab, args.repeats) for batch in args.batches]
    for row in rows:
        print(json.dumps(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
