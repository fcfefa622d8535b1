"""Advantage estimators: GAE, group-relative (GRPO), entropic weights, whitening.

Pure, jittable functions of arrays. Token arrays are [B, T] with a mask of the
policy's tokens: contiguous from t = 0 for a single reply, with gaps in a
multi-turn episode (environment tokens between the model's turns). Steps are
the masked positions in order; past the last one the episode has ended. Group
arrays are [N, G]: N prompts, G samples each.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp

LN2 = math.log(2.0)
LOO_MIN_GROUP = 3  # entropic "loo": with 2 samples the ln 2 tilt is only a supremum (beta -> infinity)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Mean over the masked entries; a select, not a product, so inf or NaN off the mask stays out."""
    mask = mask.astype(bool)
    return jnp.sum(jnp.where(mask, x, 0.0), axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis, dtype=x.dtype), 1.0)


def masked_var(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Population variance over the masked entries."""
    return masked_mean(jnp.square(x - masked_mean(x, mask)), mask)


def whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / std over the masked entries (population std); masked entries -> 0."""
    mean = masked_mean(x, mask)
    scaled = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        scaled = scaled + mean
    return jnp.where(mask, scaled, 0.0)


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float):
    """Generalised advantage estimation with a reverse ``lax.scan``, over the policy's steps.

    The steps are the masked positions in order: in a multi-turn episode the
    environment's tokens between two turns are not steps (the scan carries the
    running advantage and the next step's value across them unchanged), so gamma
    and lambda discount per policy token and the value bootstrapped across a tool
    result is the critic's at the next policy token. Values off the mask are never read.

    Args:
      rewards, values, mask: [B, T]; values are V(s_t); past a row's last
        masked step the episode has ended (bootstrap value 0).
    Returns:
      (advantages, returns), each [B, T], zero where mask is 0.
    """
    chex.assert_rank([rewards, values, mask], 2)
    chex.assert_equal_shape([rewards, values, mask])
    mask = mask.astype(bool)
    rewards, values = jnp.where(mask, rewards, 0.0), jnp.where(mask, values, 0.0)

    def backward(carry, inputs):
        next_advantage, next_value = carry
        reward, value, step = inputs
        advantage = reward + gamma * next_value - value + gamma * lam * next_advantage
        carry = (jnp.where(step, advantage, next_advantage), jnp.where(step, value, next_value))
        return carry, jnp.where(step, advantage, 0.0)

    zeros = jnp.zeros(rewards.shape[0], jnp.float32)
    _, advantages = jax.lax.scan(backward, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True)
    advantages = advantages.T
    return advantages, jnp.where(mask, advantages + values, 0.0)


def last_step(mask: jax.Array) -> jax.Array:
    """[B, T] -> [B] index of each row's last masked position (T - 1 for an empty row)."""
    return mask.shape[1] - 1 - jnp.argmax(mask.astype(bool)[:, ::-1], axis=1)


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """1 - Var(returns - values) / Var(returns) over the mask: 1 for a perfect critic, 0 for one that
    predicts the mean, negative for a worse one. 0 when the returns do not vary."""
    spread = masked_var(returns, mask)
    return jnp.where(spread > 1e-12, 1.0 - masked_var(returns - values, mask) / jnp.maximum(spread, 1e-12), 0.0)


def uniform_groups(rewards: jax.Array) -> jax.Array:
    """[N, G] -> [N, 1] bool: every reward of the row equals its first.

    Such a group has no contrast, so its advantages must be exactly 0: the float
    error of a mean or a logsumexp (1e-7) is otherwise a gradient whose direction
    is noise, and Adam, blind to scale, takes a full step along it
    (experiments/RESULTS.md, "A float-noise bug").
    """
    return jnp.all(rewards == rewards[:, :1], axis=1, keepdims=True)


def group_relative(rewards: jax.Array, *, scale_by_std: bool = True, ddof: int = 1, eps: float = 1e-6):
    """GRPO advantages (r - mean) / (std + eps) within each group; exactly 0 in uniform groups.

    rewards: [N, G]. ``ddof=1`` is the sample std (tunix, TRL); ``ddof=0`` the
    population std. ``scale_by_std=False`` is Dr. GRPO (mean-centring only).
    """
    chex.assert_rank(rewards, 2)
    centred = jnp.where(uniform_groups(rewards), 0.0, rewards - jnp.mean(rewards, axis=1, keepdims=True))
    if not scale_by_std:
        return centred
    group_size = rewards.shape[1]
    denom = max(group_size - ddof, 1)
    std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=1, keepdims=True) / denom)
    return centred / (std + eps)


def entropic_weights(rewards: jax.Array, beta: jax.Array | float) -> jax.Array:
    """softmax(beta · r) within each group: the tilted distribution of J = log E exp(beta R).

    rewards: [N, G]; beta: scalar or [N]. Rows sum to 1.
    """
    chex.assert_rank(rewards, 2)
    beta = jnp.broadcast_to(jnp.asarray(beta, jnp.float32), rewards.shape[:1])[:, None]
    return jax.nn.softmax(beta * rewards, axis=1)


