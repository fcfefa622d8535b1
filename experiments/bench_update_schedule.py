"""One RL update's schedule as one compiled program vs a step per call, side by side in one process.

Both run the same pure train step (GRPO loss, Adam, the KL guard) over the same
epochs x minibatches schedule on the same batch:

- ``per_step``: the driver siajax had before: the host draws each epoch's
  permutation, gathers each minibatch with a jitted ``take_rows``, calls the
  jitted step and reads its metrics (a host sync per step, for the KL stop);
- ``scheduled``: :func:`siajax.train.learner.scheduled_steps`, the whole
  schedule in one ``lax.while_loop``, metrics read once per update.

Shapes: the main job's update (32 rows = 4 prompts x 8, 64-token prompts,
24-token responses) on a random SmolLM2-135M-shaped Llama and on the bundled
tiny model, under PPO's default schedule (2 epochs x 4 minibatches). Reports
the first call (compile included) and the median of ``--repeats`` warm calls.
``--trace-only`` reports instead the seconds JAX spends tracing the scheduled
program (Python, before lowering and compiling: paid on every first run).

    python experiments/bench_update_schedule.py [--layers 30] [--repeats 5] [--trace-only] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: experiments.* imports

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.bench_model_core import grpo_batch
from experiments.bench_shared_prompts import smollm2_shaped
from experiments.benchmarking import median_seconds
from siajax.models import BUNDLED_TINY_MODEL, LoRAConfig, add_lora, from_pretrained
from siajax.rl import GRPOConfig, grpo_loss
from siajax.train import init_train_state, make_policy_loss, split_policy, take_rows, train_step_fn, with_full_batch_normaliser
from siajax.train.learner import DEFAULT_SCHEDULES, scheduled_steps

CFG = GRPOConfig(kl_coef=0.04)


def per_step_driver(step, schedule):
    """The old shell: a host permutation per epoch, a jitted gather and a jitted step per minibatch."""
    jitted_step, gather = jax.jit(step, donate_argnums=0), jax.jit(take_rows)

    def update(state, frozen, batch):
        rows = batch.tokens.shape[0]
        shuffle = np.random.default_rng(int(jax.device_get(state.step)))
        for _ in range(schedule.epochs):
            order = shuffle.permutation(rows)
            for start in range(0, rows, rows // schedule.minibatches):
                minibatch = gather(batch, jnp.asarray(order[start:start + rows // schedule.minibatches]))
                state, metrics = jitted_step(state, frozen, minibatch)
                if float(metrics["kl_stop"]):  # the host reads every step's metrics
                    return state
        return state
    return update


def scheduled_driver(step, schedule):
    program = jax.jit(scheduled_steps(step, schedule), donate_argnums=0)

    def update(state, frozen, batch):
        state, (per_step, steps_run) = program(state, frozen, batch)
        jax.device_get((per_step, steps_run))
        return state
    return update


def grpo_step(model):
    """-> (the pure GRPO train step, trainable params, frozen base, optimizer) for ``model``."""
    parts, params, frozen = split_policy(model)
    optimizer = optax.adam(1e-5)
    step = train_step_fn(make_policy_loss(parts, grpo_loss, CFG), optimizer,
                         prepare_batch=partial(with_full_batch_normaliser, aggregation=CFG.aggregation))
    return step, params, frozen, optimizer


def trace_seconds(name: str, model, batch, schedule, repeats: int) -> dict:
    """Median seconds to trace the scheduled program (a fresh program each time: no trace cache)."""
    step, params, frozen, optimizer = grpo_step(model)
    state = init_train_state(params, optimizer, 0)
    seconds = median_seconds(lambda: jax.jit(scheduled_steps(step, schedule)).trace(state, frozen, batch),
                             repeats, warmup=1)
    print(f"{name:>14}  trace {seconds:.2f} s", flush=True)
    return {"model": name, "trace_s": seconds}


def bench(name: str, model, batch, schedule, repeats: int) -> dict:
    step, params, frozen, optimizer = grpo_step(model)
    row = {"model": name}
    for label, make in (("per_step", per_step_driver), ("scheduled", scheduled_driver)):
        update, holder = make(step, schedule), {"state": init_train_state(params, optimizer, 0)}

        def run():
            holder["state"] = update(holder["state"], frozen, batch)
            jax.block_until_ready(holder["state"].params)

        start = time.perf_counter()
        run()
        row[f"{label}_first_s"] = time.perf_counter() - start
        row[f"{label}_s"] = median_seconds(run, repeats, warmup=0)
    row["speedup"] = row["per_step_s"] / row["scheduled_s"]
    print(f"{name:>14}  per-step {row['per_step_s'] * 1e3:8.1f} ms (first {row['per_step_first_s']:.1f} s)  "
          f"scheduled {row['scheduled_s'] * 1e3:8.1f} ms (first {row['scheduled_first_s']:.1f} s)  "
          f"{row['speedup']:.2f}x", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trace-only", action="store_true", help="time tracing the scheduled program only")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.out = args.out or Path(f"experiments/out/bench_update_{'trace' if args.trace_only else 'schedule'}.json")
    schedule, measure = DEFAULT_SCHEDULES["ppo_gae"], trace_seconds if args.trace_only else bench
    tiny, _ = from_pretrained(BUNDLED_TINY_MODEL)
    add_lora(tiny, LoRAConfig(rank=8, alpha=16), key=jax.random.key(0))
    rows = [measure("tiny-llama", tiny, grpo_batch(32, 64, 24, tiny.config.vocab_size)[1], schedule, args.repeats)]
    big = smollm2_shaped(args.layers)
    rows.append(measure(f"smollm2-{args.layers}L", big, grpo_batch(32, 64, 24, big.config.vocab_size)[1], schedule,
                        args.repeats))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"schedule": dataclasses.asdict(schedule),
                                    "rows_per_update": 32, "backend": jax.default_backend(),
                                    "cpu_count": os.cpu_count(), "machine": platform.machine(), "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
