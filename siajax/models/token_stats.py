"""Log-probabilities and entropies of chosen tokens, the LM head applied in vocabulary chunks.

Training needs, per response position, log p(token) and the entropy of the
distribution softmax(logits / T), possibly restricted to an allowed set of
tokens (constrained decoding). Computing full float32 logits [B, T, V] for
that is the largest array of a step at real vocabulary sizes (49k-152k). Here
the head runs over chunks of the vocabulary inside a rematerialised scan that
keeps only running statistics (max, sum of exp, sum of exp·logit, the chosen
token's logit), so memory is O(B·T·chunk) in the forward and the backward.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

DEFAULT_CHUNK = 8192


class TokenStats(NamedTuple):
    logprobs: jax.Array  # [B, T] log p(target) under softmax(logits / T) (over the allowed set if given)
    entropy: jax.Array  # [B, T] entropy of that distribution


def _inverse_temperature(temperature, batch: int) -> jax.Array:
    """[B, 1, 1] 1/T; T <= 0 (greedy) reads the raw logits, as the sampler reports them."""
    t = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (batch,))
    return (1.0 / jnp.where(t > 0, t, 1.0))[:, None, None]


def _gather_in_chunk(logits, ids, start, width):
    """logits [B, T, C] at ids [B, T, ...] that fall in [start, start + width); 0 elsewhere."""
    local = ids - start
    inside = (ids >= 0) & (local >= 0) & (local < width)
    flat = local.reshape(*local.shape[:2], -1)
    picked = jnp.take_along_axis(logits, jnp.clip(flat, 0, width - 1), axis=-1).reshape(local.shape)
    return jnp.where(inside, picked, 0.0), inside


def token_stats(hidden: jax.Array, head: jax.Array, targets: jax.Array, temperature=1.0, *,
                allowed: jax.Array | None = None, chunk: int = DEFAULT_CHUNK) -> TokenStats:
    """Chosen-token log-probs and entropies without a [B, T, V] float32 array.

    Args:
      hidden: [B, T, E] final hidden states (any float dtype).
      head: [E, V] LM-head matrix; products accumulate in float32.
      targets: [B, T] token ids whose log-probs are wanted.
      temperature: scalar or [B]; logits are divided by it.
      allowed: optional [B, T, F] token ids (-1 = unused slot) the distribution is
        restricted to at each position (a constrained decoder's allowed set); a
        position whose slots are all -1 gets log-prob 0 and entropy 0.
      chunk: vocabulary columns per step of the scan.
    """
    batch, length, _ = hidden.shape
    vocab = head.shape[1]
    width = min(chunk, vocab)
    chunks = -(-vocab // width)
    padded = jnp.pad(head, ((0, 0), (0, chunks * width - vocab)))
    columns = padded.reshape(head.shape[0], chunks, width).transpose(1, 0, 2)  # [n, E, C]
    starts = jnp.arange(chunks, dtype=jnp.int32) * width
    inv_t = _inverse_temperature(temperature, batch)
    restricted = allowed is not None

    def step(carry, inputs):
        running_max, sum_exp, sum_exp_logit, target_logit, allowed_logits = carry
        weights, start = inputs
        logits = jnp.einsum("bte,ec->btc", hidden, weights, preferred_element_type=jnp.float32) * inv_t
        real = (start + jnp.arange(width)) < vocab
        logits = jnp.where(real, logits, -jnp.inf)
        new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
        rescale = jnp.exp(running_max - new_max)
        weights_exp = jnp.exp(logits - new_max[..., None])
        sum_exp = sum_exp * rescale + jnp.sum(weights_exp, axis=-1)
        sum_exp_logit = sum_exp_logit * rescale + jnp.sum(weights_exp * jnp.where(real, logits, 0.0), axis=-1)
        target_logit = target_logit + _gather_in_chunk(logits, targets, start, width)[0]
        if restricted:
            allowed_logits = allowed_logits + _gather_in_chunk(logits, allowed, start, width)[0]
        return (new_max, sum_exp, sum_exp_logit, target_logit, allowed_logits), None

    zeros = jnp.zeros((batch, length), jnp.float32)
    init = (jnp.full((batch, length), -jnp.inf), zeros, zeros, zeros,
            jnp.zeros(allowed.shape, jnp.float32) if restricted else None)
    # Recompute each chunk's logits in the backward pass instead of storing them all.
    step = jax.checkpoint(step, prevent_cse=False)
    (running_max, sum_exp, sum_exp_logit, target_logit, allowed_logits), _ = jax.lax.scan(
        step, init, (columns, starts))
    if restricted:
        valid = allowed >= 0
        # A position with no allowed id (past the end of a stopped row) has no distribution: it gets
        # log-prob and entropy 0, and every slot counts there so that log_norm stays finite (an all
        # -inf logsumexp is -inf, its log-prob +inf, and one such masked token made a loss NaN).
        has_choice = jnp.any(valid, axis=-1)
        valid = valid | ~has_choice[..., None]
        log_norm = jax.nn.logsumexp(jnp.where(valid, allowed_logits, -jnp.inf), axis=-1)
        log_p = jnp.where(valid, allowed_logits - log_norm[..., None], 0.0)  # finite everywhere: safe gradients
        entropy = -jnp.sum(jnp.where(valid, jnp.exp(log_p) * log_p, 0.0), axis=-1)
        return TokenStats(jnp.where(has_choice, target_logit - log_norm, 0.0), jnp.where(has_choice, entropy, 0.0))
    log_norm = running_max + jnp.log(sum_exp)
    return TokenStats(target_logit - log_norm, log_norm - sum_exp_logit / sum_exp)
