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


def restore_pytree(directory: str | os.PathLike, like):
    """Restores into the structure, shapes and dtypes of ``like`` (arrays or abstract arrays)."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return ocp.StandardCheckpointer().restore(os.path.abspath(directory), target)
