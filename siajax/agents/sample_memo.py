"""Sampler calls remembered by everything their draws depend on, so that asking again decodes nothing.

Evaluations often ask the sampler for samples it has already drawn: a harness candidate that changes
only how replies are read (the parser), a retry candidate's first attempt, and the test evaluation
of a kept parser change all sample the same prompts with the same weights, decoding settings and key
as an earlier evaluation. Sampling is a pure function of those inputs, so :class:`SampleMemo` hands
back the earlier call's result: scores, records and ledgers are the same as if it were drawn again.
Budgets still charge a reused sample as drawn: they count the protocol's samples, not the machine's work.

Weights are told apart by the identity of their arrays (JAX arrays are immutable). An entry keeps its
arrays alive, so no other array can take an identity an entry holds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import jax
import numpy as np


def key_bytes(key: jax.Array) -> tuple[str, bytes]:
    """A PRNG key (typed or raw uint32) as hashable data: its implementation and its bits."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(key) if typed else key
    return str(key.dtype), np.asarray(data).tobytes()


class SampleMemo:
    """The last ``capacity`` sampler calls' results, keyed by (the weights' arrays, the request)."""

    def __init__(self, capacity: int = 8):
        if capacity < 1:
            raise ValueError(f"a sample memo needs capacity >= 1, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[tuple, tuple[list, object]] = OrderedDict()

    def get(self, weights: list, request: Hashable):
        """The result stored for ``request`` on these very weight arrays, or None."""
        key = (tuple(map(id, weights)), request)
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, weights: list, request: Hashable, result) -> None:
        """Stores ``result``, keeping ``weights`` alive with it; the least recently used entry leaves
        when the memo is full."""
        self._entries[(tuple(map(id, weights)), request)] = (list(weights), result)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
