"""Where every array lives: one table of PartitionSpec rules keyed by pytree path.

A path is the array's place in its tree joined by "/", e.g.
``layers/attn/q_proj/kernel`` (frozen base), ``lora/layers/attn/q_proj/lora_a``
(trainable), ``cache/keys`` (KV cache), ``batch/tokens``. Everything under
``layers/`` is stacked: its leading axis is the layer axis, never split. The first rule whose
pattern ``re.search``-es the path wins, so overriding a rule means putting a
new one in front (see ``REPLICATED_LORA_RULES``). Optimizer state needs no
rule of its own: a moment takes the sharding of the parameter it mirrors.

When a dimension does not divide by its mesh axes, trailing axes are dropped
from that dimension until it does (down to replicated); the layout changes,
the numbers do not.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from siajax.parallel.mesh import BATCH_AXES

Rules = Sequence[tuple[str, P]]
_COLUMN = r"(q_proj|k_proj|v_proj|gate_proj|up_proj)"  # output dim split over tensor
_ROW = r"(o_proj|down_proj)"  # input dim split over tensor

PARTITION_RULES: Rules = (
    # Frozen base weights. Kernels are [L, in, out] (L: the stacked layer axis):
    # column-parallel projections split out over tensor, row-parallel ones split
    # in; fsdp takes the other dim.
    (r"(^|/)embed$", P("tensor", "fsdp")),  # [V, E]: vocab-parallel (tied LM head too)
    (r"lm_head/kernel$", P("fsdp", "tensor")),  # [E, V]
    (_COLUMN + r"/kernel$", P(None, "fsdp", "tensor")),
    (_COLUMN + r"/bias$", P(None, "tensor")),
    (_ROW + r"/kernel$", P(None, "tensor", "fsdp")),
    (r"norm/scale$", P()),
    # LoRA adapters: A [L, in, r] splits like its kernel's input, B [L, r, out] like its output.
    (_COLUMN + r"/lora_a$", P(None, "fsdp", None)),
    (_COLUMN + r"/lora_b$", P(None, None, "tensor")),
    (_ROW + r"/lora_a$", P(None, "tensor", None)),
    (_ROW + r"/lora_b$", P(None, None, "fsdp")),
    (r"(^|/)value_head/", P()),
    # KV cache: keys/values [L, B, S, K, D] by batch and kv head; valid [B, S] by batch.
    (r"(^|/)cache/(keys|values)$", P(None, BATCH_AXES, None, "tensor", None)),
    (r"(^|/)cache/valid$", P(BATCH_AXES)),
    # Batches (prompts, train batches): leading axis over data x fsdp.
    (r"^batch(/|$)", P(BATCH_AXES)),
    (r".*", P()),  # everything else (norm biases, counters, scalars): replicated
)

REPLICATED_LORA_RULES: Rules = ((r"lora_(a|b)$", P()), *PARTITION_RULES)

_log = logging.getLogger(__name__)


def path_string(key_path) -> str:
    """A jax key path as "a/0/b" (an NNX Variable's trailing ``value`` dropped)."""
    names = []
    for entry in key_path:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
        else:
            names.append(str(entry))
    if names and names[-1] == "value":
        names.pop()
    return "/".join(names)


def rule_for(path: str, rules: Rules = PARTITION_RULES) -> P:
    """The first matching rule's spec (unfitted)."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            return spec
    return P()


def _axis_names(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def fit_spec(spec: P, shape: Sequence[int], mesh, path: str = "?") -> P:
    """``spec`` with axes dropped where a dimension does not divide by them."""
    if len(spec) > len(shape):
        raise ValueError(f"rule {spec} for {path!r} has {len(spec)} entries but the array has rank {len(shape)}")
    fitted = []
    for dim, entry in zip(shape, spec):
        axes = _axis_names(entry)
        kept = axes
        while kept and dim % math.prod(mesh.shape[a] for a in kept):
            kept = kept[:-1]
        if kept != axes:
            _log.info("%s: dim %d does not divide by %s; sharding it over %s", path, dim, axes, kept or "nothing")
        fitted.append(None if not kept else kept[0] if len(kept) == 1 and isinstance(entry, str) else kept)
    return P(*fitted)


def spec_for(path: str, shape: Sequence[int], mesh, rules: Rules = PARTITION_RULES) -> P:
    """The PartitionSpec an array at ``path`` with ``shape`` gets on ``mesh``."""
    return fit_spec(rule_for(path, rules), shape, mesh, path)


def join_path(prefix: str, key_path) -> str:
    path = path_string(key_path)
    return f"{prefix}/{path}" if prefix and path else prefix or path


def tree_shardings(tree, mesh: Mesh, rules: Rules = PARTITION_RULES, prefix: str = ""):
    """A NamedSharding for every array (or abstract array) of ``tree``, by the rules."""
    return jax.tree_util.tree_map_with_path(
        lambda key_path, x: NamedSharding(mesh, spec_for(join_path(prefix, key_path), x.shape, mesh, rules)), tree)


def shard_tree(tree, mesh: Mesh, rules: Rules = PARTITION_RULES, prefix: str = ""):
    """Places ``tree`` on ``mesh`` by the rules (a no-op for arrays already there)."""
    return jax.device_put(tree, tree_shardings(tree, mesh, rules, prefix))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def optimizer_state_shardings(opt_state, param_shardings, mesh: Mesh):
    """Moments mirror their parameter's sharding; counters and other leaves are replicated.

    A moment is found by its path: optax states (chains, partitions, masks) hold a params-shaped
    tree, so a moment's path ends with its parameter's path. Matched by path, not through
    ``optax.tree_map_params``, which cannot walk a ``multi_transform``'s masked partitions, so the
    state alone says where each moment goes: no optimiser is needed."""
    by_path = {tuple(map(str, path)): sharding
               for path, sharding in jax.tree_util.tree_leaves_with_path(param_shardings)}
    longest = max((len(path) for path in by_path), default=0)

    def place(path, leaf):
        keys = tuple(map(str, path))
        for length in range(min(longest, len(keys)), 0, -1):
            sharding = by_path.get(keys[-length:])
            if sharding is not None:
                return sharding
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(place, opt_state)


class StepShardings(NamedTuple):
    """What a sharded train step needs: the mesh, the rules, and the state's layout."""

    mesh: Mesh
    rules: Any
    state: Any  # a TrainState of NamedShardings


def train_state_shardings(state, mesh: Mesh, rules: Rules = PARTITION_RULES):
    """A TrainState-shaped tree of NamedShardings for ``state`` (arrays or abstract)."""
    params = tree_shardings(state.params, mesh, rules)
    return state.replace(
        params=params, opt_state=optimizer_state_shardings(state.opt_state, params, mesh),
        step=replicated(mesh), rng=replicated(mesh),
    )


def step_shardings(state, mesh: Mesh, rules: Rules = PARTITION_RULES) -> StepShardings:
    return StepShardings(mesh, tuple(rules), train_state_shardings(state, mesh, rules))

