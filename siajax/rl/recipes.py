"""The recipes: rollout rewards -> token advantages, one function each, and the registry.

Each advantage function returns an :class:`~siajax.rl.losses.RLBatch`-ready dict
of [B, T] arrays plus metrics. Rows are laid out group-major: row b belongs to
prompt b // G. :data:`RECIPES` is the one place a recipe's name, loss, config,
advantages and group minimum are written.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import chex
import jax
import jax.numpy as jnp

from siajax.rl.advantages import (
    LOO_MIN_GROUP, effective_sample_size, entropic_advantages, entropic_weights, adaptive_entropic_beta, gae,
    explained_variance, group_relative, last_step, masked_mean, uniform_groups, whiten,
)
from siajax.rl.losses import EntropicConfig, GRPOConfig, PPOConfig, entropic_loss, grpo_loss, ppo_gae_loss


def _per_token(sequence_values: jax.Array, mask: jax.Array) -> jax.Array:
    """[B] -> [B, T], zero off the response."""
    return jnp.where(mask, sequence_values[:, None], 0.0)


def ppo_token_rewards(outcome, old_logprobs, ref_logprobs, mask, kl_coef: float):
    """-beta·(log pi_old - log pi_ref) at every policy token, plus the outcome at the last one."""
    chex.assert_rank(outcome, 1)
    mask = mask.astype(bool)
    final = jax.nn.one_hot(last_step(mask), mask.shape[1]) * outcome[:, None]
    return jnp.where(mask, final - kl_coef * (old_logprobs - ref_logprobs), 0.0)


def standardise_outcomes(outcome: jax.Array, eps: float = 1e-6) -> jax.Array:
    """(r - mean) / (std + eps) over the batch: the critic's targets stay O(1) whatever the task's
    reward scale (an Adam step moves a value by O(lr), so raw rewards of 0.01 or 1e3 both fail).
    Exactly 0 when every outcome is equal (no float noise standardised up to O(1e-3))."""
    uniform = uniform_groups(outcome.reshape(1, -1))[0, 0]
    return jnp.where(uniform, 0.0, (outcome - jnp.mean(outcome)) / (jnp.std(outcome) + eps))


def ppo_gae_advantages(outcome, old_values, old_logprobs, ref_logprobs, mask, cfg: PPOConfig):
    """GAE on KL-shaped token rewards (outcomes standardised over the batch first when
    ``cfg.standardise_rewards``); advantages whitened over the mask."""
    scaled = standardise_outcomes(outcome) if cfg.standardise_rewards else outcome
    rewards = ppo_token_rewards(scaled, old_logprobs, ref_logprobs, mask, cfg.reward_kl_coef)
    advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    return {"advantages": whiten(advantages, mask), "returns": returns}, {
        "reward_mean": jnp.mean(outcome), "return_mean": masked_mean(returns, mask),
        # of the values that made these advantages, before any step (as SB3 and CleanRL report it)
        "explained_variance": explained_variance(old_values, returns, mask),
    }


def _group_mask(informative: jax.Array, group_size: int, mask: jax.Array, drop_uniform: bool) -> jax.Array:
    if not drop_uniform:
        return mask
    return mask & jnp.repeat(informative, group_size)[:, None]  # DAPO dynamic sampling


def grpo_advantages(rewards: jax.Array, mask: jax.Array, cfg: GRPOConfig):
    """rewards [N, G], mask [N*G, T] -> group-relative advantages on every response token."""
    advantages = group_relative(rewards, scale_by_std=cfg.scale_by_std, ddof=cfg.std_ddof)
    informative = ~uniform_groups(rewards)[:, 0]
    mask = _group_mask(informative, rewards.shape[1], mask, cfg.drop_uniform_groups)
    return {"advantages": _per_token(advantages.reshape(-1), mask), "mask": mask}, {
        "reward_mean": jnp.mean(rewards),
        "informative_groups": jnp.mean(informative.astype(jnp.float32)),
    }


def entropic_token_advantages(rewards: jax.Array, mask: jax.Array, cfg: EntropicConfig):
    """rewards [N, G] -> entropic advantages per token; reports beta and weight ESS."""
    beta = adaptive_entropic_beta(rewards, cfg.target_kl) if cfg.beta is None else jnp.full(
        rewards.shape[:1], cfg.beta, jnp.float32)
    advantages = entropic_advantages(rewards, beta if cfg.form == "loo" else cfg.beta, form=cfg.form,
                                     target_kl=cfg.target_kl, max_advantage=cfg.max_advantage)
    ess = effective_sample_size(entropic_weights(rewards, beta))
    return {"advantages": _per_token(advantages.reshape(-1), mask)}, {
        "reward_mean": jnp.mean(rewards), "beta_mean": jnp.mean(beta), "weight_ess": jnp.mean(ess),
    }


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A weight-lever recipe: its loss and config type, and how its advantages are made.

    ``advantages(cfg, rewards [B], old, ref, mask, group_size) -> (RLBatch fields, metrics)``
    reads the old and reference policies' :class:`~siajax.rl.losses.PolicyOutputs` (``ref`` is None
    when ``uses_reference(cfg)`` is false).
    """

    name: str
    loss: Callable
    config_type: type
    advantages: Callable
    min_group_size: int  # samples per prompt below which its advantages are undefined
    uses_critic: bool = False
    # Whether its advantages read the old policy's forward pass (values, entropies). When not, the old
    # log-probs are the sampler's own (the behaviour policy's, ~5e-5 from training's forward: the first
    # train step measures it as ``logprob_mismatch``) and an update saves a forward pass over its batch.
    reads_old_forward: bool = True
    # Whether the learner must score the frozen reference policy for a config (a forward pass per
    # update); a registered recipe may read ``ref`` anywhere, so it always gets one unless it says.
    uses_reference: Callable = lambda cfg: True


