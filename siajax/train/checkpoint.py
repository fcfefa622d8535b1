"""Orbax save/restore of a TrainState (and any pytree) to a directory."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def save_pytree(directory: str | os.PathLike, tree) -> None:
    """Writes ``tree`` atomically (orbax writes to a temp dir, then renames)."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(directory), tree, force=True)
    checkpointer.wait_until_finished()


def restore_pytree(directory: str | os.PathLike, like, shardings=None):
    """Restores into the structure, shapes and dtypes of ``like`` (arrays or abstract arrays).

    ``shardings`` (a matching tree of ``jax.sharding.Sharding``, e.g. from
    ``siajax.parallel.train_state_shardings`` on a new mesh) lays the restored
    arrays out anew: each host reads just its shards, whatever mesh saved them.
    Without it the arrays take ``like``'s own shardings.
    """
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    if shardings is not None:
        target = jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                              target, shardings)
    return ocp.StandardCheckpointer().restore(os.path.abspath(directory), target)
