"""A train step past the KL limit against one that applies, side by side in one process.

A step whose forward pass finds the policy past the update's KL limit is not
applied, so :func:`siajax.train.train_step_fn` skips its backward pass (one
micro-batch). Both steps here are the same jitted GRPO step (Adam, the KL
guard) on the same state and minibatch of a random SmolLM2-135M-shaped Llama,
the main job's minibatch shape (16 rows, 64-token prompts, 24-token responses);
only the limit differs (none, and -1, which every approx-KL >= 0 passes).

    python experiments/bench_kl_stop.py [--layers 30] [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: experiments.* imports

import jax
import optax

from experiments.bench_model_core import grpo_batch
from experiments.bench_shared_prompts import smollm2_shaped
from experiments.benchmarking import median_seconds
from siajax.rl import GRPOConfig, grpo_loss
from siajax.train import init_train_state, make_policy_loss, split_policy, train_step_fn, with_full_batch_normaliser

CFG = GRPOConfig(kl_coef=0.04)


def step_seconds(layers: int, repeats: int) -> dict:
    """Median seconds of one applied step and of one step past the KL limit."""
    model = smollm2_shaped(layers)
    parts, params, frozen = split_policy(model)
    optimizer = optax.adam(1e-5)
    batch = grpo_batch(16, 64, 24, model.config.vocab_size)[1]
    row = {"layers": layers, "rows": 16, "prompt_tokens": 64, "response_tokens": 24}
    for label, limit in (("applied", None), ("past_kl_limit", -1.0)):
        step = jax.jit(train_step_fn(make_policy_loss(parts, grpo_loss, CFG), optimizer, max_approx_kl=limit,
                                     prepare_batch=partial(with_full_batch_normaliser, aggregation=CFG.aggregation)))
        state = init_train_state(params, optimizer, 0)
        _, metrics = jax.block_until_ready(step(state, frozen, batch))
        if int(metrics["kl_stop"]) != (limit is not None):
            raise RuntimeError(f"the {label} step's kl_stop reads {int(metrics['kl_stop'])}")
        row[f"{label}_s"] = median_seconds(lambda: jax.block_until_ready(step(state, frozen, batch)), repeats)
    row["ratio"] = row["past_kl_limit_s"] / row["applied_s"]
    print(f"train step ({layers} layers, 16 rows): applied {row['applied_s']:.2f} s, past the KL limit "
          f"{row['past_kl_limit_s']:.2f} s ({row['ratio']:.2f} of it)", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("experiments/out/bench_kl_stop.json"))
    args = parser.parse_args()
    row = step_seconds(args.layers, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**row, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
                                    "machine": platform.machine()}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
