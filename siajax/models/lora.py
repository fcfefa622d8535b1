"""LoRA adapters on the model's projections: add, split out, merge back.

Adapters are ``nnx.LoRAParam`` variables on :class:`siajax.models.transformer.Linear`,
so the trainable pytree is ``nnx.split(model, nnx.LoRAParam, ...)[1]`` and the
frozen base is everything else.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from siajax.models.transformer import Linear

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapter settings; ``targets`` name projection modules (HF names)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ALL_PROJECTIONS

    def __post_init__(self):
        unknown = set(self.targets) - set(ALL_PROJECTIONS)
        if unknown:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {ALL_PROJECTIONS}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


def _target_linears(model: nnx.Module, targets: tuple[str, ...]):
    for path, module in nnx.iter_graph(model):
        if isinstance(module, Linear) and path and path[-1] in targets:
            yield path, module


def add_lora(model: nnx.Module, config: LoRAConfig, *, key: jax.Array) -> nnx.Module:
    """Adds adapters in place; the model's output is unchanged (B = 0).

    A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), as PEFT's kaiming_uniform(a=sqrt(5))
    gives, so x·A has the same scale whatever the layer's width (a fixed
    N(0, 1/r) makes x·A grow with sqrt(d_in): about 8x PEFT's at d_in=1536,
    r=8). Stacked layers ([L, in, out] kernels) get one independent A per layer.
    """
    targets = list(_target_linears(model, config.targets))
    if not targets:
        raise ValueError(f"no Linear module named any of {config.targets} in the model")
    for k, (_, linear) in zip(jax.random.split(key, len(targets)), targets):
        *stack, d_in, d_out = linear.kernel.shape
        bound = 1.0 / math.sqrt(d_in)
        linear.lora_a = nnx.LoRAParam(jax.random.uniform(k, (*stack, d_in, config.rank), jnp.float32, -bound, bound))
        linear.lora_b = nnx.LoRAParam(jnp.zeros((*stack, config.rank, d_out), jnp.float32))
        linear.lora_scale = config.alpha / config.rank
        linear.lora_dropout = config.dropout
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` whose kernels absorb their adapters: W' = W + (alpha/r)·A·B (per layer)."""
    merged = nnx.clone(model)
    for _, linear in nnx.iter_graph(merged):
        if isinstance(linear, Linear) and linear.lora_a is not None:
            delta = jnp.einsum("...ir,...ro->...io", linear.lora_a[...], linear.lora_b[...]) * linear.lora_scale
            linear.kernel = nnx.Param((linear.kernel[...].astype(jnp.float32) + delta).astype(linear.kernel.dtype))
            linear.lora_a = None
            linear.lora_b = None
            linear.lora_scale = 0.0
    return merged


def lora_param_count(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
