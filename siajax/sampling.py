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

from siajax.models.transformer import KVCache, Transformer
from siajax.parallel.distributed import global_max, to_global
from siajax.parallel.mesh import ambient_mesh, batch_shard_count, mesh_context
from siajax.parallel.rules import PARTITION_RULES, Rules, shard_tree, spec_for


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


class TokenAutomaton(NamedTuple):
    """A deterministic automaton over token ids that constrains decoding.

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


def _constrain(logits, automaton: TokenAutomaton, state):
    """Masks logits [B, V] to the tokens the automaton allows in each row's state."""
    allowed = automaton.tokens[state]  # [B, F]
    rows = jnp.arange(logits.shape[0])[:, None]
    mask = jnp.zeros(logits.shape, bool).at[rows, jnp.maximum(allowed, 0)].max(allowed >= 0)
    return jnp.where(mask, logits, -jnp.inf)


def _advance(automaton: TokenAutomaton, state, token):
    hit = automaton.tokens[state] == token[:, None]
    return jnp.sum(jnp.where(hit, automaton.next_state[state], 0), axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """The static part of a sampling call (changing it recompiles)."""

    max_new_tokens: int
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    lora: bool = True
    constrained: bool = False


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


def sample_next_token(logits, key, temperature, top_p, top_k: int, allowed_logits=None):
    """Draws one token per row from logits [B, V]; returns (token [B], logprob [B]).

    temperature <= 0 means greedy. top_k = 0 and top_p >= 1 disable truncation.
    ``allowed_logits`` (logits with forbidden tokens at -inf) constrains the draw;
    the returned log-prob stays that of the unconstrained policy, which is what
    a training forward pass recomputes.
    """
    greedy = temperature <= 0.0
    scaled = logits / jnp.where(greedy, 1.0, temperature)
    choice = scaled if allowed_logits is None else allowed_logits / jnp.where(greedy, 1.0, temperature)

    def draw(scaled):
        filtered = scaled
        if top_k > 0:
            kth_largest = jax.lax.top_k(scaled, top_k)[0][..., -1:]
            filtered = jnp.where(scaled < kth_largest, -jnp.inf, scaled)
        filtered = jax.lax.cond(top_p < 1.0, _nucleus_filter, lambda x, _: x, filtered, top_p)
        return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

    # Greedy skips the noise draw over the vocabulary, the costliest part of a small model's step.
    token = jax.lax.cond(greedy, lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32), draw, choice)
    return token, token_logprobs(scaled, token)


def _constrain_cache(cache: KVCache, rules: Rules | None) -> KVCache:
    """Lays the cache out by the rules when tracing under a mesh (a no-op otherwise)."""
    mesh = ambient_mesh()
    if rules is None or mesh is None:
        return cache
    specs = {name: spec_for(f"cache/{name}", getattr(cache, name).shape, mesh, rules)
             for name in ("keys", "values", "valid", "index")}
    return KVCache(**{name: jax.lax.with_sharding_constraint(getattr(cache, name), spec)
                      for name, spec in specs.items()})


