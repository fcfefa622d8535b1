"""Sampler throughput: siajax (jitted JAX) vs transformers ``generate`` (PyTorch).

Same weights (one HF checkpoint, loaded by both), same prompts, greedy decoding
with no stop token so every row makes exactly ``--new-tokens`` tokens. Compile
and warm-up are excluded; each timing is the median of ``--repeats`` runs.

    python experiments/bench_sampling.py [--model DIR] [--batch-sizes 1 8 32] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: experiments.* imports

import jax
import numpy as np
import torch
from transformers import AutoModelForCausalLM

from experiments.benchmarking import median_seconds
from siajax.models import BUNDLED_TINY_MODEL, from_pretrained
from siajax.sampling import generate, left_pad


def make_prompts(tokenizer, batch: int, seed: int = 0) -> list[list[int]]:
    texts = ["Name the charge for this case:", "def trimul(x, mask):", "Denoise the counts of cell",
             "被告人于2014年盗窃", "Write a Pallas kernel that"]
    rng = np.random.RandomState(seed)
    return [tokenizer(texts[rng.randint(len(texts))] * (1 + rng.randint(3)))["input_ids"] for _ in range(batch)]


def bench_siajax(model, prompts, new_tokens, repeats):
    def run():
        result = generate(model, prompts, key=jax.random.key(0), max_new_tokens=new_tokens, temperature=0.0)
        jax.block_until_ready(result.tokens)
    return median_seconds(run, repeats)


def bench_transformers(torch_model, prompts, new_tokens, repeats, pad_id):
    ids, mask = left_pad(prompts, pad_id, length=max(map(len, prompts)))
    ids, mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    def run():
        with torch.no_grad():
            torch_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=pad_id, eos_token_id=None)
    return median_seconds(run, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=BUNDLED_TINY_MODEL)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("experiments/out/bench_sampling.json"))
    args = parser.parse_args()

    model, tokenizer = from_pretrained(args.model)
    torch_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    rows = []
    print(f"{'batch':>5} {'siajax tok/s':>13} {'torch tok/s':>12} {'ratio':>7}")
    for batch in args.batch_sizes:
        prompts = make_prompts(tokenizer, batch)
        tokens = batch * args.new_tokens
        ours = tokens / bench_siajax(model, prompts, args.new_tokens, args.repeats)
        theirs = tokens / bench_transformers(torch_model, prompts, args.new_tokens, args.repeats,
                                             tokenizer.pad_token_id)
        rows.append({"batch": batch, "siajax_tokens_per_s": ours, "torch_tokens_per_s": theirs,
                     "ratio": ours / theirs})
        print(f"{batch:>5} {ours:>13.1f} {theirs:>12.1f} {ours / theirs:>6.2f}x")
    report = {
        "model": str(args.model), "new_tokens": args.new_tokens, "repeats": args.repeats,
        "backend": jax.default_backend(), "jax": jax.__version__, "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
