"""Where siajax keeps what it can reuse between runs: converted GGUF weights and compiled XLA programs.

The root is ``$SIAJAX_CACHE`` (default ``~/.cache/siajax``). The command line
turns JAX's persistent compilation cache on under it, so a second run of the
same config (or a resume) loads its programs instead of compiling them again.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

# siajax's programs on 2 CPU cores compile in 0.1-30 s each; JAX's default floor (1 s) would leave
# most of them out of the cache.
MIN_COMPILE_SECONDS_CACHED = 0.1


def cache_root() -> Path:
    return Path(os.environ.get("SIAJAX_CACHE", Path.home() / ".cache" / "siajax"))


def enable_compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache under ``cache_root()/xla``; -> its directory.

    A directory the user already chose (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``) is kept as
    it is; ``SIAJAX_COMPILE_CACHE=0`` turns the cache off (-> None).
    """
    if os.environ.get("SIAJAX_COMPILE_CACHE") == "0":
        return None
    chosen = jax.config.jax_compilation_cache_dir
    if chosen:
        return chosen
    directory = str(cache_root() / "xla")
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS_CACHED)
    return directory