def _kl_from_uniform(rewards: jax.Array, beta: jax.Array) -> jax.Array:
    """KL(softmax(beta r) || Uniform_G) per row. rewards [N, G], beta [N]."""
    log_q = jax.nn.log_softmax(beta[:, None] * rewards, axis=1)
    return jnp.sum(jnp.exp(log_q) * log_q, axis=1) + jnp.log(rewards.shape[1])


def adaptive_entropic_beta(
    rewards: jax.Array, target_kl: float = LN2, *, max_doublings: int = 40, bisection_steps: int = 60
) -> jax.Array:
    """Per-group beta with KL(softmax(beta r) || Uniform) = target_kl (TTT-Discover).

    KL grows monotonically in beta, so: double an upper bracket until it passes
    the target, then bisect. Groups that cannot reach the target (ties, or
    G = 2 with target ln 2) get the largest bracket tried. G < 2 gives beta 0.
    rewards: [N, G] -> beta [N].
    """
    chex.assert_rank(rewards, 2)
    n, g = rewards.shape
    if g < 2:
        return jnp.zeros((n,), jnp.float32)
    rewards = rewards.astype(jnp.float32)

    def double(_, hi):
        return jnp.where(_kl_from_uniform(rewards, hi) < target_kl, 2.0 * hi, hi)

    hi = jax.lax.fori_loop(0, max_doublings, double, jnp.ones((n,), jnp.float32))
    lo = jnp.where(_kl_from_uniform(rewards, hi) < target_kl, hi, jnp.zeros_like(hi))

    def bisect(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        below = _kl_from_uniform(rewards, mid) < target_kl
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo, hi = jax.lax.fori_loop(0, bisection_steps, bisect, (lo, hi))
    return 0.5 * (lo + hi)


def entropic_advantages(
    rewards: jax.Array, beta: jax.Array | float | None = None, *, form: str = "loo", target_kl: float = LN2,
    max_advantage: float = 100.0,
) -> jax.Array:
    """Entropic advantage weighting: rare high rewards dominate the update.

    form="loo" (TTT-Discover): A_i = exp(beta r_i) / Z_i - 1 with the leave-one-out
      mean Z_i = mean_{j != i} exp(beta r_j), taken as a logsumexp over the others
      (no cancellation in sum - e_i). beta=None solves beta per group so the tilt
      has KL ``target_kl`` from uniform. Needs G >= 3: with G = 2 the ln 2 target
      is only a supremum and beta runs off to infinity.
    form="rs" (risk-sensitive GRPO): A_i = (exp(beta r_i) / mean_j exp(beta r_j) - 1) / beta
      with a fixed beta != 0 (2 recommended); -> r_i - mean r as beta -> 0.
    Advantages are capped at ``max_advantage`` (both forms are >= -1 / -1/beta) and
    are exactly 0 in a group whose rewards are all equal (``uniform_groups``).
    rewards: [N, G] -> advantages [N, G].
    """
    chex.assert_rank(rewards, 2)
    rewards = rewards.astype(jnp.float32)
    g = rewards.shape[1]
    no_contrast = uniform_groups(rewards)
    if form == "rs":
        if beta is None or (isinstance(beta, (int, float)) and beta == 0):
            raise ValueError("form='rs' needs a fixed beta != 0 (2.0 is the published choice)")
        log_mean = jax.nn.logsumexp(beta * rewards, axis=1, keepdims=True) - math.log(g)
        advantages = jnp.minimum(jnp.expm1(beta * rewards - log_mean) / beta, max_advantage)
        return jnp.where(no_contrast, 0.0, advantages)
    if form != "loo":
        raise ValueError(f"unknown entropic form {form!r}; use 'loo' or 'rs'")
    if g < LOO_MIN_GROUP:
        raise ValueError(f"entropic form 'loo' needs at least {LOO_MIN_GROUP} samples per prompt, got {g}; raise "
                         "samples_per_prompt or use form='rs'")
    beta = adaptive_entropic_beta(rewards, target_kl) if beta is None else jnp.asarray(beta, jnp.float32)
    beta = jnp.broadcast_to(beta, rewards.shape[:1])[:, None]
    # Shifted by the row's best reward: softmax and the leave-one-out ratio are shift-invariant, and the
    # shift keeps the logits <= 0. Unshifted, a group where most samples succeed (ln 2 unreachable, beta
    # at its 2^40 cap) had logits ~1e12, where float32 logsumexp drops the log((k-1)/(G-1)) term and the
    # winners' advantage 0.5 (rewards [1, 1, 1, 0]) came out 0.
    logits = beta * (rewards - jnp.max(rewards, axis=1, keepdims=True))  # [N, G]
    others = jnp.where(jnp.eye(g, dtype=bool)[None], -jnp.inf, logits[:, None, :])  # [N, i, j], j != i
    log_loo_mean = jax.nn.logsumexp(others, axis=2) - math.log(g - 1)
    advantages = jnp.minimum(jnp.expm1(logits - log_loo_mean), max_advantage)
    return jnp.where(no_contrast, 0.0, advantages)


def effective_sample_size(weights: jax.Array) -> jax.Array:
    """1 / sum w^2 of normalised weights [N, G] -> [N]; G for uniform, 1 for one-hot."""
    return 1.0 / jnp.sum(jnp.square(weights), axis=-1)
