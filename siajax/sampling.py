"""Batched, jitted sampling: one prefill program, then a decode program of ``lax.while_loop`` steps.

Every shape that reaches the compiler is bucketed so that a new request rarely
compiles a new program: rows are padded to a power of two (padding rows start
finished), prompts are left-padded to a power of two, and ``max_new_tokens``
is rounded up to one (the real limit is a traced value). Temperature, top-p
and the limit are traced and never recompile; top-k and the stop ids are
static. Decoding runs in a few segments whose attention spans only the filled
part of the preallocated KV cache (doubling spans), not all of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from siajax import timing
from siajax.harness.constrained import TokenAutomaton, advance, allowed_tokens, mask_logits
from siajax.models.transformer import KVCache, Transformer
from siajax.parallel.distributed import gather_to_host, global_max, to_global
from siajax.parallel.mesh import ambient_mesh, batch_shard_count, mesh_context
from siajax.parallel.rules import PARTITION_RULES, Rules, shard_tree, spec_for
from siajax.prompts import SharedPrompts, bucket_length, left_pad, prompt_sharing, row_bucket, run_prompts


class GenerationResult(NamedTuple):
    """Everything a rollout needs to score and train on its samples.

    tokens, logprobs, mask: [B, N]. ``mask`` marks response tokens (the stop
    token included); tokens after a stop are ``pad_token_id`` with logprob 0.
    ``logprobs`` are log-probabilities of the distribution each token was
    drawn from: softmax(logits / temperature), restricted to the constraint's
    allowed tokens and truncated by top-k / top-p when those are on (greedy:
    the raw logits' softmax). ``temperature``, ``top_p``, ``top_k`` are the
    draw's settings and ``allowed`` [B, N, F] the constraint's allowed token
    ids at each step (-1 = unused; None unconstrained), so a trainer can
    recompute exactly this distribution.

    A multi-turn episode (:mod:`siajax.agents.episodes`) is one row too: its
    response region holds the model's turns and the environment's segments
    between them, ``mask`` all of their tokens (what attention reads) and
    ``policy_mask`` only the model's (what is trained; None: all of ``mask``).
    """

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    lengths: jax.Array
    prompt_tokens: jax.Array  # [B, P] left-padded
    prompt_mask: jax.Array  # [B, P]
    temperature: jax.Array  # [] float32
    top_p: jax.Array  # [] float32
    top_k: jax.Array  # [] int32
    allowed: jax.Array | None = None  # [B, N, F] int32
    policy_mask: jax.Array | None = None  # [B, N] bool: the policy's tokens (None: all of mask)

    @property
    def trained_mask(self) -> jax.Array:
        """The tokens a trainer scores against the sampler and puts in the loss."""
        return self.mask if self.policy_mask is None else self.policy_mask

    @property
    def truncated(self) -> bool:
        """Whether top-k or top-p cut the distribution (a trainer cannot recompute that cut)."""
        return bool(self.top_k > 0) or bool(self.top_p < 1.0)


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """The static part of a sampling call (changing it recompiles)."""

    max_new_tokens: int  # bucketed; the requested limit is traced
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    lora: bool = True
    constrained: bool = False
    row_keys: bool = False  # each row draws with its own key (see _draw): draws independent of the batch layout


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


def categorical_by_inverse_cdf(key: jax.Array, logits: jax.Array) -> jax.Array:
    """One token per row of logits [..., V] drawn from their softmax -> int32 [...].

    One uniform per row, placed on the running sum of the probabilities: the Gumbel trick
    (``jax.random.categorical``) draws V random numbers a row instead, which on CPU cost 4x this whole
    draw (24 ms against 5 ms at 32 x 49,152). A token's probability is the width of its interval on the
    float32 running sum, off by a few ulps of the total where rounding errors cancel (~sqrt(V) ulps,
    ~1e-5 at V = 49,152) and by V ulps at worst; a token of probability 0 is never drawn.
    """
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    cumulative = jnp.cumsum(probs, axis=-1)
    total = cumulative[..., -1:]
    point = jnp.minimum(jax.random.uniform(key, total.shape) * total, jnp.nextafter(total, 0.0))
    # The first token whose running sum passes the point; requiring p > 0 keeps a zero-probability token
    # out even where the summation order makes the running sum tie or dip by an ulp.
    return jnp.argmax((cumulative > point) & (probs > 0), axis=-1).astype(jnp.int32)


def sample_next_token(logits, key, temperature, top_p, top_k: int, allowed: jax.Array | None = None):
    """Draws one token per row from logits [B, V]; returns (token [B], logprob [B]).

    temperature <= 0 means greedy. top_k = 0 and top_p >= 1 disable truncation.
    ``allowed`` [B, F] (token ids, -1 unused) restricts the draw. The log-prob is
    that of the distribution the token was drawn from (see GenerationResult).
    """
    greedy = temperature <= 0.0
    if allowed is not None:
        logits = mask_logits(logits, allowed)
    scaled = logits / jnp.where(greedy, 1.0, temperature)

    def pick_greedy(scaled):
        token = jnp.argmax(scaled, axis=-1).astype(jnp.int32)
        return token, token_logprobs(scaled, token)

    def draw(scaled):
        filtered = scaled
        if top_k > 0:
            kth_largest = jax.lax.top_k(scaled, top_k)[0][..., -1:]
            filtered = jnp.where(scaled < kth_largest, -jnp.inf, scaled)
        filtered = jax.lax.cond(top_p < 1.0, _nucleus_filter, lambda x, _: x, filtered, top_p)
        token = categorical_by_inverse_cdf(key, filtered)
        return token, token_logprobs(filtered, token)

    # Greedy skips the draw (softmax, running sum and filters over the vocabulary).
    return jax.lax.cond(greedy, pick_greedy, draw, scaled)


def _constrain_cache(cache: KVCache, rules: Rules | None) -> KVCache:
    """Lays the cache out by the rules when tracing under a mesh (a no-op otherwise)."""
    mesh = ambient_mesh()
    if rules is None or mesh is None:
        return cache
    specs = {name: spec_for(f"cache/{name}", getattr(cache, name).shape, mesh, rules)
             for name in ("keys", "values", "valid", "index")}
    return KVCache(**{name: jax.lax.with_sharding_constraint(getattr(cache, name), spec)
                      for name, spec in specs.items()})


def kv_span_segments(prompt_len: int, steps: int, first: int = 128) -> list[int]:
    """Ends (in cache slots) of the decode segments: each attends to that many slots.

    Spans double from max(2P, P + first) until the whole cache, so attention
    reads at most twice the filled part with only a few compiled loop bodies.
    """
    total, ends = prompt_len + steps, []
    end = max(2 * prompt_len, prompt_len + first)
    while end < total:
        ends.append(end)
        end *= 2
    return ends + [total]


def _draw(spec: DecodeSpec, automaton, temperature, top_p, logits, step_key, automaton_state, row_ids):
    """One token per row, within the automaton's allowed set when constrained; -> ((token, logprob), allowed).

    With ``spec.row_keys`` row r draws with ``fold_in(step_key, row_ids[r])``, so what a row draws does
    not depend on which other rows share its batch (rows may leave it: :func:`_retiring_decode`);
    otherwise one key draws for the whole batch."""
    allowed = allowed_tokens(automaton, automaton_state) if spec.constrained else None

    def sample(logits, key, allowed):
        return sample_next_token(logits, key, temperature, top_p, spec.top_k, allowed)

    if not spec.row_keys:
        return sample(logits, step_key, allowed), allowed
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, row_ids)
    token, logprob = jax.vmap(lambda row, key, ok: sample(row[None], key, None if ok is None else ok[None]))(
        logits, keys, allowed)
    return (token[:, 0], logprob[:, 0]), allowed


def _first_token_state(draw, logits, key, spec: DecodeSpec, automaton, live_rows, stop_ids):
    """The decode loop's buffers after the prefill's token (padding rows start, and stay, finished);
    -> (done, tokens, logprobs, allowed_log, lengths, automaton_state)."""
    batch, steps = logits.shape[0], spec.max_new_tokens
    width = automaton.tokens.shape[1] if spec.constrained else 0
    automaton_state = jnp.zeros((batch,), jnp.int32)
    (token, logprob), allowed = draw(logits, key, automaton_state, jnp.arange(batch, dtype=jnp.int32))
    if spec.constrained:
        automaton_state = advance(automaton, automaton_state, token)
    done = jnp.arange(batch) >= live_rows
    token = jnp.where(done, spec.pad_token_id, token)
    tokens = jnp.full((batch, steps), spec.pad_token_id, jnp.int32).at[:, 0].set(token)
    logprobs = jnp.zeros((batch, steps), jnp.float32).at[:, 0].set(jnp.where(done, 0.0, logprob))
    allowed_log = jnp.full((batch, steps, width), -1, jnp.int32)
    if spec.constrained:
        allowed_log = allowed_log.at[:, 0].set(jnp.where(done[:, None], -1, allowed))
    lengths = (~done).astype(jnp.int32)
    return done | jnp.isin(token, stop_ids), tokens, logprobs, allowed_log, lengths, automaton_state


class PromptPlan(NamedTuple):
    """A call's rows: tokens / mask [B, P] left-padded (what the result reports and the learner reads),
    and what their prefill shares (:func:`siajax.prompts.prompt_sharing`), or None."""

    tokens: np.ndarray
    mask: np.ndarray
    shared: SharedPrompts | None

    def prefilled_tokens(self) -> int:
        """Token slots the prefill runs (padding included): the measure of what sharing saves."""
        if self.shared is None:
            return int(np.size(self.tokens))
        tokens, _, prefix = self.shared.prompt_inputs()
        return int(tokens.size) + (0 if prefix is None else int(prefix.tokens.size))


@partial(jax.jit, static_argnames=("graphdef", "spec", "rules"))
def _prefill(graphdef, state, prompt_tokens, prompt_mask, live_rows, key, temperature, top_p,
             spec: DecodeSpec, automaton: TokenAutomaton | None = None, rules: Rules | None = None,
             shared: SharedPrompts | None = None):
    """The prompts' forward pass into a fresh KV cache and the first token; -> (cache, the rest of the
    decode loop's carry). With ``shared`` each distinct prompt (and their common prefix) is run once
    and the cache broadcast to the rows that continue it (a prompt sampled G times costs one)."""
    model = nnx.merge(graphdef, state)
    stop_ids = jnp.asarray(spec.stop_token_ids or (-1,), jnp.int32)
    if shared is not None:
        prompt_tokens, prompt_mask, prefix = shared.prompt_inputs()
        width = shared.tokens.shape[1]
    else:
        prefix, width = None, prompt_tokens.shape[1]
    slots = width + spec.max_new_tokens
    fresh = None if prefix is not None else _constrain_cache(KVCache.empty(model.config, len(prompt_tokens), slots),
                                                             rules)
    out, next_position = run_prompts(model, prompt_tokens, prompt_mask, prefix, slots, lora=spec.lora, head="last",
                                     cache=fresh)
    cache, logits = out.cache, out.logits[:, -1]
    if shared is not None:
        source = shared.row_source
        cache, logits, next_position = cache.take_rows(source), logits[source], next_position[source]
    key, first_key = jax.random.split(key)
    draw = partial(_draw, spec, automaton, temperature, top_p)
    done, tokens, logprobs, allowed_log, lengths, automaton_state = _first_token_state(
        draw, logits, first_key, spec, automaton, live_rows, stop_ids)
    return _constrain_cache(cache, rules), (jnp.ones((), jnp.int32), next_position, done, tokens, logprobs,
                                            allowed_log, lengths, key, automaton_state,
                                            jnp.arange(tokens.shape[0], dtype=jnp.int32))


def _decode_loop(model, cache, carry, prompt_len: int, temperature, top_p, limit, spec: DecodeSpec, automaton,
                 rules, unstacked):
    """Token after token from ``carry`` (step, position, done, tokens, logprobs, allowed_log, lengths, key,
    automaton_state, row_ids) until ``limit`` tokens or every row stopped; -> (cache, carry) in the same layout.
    ``unstacked``: the model's per-layer weights to run unrolled (None: scan the stack)."""
    batch, steps = carry[3].shape[0], spec.max_new_tokens
    stop_ids = jnp.asarray(spec.stop_token_ids or (-1,), jnp.int32)
    draw = partial(_draw, spec, automaton, temperature, top_p)

    def decode_step(span, carry):
        step, cache, position, done, tokens, logprobs, allowed_log, lengths, key, automaton_state, row_ids = carry
        previous = tokens[:, step - 1]
        out = model(previous[:, None], attention_mask=jnp.ones((batch, 1), bool), positions=position[:, None],
                    cache=cache, kv_span=span, lora=spec.lora, head="last", unstacked_layers=unstacked)
        key, step_key = jax.random.split(key)
        (token, logprob), allowed = draw(out.logits[:, -1], step_key, automaton_state, row_ids)
        if spec.constrained:
            automaton_state = advance(automaton, automaton_state, token)
            allowed_log = allowed_log.at[:, step].set(jnp.where(done[:, None], -1, allowed))
        token = jnp.where(done, spec.pad_token_id, token)
        tokens = tokens.at[:, step].set(token)
        logprobs = logprobs.at[:, step].set(jnp.where(done, 0.0, logprob))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, stop_ids)
        cache = _constrain_cache(out.cache, rules)
        return (step + 1, cache, position + 1, done, tokens, logprobs, allowed_log, lengths, key, automaton_state,
                row_ids)

    step, *rest = carry
    carry = (step, cache, *rest)
    for span in kv_span_segments(prompt_len, steps):
        # Step s writes slot P + s - 1 and reads slots [0, P + s): this segment covers P + s <= span.
        def keep_going(carry, span=span):
            step, _, _, done, *_ = carry
            return (step < limit) & (prompt_len + step <= span) & ~jnp.all(done)

        carry = jax.lax.while_loop(keep_going, partial(decode_step, span), carry)
    step, cache, *rest = carry
    return cache, (step, *rest)


