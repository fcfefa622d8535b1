"""Sampler compile against depth, and decode speed, for the two ways the decode step runs the layers.

``ModelConfig.decode_unroll=True`` unrolls the layers over per-layer weight copies; ``False`` (the
default) scans the stacked block. Both are measured in one process on random Llamas shaped like
SmolLM2-135M (d=576, 9 / 3 heads, MLP 1,536, vocab 49,152) at each depth asked for, from 32-token
prompts (greedy, or sampled at ``--temperature``): the first call's compile seconds (``siajax.timing``) and the best warm decode
seconds of the calls after it, interleaved so that both paths see the same machine load.

    python experiments/bench_decode_depth.py [--layers 4 32] [--batches 1 8 32] [--new-tokens 128] [--temperature 0]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.benchmarking import smollm2_135m_config
from siajax import timing
from siajax.models import Transformer
from siajax.sampling import generate


def timed_call(model, prompts, new_tokens: int, temperature: float) -> tuple[dict, int]:
    """-> (the call's phase seconds, generated tokens)."""
    with timing.measuring() as clock:
        result = generate(model, prompts, key=jax.random.key(0), max_new_tokens=new_tokens, temperature=temperature)
        jax.block_until_ready(result.tokens)
    return clock.summary()["phases"], int(jnp.sum(result.lengths))


def measure(layers: int, batch: int, new_tokens: int, repeats: int, temperature: float = 0.0) -> dict:
    """Both paths at one depth and batch: compile of the first call, best warm decode after it."""
    models = {name: Transformer(smollm2_135m_config(layers, decode_unroll=name == "unrolled"), rngs=nnx.Rngs(0))
              for name in ("unrolled", "scan")}
    prompts = [[int(t) for t in np.random.RandomState(r).randint(3, 4000, size=32)] for r in range(batch)]
    rows = {name: {"decode_s": []} for name in models}
    for repeat in range(repeats + 1):
        for name, model in models.items():
            phases, tokens = timed_call(model, prompts, new_tokens, temperature)
            if repeat == 0:
                rows[name]["compile_s"] = round(phases["compile"], 2)
            else:
                rows[name]["decode_s"].append(phases["decode"])
            rows[name]["tokens"] = tokens
    for row in rows.values():
        row["decode_s"] = round(min(row["decode_s"]), 2)
        row["tokens_per_s"] = round(row["tokens"] / row["decode_s"], 1)
    return {"layers": layers, "batch": batch, "new_tokens": new_tokens, "temperature": temperature, **rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 32])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--out", type=Path, default=Path("experiments/out/bench_decode_depth.json"))
    args = parser.parse_args()
    results = []
    for layers in args.layers:
        for batch in args.batches:
            results.append(measure(layers, batch, args.new_tokens, args.repeats, args.temperature))
            print(json.dumps(results[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
