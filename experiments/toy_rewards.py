"""Checkable rewards over token ids, for showing that a recipe learns.

The property "a response token contains a decimal digit" is verifiable from
ids alone and rare under the bundled model, so it gives both a dense reward
(the fraction of such tokens) and a high-failure one (at least k of them).
A common property (a token containing the letter "e") gives a reward whose
groups are rarely all equal: a short run that moves the weights from its first update.
"""

from __future__ import annotations

import numpy as np


def token_table(tokenizer, has_property) -> np.ndarray:
    """[V] bool: which token ids decode to text for which ``has_property(text)`` holds."""
    table = np.zeros(len(tokenizer), bool)
    for token, index in tokenizer.get_vocab().items():
        if has_property(tokenizer.convert_tokens_to_string([token])):
            table[index] = True
    return table


def digit_token_table(tokenizer) -> np.ndarray:
    """[V] bool: which token ids decode to text containing a digit (rare)."""
    return token_table(tokenizer, lambda text: any(ch.isdigit() for ch in text))


def letter_token_table(tokenizer, letter: str = "e") -> np.ndarray:
    """[V] bool: which token ids decode to text containing ``letter`` (common)."""
    return token_table(tokenizer, lambda text: letter in text.lower())


def token_fraction_reward(table: np.ndarray):
    """Dense reward in [0, 1]: share of response tokens that are in ``table``."""
    def reward(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        hits = (table[tokens] & mask).sum(axis=1)
        return hits / np.maximum(mask.sum(axis=1), 1)
    return reward


def at_least_k_digits_reward(table: np.ndarray, k: int):
    """Binary reward: 1 when the response holds at least ``k`` digit tokens."""
    def reward(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return ((table[tokens] & mask).sum(axis=1) >= k).astype(np.float32)
    return reward
