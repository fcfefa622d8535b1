"""One key per consumer: every random draw of a run comes from its seed and a purpose tag.

With one root key, LoRA's initialisation, the train state's dropout stream and the
sampler all started from ``jax.random.key(seed)``: the same bits, correlated. A
purpose tag folded into the seed's key gives each consumer its own stream, and
adding a consumer never shifts the others.
"""

from __future__ import annotations

import zlib

import jax


def purpose_key(seed: int, purpose: str) -> jax.Array:
    """The key of ``purpose`` (e.g. "lora_init", "train_state", "loop", "rollouts") under ``seed``."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(purpose.encode()) & 0x7FFFFFFF)
