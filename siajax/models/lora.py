"""LoRA adapters on the model's projections: add, split out, merge back.

Adapters are ``nnx.LoRAParam`` variables on :class:`siajax.models.transformer.Linear`,
so the trainable pytree is ``nnx.split(model, nnx.LoRAParam, ...)[1]`` and the
frozen base is everything else.
"""

from __future__ import annotations

import dataclasses

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
    """Adds adapters in place (A ~ N(0, 1/r), B = 0, so the model's output is unchanged)."""
    targets = list(_target_linears(model, config.targets))
    if not targets:
        raise ValueError(f"no Linear module named any of {config.targets} in the model")
    for k, (_, linear) in zip(jax.random.split(key, len(targets)), targets):
        d_in, d_out = linear.kernel.shape
        linear.lora_a = nnx.LoRAParam(jax.random.normal(k, (d_in, config.rank), jnp.float32) / config.rank)
        linear.lora_b = nnx.LoRAParam(jnp.zeros((config.rank, d_out), jnp.float32))
        linear.lora_scale = config.alpha / config.rank
        linear.lora_dropout = config.dropout
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` whose kernels absorb their adapters: W' = W + (alpha/r)·A·B."""
    merged = nnx.clone(model)
    for _, linear in nnx.iter_graph(merged):
        if isinstance(linear, Linear) and linear.lora_a is not None:
            delta = (linear.lora_a[...] @ linear.lora_b[...]) * linear.lora_scale
            linear.kernel = nnx.Param((linear.kernel[...].astype(jnp.float32) + delta).astype(linear.kernel.dtype))
            linear.lora_a = None
            linear.lora_b = None
            linear.lora_scale = 0.0
    return merged


def lora_param_count(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
