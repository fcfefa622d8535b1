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
import numpy as np

from siajax.rl.advantages import LN2, masked_var

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
ENTROPIC_FORMS = ("loo", "rs")


class PolicyOutputs(NamedTuple):
    """The current policy on the batch's response tokens, each [B, T]."""

    logprobs: jax.Array
    entropy: jax.Array
    values: jax.Array | None = None


class RLBatch(NamedTuple):
    """Rollout data a loss needs, each [B, T] (unused fields may be None).

    ``normaliser`` [B] holds each row's full-batch denominator (see
    :func:`aggregation_normaliser`): with it a loss over a micro-batch is that
    micro-batch's exact share of the full-batch loss, so shares add up.
    ``token_count`` [B] is the full batch's token-mean normaliser (its response-token
    count on every row): with it the token-mean metrics are shares too, so a
    micro-batched step reports exactly what the unsplit step would.
    """

    mask: jax.Array
    old_logprobs: jax.Array
    advantages: jax.Array
    ref_logprobs: jax.Array | None = None
    returns: jax.Array | None = None
    old_values: jax.Array | None = None
    normaliser: jax.Array | None = None
    token_count: jax.Array | None = None
    coefficients: SurrogateCoefficients | None = None  # the config's numbers as data (see that class)


class SurrogateCoefficients(NamedTuple):
    """A :class:`SurrogateConfig`'s numbers as data carried in the batch, one value per row (the same
    on every row, so that they split with the rows: minibatches, micro-batches, mesh shards).

    With them :func:`clipped_policy_loss` reads its coefficients as traced values, always has its
    KL and entropy terms (weighted by them, 0 when off) and picks the aggregation by index. Its
    program is then the same for every clipped-surrogate recipe (GRPO, entropic weighting) whatever
    their settings: a loop that switches recipe compiles its update once, and the other recipe's
    comes from the compilation cache.
    """

    clip_low: jax.Array  # [B] float32
    clip_high: jax.Array
    kl_coef: jax.Array
    kl_max: jax.Array  # inf when uncapped
    entropy_coef: jax.Array
    aggregation: jax.Array  # [B] int32, an index into AGGREGATIONS

    @classmethod
    def of(cls, cfg: SurrogateConfig, rows: int) -> SurrogateCoefficients:
        def per_row(value, dtype=np.float32):  # NumPy, then one transfer: no program per value
            return jnp.asarray(np.full((rows,), value, dtype))

        return cls(per_row(cfg.clip_low), per_row(cfg.clip_high), per_row(cfg.kl_coef),
                   per_row(np.inf if cfg.kl_max is None else cfg.kl_max), per_row(cfg.entropy_coef),
                   per_row(AGGREGATIONS.index(cfg.aggregation), np.int32))

    def as_numbers(self):
        """-> (per-token view: each [B, 1], for the clip and the KL cap; the KL and entropy weights as
        scalars)."""
        return jax.tree.map(lambda x: x[:, None], self), jnp.max(self.kl_coef), jnp.max(self.entropy_coef)