@partial(jax.jit, static_argnames=("graphdef", "spec", "rules"), donate_argnames=("cache",))
def _decode(graphdef, state, cache, carry, prompt_tokens, prompt_mask, temperature, top_p, limit,
            spec: DecodeSpec, automaton: TokenAutomaton | None = None, rules: Rules | None = None):
    """Token after token from the prefill's cache and carry until every row stops; -> (result, the
    final cache: returned only so that the donated cache is updated in place, not copied)."""
    model = nnx.merge(graphdef, state)
    unstacked = model.unstacked_layers() if model.config.decode_unroll else None
    cache, carry = _decode_loop(model, cache, carry, prompt_tokens.shape[1], temperature, top_p, limit, spec,
                                automaton, rules, unstacked)
    _, _, _, tokens, logprobs, allowed_log, lengths, _, _, _ = carry
    mask = jnp.arange(spec.max_new_tokens)[None, :] < lengths[:, None]
    return GenerationResult(tokens, logprobs, mask, lengths, prompt_tokens, prompt_mask, temperature, top_p,
                            jnp.int32(spec.top_k), allowed_log if spec.constrained else None), cache


@partial(jax.jit, static_argnames=("graphdef",))
def _unstacked_layers(graphdef, state):
    """The per-layer weight copies a stream's chunks share (made once per call, as in :func:`_decode`)."""
    return nnx.merge(graphdef, state).unstacked_layers()


