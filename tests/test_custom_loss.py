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


USER_RECIPE = textwrap.dedent('''
    """REINFORCE with a batch-mean baseline, registered as a recipe of its own."""
    import jax.numpy as jnp

    from siajax.rl import Recipe, SurrogateConfig, register_recipe

    def advantages(cfg, rewards, old, ref, mask, group_size):
        centred = rewards - jnp.mean(rewards)
        return {"advantages": jnp.where(mask, centred[:, None], 0.0)}, {"reward_mean": jnp.mean(rewards)}

    def loss(policy, batch, cfg):
        term = -jnp.sum(jnp.where(batch.mask, batch.advantages * policy.logprobs, 0.0)) / jnp.sum(batch.mask)
        return term, {"reinforce_term": term}

    register_recipe(Recipe("reinforce", loss, SurrogateConfig, advantages, min_group_size=1))
''')


def test_a_recipe_registered_by_a_user_module_trains_in_the_loop_with_its_settings(tmp_path, monkeypatch):
    """recipe_modules imports the module (its register_recipe call), recipe = "reinforce" forces it,
    [recipe_settings.reinforce] sets its config, and the ledger says what ran with which settings."""
    import json
    import shutil

    from siajax.config import RunConfig
    from siajax.loop import run
    from siajax.models import BUNDLED_TINY_MODEL
    from siajax.rl import RECIPES
    from siajax.tasks import resolve_task

    (tmp_path / "my_recipes.py").write_text(USER_RECIPE)
    monkeypatch.syspath_prepend(str(tmp_path))
    task_dir = tmp_path / "varied"
    shutil.copytree(resolve_task("digits").root, task_dir)
    (task_dir / "verifier.py").write_text(  # rewards that differ within a batch, whatever the model says
        "def score(item, answer, text):\n"
        "    ok = len(text) % 2 == 0\n"
        "    return {'reward': 1.0 if ok else 0.0, 'failure': None if ok else 'wrong_answer', 'metrics': {}}\n")
    harness = json.loads((task_dir / "harness.json").read_text())
    (task_dir / "harness.json").write_text(json.dumps({**harness, "parser": {"kind": "raw"}}))
    try:
        config = RunConfig(task=str(task_dir), model=str(BUNDLED_TINY_MODEL), levers="weights", generations=1,
                           seed=1, items_per_generation=4, updates_per_generation=1, dev_items=4, test_items=4,
                           recipe="reinforce", recipe_modules=("my_recipes",),
                           recipe_settings={"reinforce": {"clip_low": 0.1, "clip_high": 0.1}})
        (entry,) = run(config, tmp_path / "run")
    finally:
        RECIPES.pop("reinforce", None)
    assert entry["decision"]["recipe"] == "reinforce" and entry["train"]["recipe"] == "reinforce"
    assert entry["train"]["recipe_config"]["clip_low"] == 0.1  # the settings it ran with, recorded
    assert entry["train"]["applied_steps"] > 0
    assert "reinforce_term" in entry["train"]["updates"][0]  # the user loss's own metric reached the ledger
    assert json.loads((tmp_path / "run" / "config.json").read_text())["recipe_modules"] == ["my_recipes"]


def test_recipe_settings_and_modules_that_cannot_serve_are_one_line():
    from siajax.config import RunConfig

    for settings, message in (({"grpo": {"kl": 1.0}}, "GRPOConfig has no such field"),
                              ({"grpo": {"kl_coef": "high"}}, "recipe_settings.grpo.kl_coef: expected float"),
                              ({"ppo": {}}, "recipe_settings.ppo: no such recipe"),
                              ({"entropic": {"form": "x"}}, "unknown entropic form")):
        with pytest.raises(ValueError, match=message):
            RunConfig(recipe_settings=settings)
    with pytest.raises(ValueError, match="recipe_modules: cannot import no_such_recipes_module"):
        RunConfig(recipe_modules=("no_such_recipes_module",))
    assert RunConfig(recipe_settings={"grpo": {"kl_coef": 0.02}}).recipe_config("grpo").kl_coef == 0.02
