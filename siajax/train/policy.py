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

from siajax.models.transformer import Transformer, ValueHead
from siajax.rl.losses import PolicyOutputs, RLBatch
from siajax.sampling import token_logprobs


class TrainBatch(NamedTuple):
    """tokens / attention_mask: [B, P + N] prompt then response; rl fields: [B, N]."""

    tokens: jax.Array
    attention_mask: jax.Array
    rl: RLBatch


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


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """Entropy of softmax(logits) over the last axis, float32."""
    logits = logits.astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


def evaluate_responses(parts: PolicyParts, params, frozen, tokens, attention_mask, response_len: int, *,
                       lora: bool = True, dropout_key=None) -> PolicyOutputs:
    """The policy's log-probs, entropies and values on the last ``response_len`` tokens."""
    model = nnx.merge(parts.graphdef, params["lora"], frozen)
    out = model(tokens, attention_mask=attention_mask, lora=lora, dropout_key=dropout_key)
    start = tokens.shape[1] - response_len
    logits = out.logits[:, start - 1 : -1]  # position t predicts token t + 1
    values = None
    if parts.value_graphdef is not None and "value_head" in params:
        values = nnx.merge(parts.value_graphdef, params["value_head"])(out.hidden[:, start - 1 : -1])
    return PolicyOutputs(token_logprobs(logits, tokens[:, start:]), entropy_from_logits(logits), values)


@partial(jax.jit, static_argnames=("parts", "response_len", "lora"))
def score_responses(parts: PolicyParts, params, frozen, tokens, attention_mask, response_len: int,
                    lora: bool = True):
    """Jitted :func:`evaluate_responses` without dropout: old / reference log-probs, values."""
    return evaluate_responses(parts, params, frozen, tokens, attention_mask, response_len, lora=lora)


def make_policy_loss(parts: PolicyParts, objective: Callable, cfg) -> Callable:
    """Wraps ``objective(policy_outputs, rl_batch, cfg)`` into a train-step LossFn.

    The frozen base arrives as the step's ``frozen`` argument, so one jitted
    step serves any base weights of the same shapes.
    """

    def loss_fn(params, frozen, batch: TrainBatch, key):
        policy = evaluate_responses(
            parts, params, frozen, batch.tokens, batch.attention_mask,
            batch.rl.mask.shape[1], dropout_key=key,
        )
        return objective(policy, batch.rl, cfg)

    return loss_fn