@partial(jax.jit, static_argnames=("graphdef", "spec", "prompt_len"), donate_argnames=("cache",))
def _decode_until(graphdef, state, unstacked, cache, carry, temperature, top_p, limit, spec: DecodeSpec,
                  prompt_len: int, automaton: TokenAutomaton | None = None):
    """The decode loop stopped after ``limit`` tokens (traced: every chunk of a stream runs this one
    program); -> (cache, carry) to continue from."""
    return _decode_loop(nnx.merge(graphdef, state), cache, carry, prompt_len, temperature, top_p, limit, spec,
                        automaton, None, unstacked)


def _prefill_then_decode(graphdef, state, plan: PromptPlan, live_rows, key, temperature, top_p, limit,
                         spec: DecodeSpec, automaton=None, rules=None, retire_every: int = 0) -> GenerationResult:
    """Two programs, timed apart (``siajax.timing``): the prefill (:class:`PromptPlan`), then the
    decode loop over every row (or, with ``retire_every``, :func:`_retiring_decode`)."""
    # The decode reads the rows as they are: a shared prefix keeps their width (siajax.prompts.SharedPrefix).
    prompt_tokens, prompt_mask = jnp.asarray(plan.tokens), jnp.asarray(plan.mask)
    with timing.phase("prefill"):
        cache, carry = jax.block_until_ready(_prefill(graphdef, state, prompt_tokens, prompt_mask, live_rows, key,
                                                      temperature, top_p, spec, automaton, rules, plan.shared))
        timing.count("prefill_tokens", plan.prefilled_tokens())
    with timing.phase("decode"):
        if retire_every:
            buffers, _ = _retiring_decode(graphdef, state, cache, carry, prompt_tokens.shape[1], temperature, top_p,
                                          int(limit), spec, automaton, retire_every)
            result = _result_from_buffers(buffers, prompt_tokens, prompt_mask, temperature, top_p, spec)
        else:
            result, _ = jax.block_until_ready(_decode(graphdef, state, cache, carry, prompt_tokens, prompt_mask,
                                                      temperature, top_p, limit, spec, automaton, rules))
        if result.lengths.is_fully_addressable:
            timing.count("generated_tokens", int(jnp.sum(result.lengths)))
    return result


