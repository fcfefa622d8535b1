"""RL core: pure advantage estimators and losses. Imports nothing from agents or tasks."""

from siajax.rl.advantages import (
    adaptive_entropic_beta, effective_sample_size, entropic_advantages, entropic_weights, explained_variance, gae,
    group_relative, masked_mean, uniform_groups, whiten,
)
from siajax.rl.losses import (
    EntropicConfig, GRPOConfig, PolicyOutputs, PPOConfig, RLBatch, SurrogateConfig, aggregate,
    aggregation_normaliser, approx_kl_to_old, clipped_policy_loss, clipped_surrogate, entropic_loss, grpo_loss,
    kl_estimate, ppo_gae_loss,
)
from siajax.rl.recipes import (
    RECIPES, Recipe, entropic_token_advantages, grpo_advantages, ppo_gae_advantages, ppo_token_rewards, get_recipe,
    recipe_config, register_recipe,
)

__all__ = [
    "RECIPES", "Recipe", "get_recipe", "recipe_config", "register_recipe", "EntropicConfig", "GRPOConfig", "PPOConfig", "PolicyOutputs", "RLBatch", "SurrogateConfig",
    "adaptive_entropic_beta", "aggregate", "aggregation_normaliser", "approx_kl_to_old", "clipped_policy_loss",
    "clipped_surrogate", "effective_sample_size", "entropic_advantages", "entropic_loss",
    "entropic_token_advantages", "entropic_weights", "explained_variance", "gae", "group_relative", "grpo_advantages", "grpo_loss",
    "kl_estimate", "masked_mean", "ppo_gae_advantages", "ppo_gae_loss", "ppo_token_rewards", "uniform_groups",
    "whiten",
]
