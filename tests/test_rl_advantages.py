"""Advantage estimators against float64 NumPy references written here, plus invariances."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siajax.rl import (
    adaptive_entropic_beta, effective_sample_size, entropic_advantages, entropic_weights, gae,
    group_relative, whiten,
)
from siajax.rl.recipes import standardise_outcomes


def ragged_mask(rng, batch, length):
    lengths = rng.randint(1, length + 1, batch)
    return (np.arange(length)[None] < lengths[:, None]), lengths


def gae_reference(rewards, values, lengths, gamma, lam):
    advantages = np.zeros_like(rewards, np.float64)
    for b, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            running = delta + gamma * lam * running
            advantages[b, t] = running
    returns = advantages + values * (np.arange(rewards.shape[1])[None] < lengths[:, None])
    return advantages, returns


class GAETest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_gae_matches_float64_reference_on_ragged_rows(self):
        rng = np.random.RandomState(0)
        mask, lengths = ragged_mask(rng, 6, 11)
        rewards, values = rng.randn(6, 11), rng.randn(6, 11)
        for gamma, lam in ((1.0, 0.95), (0.9, 0.5), (0.99, 1.0), (1.0, 0.0)):
            fn = self.variant(lambda r, v, m: gae(r, v, m, gamma, lam))
            adv, ret = fn(jnp.float32(rewards), jnp.float32(values), jnp.asarray(mask))
            ref_adv, ref_ret = gae_reference(rewards, values, lengths, gamma, lam)
            np.testing.assert_allclose(np.asarray(adv), ref_adv, atol=1e-5)
            np.testing.assert_allclose(np.asarray(ret), ref_ret * mask, atol=1e-5)


def episode_gae_reference(rewards, values, mask, gamma, lam):
    """GAE over each row's policy steps (its masked positions, in order), float64: environment tokens
    between turns are not steps and their values are never read."""
    advantages = np.zeros_like(rewards, np.float64)
    for b in range(rewards.shape[0]):
        steps = np.flatnonzero(mask[b])
        running = 0.0
        for i in reversed(range(len(steps))):
            t = steps[i]
            next_value = values[b, steps[i + 1]] if i + 1 < len(steps) else 0.0
            running = rewards[b, t] + gamma * next_value - values[b, t] + gamma * lam * running
            advantages[b, t] = running
    return advantages, np.where(mask, advantages + values, 0.0)


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0)])
def test_gae_over_multi_turn_masks_discounts_per_policy_step(gamma, lam):
    """Masks with gaps (tool results between turns): rewards and values on environment tokens are
    garbage here and must not reach any advantage or return."""
    rng = np.random.RandomState(4)
    mask = rng.rand(5, 13) < 0.6
    mask[0] = False  # an empty row
    mask[1] = np.arange(13) < 7  # a single turn: the contiguous case
    rewards, values = rng.randn(5, 13), rng.randn(5, 13)
    rewards[~mask], values[~mask] = 1e6, -1e6
    adv, ret = gae(jnp.float32(rewards), jnp.float32(values), jnp.asarray(mask), gamma, lam)
    ref_adv, ref_ret = episode_gae_reference(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(np.asarray(adv), ref_adv, atol=2e-5)
    np.testing.assert_allclose(np.asarray(ret), ref_ret, atol=2e-5)


def test_the_outcome_lands_on_the_last_policy_token_of_an_episode():
    from siajax.rl.recipes import ppo_token_rewards

    mask = np.array([[1, 1, 0, 0, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0], [0] * 8], bool)
    zeros = jnp.zeros(mask.shape, jnp.float32)
    rewards = np.asarray(ppo_token_rewards(jnp.float32([2.0, 3.0, 5.0]), zeros, zeros, jnp.asarray(mask), 0.1))
    expected = np.zeros(mask.shape)
    expected[0, 5], expected[1, 0] = 2.0, 3.0
    np.testing.assert_array_equal(rewards, expected)


def test_gae_agrees_with_rlax_when_installed():
    rlax = pytest.importorskip("rlax")
    rng = np.random.RandomState(1)
    rewards, values = rng.randn(1, 9).astype(np.float32), rng.randn(1, 9).astype(np.float32)
    ours, _ = gae(rewards, values, np.ones((1, 9), bool), 0.97, 0.9)
    theirs = rlax.truncated_generalized_advantage_estimation(
        rewards[0], jnp.full(9, 0.97), 0.9, jnp.concatenate([values[0], jnp.zeros(1)]))
    np.testing.assert_allclose(np.asarray(ours[0]), np.asarray(theirs), atol=1e-5)


def test_whiten_gives_zero_mean_unit_std_on_the_mask_only():
    rng = np.random.RandomState(2)
    x = rng.randn(5, 7) * 3 + 2
    mask, _ = ragged_mask(rng, 5, 7)
    out = np.asarray(whiten(jnp.float32(x), jnp.asarray(mask)))
    chosen = x[mask]
    np.testing.assert_allclose(out[mask], (chosen - chosen.mean()) / chosen.std(), atol=1e-4)
    assert (out[~mask] == 0).all()


@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("scale", [True, False])
def test_group_relative_matches_numpy(ddof, scale):
    rewards = np.random.RandomState(3).randn(4, 6)
    ours = np.asarray(group_relative(jnp.float32(rewards), scale_by_std=scale, ddof=ddof, eps=1e-6))
    centred = rewards - rewards.mean(1, keepdims=True)
    expected = centred / (rewards.std(1, ddof=ddof, keepdims=True) + 1e-6) if scale else centred
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_grpo_advantages_are_invariant_to_reward_shift_and_scale():
    rewards = jnp.asarray(np.random.RandomState(4).randn(3, 8), jnp.float32)
    base = group_relative(rewards)
    np.testing.assert_allclose(np.asarray(group_relative(rewards + 17.0)), np.asarray(base), atol=1e-4)
    np.testing.assert_allclose(np.asarray(group_relative(rewards * 5.0)), np.asarray(base), atol=1e-4)


def entropic_loo_reference(rewards, beta):
    rewards = np.asarray(rewards, np.float64)
    e = np.exp(beta * (rewards - rewards.max(1, keepdims=True)))
    z = (e.sum(1, keepdims=True) - e) / (rewards.shape[1] - 1)
    return e / (z + 1e-12) - 1


def test_entropic_loo_and_rs_forms_match_numpy():
    rewards = np.random.RandomState(5).rand(5, 8)
    for beta in (0.5, 2.0, 7.0):
        ours = entropic_advantages(jnp.float32(rewards), beta, form="loo")
        np.testing.assert_allclose(np.asarray(ours), entropic_loo_reference(rewards, beta), rtol=1e-4, atol=1e-5)
        rs = np.asarray(entropic_advantages(jnp.float32(rewards), beta, form="rs"))
        tilted = np.exp(beta * rewards)
        np.testing.assert_allclose(rs, (tilted / tilted.mean(1, keepdims=True) - 1) / beta, rtol=1e-4, atol=1e-5)


def test_adaptive_beta_hits_the_target_kl():
    rewards = np.random.RandomState(6).rand(6, 8)
    beta = np.asarray(adaptive_entropic_beta(jnp.float32(rewards), math.log(2)), np.float64)
    for row, b in zip(rewards, beta):
        q = np.exp(b * row - np.log(np.exp(b * row).sum()))
        assert abs(np.sum(q * np.log(q * len(row))) - math.log(2)) < 1e-4


def test_adaptive_beta_handles_ties_and_tiny_groups():
    ties = jnp.ones((2, 4))
    assert np.isfinite(np.asarray(adaptive_entropic_beta(ties))).all()
    np.testing.assert_allclose(np.asarray(entropic_advantages(ties)), 0.0, atol=1e-6)
    assert np.asarray(adaptive_entropic_beta(jnp.ones((3, 1)))).tolist() == [0, 0, 0]


def test_entropic_tends_to_mean_centred_rewards_as_beta_vanishes():
    rewards = np.random.RandomState(7).randn(4, 6)
    beta = 1e-4
    rs = np.asarray(entropic_advantages(jnp.float32(rewards), beta, form="rs"))
    np.testing.assert_allclose(rs, rewards - rewards.mean(1, keepdims=True), atol=2e-3)
    loo = np.asarray(entropic_advantages(jnp.float32(rewards), beta, form="loo")) / beta
    others_mean = (rewards.sum(1, keepdims=True) - rewards) / 5
    np.testing.assert_allclose(loo, rewards - others_mean, atol=2e-2)


def test_entropic_puts_all_weight_on_the_best_sample_as_beta_grows():
    rng = np.random.RandomState(8)
    rewards = jnp.asarray([rng.permutation(np.linspace(0, 1, 6)) for _ in range(4)], jnp.float32)
    weights = np.asarray(entropic_weights(rewards, 500.0))
    np.testing.assert_allclose(weights, np.asarray(jax.nn.one_hot(jnp.argmax(rewards, 1), 6)), atol=1e-4)
    np.testing.assert_allclose(np.asarray(effective_sample_size(jnp.asarray(weights))), 1.0, atol=1e-3)
    advantages = np.asarray(entropic_advantages(rewards, 500.0, form="loo", max_advantage=1e6))
    best = np.argmax(np.asarray(rewards), 1)
    assert (advantages[np.arange(4), best] > 1e3).all()
    others = np.ones_like(advantages, bool)
    others[np.arange(4), best] = False
    np.testing.assert_allclose(advantages[others], -1.0, atol=1e-3)


def test_rare_success_dominates_entropic_but_not_grpo():
    """One success in 16: entropic gives it a far larger share than GRPO does."""
    rewards = jnp.zeros((1, 16)).at[0, 3].set(1.0)
    entropic = np.asarray(entropic_advantages(rewards))[0]
    grpo = np.asarray(group_relative(rewards))[0]
    assert entropic[3] / abs(entropic[0]) > 1.5 * grpo[3] / abs(grpo[0])


def entropic_loo_reference_logspace(rewards, beta):
    """Float64 leave-one-out A_i = exp(beta r_i) / mean_{j != i} exp(beta r_j) - 1, in log space."""
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    g = rewards.shape[1]
    for n, row in enumerate(rewards):
        b = beta[n] if np.ndim(beta) else beta
        for i in range(g):
            others = np.delete(b * row, i)
            log_mean = np.logaddexp.reduce(others) - np.log(g - 1)
            out[n, i] = np.expm1(b * row[i] - log_mean)
    return out


@pytest.mark.parametrize("rewards", [
    [[0.0, 0.0, 1.0]],                      # G = 3, one success
    [[0.0] * 7 + [1.0]],                    # one success among zeros
    [[0.3, 0.3, 0.3, 0.3]],                 # equal rewards
    [[0.0, 1e4, 2e4, 5e3, -3e3]],           # huge reward scale
    [[1e-6, 0.0, 2e-6, 0.0], [5.0, 1.0, 1.0, 1.0]],
])
def test_entropic_loo_is_stable_and_matches_a_float64_reference(rewards):
    rewards = np.asarray(rewards, np.float64)
    beta = np.asarray(adaptive_entropic_beta(jnp.float32(rewards)), np.float64)
    ours = np.asarray(entropic_advantages(jnp.float32(rewards), form="loo", max_advantage=1e9))
    assert np.isfinite(ours).all() and (ours >= -1 - 1e-6).all()
    expected = entropic_loo_reference_logspace(rewards.astype(np.float32).astype(np.float64), beta)
    np.testing.assert_allclose(ours, expected, rtol=1e-3, atol=1e-4)
    capped = np.asarray(entropic_advantages(jnp.float32(rewards), form="loo", max_advantage=5.0))
    assert capped.max() <= 5.0


def test_entropic_loo_with_two_samples_is_refused_and_rs_needs_a_nonzero_beta():
    with pytest.raises(ValueError, match="at least 3 samples"):
        entropic_advantages(jnp.asarray([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="beta != 0"):
        entropic_advantages(jnp.asarray([[0.0, 1.0, 0.0]]), 0.0, form="rs")
    from siajax.rl import EntropicConfig
    with pytest.raises(ValueError, match="beta != 0"):
        EntropicConfig(form="rs", beta=0.0)
    with pytest.raises(ValueError, match="beta != 0"):
        EntropicConfig(form="rs")
    # G = 2, rewards [0, 1]: the old sum-minus-self form gave [-1, 1e12]; RS stays bounded.
    rs = np.asarray(entropic_advantages(jnp.asarray([[0.0, 1.0]]), 2.0, form="rs"))
    tilted = np.exp(2.0 * np.array([0.0, 1.0]))
    np.testing.assert_allclose(rs[0], (tilted / tilted.mean() - 1) / 2.0, rtol=1e-5)


@pytest.mark.parametrize("group", [3, 6, 8])
@pytest.mark.parametrize("value", [0.0, 0.1, 0.3, 1 / 3, 7.0, -2.5, 1e4])
def test_a_group_without_contrast_has_exactly_zero_advantages(value, group):
    """Equal rewards carry no signal, so the advantages are 0 exactly, not 1e-7: a noise gradient that
    Adam would scale to a full step. Before: entropic gave -1.2e-7 on all-zero groups, GRPO -0.0074 on
    six rewards of 0.1 (the group mean's rounding error divided by a std of the same size)."""
    rewards = jnp.stack([jnp.full((group,), value, jnp.float32), jnp.arange(group, dtype=jnp.float32)])
    for advantages in (group_relative(rewards), group_relative(rewards, scale_by_std=False),
                       entropic_advantages(rewards), entropic_advantages(rewards, 2.0, form="rs")):
        advantages = np.asarray(advantages)
        assert (advantages[0] == 0).all(), advantages[0]
        assert np.abs(advantages[1]).max() > 0.1  # a row with contrast keeps its signal
    assert (np.asarray(standardise_outcomes(jnp.full((4 * group,), value, jnp.float32))) == 0).all()


@pytest.mark.parametrize("drop", [False, True])
def test_grpo_drops_uniform_groups_from_the_mask_only_when_asked(drop):
    """DAPO dynamic sampling: with ``drop_uniform_groups`` a group without contrast leaves the loss mask;
    either way it is reported in ``informative_groups``."""
    from siajax.rl import GRPOConfig, grpo_advantages

    rewards = jnp.asarray([[0.1, 0.1, 0.1], [0.0, 1.0, 0.0]], jnp.float32)
    mask = jnp.ones((6, 5), bool)
    extra, metrics = grpo_advantages(rewards, mask, GRPOConfig(drop_uniform_groups=drop))
    kept = np.asarray(extra["mask"]).all(axis=1)
    np.testing.assert_array_equal(kept, [not drop] * 3 + [True] * 3)
    assert float(metrics["informative_groups"]) == 0.5
    assert (np.asarray(extra["advantages"])[:3] == 0).all()


@pytest.mark.parametrize("winners,group", [(3, 4), (5, 8), (2, 3), (7, 8), (1, 8), (4, 8)])
def test_entropic_loo_reaches_the_exact_limits_when_most_of_a_group_succeeds(winners, group):
    """k successes among G (ln 2 unreachable when k > G/2, so beta runs to its cap): as beta -> inf
    a winner's leave-one-out advantage is (G-1)/(k-1) - 1 and a loser's -1. Before: in float32 the
    logits ~1e12 swallowed the log((k-1)/(G-1)) term and rewards [1, 1, 1, 0] gave winners 0."""
    rewards = np.array([[1.0] * winners + [0.0] * (group - winners)])
    ours = np.asarray(entropic_advantages(jnp.float32(rewards), form="loo", max_advantage=1e9))[0]
    beta = np.asarray(adaptive_entropic_beta(jnp.float32(rewards)), np.float64)
    shifted = rewards - rewards.max()  # the float64 reference, shifted so that it is exact too
    np.testing.assert_allclose(ours, entropic_loo_reference_logspace(shifted, beta)[0], rtol=1e-4, atol=1e-5)
    if 2 * winners > group:  # beta at its cap: the advantages are the limits
        limit = (group - 1) / (winners - 1) - 1 if winners > 1 else np.inf
        np.testing.assert_allclose(ours, [limit] * winners + [-1.0] * (group - winners), rtol=1e-5)