ROW_BUFFERS = {"tokens": 3, "logprobs": 4, "allowed": 5, "lengths": 6}  # the carry's per-row outputs
CARRY_PER_ROW = (1, 2, 3, 4, 5, 6, 8, 9)  # every carry entry but the step and the key (the batch's)


def _shrink_batch(cache: KVCache, carry: tuple, live: np.ndarray):
    """-> (cache, carry) of the ``live`` slots only, padded to a power of two with copies of the last
    live slot that start finished (they decode padding and are never read)."""
    size = row_bucket(len(live))
    picks = jnp.asarray(np.concatenate([live, np.full(size - len(live), live[-1])]))
    carry = [x[picks] if i in CARRY_PER_ROW else x for i, x in enumerate(carry)]
    carry[2] = carry[2].at[len(live):].set(True)
    return cache.take_rows(picks), tuple(carry)


def _retiring_decode(graphdef, state, cache, carry, prompt_len: int, temperature, top_p, limit: int,
                     spec: DecodeSpec, automaton, every: int):
    """Decodes ``every`` tokens at a time; between chunks the rows that finished leave the batch (their
    cache rows dropped, the batch cut to the next power of two that holds the rest), so a long answer
    does not keep finished short ones computing. Needs ``spec.row_keys`` (a row's draws must not
    depend on its batch). -> (host buffers per original row (:data:`ROW_BUFFERS`), each chunk's batch)."""
    if not spec.row_keys:
        raise ValueError("retiring rows needs DecodeSpec.row_keys: with one key per batch a row's draws "
                         "would change as other rows leave")
    unroll = nnx.merge(graphdef, state).config.decode_unroll
    unstacked = _unstacked_layers(graphdef, state) if unroll else None
    buffers = {name: np.array(carry[i]) for name, i in ROW_BUFFERS.items()}
    slots, batches = np.arange(buffers["lengths"].shape[0]), []  # each slot's original row (-1: padding)
    while True:
        step, done = int(carry[0]), np.asarray(carry[2])
        real = slots >= 0
        for name, i in ROW_BUFFERS.items():
            buffers[name][slots[real]] = np.asarray(carry[i])[real]
        live = np.flatnonzero(~done & real) if step < limit else np.zeros(0, int)
        if not len(live):
            return buffers, batches
        if row_bucket(len(live)) < len(slots):
            cache, carry = _shrink_batch(cache, carry, live)
            slots = np.concatenate([slots[live], np.full(row_bucket(len(live)) - len(live), -1)])
        batches.append(len(slots))
        cache, carry = _decode_until(graphdef, state, unstacked, cache, carry, temperature, top_p,
                                     jnp.int32(min(step + every, limit)), spec, prompt_len, automaton)


