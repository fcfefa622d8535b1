"""Scale-out: a named device mesh, PartitionSpec rules per pytree path, multi-host wiring."""

from siajax.parallel.mesh import (
    BATCH_AXES, MESH_AXES, MeshConfig, batch_shard_count, constrain_batch, make_mesh, mesh_context,
)
from siajax.parallel.rules import (
    PARTITION_RULES, REPLICATED_LORA_RULES, StepShardings, fit_spec, path_string, replicated, rule_for,
    shard_tree, spec_for, step_shardings, train_state_shardings, tree_shardings,
)

__all__ = [
    "BATCH_AXES", "MESH_AXES", "MeshConfig", "PARTITION_RULES", "REPLICATED_LORA_RULES", "StepShardings",
    "batch_shard_count", "constrain_batch", "fit_spec", "make_mesh", "mesh_context",
    "path_string", "replicated", "rule_for", "shard_tree", "spec_for", "step_shardings",
    "train_state_shardings", "tree_shardings",
]
