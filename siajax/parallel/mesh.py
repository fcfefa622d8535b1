"""The device mesh: three named axes built from a small config.

    data    pure data parallelism: params replicated, batch split
    fsdp    data parallelism with params, grads and optimizer state split too
    tensor  Megatron-style model parallelism inside each matmul

Batches split over ``data`` and ``fsdp`` together (``BATCH_AXES``). All axes
are ``AxisType.Auto``: the rules pin parameters, caches and batches, and
XLA's SPMD partitioner propagates the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the three axes; one of them may be -1 to take the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = self.sizes()
        if sizes.count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {self}")
        if any(size == 0 or size < -1 for size in sizes):
            raise ValueError(f"mesh axis sizes must be positive (or one -1), got {self}")

    def sizes(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    def resolve(self, device_count: int) -> tuple[int, int, int]:
        """Concrete axis sizes for ``device_count`` devices (fills the -1 axis)."""
        sizes = list(self.sizes())
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if device_count % known:
                raise ValueError(f"{device_count} devices do not split into {self}: {known} does not divide it")
            sizes[sizes.index(-1)] = device_count // known
        if math.prod(sizes) != device_count:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                             f"{device_count} are available; set one axis to -1 to fill")
        return tuple(sizes)

    @classmethod
    def parse(cls, text: str) -> MeshConfig:
        """``"data=2,fsdp=2,tensor=2"`` or ``"2,2,2"`` (data, fsdp, tensor order)."""
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            if all("=" in p for p in parts):
                given = {k.strip(): int(v) for k, v in (p.split("=", 1) for p in parts)}
                unknown = set(given) - set(MESH_AXES)
                if unknown:
                    raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
                # Unnamed axes are 1, except data, which fills the rest unless another axis does.
                defaults = {"data": 1 if -1 in given.values() else -1, "fsdp": 1, "tensor": 1}
                return cls(**{**defaults, **given})
            if len(parts) == 3:
                return cls(*(int(p) for p in parts))
        except ValueError as err:
            raise ValueError(f"bad mesh {text!r}: {err}") from None
        raise ValueError(f"bad mesh {text!r}; write e.g. 'data=2,fsdp=2,tensor=2' or '2,2,2'")


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: every device of every process).

    ``jax.make_mesh`` orders devices so the innermost axis (tensor) lies on the
    fastest links (same host / ICI neighbours).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = config.resolve(len(devices))
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def mesh_context(mesh: Mesh | None):
    """Makes ``mesh`` the ambient mesh while tracing (activation constraints read it); None: no-op."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def batch_shard_count(mesh: Mesh) -> int:
    """How many ways a batch's leading axis is split."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def ambient_mesh():
    """The mesh being traced under, if it has siajax's axes (else None)."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names) else mesh


def constrain_batch(x: jax.Array) -> jax.Array:
    """Pins an activation's leading (batch) axis to ``BATCH_AXES`` under an ambient mesh.

    Without it, XLA may all-gather activations instead of fsdp-sharded weights.
    A no-op outside a mesh or when the batch does not divide.
    """
    mesh = ambient_mesh()
    if mesh is None or x.shape[0] % batch_shard_count(mesh):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(BATCH_AXES))


def gather_fsdp_for_lookup(table: jax.Array) -> jax.Array:
    """All-gathers an embedding table's fsdp-split dimension before a row lookup.

    FSDP gathers weights right before use; XLA does that by itself for matmuls
    but not for a gather whose output is batch-split over the same axis, where
    it falls back to full rematerialisation. No-op outside a mesh.
    """
    mesh = ambient_mesh()
    if mesh is None or table.shape[0] % mesh.shape["tensor"]:
        return table
    return jax.lax.with_sharding_constraint(table, PartitionSpec("tensor", None))
