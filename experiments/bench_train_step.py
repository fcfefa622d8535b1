"""GRPO train-step speed: siajax's jitted step vs the same step in plain PyTorch.

Same checkpoint, same LoRA adapters (values copied across), same batch, same
loss (clipped surrogate + k3 KL, seq-mean-token-mean) and Adam. Reports the
median step time and response tokens per second for each, and the ratio.

    python experiments/bench_train_step.py [--batch-sizes 8 32 64] [--prompt-len 32] [--response-len 64]
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
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx
from transformers import AutoModelForCausalLM

from experiments.benchmarking import median_seconds
from siajax.models import BUNDLED_TINY_MODEL, LoRAConfig, add_lora, from_pretrained
from siajax.rl import GRPOConfig, RLBatch, grpo_loss
from siajax.train import TrainBatch, init_train_state, make_policy_loss, make_train_step, split_policy

CFG = GRPOConfig(clip_low=0.2, clip_high=0.2, kl_coef=0.04, aggregation="seq-mean-token-mean")


class TorchLoRALinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, a: np.ndarray, b: np.ndarray, scale: float):
        super().__init__()
        self.base, self.scale = base, scale
        self.a = torch.nn.Parameter(torch.tensor(a))
        self.b = torch.nn.Parameter(torch.tensor(b))

    def forward(self, x):
        return self.base(x) + (x @ self.a) @ self.b * self.scale


def torch_policy_with_adapters(model_dir, jax_model):
    """The HF torch model with our adapters' exact values spliced onto the same projections."""
    torch_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for p in torch_model.parameters():
        p.requires_grad_(False)
    for path, linear in nnx.iter_graph(jax_model):
        if getattr(linear, "lora_a", None) is None:
            continue
        # Stacked blocks: path (layers, attn, q_proj) with adapters [L, ...].
        group, name = {"attn": "self_attn", "mlp": "mlp"}[path[-2]], path[-1]
        a, b = np.asarray(linear.lora_a[...]), np.asarray(linear.lora_b[...])
        for layer in range(a.shape[0]):
            parent = getattr(torch_model.model.layers[layer], group)
            setattr(parent, name, TorchLoRALinear(getattr(parent, name), a[layer], b[layer], linear.lora_scale))
    return torch_model


def torch_grpo_step(model, optimizer, tokens, attention, mask, old, ref, adv):
    logits = model(input_ids=tokens, attention_mask=attention,
                   position_ids=(attention.cumsum(-1) - 1).clamp(min=0)).logits
    n = mask.shape[1]
    logp = torch.log_softmax(logits[:, -n - 1 : -1], -1).gather(-1, tokens[:, -n:, None])[..., 0]
    ratio = torch.exp(logp - old)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CFG.clip_low, 1 + CFG.clip_high))
    kl = torch.expm1(ref - logp) - (ref - logp)
    per_token = pg + CFG.kl_coef * kl
    loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=BUNDLED_TINY_MODEL)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--response-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("experiments/out/bench_train_step.json"))
    args = parser.parse_args()

    model, _ = from_pretrained(args.model)
    add_lora(model, LoRAConfig(rank=8, alpha=16), key=jax.random.key(0))
    parts, params, frozen = split_policy(model)
    optimizer = optax.adam(1e-4)
    step = make_train_step(make_policy_loss(parts, grpo_loss, CFG), optimizer)
    torch_model = torch_policy_with_adapters(args.model, model)
    torch_opt = torch.optim.Adam([p for p in torch_model.parameters() if p.requires_grad], lr=1e-4)

    rows = []
    print(f"{'batch':>5} {'siajax ms':>10} {'torch ms':>9} {'siajax tok/s':>13} {'torch tok/s':>12} {'ratio':>6}")
    for batch in args.batch_sizes:
        rng = np.random.RandomState(batch)
        length = args.prompt_len + args.response_len
        tokens = rng.randint(3, model.config.vocab_size, (batch, length)).astype(np.int32)
        attention = np.ones((batch, length), bool)
        attention[:, : args.prompt_len // 4] = False
        mask = np.arange(args.response_len)[None] < rng.randint(args.response_len // 2, args.response_len + 1, batch)[:, None]
        attention[:, args.prompt_len:] = mask
        old = -rng.rand(batch, args.response_len).astype(np.float32) * 5
        ref = old + 0.05 * rng.randn(batch, args.response_len).astype(np.float32)
        adv = rng.randn(batch, args.response_len).astype(np.float32) * mask

        jax_batch = TrainBatch(jnp.asarray(tokens), jnp.asarray(attention),
                               RLBatch(jnp.asarray(mask), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(ref)))
        holder = {"state": init_train_state(params, optimizer, 0)}

        def run_jax():
            holder["state"], metrics = step(holder["state"], frozen, jax_batch)
            jax.block_until_ready(metrics["loss"])

        t_args = [torch.tensor(x) for x in (tokens.astype(np.int64), attention.astype(np.int64),
                                            mask.astype(np.float32), old, ref, adv)]
        ours = median_seconds(run_jax, args.repeats)
        theirs = median_seconds(lambda: torch_grpo_step(torch_model, torch_opt, *t_args), args.repeats)
        n_tokens = int(mask.sum())
        rows.append({"batch": batch, "siajax_s": ours, "torch_s": theirs, "siajax_tokens_per_s": n_tokens / ours,
                     "torch_tokens_per_s": n_tokens / theirs, "speedup": theirs / ours})
        print(f"{batch:>5} {ours * 1e3:>10.1f} {theirs * 1e3:>9.1f} {n_tokens / ours:>13.0f} "
              f"{n_tokens / theirs:>12.0f} {theirs / ours:>5.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": str(args.model), "prompt_len": args.prompt_len, "response_len": args.response_len,
        "backend": jax.default_backend(), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
