"""Bytes per device, computed from the sharding rules on abstract shapes (no weights, no devices).

The same ``spec_for`` that places arrays at run time decides each shard's
shape here, so the numbers are what a run would hold, not estimates.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, NamedSharding

from siajax.models.config import ModelConfig
from siajax.models.lora import LoRAConfig, add_lora
from siajax.models.transformer import KVCache, Transformer
from siajax.parallel.mesh import MESH_AXES
from siajax.parallel.rules import PARTITION_RULES, Rules, join_path, spec_for


def abstract_mesh(shape: Sequence[int]) -> AbstractMesh:
    """A (data, fsdp, tensor) mesh of the given sizes without any devices."""
    return AbstractMesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def per_device_bytes(tree, mesh, rules: Rules = PARTITION_RULES, prefix: str = "") -> int:
    """Bytes of ``tree`` (arrays or ShapeDtypeStructs) held by one device, by the rules."""
    total = 0
    for key_path, x in jax.tree_util.tree_leaves_with_path(tree):
        spec = spec_for(join_path(prefix, key_path), x.shape, mesh, rules)
        shard = NamedSharding(mesh, spec).shard_shape(tuple(x.shape))
        total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
    return total


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    """One device's share, in bytes, of the pieces a sharded RL run keeps resident."""

    params: int  # frozen base weights
    lora_state: int  # adapters + their gradients + Adam's two moments (float32)
    kv_cache: int  # sampler cache for ``batch`` rows x ``slots`` positions

    @property
    def total(self) -> int:
        return self.params + self.lora_state + self.kv_cache


def abstract_policy(config: ModelConfig, lora: LoRAConfig):
    """(frozen base, LoRA params) as ShapeDtypeStructs: shapes of a model never built."""
    def build():
        model = Transformer(config, rngs=nnx.Rngs(0))
        add_lora(model, lora, key=jax.random.key(0))
        _, adapters, frozen = nnx.split(model, nnx.LoRAParam, ...)
        return frozen, {"lora": adapters}

    return jax.eval_shape(build)


def memory_budget(config: ModelConfig, mesh_shape: Sequence[int], *, lora: LoRAConfig = LoRAConfig(rank=16),
                  batch: int = 64, slots: int = 2048, rules: Rules = PARTITION_RULES) -> MemoryBudget:
    """Per-device bytes of base params, LoRA training state and KV cache on a (data, fsdp, tensor) mesh."""
    mesh = abstract_mesh(mesh_shape)
    frozen, adapters = abstract_policy(config, lora)
    cache = jax.eval_shape(lambda: KVCache.empty(config, batch, slots))
    return MemoryBudget(
        params=per_device_bytes(frozen, mesh, rules),
        lora_state=4 * per_device_bytes(adapters, mesh, rules),  # value, gradient, Adam mu and nu
        kv_cache=per_device_bytes(cache, mesh, rules, prefix="cache"),
    )
