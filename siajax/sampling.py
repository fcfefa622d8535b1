"""Batched, jitted sampling: one prefill, then a ``lax.while_loop`` of decode steps.

Shapes are static per (batch, prompt bucket, max_new_tokens, top_k, stop ids), so
a bucket compiles once and every later call reuses it; temperature and top-p are
traced values and never recompile. The KV cache is preallocated for
prompt + max_new_tokens slots. Prompts are left-padded so all rows write the
same cache slot each step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from siajax.models.transformer import KVCache, Transformer, positions_from_mask


class GenerationResult(NamedTuple):
    """Everything a rollout needs to score and train on its samples.

    tokens, logprobs, mask: [B, N]. ``mask`` marks response tokens (the stop
    token included); tokens after a stop are ``pad_token_id`` with logprob 0.
    ``logprobs`` are log-probabilities under the tempered, untruncated
    distribution softmax(logits / temperature) (raw logits when greedy), the
    behaviour policy a policy-gradient ratio is taken against.
    """

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    lengths: jax.Array
    prompt_tokens: jax.Array  # [B, P] left-padded
    prompt_mask: jax.Array  # [B, P]


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """The static part of a sampling call (changing it recompiles)."""

    max_new_tokens: int
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    lora: bool = True


def bucket_length(n: int, minimum: int = 16) -> int:
    """Rounds a prompt length up to a power of two so similar prompts share a compilation."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


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


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log softmax(logits)[tokens]: logits [..., V] float, tokens [...] int -> [...]."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    return jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0] - logz


def _nucleus_filter(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keeps the smallest set of top tokens whose probability mass reaches top_p."""
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_next_token(logits, key, temperature, top_p, top_k: int):
    """Draws one token per row from logits [B, V]; returns (token [B], logprob [B]).

    temperature <= 0 means greedy. top_k = 0 and top_p >= 1 disable truncation.
    """
    greedy = temperature <= 0.0
    scaled = logits / jnp.where(greedy, 1.0, temperature)

    def draw(scaled):
        filtered = scaled
        if top_k > 0:
            kth_largest = jax.lax.top_k(scaled, top_k)[0][..., -1:]
            filtered = jnp.where(scaled < kth_largest, -jnp.inf, scaled)
        filtered = jax.lax.cond(top_p < 1.0, _nucleus_filter, lambda x, _: x, filtered, top_p)
        return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

    # Greedy skips the noise draw over the vocabulary, the costliest part of a small model's step.
    token = jax.lax.cond(greedy, lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32), draw, scaled)
    return token, token_logprobs(scaled, token)


@partial(jax.jit, static_argnames=("graphdef", "spec"))
def _generate(graphdef, state, prompt_tokens, prompt_mask, key, temperature, top_p, spec: DecodeSpec):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = prompt_tokens.shape
    steps = spec.max_new_tokens
    stop_ids = jnp.asarray(spec.stop_token_ids or (-1,), jnp.int32)

    cache = KVCache.empty(model.config, batch, prompt_len + steps)
    out = model(prompt_tokens, attention_mask=prompt_mask, cache=cache, lora=spec.lora)
    next_position = jnp.sum(prompt_mask, axis=-1).astype(jnp.int32)
    key, first_key = jax.random.split(key)
    token, logprob = sample_next_token(out.logits[:, -1], first_key, temperature, top_p, spec.top_k)

    tokens = jnp.full((batch, steps), spec.pad_token_id, jnp.int32).at[:, 0].set(token)
    logprobs = jnp.zeros((batch, steps), jnp.float32).at[:, 0].set(logprob)
    done = jnp.isin(token, stop_ids)
    lengths = jnp.ones((batch,), jnp.int32)

    def keep_going(carry):
        step, _, _, done, *_ = carry
        return (step < steps) & ~jnp.all(done)

    def decode_step(carry):
        step, cache, position, done, tokens, logprobs, lengths, key = carry
        previous = tokens[:, step - 1]
        out = model(
            previous[:, None], attention_mask=jnp.ones((batch, 1), bool),
            positions=position[:, None], cache=cache, lora=spec.lora,
        )
        key, step_key = jax.random.split(key)
        token, logprob = sample_next_token(out.logits[:, -1], step_key, temperature, top_p, spec.top_k)
        token = jnp.where(done, spec.pad_token_id, token)
        tokens = tokens.at[:, step].set(token)
        logprobs = logprobs.at[:, step].set(jnp.where(done, 0.0, logprob))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, stop_ids)
        return step + 1, out.cache, position + 1, done, tokens, logprobs, lengths, key

    carry = (jnp.ones((), jnp.int32), out.cache, next_position, done, tokens, logprobs, lengths, key)
    _, _, _, _, tokens, logprobs, lengths, _ = jax.lax.while_loop(keep_going, decode_step, carry)
    mask = jnp.arange(steps)[None, :] < lengths[:, None]
    return GenerationResult(tokens, logprobs, mask, lengths, prompt_tokens, prompt_mask)


def generate(
    model: Transformer,
    prompt_token_ids,
    *,
    key: jax.Array,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    lora: bool = True,
) -> GenerationResult:
    """Samples continuations for a batch of prompts.

    prompt_token_ids: ragged list of token-id lists, or an int array [B, P] of
    unpadded prompts. ``lora=False`` samples from the frozen base policy.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if isinstance(prompt_token_ids, (np.ndarray, jax.Array)) and np.ndim(prompt_token_ids) == 2:
        prompt_token_ids = np.asarray(prompt_token_ids).tolist()
    tokens, mask = left_pad(prompt_token_ids, pad_token_id)
    spec = DecodeSpec(max_new_tokens, int(top_k or 0), tuple(int(t) for t in stop_token_ids), pad_token_id, lora)
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), key,
        jnp.float32(temperature), jnp.float32(top_p), spec,
    )
