"""Shared prompts vs one prompt per row, side by side in one process, on a random SmolLM2-135M-shaped Llama.

A group of G samples of one prompt runs the prompt once, and prompts that open
alike (the harness's system prompt and few-shot examples) run that opening once:
the sampler prefills each distinct prompt (after the common prefix, run as one
row) and copies the KV cache to the rows that continue it; the learner's scoring
and train step do the same before running the responses. Two workloads:

- ``grouped``: one LawBench-length prompt (``--prompt-len``, ~1,000 tokens)
  sampled G = 8 times (prefill alone); then the learner on the main job's update
  (4 prompts x 8 rows, 48-token prompts, 24-token responses);
- ``few_shot``: prompts that share a ``--prefix-len``-token opening and end in
  their own 16-48-token item: 16 distinct ones (an evaluation call, prefill
  alone), then the learner on 4 of them x 8 rows (24-token responses).

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
from siajax.prompts import distinct_prompts, left_pad, prompt_sharing
from siajax.sampling import DecodeSpec, _prefill
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


def prefixed_prompts(prompts: int, group: int, prefix_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``prompts`` distinct prompts opening with the same ``prefix_len`` tokens, each ending in its own
    16-48 tokens, each repeated ``group`` times."""
    rng = np.random.RandomState(seed)
    opening = list(rng.randint(3, vocab, prefix_len))
    distinct = [opening + list(rng.randint(3, vocab, rng.randint(16, 49))) for _ in range(prompts)]
    return [prompt for prompt in distinct for _ in range(group)]


def bench_prefill(model, prompts: list[list[int]], repeats: int) -> dict:
    """The sampler's prefill program over every row vs over what the rows share (distinct prompts,
    their common prefix)."""
    graphdef, state = nnx.split(model)
    tokens, mask = left_pad(prompts, 0)
    spec = DecodeSpec(max_new_tokens=16, pad_token_id=0)
    shared = prompt_sharing(tokens, mask)
    key, temperature, top_p = jax.random.key(0), jnp.float32(1.0), jnp.float32(1.0)
    live = jnp.int32(len(prompts))

    def prefill(table):
        jax.block_until_ready(_prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), live, key,
                                       temperature, top_p, spec, shared=table))

    return {"rows": len(prompts), "distinct_rows": int(shared.tokens.shape[0]), "prompt_len": int(tokens.shape[1]),
            "prefix_slots": 0 if shared.prefix is None else int(shared.prefix.tokens.shape[1]),
            "per_row_s": median_seconds(partial(prefill, None), repeats),
            "shared_s": median_seconds(partial(prefill, shared), repeats)}


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
    prompts = (batch.tokens[:, :prompt_len], batch.attention_mask[:, :prompt_len])
    distinct, shared = distinct_prompts(*prompts), prompt_sharing(*prompts)
    tables = [("per_row", None), ("distinct", distinct)] + ([("shared", shared)] if shared.prefix is not None else [])
    figures = {}
    for name, table in tables:
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
    return {"rows": int(batch.tokens.shape[0]), "distinct_rows": int(distinct.tokens.shape[0]),
            "prompt_len": int(prompt_len), "response_len": response_len,
            "prefix_slots": 0 if shared.prefix is None else int(shared.prefix.tokens.shape[1]), **figures}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--prompt-len", type=int, default=1000, help="prefill: LawBench-length prompts")
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prefix-len", type=int, default=160, help="few_shot: the shared opening's tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("experiments/out/bench_shared_prompts.json"))
    args = parser.parse_args()

    model = smollm2_shaped(args.layers)
    vocab = model.config.vocab_size
    workloads = {
        "grouped": (grouped_prompts(1, args.group, args.prompt_len, vocab), grouped_prompts(4, 8, 48, vocab, seed=1)),
        "few_shot": (prefixed_prompts(16, 1, args.prefix_len, vocab), prefixed_prompts(4, 8, args.prefix_len, vocab)),
    }
    results = {}
    for name, (prefill_prompts, learner_prompts) in workloads.items():
        prefill = bench_prefill(model, prefill_prompts, args.repeats)
        print(f"{name} prefill, {prefill['rows']} rows, {prefill['distinct_rows']} distinct, "
              f"{prefill['prompt_len']}-token bucket: per row {prefill['per_row_s']:.2f} s, shared "
              f"{prefill['shared_s']:.2f} s ({prefill['per_row_s'] / prefill['shared_s']:.2f}x)")
        learner = bench_learner(model, learner_batch(learner_prompts, 24, vocab), 24, args.repeats)
        for part in ("score", "train_step"):
            shared = [key for key in ("distinct", "shared") if f"{part}_{key}_s" in learner]
            print(f"{name} {part}, 32 rows of 4 prompts: per row {learner[f'{part}_per_row_s']:.2f} s, " + ", ".join(
                f"{key} {learner[f'{part}_{key}_s']:.2f} s ({learner[f'{part}_per_row_s'] / learner[f'{part}_{key}_s']:.2f}x)"
                for key in shared))
        results[name] = {"prefill": prefill, "learner": learner}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"layers": args.layers, "backend": jax.default_backend(),
                                    "cpu_count": os.cpu_count(), "machine": platform.machine(),
                                    "prefix_len": args.prefix_len, **results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
