"""Prompt batches as the compiler sees them: left-padded to bucketed shapes, and what their rows
share found once so it is run once.

A call's rows often repeat a prompt (G samples of one prompt, evaluation votes) and nearly always
start alike (the harness's system prompt and few-shot examples, then an item). The sampler's
prefill and the learner's forward pass run each distinct prompt once (:class:`SharedPrompts`) and
the common start once, as one row (:class:`SharedPrefix`); the keys and values serve every row
that continues them. The KV cache then holds [pad, prefix, pad, suffix] per row, positions counted
over real tokens, so attention and RoPE see each prompt as written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from siajax.models.transformer import KVCache, ModelOutput, Transformer, positions_from_mask

MIN_SHARED_PREFIX = 8  # tokens: below this a second prefill program is not worth compiling
PREFIX_SAVING = 0.75  # share a prefix only when it cuts the prompt tokens run to this fraction or less


def bucket_length(n: int, minimum: int = 16) -> int:
    """Rounds a length up to a power of two (at least ``minimum``) so similar calls share a program."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def row_bucket(rows: int, multiple: int = 1) -> int:
    """Rows padded to a power of two, and to a multiple of the batch shards under a mesh."""
    padded = 1 << max(0, rows - 1).bit_length()
    return -(-padded // multiple) * multiple


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int, length: int | None = None):
    """Ragged prompts -> (tokens [B, P] int32, mask [B, P] bool), right-aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    length = bucket_length(longest) if length is None else length
    if length < longest:
        raise ValueError(f"pad length {length} is shorter than the longest prompt ({longest})")
    tokens = np.full((len(prompts), length), pad_token_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt):] = np.asarray(prompt, np.int32)
        mask[row, length - len(prompt):] = True
    return tokens, mask


class SharedPrefix(NamedTuple):
    """The tokens every distinct prompt starts with, run once as one row into the first
    ``tokens.shape[1]`` cache slots; each prompt's own ``suffix`` follows them. tokens / mask [1, C]
    and suffix_tokens / suffix_mask [U, S], left-padded, C + S = P (the prompts' own width: the cache,
    the decode program and the learner's shapes stay those of the unshared prompts)."""

    tokens: jax.Array
    mask: jax.Array
    suffix_tokens: jax.Array
    suffix_mask: jax.Array


class SharedPrompts(NamedTuple):
    """The distinct prompts of a batch: tokens / mask [U, P], left-padded like the rows' (U a power of
    two), each row's prompt ``row_source`` [B], and their common start ``prefix`` (or None). Each is
    run once; its keys and values serve every row that continues it (:meth:`KVCache.take_rows`)."""

    tokens: jax.Array
    mask: jax.Array
    row_source: jax.Array
    prefix: SharedPrefix | None = None

    def prompt_inputs(self):
        """-> (tokens, mask, prefix or None): what :func:`run_prompts` runs (the suffixes after a prefix)."""
        if self.prefix is None:
            return self.tokens, self.mask, None
        return self.prefix.suffix_tokens, self.prefix.suffix_mask, self.prefix


def distinct_prompts(prompt_tokens, prompt_mask) -> SharedPrompts | None:
    """The distinct rows of left-padded prompts [B, P] in order of first appearance (repeated up to a
    power of two, so a few shapes compile), or None when they would not be fewer rows than B."""
    prompt_tokens, prompt_mask = np.asarray(prompt_tokens), np.asarray(prompt_mask)
    rows = np.concatenate([prompt_tokens, prompt_mask.astype(np.int32)], axis=1)
    _, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
    if row_bucket(len(first)) >= len(rows):
        return None
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    firsts = first[order]
    firsts = np.concatenate([firsts, np.full(row_bucket(len(firsts)) - len(firsts), firsts[-1])])
    return SharedPrompts(jnp.asarray(prompt_tokens[firsts]), jnp.asarray(prompt_mask[firsts]),
                         jnp.asarray(rank[inverse.reshape(-1)], jnp.int32))


def shared_prefix(prompt_tokens, prompt_mask) -> SharedPrefix | None:
    """The common first tokens of left-padded prompts [U, P] (each keeps at least one token of its own,
    whose hidden state predicts what follows), or None when running them once would not cut the
    prompt tokens run (rows x length) to ``PREFIX_SAVING`` or less. The suffixes get the smallest
    power of two that holds the longest (so few shapes compile), the prefix the rest of P."""
    prompt_tokens, prompt_mask = np.asarray(prompt_tokens), np.asarray(prompt_mask, bool)
    rows = [row[keep] for row, keep in zip(prompt_tokens, prompt_mask)]
    shortest, width = min(len(row) for row in rows), prompt_tokens.shape[1]
    differs = np.any(np.stack([row[:shortest] for row in rows]) != rows[0][:shortest], axis=0)
    common = min(int(np.argmax(differs)) if differs.any() else shortest, shortest - 1)
    if common < MIN_SHARED_PREFIX or len(rows) < 2:
        return None
    suffix_width = min(bucket_length(max(len(row) for row in rows) - common), width - common)
    if width - suffix_width + len(rows) * suffix_width > PREFIX_SAVING * prompt_tokens.size:
        return None
    suffix_tokens, suffix_mask = left_pad([row[common:] for row in rows], 0, suffix_width)
    tokens, mask = left_pad([rows[0][:common]], 0, width - suffix_width)
    return SharedPrefix(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(suffix_tokens), jnp.asarray(suffix_mask))


def prompt_sharing(prompt_tokens, prompt_mask) -> SharedPrompts | None:
    """What the rows [B, P] share: their distinct prompts (when fewer) and those prompts' common start
    (when it pays); None when neither would save work."""
    distinct = distinct_prompts(prompt_tokens, prompt_mask)
    rows = distinct or SharedPrompts(jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask),
                                     jnp.arange(len(prompt_tokens), dtype=jnp.int32))
    prefix = shared_prefix(rows.tokens, rows.mask)
    if distinct is None and prefix is None:
        return None
    return rows._replace(prefix=prefix)


