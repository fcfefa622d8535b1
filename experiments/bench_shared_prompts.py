"""Shared prompts vs one prompt per row, side by side in one process, on a random SmolLM2-135M-shaped Llama.

A group of G samples of one prompt runs the prompt once: the sampler prefills
each distinct prompt and copies its KV cache to its G rows; the learner's
scoring and train step run each distinct prompt once and the responses over
its keys and values. Two shapes:

- ``prefill``: LawBench-length prompts (``--prompt-len``, ~1,000 tokens), G = 8,
  the sampler's prefill program alone (what sharing changes);
- ``learner``: the main job's update (4 prompts x 8 rows, 64-token prompts,
  24-token responses): scoring (old + reference) and one GRPO train step.

Compile and warm-up are excluded; each figure is the median of ``--repeats`` runs.

    python experiments/bench_shared_prompts.py [--layers 30] [--out FILE]
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
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.benchmarking import median_seconds, smollm2_135m_config
from siajax.models import LoRAConfig, Transformer, add_lora
from siajax.rl import GRPOConfig, RLBatch, grpo_loss
from siajax.sampling import DecodeSpec, _prefill, distinct_prompts, left_pad
from siajax.train import (TrainBatch, init_train_state, make_policy_loss, make_train_step, score_responses,
                          split_policy, with_full_batch_normaliser)


def smollm2_shaped(layers: int) -> Transformer:
    config = smollm2_135m_config(layers)
    model = Transformer(config, rngs=nnx.Rngs(0))
    add_lora(model, LoRAConfig(rank=8, alpha=16), key=jax.random.key(0))
    return model


def grouped_prompts(prompts: int, group: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    distinct = [list(rng.randint(3, vocab, length - rng.randint(length // 8))) for _ in range(prompts)]
    return [prompt for prompt in distinct for _ in range(group)]


def bench_prefill(model, prompts: list[list[int]], repeats: int) -> dict:
    """The sampler's prefill program over every row vs over the distinct prompts."""
    graphdef, state = nnx.split(model)
    tokens, mask = left_pad(prompts, 0)
    spec = DecodeSpec(max_new_tokens=16, pad_token_id=0)
    distinct = distinct_prompts(tokens, mask)
    key, temperature, top_p = jax.random.key(0), jnp.float32(1.0), jnp.float32(1.0)
    live = jnp.int32(len(prompts))

    def per_row():
        jax.block_until_ready(_prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), live, key,
                                       temperature, top_p, spec))

    def shared():
        jax.block_until_ready(_prefill(graphdef, state, distinct.tokens, distinct.mask, live, key, temperature,
                                       top_p, spec, row_source=distinct.row_source))

    return {"rows": len(prompts), "distinct_rows": int(distinct.tokens.shape[0]), "prompt_len": int(tokens.shape[1]),
            "per_row_s": median_seconds(per_row, repeats), "shared_s": median_seconds(shared, repeats)}


def learner_batch(prompts: list[list[int]], response_len: int, vocab: int, seed: int = 0) -> TrainBatch:
    rng = np.random.RandomState(seed)
    prompt_tokens, prompt_mask = left_pad(prompts, 0)
    rows = len(prompts)
    mask = np.arange(response_len)[None] < rng.randint(response_len // 2, response_len + 1, rows)[:, None]
    tokens = np.concatenate([prompt_tokens, rng.randint(3, vocab, (rows, response_len))], axis=1)
    old = -rng.rand(rows, response_len).astype(np.float32) * 5
    rl = RLBatch(jnp.asarray(mask), jnp.asarray(old), jnp.asarray(rng.randn(rows, response_len), jnp.float32),
                 jnp.asarray(old + 0.05 * rng.randn(rows, response_len).astype(np.float32)))
    return TrainBatch(jnp.asarray(tokens, jnp.int32), jnp.asarray(np.concatenate([prompt_mask, mask], axis=1)), rl)


def bench_learner(model, batch: TrainBatch, response_len: int, repeats: int) -> dict:
    """Scoring (old + reference policy) and one GRPO step, every row's prompt vs the distinct ones."""
    cfg = GRPOConfig()
    parts, params, frozen = split_policy(model)
    optimizer = optax.adam(1e-4)
    step = make_train_step(make_policy_loss(parts, grpo_loss, cfg), optimizer,
                           prepare_batch=partial(with_full_batch_normaliser, aggregation=cfg.aggregation))
    prompt_len = batch.tokens.shape[1] - response_len
    shared = distinct_prompts(batch.tokens[:, :prompt_len], batch.attention_mask[:, :prompt_len])
    figures = {}
    for name, table in (("per_row", None), ("shared", shared)):
        def score(table=table):
            for lora in (True, False):
                jax.block_until_ready(score_responses(parts, params, frozen, batch.tokens, batch.attention_mask,
                                                      response_len, lora=lora, shared=table))

        holder = {"state": init_train_state(params, optimizer, 0)}

        def train(table=table):
            holder["state"], metrics = step(holder["state"], frozen, batch._replace(shared_prompts=table))
            jax.block_until_ready(metrics["loss"])

        figures[f"score_{name}_s"] = median_seconds(score, repeats)
        figures[f"train_step_{name}_s"] = median_seconds(train, repeats)
    return {"rows": int(batch.tokens.shape[0]), "distinct_rows": int(shared.tokens.shape[0]),
            "prompt_len": int(prompt_len), "response_len": response_len, **figures}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--prompt-len", type=int, default=1000, help="prefill: LawBench-length prompts")
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("experiments/out/bench_shared_prompts.json"))
    args = parser.parse_args()

    model = smollm2_shaped(args.layers)
    vocab = model.config.vocab_size
    prefill = bench_prefill(model, grouped_prompts(1, args.group, args.prompt_len, vocab), args.repeats)
    print(f"prefill, {prefill['rows']} rows of one {prefill['prompt_len']}-token prompt: per row "
          f"{prefill['per_row_s']:.2f} s, shared {prefill['shared_s']:.2f} s "
          f"({prefill['per_row_s'] / prefill['shared_s']:.2f}x)")
    learner = bench_learner(model, learner_batch(grouped_prompts(4, 8, 48, vocab, seed=1), 24, vocab), 24,
                            args.repeats)
    for part in ("score", "train_step"):
        per_row, shared = learner[f"{part}_per_row_s"], learner[f"{part}_shared_s"]
        print(f"{part}, 32 rows of 4 prompts: per row {per_row:.2f} s, shared {shared:.2f} s "
              f"({per_row / shared:.2f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"layers": args.layers, "backend": jax.default_backend(),
                                    "cpu_count": os.cpu_count(), "machine": platform.machine(),
                                    "prefill": prefill, "learner": learner}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