@dataclasses.dataclass(frozen=True)
class SurrogateConfig:
    """The clipped policy-gradient surrogate every recipe shares.

    ``clip_low``/``clip_high`` give the asymmetric (DAPO clip-higher) ratio clip;
    ``kl_coef`` adds a KL-to-reference penalty with ``kl_estimator``, each token's
    estimate capped at ``kl_max`` (k3 grows like exp(ref - logp): one token the policy
    has pushed 20 nats below the reference would otherwise outweigh the whole batch:
    experiments/RESULTS.md, "Defaults and why");
    ``entropy_coef`` an entropy bonus; ``aggregation`` reduces tokens to a scalar.
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_max: float | None = 10.0
    entropy_coef: float = 0.0
    aggregation: str = "token-mean"

    def __post_init__(self):
        if self.kl_max is not None and not self.kl_max > 0:
            raise ValueError(f"kl_max must be > 0 (or None for no cap), got {self.kl_max}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregation!r}; use one of {AGGREGATIONS}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown KL estimator {self.kl_estimator!r}; use one of {KL_ESTIMATORS}")
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError("clip_low and clip_high must be >= 0")


@dataclasses.dataclass(frozen=True)
class PPOConfig(SurrogateConfig):
    """PPO with GAE. ``value_clip`` bounds the value update relative to the returns' scale
    (|V - V_old| <= value_clip · std(returns)); None (default) leaves it unclipped."""

    value_clip: float | None = None
    value_coef: float = 0.5
    gamma: float = 1.0
    # lambda 1 (verl's and OpenRLHF's default for outcome rewards): each token's advantage is the outcome
    # minus its value, so a critic that is still learning costs variance, not credit. At 0.95 the first
    # token of a 256-token reply got 0.95^255 ~ 2e-6 of the outcome while V ~ 0.
    lam: float = 1.0
    reward_kl_coef: float = 0.02  # beta of the per-token -beta*KL reward shaping
    standardise_rewards: bool = True  # outcomes -> (r - mean) / std over the batch before GAE


@dataclasses.dataclass(frozen=True)
class GRPOConfig(SurrogateConfig):
    """GRPO; DAPO and Dr. GRPO are settings of it (see README)."""

    kl_coef: float = 0.04
    aggregation: str = "seq-mean-token-mean"
    scale_by_std: bool = True
    std_ddof: int = 1
    drop_uniform_groups: bool = False  # DAPO dynamic sampling


@dataclasses.dataclass(frozen=True)
class EntropicConfig(SurrogateConfig):
    """Entropic advantage weighting; ``beta=None`` solves beta per group (TTT-Discover).

    form "loo" needs groups of at least ``LOO_MIN_GROUP`` samples; form "rs" needs a fixed beta != 0.
    Advantages are capped at ``max_advantage`` (they are >= -1 by construction).
    """

    form: str = "loo"
    beta: float | None = None
    target_kl: float = LN2
    max_advantage: float = 100.0

    def __post_init__(self):
        super().__post_init__()
        if self.form not in ENTROPIC_FORMS:
            raise ValueError(f"unknown entropic form {self.form!r}; use one of {ENTROPIC_FORMS}")
        if self.form == "rs" and (self.beta is None or self.beta == 0):
            raise ValueError("entropic form 'rs' needs a fixed beta != 0 (2.0 is the published choice)")
        if self.beta is not None and self.form == "loo" and self.beta <= 0:
            raise ValueError(f"entropic form 'loo' needs beta > 0 or None (solved per group), got {self.beta}")
        if self.max_advantage <= 0:
            raise ValueError("max_advantage must be > 0")


def kl_estimate(logprobs: jax.Array, ref_logprobs: jax.Array, estimator: str = "k3",
                max_value: float | None = None) -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3).

    k3 = exp(ref - logp) - (ref - logp) - 1 is unbiased and non-negative
    (DeepSeekMath's choice); k1 = logp - ref is unbiased but noisy. ``max_value``
    caps each token's estimate (no gradient past the cap).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        estimate = log_ratio
    elif estimator == "k2":
        estimate = 0.5 * jnp.square(log_ratio)
    elif estimator == "k3":
        estimate = jnp.expm1(-jnp.maximum(log_ratio, -50.0)) + log_ratio  # -50: finite in float32
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; use one of {KL_ESTIMATORS}")
    return estimate if max_value is None else jnp.minimum(estimate, max_value)


def aggregation_normaliser(mask: jax.Array, mode: str) -> jax.Array:
    """[B] per-row denominators of ``mode`` over this (full) batch.

    token-mean: the batch's token count; seq-mean-token-mean: B times the
    row's token count; seq-mean-token-sum-norm (Dr. GRPO): B times T.
    """
    mask = mask.astype(jnp.float32)
    rows = jnp.float32(mask.shape[0])
    if mode == "token-mean":
        return jnp.broadcast_to(jnp.maximum(jnp.sum(mask), 1.0), mask.shape[:1])
    if mode == "seq-mean-token-mean":
        return rows * jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    if mode == "seq-mean-token-sum-norm":
        return jnp.full(mask.shape[:1], rows * mask.shape[1])
    raise ValueError(f"unknown aggregation {mode!r}; use one of {AGGREGATIONS}")


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str, normaliser: jax.Array | None = None) -> jax.Array:
    """Reduces [B, T] per-token losses to a scalar, as the mode names it.

    Every mode is sum_b sum_t x·m / n_b with n_b from :func:`aggregation_normaliser`;
    pass ``normaliser`` computed over the full batch to get a micro-batch's share.
    """
    if normaliser is None:
        normaliser = aggregation_normaliser(mask, mode)
    per_row = jnp.sum(jnp.where(mask, per_token, 0.0), axis=1)  # a select: inf/NaN off the mask stays out
    return jnp.sum(per_row / normaliser)


def aggregation_normaliser_at(mask: jax.Array, modes: jax.Array) -> jax.Array:
    """:func:`aggregation_normaliser` with each row's mode given as data: ``AGGREGATIONS[modes[b]]``."""
    every = jnp.stack([aggregation_normaliser(mask, mode) for mode in AGGREGATIONS])  # [modes, B]
    return jnp.take_along_axis(every, modes[None], axis=0)[0]


