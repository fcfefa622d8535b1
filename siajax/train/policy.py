"""Glue between the NNX policy and the pure losses: split, score, build a LossFn.

Trainable params are a dict pytree ``{"lora": State, "value_head": State}``
(value head only for PPO); the frozen base is a separate State that the
train step reads but never donates or updates.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from siajax.models.lora import LoRAConfig, add_lora
from siajax.models.token_stats import token_stats
from siajax.models.transformer import Transformer, ValueHead, positions_from_mask
from siajax.rl.losses import PolicyOutputs, RLBatch, aggregation_normaliser, aggregation_normaliser_at
from siajax.rng import purpose_key
from siajax.prompts import SharedPrompts, run_prompts


class TrainBatch(NamedTuple):
    """What a train step reads: tokens / attention_mask [B, P + N] (prompt then response),
    the behaviour distribution's settings, and the loss's rollout data (rl fields [B, N]).

    ``temperature`` [B] and ``allowed`` [B, N, F] (a constraint's allowed token ids,
    -1 unused; None unconstrained) make the training forward compute log-probs of
    the very distribution that sampled. ``shared_prompts`` (optional) lets the
    forward run each distinct prompt once (:class:`siajax.sampling.SharedPrompts`);
    ``tokens`` still holds every row's prompt.
    """

    tokens: jax.Array
    attention_mask: jax.Array
    rl: RLBatch
    temperature: jax.Array | None = None
    allowed: jax.Array | None = None
    shared_prompts: SharedPrompts | None = None


def take_rows(batch: TrainBatch, rows) -> TrainBatch:
    """A minibatch: the given rows of every per-row field (a shared prompt table stays whole)."""
    shared = batch.shared_prompts
    picked = jax.tree.map(lambda x: x[rows], batch._replace(shared_prompts=None))
    if shared is None:
        return picked
    return picked._replace(shared_prompts=shared._replace(row_source=shared.row_source[rows]))


class PolicyParts(NamedTuple):
    """The static structure of a policy (hashable; weights travel separately)."""

    graphdef: nnx.GraphDef
    value_graphdef: nnx.GraphDef | None = None


def split_policy(model: Transformer, value_head: ValueHead | None = None):
    """-> (PolicyParts, trainable params, frozen base). The model must carry LoRA adapters."""
    graphdef, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
    if not jax.tree.leaves(lora):
        raise ValueError("the model has no LoRA adapters; call siajax.models.add_lora first")
    params = {"lora": lora}
    value_graphdef = None
    if value_head is not None:
        value_graphdef, params["value_head"] = nnx.split(value_head)
    return PolicyParts(graphdef, value_graphdef), params, frozen


def attach_trainable(model: Transformer, lora: LoRAConfig, *, seed: int, value_head: bool = True):
    """The weight lever's model surgery: LoRA adapters (unless the model has some already, keyed by
    the seed's "lora_init" purpose) and, for a critic, a zero value head; -> :func:`split_policy`'s
    (PolicyParts, trainable params, frozen base)."""
    if not jax.tree.leaves(nnx.state(model, nnx.LoRAParam)):
        add_lora(model, lora, key=purpose_key(seed, "lora_init"))
    return split_policy(model, ValueHead(model.config.hidden_size) if value_head else None)


def _hidden_over_shared_prompts(model: Transformer, shared: SharedPrompts, responses, response_mask, *, lora,
                                dropout_key):
    """Hidden states predicting each response token [B, N, E]: the distinct prompts (after their
    common prefix, when shared) run once into a KV cache, its rows are copied to the responses that
    continue them, then the responses run."""
    keys = [None, None] if dropout_key is None else list(jax.random.split(dropout_key))
    tokens, mask, prefix = shared.prompt_inputs()
    prompts, prompt_tokens = run_prompts(model, tokens, mask, prefix, shared.tokens.shape[1] + responses.shape[1],
                                         lora=lora, head="none", dropout_key=keys[0])
    source = shared.row_source
    out = model(responses, attention_mask=response_mask,
                positions=positions_from_mask(response_mask, prompt_tokens[source][:, None]),
                cache=prompts.cache.take_rows(source), lora=lora, dropout_key=keys[1], head="none")
    return jnp.concatenate([prompts.hidden[source, -1:], out.hidden[:, :-1]], axis=1)


def evaluate_responses(parts: PolicyParts, params, frozen, tokens, attention_mask, response_len: int, *,
                       temperature=1.0, allowed=None, lora: bool = True, dropout_key=None,
                       shared: SharedPrompts | None = None) -> PolicyOutputs:
    """The policy's log-probs, entropies and values on the last ``response_len`` tokens.

    Log-probs and entropies are of softmax(logits / temperature), restricted to
    ``allowed`` when given; the LM head runs on response positions only, in
    vocabulary chunks. The value head reads stop-gradient hidden states, so the
    critic's loss never moves the shared LoRA trunk. With ``shared`` the rows'
    prompts are its distinct ones, each run once (:class:`SharedPrompts`).
    """
    model = nnx.merge(parts.graphdef, params["lora"], frozen)
    start = tokens.shape[1] - response_len
    if shared is None:
        out = model(tokens, attention_mask=attention_mask, lora=lora, dropout_key=dropout_key, head="none")
        hidden = out.hidden[:, start - 1 : -1]  # position t predicts token t + 1
    else:
        hidden = _hidden_over_shared_prompts(model, shared, tokens[:, start:], attention_mask[:, start:], lora=lora,
                                             dropout_key=dropout_key)
    stats = token_stats(hidden, model.head_weight(), tokens[:, start:], temperature, allowed=allowed)
    values = None
    if parts.value_graphdef is not None and "value_head" in params:
        values = nnx.merge(parts.value_graphdef, params["value_head"])(jax.lax.stop_gradient(hidden))
    return PolicyOutputs(stats.logprobs, stats.entropy, values)


@partial(jax.jit, static_argnames=("parts", "response_len", "lora"))
def score_responses(parts: PolicyParts, params, frozen, tokens, attention_mask, response_len: int,
                    temperature=1.0, allowed=None, lora: bool = True, shared: SharedPrompts | None = None):
    """Jitted :func:`evaluate_responses` without dropout: old / reference log-probs, values."""
    return evaluate_responses(parts, params, frozen, tokens, attention_mask, response_len,
                              temperature=temperature, allowed=allowed, lora=lora, shared=shared)


def with_full_batch_normaliser(batch: TrainBatch, aggregation: str) -> TrainBatch:
    """Fills ``batch.rl.normaliser`` and ``token_count`` from the whole batch (before any micro-batch
    split), so that each micro-batch's loss and metrics are its share of the full batch's."""
    if batch.rl.normaliser is not None:
        return batch
    mask, coefficients = batch.rl.mask, batch.rl.coefficients
    normaliser = (aggregation_normaliser(mask, aggregation) if coefficients is None  # else the rows' own mode
                  else aggregation_normaliser_at(mask, coefficients.aggregation))
    return batch._replace(rl=batch.rl._replace(normaliser=normaliser,
                                               token_count=aggregation_normaliser(mask, "token-mean")))


def make_policy_loss(parts: PolicyParts, objective: Callable, cfg) -> Callable:
    """Wraps ``objective(policy_outputs, rl_batch, cfg)`` into a train-step LossFn.

    The frozen base arrives as the step's ``frozen`` argument, so one jitted
    step serves any base weights of the same shapes. Pass
    ``partial(with_full_batch_normaliser, aggregation=cfg.aggregation)`` as the
    step's ``prepare_batch`` so micro-batches add up to the full-batch loss.
    """

    def loss_fn(params, frozen, batch: TrainBatch, key):
        temperature = 1.0 if batch.temperature is None else batch.temperature
        policy = evaluate_responses(
            parts, params, frozen, batch.tokens, batch.attention_mask, batch.rl.mask.shape[1],
            temperature=temperature, allowed=batch.allowed, dropout_key=key, shared=batch.shared_prompts,
        )
        loss, metrics = objective(policy, batch.rl, cfg)
        return loss, {**metrics, "logprob_change": logprob_change(policy.logprobs, batch.rl)}

    return loss_fn


def logprob_gap(logprobs: jax.Array, other: jax.Array, mask: jax.Array) -> jax.Array:
    """max |logprobs - other| over the ``mask`` tokens: how far two passes over the same tokens disagree."""
    return jnp.max(jnp.where(mask, jnp.abs(logprobs - other), 0.0))


def logprob_change(logprobs: jax.Array, rl: RLBatch) -> jax.Array:
    """max |log pi(token) - old log-prob| over the trained tokens. On an update's first step, with the
    sampler's log-probs as the old ones, it is how far training's forward is from the distribution
    that sampled (``logprob_mismatch``). Combined over micro-batches by max (MAX_METRICS)."""
    return logprob_gap(jax.lax.stop_gradient(logprobs), rl.old_logprobs, rl.mask)