def _result_from_buffers(buffers: dict, prompt_tokens, prompt_mask, temperature, top_p,
                         spec: DecodeSpec) -> GenerationResult:
    mask = np.arange(spec.max_new_tokens)[None, :] < buffers["lengths"][:, None]
    return GenerationResult(jnp.asarray(buffers["tokens"]), jnp.asarray(buffers["logprobs"]), jnp.asarray(mask),
                            jnp.asarray(buffers["lengths"]), prompt_tokens, prompt_mask, temperature, top_p,
                            jnp.int32(spec.top_k), jnp.asarray(buffers["allowed"]) if spec.constrained else None)


def validate_sampling(*, max_new_tokens: int, temperature: float, top_p: float, top_k: int, pad_token_id) -> None:
    """Rejects settings the sampler would silently misread (top_p=0 would emit token 0)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: pass the tokenizer's pad id, or its EOS id when it has no pad "
                         "token (siajax.models.generation_defaults does this)")


def _take_rows(result: GenerationResult, rows: int, steps: int) -> GenerationResult:
    """Cuts bucket padding off: the first ``rows`` rows and ``steps`` decode positions."""
    def per_row(x):
        return x[:rows]

    def per_step(x):
        return None if x is None else x[:rows, :steps]

    return result._replace(tokens=per_step(result.tokens), logprobs=per_step(result.logprobs),
                           mask=per_step(result.mask), lengths=per_row(result.lengths),
                           prompt_tokens=per_row(result.prompt_tokens), prompt_mask=per_row(result.prompt_mask),
                           allowed=per_step(result.allowed))


def concatenate_results(parts: Sequence[GenerationResult], pad_token_id: int,
                        order: Sequence[int] | None = None) -> GenerationResult:
    """One result from several calls' (same max_new_tokens): prompts left-padded to the longest,
    rows concatenated, then put in ``order`` (row i of the output is row order[i] of the stack)."""
    if len(parts) == 1 and order is None:
        return parts[0]
    width = max(part.prompt_tokens.shape[1] for part in parts)

    def pad_left(x, value):
        return jnp.pad(x, ((0, 0), (width - x.shape[1], 0)), constant_values=value)

    def stack(name, transform=None):
        arrays = [getattr(part, name) for part in parts]
        if arrays[0] is None:
            return None
        joined = jnp.concatenate([transform(x) if transform else x for x in arrays], axis=0)
        return joined if order is None else joined[jnp.asarray(order)]

    return GenerationResult(
        stack("tokens"), stack("logprobs"), stack("mask"), stack("lengths"),
        stack("prompt_tokens", lambda x: pad_left(x, pad_token_id)), stack("prompt_mask", lambda x: pad_left(x, False)),
        parts[0].temperature, parts[0].top_p, parts[0].top_k, stack("allowed"), stack("policy_mask"))


def _decode_spec(max_new_tokens: int, top_k, stop_token_ids, pad_token_id: int, lora: bool, *,
                 constrained: bool = False, row_keys: bool = False) -> DecodeSpec:
    return DecodeSpec(bucket_length(max_new_tokens), int(top_k or 0), tuple(int(t) for t in stop_token_ids),
                      int(pad_token_id), lora, constrained=constrained, row_keys=row_keys)


def _one_device_batch(prompts: list, pad_token_id: int, share_prompts: bool = True) -> PromptPlan:
    """Rows padded to the bucket (repeating the last prompt) and left-padded, with what their prefill
    may share: distinct prompts and a common prefix (``share_prompts``)."""
    rows = len(prompts)
    tokens, mask = left_pad(prompts + [prompts[-1]] * (row_bucket(rows) - rows), pad_token_id)
    return PromptPlan(tokens, mask, prompt_sharing(tokens, mask) if share_prompts else None)


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
    constraint: TokenAutomaton | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules = PARTITION_RULES,
    share_prompts: bool = True,
    every_row: bool = False,
    retire_finished_rows: int = 0,
) -> GenerationResult:
    """Samples continuations for a batch of prompts.

    prompt_token_ids: ragged list of token-id lists, or an int array [B, P] of
    unpadded prompts. ``lora=False`` samples from the frozen base policy.
    ``constraint`` restricts every sample to the automaton's language (e.g. a
    label set, see :func:`siajax.harness.constrained.label_automaton`). With a
    ``mesh``, weights, prompts and the KV cache are laid out by ``rules`` and
    decoding runs SPMD. With several processes, each passes only its own
    prompts and gets global arrays back (``siajax.parallel.to_host_local``
    returns its rows); with ``every_row``, each passes every prompt (the
    same list: a driver every process runs alike) and gets every row back as
    host arrays, drawn as one process would draw them on the same mesh.
    ``share_prompts`` prefills each distinct prompt of the call once (a group of G samples of one
    prompt, or votes) and copies its KV cache to its rows; without a mesh only.
    ``retire_finished_rows`` = N > 0 decodes N tokens at a time and drops the rows that finished from
    the batch between chunks, so short answers stop costing compute while a long one goes on (one
    device). Each row then draws with its own key, so its tokens do not depend on when the others
    stop; they differ from the N = 0 draws (one key per batch, one decode program per call).
    """
    validate_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=int(top_k or 0),
                      pad_token_id=pad_token_id)
    if isinstance(prompt_token_ids, (np.ndarray, jax.Array)) and np.ndim(prompt_token_ids) == 2:
        prompt_token_ids = np.asarray(prompt_token_ids).tolist()
    prompts = list(prompt_token_ids)
    if retire_finished_rows < 0 or (retire_finished_rows and mesh is not None):
        raise ValueError(f"retire_finished_rows must be >= 0 and needs one device (no mesh), got "
                         f"{retire_finished_rows}{' with a mesh' if mesh is not None else ''}")
    spec = _decode_spec(max_new_tokens, top_k, stop_token_ids, pad_token_id, lora, constrained=constraint is not None,
                        row_keys=retire_finished_rows > 0)
    graphdef, state = nnx.split(model)
    scalars = (jnp.float32(temperature), jnp.float32(top_p), jnp.int32(max_new_tokens))
    rows = len(prompts)
    if mesh is None:
        plan = _one_device_batch(prompts, pad_token_id, share_prompts)
        result = _prefill_then_decode(graphdef, state, plan, jnp.int32(rows), key, *scalars, spec, constraint,
                                      retire_every=retire_finished_rows)
        return _take_rows(result, rows, max_new_tokens)
    return _generate_on_mesh(graphdef, state, prompts, key, scalars, spec, constraint, mesh, rules, every_row)


def _generate_on_mesh(graphdef, state, prompts: list, key, scalars, spec: DecodeSpec, constraint, mesh, rules,
                      every_row: bool) -> GenerationResult:
    """:func:`generate` over a mesh: this process's own rows stitched into global arrays, or (one
    process, or ``every_row``) every row placed and every row returned as host arrays."""
    own_rows, rows = jax.process_count() > 1 and not every_row, len(prompts)
    padded = _pad_rows_for_mesh(prompts, mesh) if own_rows else _pad_rows_to_shards(prompts, mesh)
    tokens, mask = left_pad(padded, spec.pad_token_id, global_max(bucket_length(max(len(p) for p in padded))))
    state = shard_tree(state, mesh, rules)
    batch = {"tokens": tokens, "mask": mask}  # own rows stitched over processes, or every row placed
    placed = to_global(batch, mesh, rules, "batch") if own_rows else shard_tree(batch, mesh, rules, "batch")
    live = len(padded) * jax.process_count() if own_rows else rows
    with mesh_context(mesh):
        plan = PromptPlan(placed["tokens"], placed["mask"], None)
        result = _prefill_then_decode(graphdef, state, plan, jnp.int32(live), key, *scalars, spec, constraint,
                                      tuple(rules))
    if own_rows:
        return result
    limit = int(scalars[2])
    return _take_rows(gather_to_host(result) if jax.process_count() > 1 else result, rows, limit)


class StreamedTokens(NamedTuple):
    """One chunk of :func:`stream`: per row, the token ids and log-probs decoded since the last chunk,
    and whether the row is finished (it drew a stop token, or has ``max_new_tokens``)."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    finished: list[bool]