@partial(jax.jit, static_argnames=("graphdef", "spec", "rules"))
def _generate(graphdef, state, prompt_tokens, prompt_mask, key, temperature, top_p, spec: DecodeSpec,
              automaton: TokenAutomaton | None = None, rules: Rules | None = None):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = prompt_tokens.shape
    steps = spec.max_new_tokens
    stop_ids = jnp.asarray(spec.stop_token_ids or (-1,), jnp.int32)

    cache = _constrain_cache(KVCache.empty(model.config, batch, prompt_len + steps), rules)
    out = model(prompt_tokens, attention_mask=prompt_mask, cache=cache, lora=spec.lora)
    next_position = jnp.sum(prompt_mask, axis=-1).astype(jnp.int32)
    key, first_key = jax.random.split(key)

    def draw(logits, step_key, automaton_state):
        if not spec.constrained:
            return sample_next_token(logits, step_key, temperature, top_p, spec.top_k)
        return sample_next_token(logits, step_key, temperature, top_p, spec.top_k,
                                 allowed_logits=_constrain(logits, automaton, automaton_state))

    automaton_state = jnp.zeros((batch,), jnp.int32)
    token, logprob = draw(out.logits[:, -1], first_key, automaton_state)
    if spec.constrained:
        automaton_state = _advance(automaton, automaton_state, token)

    tokens = jnp.full((batch, steps), spec.pad_token_id, jnp.int32).at[:, 0].set(token)
    logprobs = jnp.zeros((batch, steps), jnp.float32).at[:, 0].set(logprob)
    done = jnp.isin(token, stop_ids)
    lengths = jnp.ones((batch,), jnp.int32)

    def keep_going(carry):
        step, _, _, done, *_ = carry
        return (step < steps) & ~jnp.all(done)

    def decode_step(carry):
        step, cache, position, done, tokens, logprobs, lengths, key, automaton_state = carry
        previous = tokens[:, step - 1]
        out = model(
            previous[:, None], attention_mask=jnp.ones((batch, 1), bool),
            positions=position[:, None], cache=cache, lora=spec.lora,
        )
        key, step_key = jax.random.split(key)
        token, logprob = draw(out.logits[:, -1], step_key, automaton_state)
        if spec.constrained:
            automaton_state = _advance(automaton, automaton_state, token)
        token = jnp.where(done, spec.pad_token_id, token)
        tokens = tokens.at[:, step].set(token)
        logprobs = logprobs.at[:, step].set(jnp.where(done, 0.0, logprob))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, stop_ids)
        cache = _constrain_cache(out.cache, rules)
        return step + 1, cache, position + 1, done, tokens, logprobs, lengths, key, automaton_state

    carry = (jnp.ones((), jnp.int32), _constrain_cache(out.cache, rules), next_position, done, tokens, logprobs,
             lengths, key, automaton_state)
    _, _, _, _, tokens, logprobs, lengths, _, _ = jax.lax.while_loop(keep_going, decode_step, carry)
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
    constraint: TokenAutomaton | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules = PARTITION_RULES,
) -> GenerationResult:
    """Samples continuations for a batch of prompts.

    prompt_token_ids: ragged list of token-id lists, or an int array [B, P] of
    unpadded prompts. ``lora=False`` samples from the frozen base policy.
    ``constraint`` restricts every sample to the automaton's language (e.g. a
    label set, see :func:`label_automaton`). With a ``mesh``, weights, prompts
    and the KV cache are laid out by ``rules`` and decoding runs SPMD; the batch
    is padded with repeats of its last prompt to a multiple of the data x fsdp
    shards and cut back, so rows match an unsharded call. With several
    processes, each passes only its own prompts and gets global arrays back
    (``siajax.parallel.to_host_local`` returns its rows).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if isinstance(prompt_token_ids, (np.ndarray, jax.Array)) and np.ndim(prompt_token_ids) == 2:
        prompt_token_ids = np.asarray(prompt_token_ids).tolist()
    spec = DecodeSpec(max_new_tokens, int(top_k or 0), tuple(int(t) for t in stop_token_ids), pad_token_id, lora,
                      constrained=constraint is not None)
    graphdef, state = nnx.split(model)
    if mesh is None:
        tokens, mask = left_pad(prompt_token_ids, pad_token_id)
        return _generate(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), key,
                         jnp.float32(temperature), jnp.float32(top_p), spec, constraint)
    rows = len(prompt_token_ids)
    prompt_token_ids = _pad_rows_for_mesh(list(prompt_token_ids), mesh)
    tokens, mask = left_pad(prompt_token_ids, pad_token_id,
                            global_max(bucket_length(max(len(p) for p in prompt_token_ids))))
    state = shard_tree(state, mesh, rules)
    placed = to_global({"tokens": tokens, "mask": mask}, mesh, rules, prefix="batch")
    with mesh_context(mesh):
        result = _generate(graphdef, state, placed["tokens"], placed["mask"], key, jnp.float32(temperature),
                           jnp.float32(top_p), spec, constraint, tuple(rules))
    if jax.process_count() > 1:
        return result
    return GenerationResult(*(x[:rows] for x in result))


def _pad_rows_for_mesh(prompts: list, mesh) -> list:
    """One process: repeat the last prompt up to a multiple of the batch shards (cut later).
    Several: each passes its own rows, the same number, a multiple of its shards."""
    shards, processes = batch_shard_count(mesh), jax.process_count()
    if processes == 1:
        return prompts + [prompts[-1]] * (-len(prompts) % shards)
    most, fewest = global_max(len(prompts)), -global_max(-len(prompts))  # every process joins both
    local_shards = shards // processes
    if shards % processes or most != fewest or len(prompts) % local_shards:
        raise ValueError(
            f"multi-host sampling needs the batch split over every process (data x fsdp = {shards} shards for "
            f"{processes} processes) and the same number of prompts on each, a multiple of {max(local_shards, 1)}; "
            f"this process has {len(prompts)} (fewest {fewest}, most {most})")
    return prompts
