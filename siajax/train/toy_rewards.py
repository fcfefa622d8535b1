"""Checkable rewards over token ids, for showing that a recipe learns.

The property "a response token contains a decimal digit" is verifiable from
ids alone and rare under the bundled model, so it gives both a dense reward
(the fraction of such tokens) and a high-failure one (at least k of them).
"""

from __future__ import annotations

import numpy as np


def digit_token_table(tokenizer) -> np.ndarray:
    """[V] bool: which token ids decode to text containing a digit."""
    table = np.zeros(len(tokenizer), bool)
    for token, index in tokenizer.get_vocab().items():
        if any(ch.isdigit() for ch in tokenizer.convert_tokens_to_string([token])):
            table[index] = True
    return table


def digit_fraction_reward(table: np.ndarray):
    """Dense reward in [0, 1]: share of response tokens that contain a digit."""
    def reward(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        hits = (table[tokens] & mask).sum(axis=1)
        return hits / np.maximum(mask.sum(axis=1), 1)
    return reward


def at_least_k_digits_reward(table: np.ndarray, k: int):
    """Binary reward: 1 when the response holds at least ``k`` digit tokens."""
    def reward(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return ((table[tokens] & mask).sum(axis=1) >= k).astype(np.float32)
    return reward
