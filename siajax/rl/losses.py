"""RL losses as pure functions: ``loss(policy, batch, cfg) -> (scalar, metrics)``.

``policy`` is what the current parameters say about the batch's tokens
(:class:`PolicyOutputs`); ``batch`` is what the rollout recorded plus the
precomputed advantages (:class:`RLBatch`); ``cfg`` is a frozen dataclass, static
under jit. All token arrays are [B, T] over response positions. A new loss is
any function with this signature (see ``siajax.train.make_policy_loss``).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from siajax.rl.advantages import masked_mean, masked_var

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


class PolicyOutputs(NamedTuple):
    """The current policy on the batch's response tokens, each [B, T]."""

    logprobs: jax.Array
    entropy: jax.Array
    values: jax.Array | None = None


class RLBatch(NamedTuple):
    """Rollout data a loss needs, each [B, T] (unused fields may be None)."""

    mask: jax.Array
    old_logprobs: jax.Array
    advantages: jax.Array
    ref_logprobs: jax.Array | None = None
    returns: jax.Array | None = None
    old_values: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO with GAE. ``clip_low``/``clip_high`` give the asymmetric (DAPO) clip."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    value_clip: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    kl_coef: float = 0.0  # extra KL-to-reference term; PPO usually puts KL in the reward
    kl_estimator: str = "k3"
    aggregation: str = "token-mean"
    gamma: float = 1.0
    lam: float = 0.95
    reward_kl_coef: float = 0.02  # beta of the per-token -beta*KL reward shaping


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO; DAPO and Dr. GRPO are settings of it (see README)."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.04
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    aggregation: str = "seq-mean-token-mean"
    scale_by_std: bool = True
    std_ddof: int = 1
    drop_uniform_groups: bool = False  # DAPO dynamic sampling


@dataclasses.dataclass(frozen=True)
class EntropicConfig:
    """Entropic advantage weighting; ``beta=None`` solves beta per group (TTT-Discover)."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    aggregation: str = "token-mean"
    form: str = "loo"
    beta: float | None = None
    target_kl: float = 0.6931471805599453


def kl_estimate(logprobs: jax.Array, ref_logprobs: jax.Array, estimator: str = "k3") -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3).

    k3 = exp(ref - logp) - (ref - logp) - 1 is unbiased and non-negative
    (DeepSeekMath's choice); k1 = logp - ref is unbiased but noisy.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * jnp.square(log_ratio)
    if estimator == "k3":
        return jnp.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use one of {KL_ESTIMATORS}")


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str) -> jax.Array:
    """Reduces [B, T] per-token losses to a scalar, as the field names the modes."""
    mask = mask.astype(per_token.dtype)
    if mode == "token-mean":
        return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    if mode == "seq-mean-token-mean":
        per_seq = jnp.sum(per_token * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
        return jnp.mean(per_seq)
    if mode == "seq-mean-token-sum-norm":  # Dr. GRPO: constant normaliser (T), no length bias
        return jnp.sum(per_token * mask) / (mask.shape[0] * mask.shape[1])
    raise ValueError(f"unknown aggregation {mode!r}; use one of {AGGREGATIONS}")


def clipped_surrogate(logprobs, old_logprobs, advantages, clip_low, clip_high):
    """Per-token -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) and whether clipping bit."""
    ratio = jnp.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return jnp.maximum(unclipped, clipped), (clipped > unclipped).astype(jnp.float32), ratio


def _policy_terms(policy: PolicyOutputs, batch: RLBatch, cfg):
    """Surrogate + optional KL-to-reference and entropy terms shared by every recipe."""
    chex.assert_equal_shape([policy.logprobs, batch.old_logprobs, batch.advantages, batch.mask])
    mask = batch.mask
    pg, clipped, ratio = clipped_surrogate(
        policy.logprobs, batch.old_logprobs, batch.advantages, cfg.clip_low, cfg.clip_high
    )
    loss = aggregate(pg, mask, cfg.aggregation)
    metrics = {
        "pg_loss": loss,
        "clip_fraction": masked_mean(clipped, mask),
        "approx_kl_old": masked_mean(kl_estimate(policy.logprobs, batch.old_logprobs, "k3"), mask),
        "ratio_mean": masked_mean(ratio, mask),
        "entropy": masked_mean(policy.entropy, mask),
        "advantage_mean": masked_mean(batch.advantages, mask),
    }
    if cfg.kl_coef:
        if batch.ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs batch.ref_logprobs (reference-policy log-probs)")
        kl = aggregate(kl_estimate(policy.logprobs, batch.ref_logprobs, cfg.kl_estimator), mask, cfg.aggregation)
        loss = loss + cfg.kl_coef * kl
        metrics["kl_ref"] = kl
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * aggregate(policy.entropy, mask, cfg.aggregation)
    return loss, metrics


def grpo_loss(policy: PolicyOutputs, batch: RLBatch, cfg: GRPOConfig):
    """GRPO: clipped surrogate on group-relative advantages + k3 KL to the reference."""
    loss, metrics = _policy_terms(policy, batch, cfg)
    return loss, {**metrics, "loss": loss}


def entropic_loss(policy: PolicyOutputs, batch: RLBatch, cfg: EntropicConfig):
    """The clipped surrogate on entropic advantages (advantages made by the recipe)."""
    loss, metrics = _policy_terms(policy, batch, cfg)
    return loss, {**metrics, "loss": loss}


def ppo_gae_loss(policy: PolicyOutputs, batch: RLBatch, cfg: PPOConfig):
    """PPO: clipped surrogate + c_v · clipped value loss - c_e · entropy."""
    if policy.values is None or batch.returns is None or batch.old_values is None:
        raise ValueError("ppo_gae_loss needs policy.values, batch.returns and batch.old_values")
    loss, metrics = _policy_terms(policy, batch, cfg)
    values_clipped = batch.old_values + jnp.clip(policy.values - batch.old_values, -cfg.value_clip, cfg.value_clip)
    value_err = jnp.maximum(jnp.square(policy.values - batch.returns), jnp.square(values_clipped - batch.returns))
    value_loss = 0.5 * aggregate(value_err, batch.mask, cfg.aggregation)
    loss = loss + cfg.value_coef * value_loss
    residual_var = masked_var(batch.returns - policy.values, batch.mask)
    explained = 1.0 - residual_var / jnp.maximum(masked_var(batch.returns, batch.mask), 1e-8)
    return loss, {**metrics, "value_loss": value_loss, "explained_variance": explained, "loss": loss}