def stream(
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
    chunk_tokens: int = 1,
) -> Iterator[StreamedTokens]:
    """Samples as :func:`generate` does (the same prefill, decode step and key splits: the same tokens
    for the same key) but yields them as they are decoded, every ``chunk_tokens`` steps, for a server
    that streams. Closing the generator stops decoding. One device, no constraint.

    Every chunk runs the same compiled decode program (its step limit is traced); the host reads the
    token buffer after each, which costs a device round trip per chunk.
    """
    validate_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=int(top_k or 0),
                      pad_token_id=pad_token_id)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    prompts = [list(p) for p in prompt_token_ids]
    rows = len(prompts)
    spec = _decode_spec(max_new_tokens, top_k, stop_token_ids, pad_token_id, lora)
    graphdef, state = nnx.split(model)
    temperature, top_p = jnp.float32(temperature), jnp.float32(top_p)
    plan = _one_device_batch(prompts, pad_token_id)
    cache, carry = _prefill(graphdef, state, jnp.asarray(plan.tokens), jnp.asarray(plan.mask), jnp.int32(rows), key,
                            temperature, top_p, spec, None, None, plan.shared)
    unstacked = _unstacked_layers(graphdef, state) if model.config.decode_unroll else None
    sent = np.zeros(rows, np.int64)
    while True:
        step, done = int(carry[0]), np.asarray(carry[2])[:rows]
        ids, logprobs, lengths = (np.asarray(carry[i])[:rows] for i in (3, 4, 6))
        finished = done | (lengths >= max_new_tokens)
        yield StreamedTokens([[int(t) for t in ids[r, sent[r]:lengths[r]]] for r in range(rows)],
                             [[float(x) for x in logprobs[r, sent[r]:lengths[r]]] for r in range(rows)],
                             [bool(f) for f in finished])
        sent = lengths
        if finished.all():
            return
        cache, carry = _decode_until(graphdef, state, unstacked, cache, carry, temperature, top_p,
                                     jnp.int32(min(step + chunk_tokens, max_new_tokens)), spec, plan.tokens.shape[1])


def _pad_rows_to_shards(prompts: list, mesh) -> list:
    """Every row of the call: the last prompt repeated up to the row bucket (finished from the start,
    cut later)."""
    return prompts + [prompts[-1]] * (row_bucket(len(prompts), batch_shard_count(mesh)) - len(prompts))


def _pad_rows_for_mesh(prompts: list, mesh) -> list:
    """Each process's own rows: the same number on each, a multiple of its shards."""
    shards, processes = batch_shard_count(mesh), jax.process_count()
    if processes == 1:
        return _pad_rows_to_shards(prompts, mesh)
    most, fewest = global_max(len(prompts)), -global_max(-len(prompts))  # every process joins both
    local_shards = shards // processes
    if shards % processes or most != fewest or len(prompts) % local_shards:
        raise ValueError(
            f"multi-host sampling needs the batch split over every process (data x fsdp = {shards} shards for "
            f"{processes} processes) and the same number of prompts on each, a multiple of {max(local_shards, 1)}; "
            f"this process has {len(prompts)} (fewest {fewest}, most {most})")
    return prompts