def kl_to_reference(cfg) -> bool:
    """Whether a built-in config has a KL-to-reference term on (in the loss or the reward shaping)."""
    return any(getattr(cfg, name, 0.0) for name in ("kl_coef", "reward_kl_coef"))


def _ppo_gae(cfg, rewards, old, ref, mask, group_size: int):
    reference = old if ref is None else ref  # None only when reward_kl_coef is 0: the shaping is exactly 0
    return ppo_gae_advantages(rewards, old.values, old.logprobs, reference.logprobs, mask, cfg)


def _grpo(cfg, rewards, old, ref, mask, group_size: int):
    return grpo_advantages(rewards.reshape(-1, group_size), mask, cfg)


def _entropic(cfg, rewards, old, ref, mask, group_size: int):
    return entropic_token_advantages(rewards.reshape(-1, group_size), mask, cfg)


RECIPES: dict[str, Recipe] = {
    "ppo_gae": Recipe("ppo_gae", ppo_gae_loss, PPOConfig, _ppo_gae, min_group_size=1, uses_critic=True,
                      uses_reference=kl_to_reference),
    "grpo": Recipe("grpo", grpo_loss, GRPOConfig, _grpo, min_group_size=2, uses_reference=kl_to_reference,
                   reads_old_forward=False),
    "entropic": Recipe("entropic", entropic_loss, EntropicConfig, _entropic, min_group_size=LOO_MIN_GROUP,
                       uses_reference=kl_to_reference, reads_old_forward=False),
}


def register_recipe(recipe: Recipe, *, replace: bool = False) -> Recipe:
    """Adds a recipe (its advantage estimator, loss and config type) to :data:`RECIPES` under its name,
    so ``recipe = "<name>"`` in a run's TOML (or ``--recipe``) trains with it. A module a run names in
    ``recipe_modules`` calls this when imported. Built-in names are kept unless ``replace``."""
    if not isinstance(recipe, Recipe):
        raise TypeError(f"register_recipe takes a siajax.rl.Recipe, got {type(recipe).__name__}")
    known = RECIPES.get(recipe.name)
    same = known is not None and (known.advantages, known.config_type) == (recipe.advantages, recipe.config_type)
    if known is not None and not replace and not same:  # a module imported twice registers the same again
        raise ValueError(f"a recipe named {recipe.name!r} is already registered (replace=True to override)")
    if not dataclasses.is_dataclass(recipe.config_type) or recipe.min_group_size < 1:
        raise ValueError(f"recipe {recipe.name!r}: config_type must be a dataclass and min_group_size >= 1")
    from siajax.rl.custom_loss import with_step_monitors  # the learner reads approx_kl and clip_fraction

    RECIPES[recipe.name] = dataclasses.replace(recipe, loss=with_step_monitors(recipe.loss))
    return RECIPES[recipe.name]


def get_recipe(name: str) -> Recipe:
    """The registered recipe ``name``; unknown names fail loudly."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]


def recipe_config(name: str, **overrides):
    """The default config of a recipe, with overrides."""
    return get_recipe(name).config_type(**overrides)
