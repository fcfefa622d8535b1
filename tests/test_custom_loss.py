"""A loss named in the config replaces the recipe's loss, and a loss that cannot serve is refused in one line."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from siajax.rl import GRPOConfig, PPOConfig, clipped_policy_loss
from siajax.rl.custom_loss import LossSpecError, load_loss, toy_inputs

USER_LOSSES = textwrap.dedent('''
    import jax.numpy as jnp

    def reinforce(policy, batch, cfg):
        """Plain REINFORCE: -A log pi, token mean."""
        term = -jnp.sum(jnp.where(batch.mask, batch.advantages * policy.logprobs, 0.0)) / jnp.sum(batch.mask)
        return term, {"reinforce_term": term}

    def two_arguments(policy, batch):
        return 0.0, {}

    def not_finite(policy, batch, cfg):
        return jnp.log(jnp.sum(policy.logprobs) * 0.0), {}

    def vector(policy, batch, cfg):
        return policy.logprobs, {}

    def python_branch(policy, batch, cfg):
        if policy.logprobs.sum() > 0:  # not traceable under jit
            return 0.0, {}
        return jnp.sum(policy.logprobs), {}

    NOT_A_FUNCTION = 3
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_losses.py").write_text(USER_LOSSES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_losses"


@pytest.mark.parametrize("name,message", [
    ("no colon", "expected 'package.module:function'"),
    ("no_such_module_anywhere:f", "cannot import no_such_module_anywhere"),
    ("{m}:missing", "has no function missing"),
    ("{m}:NOT_A_FUNCTION", "has no function NOT_A_FUNCTION"),
    ("{m}:two_arguments", "must take \\(policy, batch, cfg\\)"),
    ("{m}:not_finite", "not finite on a toy batch"),
    ("{m}:vector", "must return \\(scalar"),
    ("{m}:python_branch", "the dry run failed"),
])
def test_a_loss_that_cannot_serve_is_refused_in_one_line(user_module, name, message):
    with pytest.raises(LossSpecError, match=message) as caught:
        load_loss(name.format(m=user_module), [GRPOConfig()])
    assert "\n" not in str(caught.value)


def test_a_user_loss_gets_the_step_monitors_and_matches_its_own_value(user_module):
    loss = load_loss(f"{user_module}:reinforce", [GRPOConfig(), PPOConfig()])
    policy, batch = toy_inputs()
    value, metrics = loss(policy, batch, GRPOConfig())
    mask = np.asarray(batch.mask)
    expected = -(np.asarray(batch.advantages) * np.asarray(policy.logprobs))[mask].sum() / mask.sum()
    np.testing.assert_allclose(float(value), expected, rtol=1e-6)
    assert float(metrics["reinforce_term"]) == float(value)
    # approx_kl from the ratio to the sampling policy, as the built-in losses report it (the KL stop reads it)
    _, builtin = clipped_policy_loss(policy, batch, GRPOConfig())
    np.testing.assert_allclose(float(metrics["approx_kl"]), float(builtin["approx_kl"]), rtol=1e-6)
    assert load_loss("siajax.rl:grpo_loss", [GRPOConfig()])(policy, batch, GRPOConfig())[1]["clip_fraction"] == \
        builtin["clip_fraction"]  # a loss's own monitors win
