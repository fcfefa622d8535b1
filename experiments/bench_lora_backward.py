"""The LoRA adapter's backward: JAX's own transpose of scale·(x·A)·B vs siajax's hand-written one
(``siajax.models.transformer.low_rank_update``), side by side in one process on XLA:CPU.

JAX's transpose of the product moves the [tokens, out] cotangent in memory before the rank-r
products; the hand-written backward flattens the token axes and multiplies the big operands as they
lie. Two measurements, compile and warm-up excluded, median of ``--repeats``:

- ``term``: the adapter term alone at SmolLM2-135M's MLP width (576 -> 1536, r = 8), 3,072 tokens;
- ``model``: forward + backward (LoRA gradients) of a random SmolLM2-135M-shaped Llama with
  ``--layers`` layers on 32 rows x 96 tokens, every Linear's adapter one way or the other; the
  forward alone beside it, so the ratio backward / forward reads as on a GPU's 2-3x.

    python experiments/bench_lora_backward.py [--layers 30] [--out FILE]
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
from flax import nnx

import siajax.models.transformer as transformer
from experiments.benchmarking import median_seconds, smollm2_135m_config
from siajax.models import LoRAConfig, Transformer, add_lora

HAND_WRITTEN = transformer.low_rank_update


def autodiff_update(x, a, b, scale):
    """The same term with JAX's own transpose (what siajax ran before)."""
    return (x @ a) @ b * scale


def bench_term(repeats: int) -> dict:
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(32, 96, 576), jnp.float32)
    grad = jnp.asarray(rng.randn(32, 96, 1536), jnp.float32)
    a, b = (jnp.asarray(rng.randn(*shape) * 0.02, jnp.float32) for shape in ((576, 8), (8, 1536)))
    figures = {}
    for name, update in (("autodiff", autodiff_update), ("hand_written", HAND_WRITTEN)):
        pullback = jax.jit(lambda x, a, b, g, update=update: jax.vjp(lambda *v: update(*v, 2.0), x, a, b)[1](g))
        figures[f"{name}_s"] = median_seconds(lambda p=pullback: jax.block_until_ready(p(x, a, b, grad)), repeats)
    return figures


def bench_model(layers: int, repeats: int) -> dict:
    model = Transformer(smollm2_135m_config(layers), rngs=nnx.Rngs(0))
    add_lora(model, LoRAConfig(rank=8, alpha=16), key=jax.random.key(0))
    graphdef, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
    tokens = jnp.asarray(np.random.RandomState(0).randint(3, 1000, (32, 96)), jnp.int32)

    def loss(lora, frozen):
        return jnp.mean(nnx.merge(graphdef, lora, frozen)(tokens, head="none").hidden ** 2)

    figures = {}
    for name, update in (("autodiff", autodiff_update), ("hand_written", HAND_WRITTEN)):
        transformer.low_rank_update = update  # read by Linear.__call__ when the programs below trace
        try:
            forward, backward = jax.jit(loss), jax.jit(jax.grad(loss))
            figures[f"forward_{name}_s"] = median_seconds(
                lambda: jax.block_until_ready(forward(lora, frozen)), repeats)
            figures[f"forward_backward_{name}_s"] = median_seconds(
                lambda: jax.block_until_ready(backward(lora, frozen)), repeats)
        finally:
            transformer.low_rank_update = HAND_WRITTEN
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("experiments/out/bench_lora_backward.json"))
    args = parser.parse_args()
    term = bench_term(args.repeats)
    print(f"adapter term backward, 3072 tokens, 576 -> 1536: autodiff {term['autodiff_s'] * 1e3:.1f} ms, "
          f"hand-written {term['hand_written_s'] * 1e3:.1f} ms ({term['autodiff_s'] / term['hand_written_s']:.2f}x)")
    model = bench_model(args.layers, args.repeats)
    for name in ("autodiff", "hand_written"):
        print(f"{args.layers}-layer model, 32 x 96 tokens, {name}: forward {model[f'forward_{name}_s']:.2f} s, "
              f"forward + backward {model[f'forward_backward_{name}_s']:.2f} s "
              f"({model[f'forward_backward_{name}_s'] / model[f'forward_{name}_s']:.2f}x the forward)")
    print(f"forward + backward, autodiff / hand-written: "
          f"{model['forward_backward_autodiff_s'] / model['forward_backward_hand_written_s']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"layers": args.layers, "backend": jax.default_backend(),
                                    "cpu_count": os.cpu_count(), "machine": platform.machine(),
                                    "term": term, "model": model}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