def run_prompts(model: Transformer, tokens, mask, prefix: SharedPrefix | None, slots: int, *, lora: bool,
                head: str, dropout_key: jax.Array | None = None, cache: KVCache | None = None):
    """Prompts [U, P] into a fresh KV cache of ``slots`` (or ``cache``), after ``prefix`` when given
    (run once, one row, its keys and values broadcast to the U rows); -> (ModelOutput, each prompt's
    real token count [U] int32: the next position)."""
    offset, prompt_key = jnp.zeros((), jnp.int32), dropout_key
    if prefix is None:
        cache = KVCache.empty(model.config, tokens.shape[0], slots) if cache is None else cache
    else:
        prefix_key = None
        if dropout_key is not None:
            prefix_key, prompt_key = jax.random.split(dropout_key)
        one = model(prefix.tokens, attention_mask=prefix.mask, cache=KVCache.empty(model.config, 1, slots),
                    kv_span=prefix.tokens.shape[1], lora=lora, dropout_key=prefix_key, head="none").cache
        cache = _broadcast_rows(one, tokens.shape[0])
        offset = jnp.sum(prefix.mask, dtype=jnp.int32)
    width = tokens.shape[1] + (0 if prefix is None else prefix.tokens.shape[1])
    out: ModelOutput = model(tokens, attention_mask=mask, positions=positions_from_mask(mask, offset), cache=cache,
                             kv_span=width, lora=lora, dropout_key=prompt_key, head=head)
    return out, offset + jnp.sum(mask, axis=-1, dtype=jnp.int32)


def _broadcast_rows(cache: KVCache, rows: int) -> KVCache:
    """A one-row cache as ``rows`` rows (the gradient of a copy sums over the rows that read it)."""
    def widen(x, axis):
        return jnp.broadcast_to(x, x.shape[:axis] + (rows,) + x.shape[axis + 1:])
    return KVCache(widen(cache.keys, 1), widen(cache.values, 1), widen(cache.valid, 0), cache.index)