def clipped_surrogate(logprobs, old_logprobs, advantages, clip_low, clip_high):
    """Per-token -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) and whether clipping bit."""
    ratio = jnp.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return jnp.maximum(unclipped, clipped), (clipped > unclipped).astype(jnp.float32), ratio


def approx_kl_to_old(logprobs: jax.Array, old_logprobs: jax.Array) -> jax.Array:
    """Per-token (r - 1) - log r with r = pi / pi_old: the standard PPO approx-KL monitor."""
    log_ratio = logprobs - old_logprobs
    return jnp.expm1(log_ratio) - log_ratio


def clipped_policy_loss(policy: PolicyOutputs, batch: RLBatch, cfg: SurrogateConfig):
    """The shared loss body: clipped surrogate + optional KL-to-reference and entropy terms.

    GRPO and entropic weighting are this loss; they differ only in how the
    advantages in ``batch`` were made (see ``siajax.rl.recipes``). With
    ``batch.coefficients`` it reads its numbers from there (traced) and has both
    terms whatever their weights; else from ``cfg`` (constants), each term only
    when its weight is on.
    """
    chex.assert_equal_shape([policy.logprobs, batch.old_logprobs, batch.advantages, batch.mask])
    mask, traced = batch.mask, batch.coefficients is not None
    if traced:
        per_token, kl_coef, entropy_coef = batch.coefficients.as_numbers()
        clip_low, clip_high, kl_max = per_token.clip_low, per_token.clip_high, per_token.kl_max
    else:
        clip_low, clip_high, kl_max, kl_coef, entropy_coef = (cfg.clip_low, cfg.clip_high, cfg.kl_max, cfg.kl_coef,
                                                               cfg.entropy_coef)

    def reduce(x):
        return aggregate(x, mask, cfg.aggregation, batch.normaliser)

    pg, clipped, ratio = clipped_surrogate(
        policy.logprobs, batch.old_logprobs, batch.advantages, clip_low, clip_high
    )
    loss = reduce(pg)

    def share(x):  # this batch's share of the full batch's token mean: a micro-batched step adds them up
        return aggregate(x, mask, "token-mean", batch.token_count)

    metrics = {
        "pg_loss": loss,
        "clip_fraction": share(clipped),
        "approx_kl": share(approx_kl_to_old(policy.logprobs, batch.old_logprobs)),
        "ratio_mean": share(ratio),
        "entropy": share(policy.entropy),
        "advantage_mean": share(batch.advantages),
    }
    if traced or cfg.kl_coef:
        if batch.ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs batch.ref_logprobs (reference-policy log-probs)")
        kl = reduce(kl_estimate(policy.logprobs, batch.ref_logprobs, cfg.kl_estimator, kl_max))
        loss = loss + kl_coef * kl
        metrics["kl_ref"] = kl
    if traced or cfg.entropy_coef:
        loss = loss - entropy_coef * reduce(policy.entropy)
    return loss, {**metrics, "loss": loss}


# GRPO and entropic weighting share the loss body; the names say which recipe a config belongs to.
grpo_loss = clipped_policy_loss
entropic_loss = clipped_policy_loss


def ppo_gae_loss(policy: PolicyOutputs, batch: RLBatch, cfg: PPOConfig):
    """PPO: clipped surrogate + c_v · value loss (optionally clipped) - c_e · entropy."""
    if policy.values is None or batch.returns is None or batch.old_values is None:
        raise ValueError("ppo_gae_loss needs policy.values, batch.returns and batch.old_values")
    loss, metrics = clipped_policy_loss(policy, batch, cfg)
    value_err = jnp.square(policy.values - batch.returns)
    if cfg.value_clip is not None:
        bound = cfg.value_clip * jnp.sqrt(jnp.maximum(masked_var(batch.returns, batch.mask), 1e-8))
        values_clipped = batch.old_values + jnp.clip(policy.values - batch.old_values, -bound, bound)
        value_err = jnp.maximum(value_err, jnp.square(values_clipped - batch.returns))
    value_loss = 0.5 * aggregate(value_err, batch.mask, cfg.aggregation, batch.normaliser)
    loss = loss + cfg.value_coef * value_loss
    return loss, {**metrics, "value_loss": value_loss, "loss": loss}
