"""Tunix's sampler on an HF Llama checkpoint: timings for ``bench_tunix_sampling.py``.

Runs inside the benchmark's own virtual environment (google-tunix and its
dependencies, with the same jax/jaxlib/flax as siajax), so nothing of tunix is
imported into siajax's environment. Reads a JSON request on stdin
(``model_dir``, ``prompts`` as texts per batch, ``new_tokens``, ``repeats``)
and prints one JSON line: the median seconds of a whole ``Sampler`` call per
batch size (compile and warm-up excluded), the prompt ids it fed (tunix puts
the tokenizer's BOS first) and the tokens each row drew.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from transformers import AutoTokenizer
from tunix.generate import sampler as sampler_lib
from tunix.models.llama3 import model as llama_lib
from tunix.models.llama3 import params as llama_params


def tunix_config(hf: dict) -> llama_lib.ModelConfig:
    """Tunix's Llama config for an HF ``config.json`` (SmolLM2 is a Llama with tied embeddings)."""
    rope = hf.get("rope_parameters") or {}  # transformers 5 writes the rope settings there
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"the worker maps plain rope only, not {rope['rope_type']!r}")
    return llama_lib.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"], rope_theta=int(hf.get("rope_theta") or rope["rope_theta"]), norm_eps=hf["rms_norm_eps"],
        weight_tying=bool(hf.get("tie_word_embeddings", False)))


def main():
    request = json.load(sys.stdin)
    model_dir = Path(request["model_dir"])
    config = tunix_config(json.loads((model_dir / "config.json").read_text()))
    model = llama_params.create_model_from_safe_tensors(str(model_dir), config, dtype=jnp.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    new_tokens, repeats = request["new_tokens"], request["repeats"]
    seconds, tokens, prompt_ids = {}, {}, {}
    for batch, texts in request["prompts"].items():
        longest = max(len(tokenizer(t)["input_ids"]) for t in texts)
        cache = sampler_lib.CacheConfig(cache_size=(1 << (longest - 1).bit_length()) + new_tokens,
                                        num_layers=config.num_layers, num_kv_heads=config.num_kv_heads,
                                        head_dim=config.head_dim)
        sampler = sampler_lib.Sampler(model, tokenizer, cache)
        prompt_ids[batch] = [[int(t) for t in sampler.tokenize(text)] for text in texts]  # tunix adds BOS

        def run():
            # Greedy, and no token ends a row (-1 is no id), so every row makes new_tokens tokens.
            out = sampler(texts, max_generation_steps=new_tokens, temperature=0.0, eos_tokens=[-1])
            return [[int(t) for t in row] for row in jax.block_until_ready(out.tokens)]
        tokens[batch] = run()  # compile and warm up; the tokens, to check both sides ran the same model
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        seconds[batch] = statistics.median(times)
    print(json.dumps({"seconds": seconds, "tokens": tokens, "prompt_ids": prompt_ids, "tunix_jax": jax.__version__}))


if __name__ == "__main__":
    main()
