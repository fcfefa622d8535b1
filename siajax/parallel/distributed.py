"""Multi-host wiring: one Python process per host, every process runs the same program.

Each process loads only its own rows (prompts, rewards); ``to_global`` stitches
host-local rows into one global array laid out by the rules, jitted code runs
SPMD over the whole mesh, and ``to_host_local`` hands each process back the
rows it owns (to decode, verify and reward them). With one process both are
plain placement, so the same driver code runs on a laptop, a multi-GPU node
and a TPU slice.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from siajax.parallel.rules import PARTITION_RULES, Rules, join_path, shard_tree, spec_for

ENV_PREFIX = "SIAJAX_"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """``jax.distributed.initialize`` arguments; all None = let JAX detect the cluster
    (TPU pod slices, SLURM, Open MPI and Kubernetes JobSets need nothing)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None

    @classmethod
    def from_env(cls, environ=os.environ) -> DistributedConfig:
        """SIAJAX_COORDINATOR=host:port, SIAJAX_NUM_PROCESSES, SIAJAX_PROCESS_ID, SIAJAX_LOCAL_DEVICE_IDS=0,1."""
        def number(name):
            value = environ.get(ENV_PREFIX + name)
            return None if value in (None, "") else int(value)

        ids = environ.get(ENV_PREFIX + "LOCAL_DEVICE_IDS")
        return cls(environ.get(ENV_PREFIX + "COORDINATOR") or None, number("NUM_PROCESSES"), number("PROCESS_ID"),
                   tuple(int(i) for i in ids.split(",")) if ids else None)


def initialize(config: DistributedConfig = DistributedConfig()) -> None:
    """Joins this process to the job (once; later calls are no-ops). Call before any other JAX work.

    On CPU the collectives go through gloo, so the same launch works for tests, and
    programs run one at a time in the order issued: with asynchronous dispatch two
    independent programs (say the old and the reference policy's scoring) can run at
    once, and their collectives pair up in a different order on each process and wait
    on each other for ever (a CI run hung so, once in several runs, on 2 busy cores).
    """
    if jax.distributed.is_initialized():
        return
    if jax.config.jax_platforms in (None, "", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    jax.distributed.initialize(
        coordinator_address=config.coordinator_address, num_processes=config.num_processes,
        process_id=config.process_id, local_device_ids=config.local_device_ids,
    )


def host_rows(total: int, process_index: int | None = None, process_count: int | None = None) -> slice:
    """This process's contiguous block of ``total`` rows (each host loads only these)."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if total % count:
        raise ValueError(f"{total} rows do not split evenly over {count} processes; pad or drop rows")
    per_host = total // count
    return slice(index * per_host, (index + 1) * per_host)


def to_global(tree, mesh: Mesh, rules: Rules = PARTITION_RULES, prefix: str = "batch"):
    """Host-local rows -> global arrays laid out by the rules (axis 0 is concatenated over processes)."""
    count = jax.process_count()
    if count == 1:
        return shard_tree(tree, mesh, rules, prefix)

    def spec(key_path, x):
        global_shape = (x.shape[0] * count, *x.shape[1:])
        return spec_for(join_path(prefix, key_path), global_shape, mesh, rules)

    specs = jax.tree_util.tree_map_with_path(spec, tree)
    return multihost_utils.host_local_array_to_global_array(tree, mesh, specs)


def to_host_local(tree) -> object:
    """Global arrays -> NumPy rows owned by this process (all rows with one process)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)

    def local(x):
        return np.asarray(multihost_utils.global_array_to_host_local_array(x, x.sharding.mesh, x.sharding.spec))

    return jax.tree.map(local, tree)


def gather_to_host(tree):
    """Full global values as NumPy on every process (for logging or export; costs a copy)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def global_max(value: int) -> int:
    """The largest ``value`` over all processes (e.g. a prompt bucket every host must share)."""
    if jax.process_count() == 1:
        return int(value)
    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def global_mean(value: float) -> float:
    """Mean of a per-process statistic over processes (equal row counts per process)."""
    if jax.process_count() == 1:
        return float(value)
    return float(np.mean(multihost_utils.process_allgather(np.asarray(value, np.float64))))


def is_primary() -> bool:
    """Process 0 writes run files; every process joins orbax saves (orbax coordinates them)."""
    return jax.process_index() == 0
