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
import hashlib
import os
import pickle
from typing import Callable, Sequence, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from siajax.parallel.rules import PARTITION_RULES, Rules, join_path, shard_tree, spec_for

ENV_PREFIX = "SIAJAX_"
T = TypeVar("T")
R = TypeVar("R")


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


def initialize_from_env(environ=os.environ) -> bool:
    """Joins the job the environment names (SIAJAX_NUM_PROCESSES > 1 with SIAJAX_COORDINATOR and
    SIAJAX_PROCESS_ID, or SIAJAX_DISTRIBUTED=1 to let JAX detect a TPU slice, SLURM or Open MPI);
    -> whether it did. Call before any other JAX work; a single process does nothing."""
    config = DistributedConfig.from_env(environ)
    if config.num_processes in (None, 1) and environ.get(ENV_PREFIX + "DISTRIBUTED") != "1":
        return False
    initialize(config)
    return True


def host_rows(total: int, process_index: int | None = None, process_count: int | None = None) -> slice:
    """This process's contiguous block of ``total`` rows (each host loads only these)."""
    count = jax.process_count() if process_count is None else process_count
    if total % count:
        raise ValueError(f"{total} rows do not split evenly over {count} processes; pad or drop rows")
    return balanced_rows(total, process_index, count)


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


def balanced_rows(total: int, process_index: int | None = None, process_count: int | None = None) -> slice:
    """This process's contiguous block of ``total`` rows, blocks equal in size up to one row (the first
    ``total % count`` processes take one more); a process may get none."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    base, extra = divmod(total, count)
    start = index * base + min(index, extra)
    return slice(start, start + base + (index < extra))


def allgather_objects(value) -> list:
    """Every process's ``value`` (any picklable object), in process order, on every process.

    Two collectives whatever the sizes: the pickled lengths, then the bytes padded to the longest."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [pickle.loads(gathered[i, :n].tobytes()) for i, n in enumerate(lengths)]


def share_rows(work: Callable[[Sequence[T]], Sequence[R]], rows: Sequence[T]) -> list[R]:
    """``work`` applied to ``rows`` split across processes: each runs it on its own block
    (:func:`balanced_rows`) and every process gets every result, in the rows' order. For work that
    must run where the rows are (verifiers, tools) and whose results all processes must agree on.
    Every process calls it with the same rows; one whose block is empty still joins the gather."""
    if jax.process_count() == 1:
        return list(work(rows))
    mine = list(rows[balanced_rows(len(rows))])
    results = list(work(mine)) if mine else []
    if len(results) != len(mine):
        raise ValueError(f"share_rows: work returned {len(results)} results for {len(mine)} rows")
    return [result for block in allgather_objects(results) for result in block]


def from_primary(produce: Callable[[], T]) -> T:
    """``produce()`` run on process 0 only, its value sent to every process (an LLM agent's reply:
    asked once, the same everywhere). An exception on process 0 is raised on every process."""
    if jax.process_count() == 1:
        return produce()
    outcome = None
    if is_primary():
        try:
            outcome = ("value", produce())
        except Exception as err:  # every process must leave the collective below
            outcome = ("error", err)
    data = _pickled(outcome) if is_primary() else b""
    size = int(multihost_utils.broadcast_one_to_all(np.asarray(len(data), np.int32)))
    buffer = np.zeros(size, np.uint8)
    if is_primary():
        buffer[:] = np.frombuffer(data, np.uint8)
    kind, value = pickle.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes())
    if kind == "error":
        raise value
    return value


def _pickled(outcome: tuple) -> bytes:
    """The outcome's bytes; an exception that does not pickle travels as a RuntimeError with its text."""
    try:
        return pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        kind, value = outcome
        return pickle.dumps(("error", RuntimeError(f"{type(value).__name__}: {value}")))


class ProcessesDisagree(RuntimeError):
    """Processes that must hold the same value (a decision, a ledger) do not."""


def check_same(what: str, data: bytes) -> None:
    """Raises :class:`ProcessesDisagree` naming the processes whose ``data`` differs from process 0's."""
    if jax.process_count() == 1:
        return
    digest = np.frombuffer(hashlib.sha256(data).digest(), np.uint8)
    digests = np.asarray(multihost_utils.process_allgather(digest)).reshape(jax.process_count(), -1)
    differ = [i for i in range(len(digests)) if not np.array_equal(digests[i], digests[0])]
    if differ:
        raise ProcessesDisagree(f"{what} differs between processes: process(es) {differ} disagree with process 0")


def barrier(name: str) -> None:
    """Every process waits here until all have arrived."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
