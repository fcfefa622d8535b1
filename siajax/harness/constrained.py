"""Constrained decoding: a token automaton that limits a decoder to a label language.

The harness's parser says which labels an answer may name and how they are
joined (``AnswerParser.constrained``); this module turns that into a
deterministic automaton over token ids. The sampler masks logits with it at
every step, and the trainer applies the very same allowed sets, so the policy
that is trained is the one that sampled.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class TokenAutomaton(NamedTuple):
    """A deterministic automaton over token ids.

    tokens[s, f]: the f-th token allowed in state s (-1 = unused slot);
    next_state[s, f]: the state after emitting it. State 0 is the start.
    """

    tokens: jax.Array
    next_state: jax.Array


def label_automaton(encode, labels, *, prefix: str = "", separator: str | None = None, terminator: str = "",
                    stop_token_id: int) -> TokenAutomaton:
    """Accepts ``prefix label (separator label)* terminator <stop>``, labels from a fixed set.

    encode: text -> token ids (no special tokens). Labels share a trie, so the
    policy picks among them token by token; each piece is tokenised on its own.
    """
    edges: list[dict[int, int]] = [{}]

    def new_state() -> int:
        edges.append({})
        return len(edges) - 1

    def chain(start: int, ids: list[int], end: int | None = None) -> int:
        state = start
        for position, token in enumerate(ids):
            last = position == len(ids) - 1
            if token in edges[state]:
                if last and end is not None and edges[state][token] != end:
                    raise ValueError(f"token {token} is ambiguous in the automaton; change the separators")
                state = edges[state][token]
            else:
                target = end if (last and end is not None) else new_state()
                edges[state][token] = target
                state = target
        return state

    label_root = chain(0, encode(prefix)) if prefix else 0
    if label_root == 0 and prefix:
        raise ValueError("empty prefix encoding")
    accepting = {chain(label_root, encode(label)) for label in labels if label}
    done = new_state()
    for state in accepting:
        if separator:
            chain(state, encode(separator), end=label_root)
        if terminator:
            chain(state, encode(terminator) + [stop_token_id], end=done)
        else:
            chain(state, [stop_token_id], end=done)
    edges[done][stop_token_id] = done
    width = max(len(e) for e in edges)
    tokens = np.full((len(edges), width), -1, np.int32)
    next_state = np.zeros((len(edges), width), np.int32)
    for state, out in enumerate(edges):
        for slot, (token, target) in enumerate(sorted(out.items())):
            tokens[state, slot], next_state[state, slot] = token, target
    return TokenAutomaton(jnp.asarray(tokens), jnp.asarray(next_state))


def allowed_tokens(automaton: TokenAutomaton, state: jax.Array) -> jax.Array:
    """state [B] -> the allowed token ids [B, F] (-1 = unused slot)."""
    return automaton.tokens[state]


def mask_logits(logits: jax.Array, allowed: jax.Array) -> jax.Array:
    """logits [B, V] with every token outside ``allowed`` [B, F] set to -inf."""
    rows = jnp.arange(logits.shape[0])[:, None]
    keep = jnp.zeros(logits.shape, bool).at[rows, jnp.maximum(allowed, 0)].max(allowed >= 0)
    return jnp.where(keep, logits, -jnp.inf)


def advance(automaton: TokenAutomaton, state: jax.Array, token: jax.Array) -> jax.Array:
    """The state after emitting ``token`` [B] in ``state`` [B]."""
    hit = automaton.tokens[state] == token[:, None]
    return jnp.sum(jnp.where(hit, automaton.next_state[state], 0), axis=-1).astype(jnp.int32)
