"""Orbax save/restore of a TrainState (and any pytree) to a directory."""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil

import jax
import orbax.checkpoint as ocp


def save_pytree(directory: str | os.PathLike, tree) -> None:
    """Writes ``tree`` atomically (orbax writes to a temp dir, then renames).

    A failed write (a full or read-only disk) raises one OSError naming ``directory``, with orbax's
    own error logs (a traceback per writer thread) held back and its temp dir removed.
    """
    directory = os.path.abspath(directory)
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.CRITICAL)
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(directory, tree, force=True)
        checkpointer.wait_until_finished()
    except OSError as err:
        _remove_partial(directory)
        raise OSError(err.errno, err.strerror, directory) from err
    except Exception as err:  # TensorStore reports an OS error in the message: ... [os_error_code='28']
        code = re.search(r"os_error_code='(\d+)'", str(err))
        if code is None:
            raise
        _remove_partial(directory)
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), directory) from err
    finally:
        absl_log.setLevel(level)


def _remove_partial(directory: str) -> None:
    for leftover in glob.glob(glob.escape(directory) + ".orbax-checkpoint-tmp*"):
        shutil.rmtree(leftover, ignore_errors=True)


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
