"""The weight lever's optimiser, assembled from optax parts, and its step-size defaults.

    apply_if_finite(                        a non-finite gradient leaves weights and state alone
      multi_transform({part:                one partition per trainable part (adapters, value head)
        freeze_on_zero_gradient(            an exactly zero gradient moves nothing (no Adam drift)
          chain(clip_by_global_norm(1),     each part clipped on its own norm
                adam(rate(part))))}))       each part at its own (scheduled) learning rate

The train step gates whole steps for any optimiser and counts what it applied
(``siajax.train.state.make_train_step``); these guards make the default
optimiser safe in any loop and hold each part on its own (a value head gets no
gradient under a recipe without a critic, while the adapters step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

PARTS = ("lora", "value_head")  # the trainable parts, each with its own clip, Adam state and rate
LR_SCHEDULES = ("constant", "cosine")
NEVER_APPLY_NON_FINITE = 2**31 - 1  # apply_if_finite's "apply anyway after N errors": never

# The critic's own step size. Its targets are standardised returns (O(1)) and its 1/E readout moves V
# by O(lr) per Adam step: a fast critic learns a predictable return quickly, but on a return it cannot
# predict it fits noise that goes straight into the advantages (the sweep is in experiments/RESULTS.md,
# "critic learning rate"). Raise it (RunConfig.critic_learning_rate) where returns are predictable.
DEFAULT_CRITIC_LEARNING_RATE = 1e-2


def default_learning_rate(config) -> float:
    """A LoRA learning rate for a model of this depth: 6e-2 / layers, at most 1e-2.

    With fan-in-scaled A and B = 0, one Adam step changes each adapted projection's
    output by O(lr) relative to it whatever the width, and the changes of 7 projections
    per layer add up over the depth. Calibrated at two depths (4-layer bundled model:
    1e-2; 30-layer SmolLM2-135M: 2e-3; experiments/RESULTS.md).
    """
    return min(1e-2, 6e-2 / config.num_layers)


def learning_rate_schedule(learning_rate: float, schedule: str = "constant", *, warmup_steps: int = 0,
                           total_steps: int | None = None):
    """Constant, or linear warm-up then cosine decay to 10% over ``total_steps`` (optax)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; use one of {LR_SCHEDULES}")
    if schedule == "cosine":
        if not total_steps:
            raise ValueError("a cosine schedule needs total_steps")
        return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1),
                                                  end_value=0.1 * learning_rate)
    if warmup_steps:
        return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps),
                                     optax.constant_schedule(learning_rate)], [warmup_steps])
    return learning_rate


def freeze_on_zero_gradient(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner``, except that an exactly zero gradient gives a zero update and leaves ``inner``'s state
    alone: Adam with non-zero moments would keep moving the weights on momentum alone (a GRPO group
    whose advantages are all zero; a value head under a recipe without a critic)."""

    def update(updates, state, params=None):
        def step(_):
            return inner.update(updates, state, params)

        def hold(_):
            return jax.tree.map(jnp.zeros_like, updates), state

        return jax.lax.cond(optax.tree.norm(updates) > 0, step, hold, None)

    return optax.GradientTransformation(inner.init, update)


def default_optimizer(learning_rate: float = 1e-2, *, critic_learning_rate: float = DEFAULT_CRITIC_LEARNING_RATE,
                      schedule: str = "constant", warmup_steps: int = 0, total_steps: int | None = None,
                      parts: tuple[str, ...] = PARTS) -> optax.GradientTransformation:
    """The module docstring's chain. Apart, the critic's gradient can neither swamp nor be swamped by
    the policy's in one shared clip, and a recipe without a critic leaves the value head exactly where
    it is. ``parts``: the top-level keys of the params this optimiser will see (static labels: optax
    also inits it on placeholders)."""

    def part(rate: float):
        rate = learning_rate_schedule(rate, schedule, warmup_steps=warmup_steps, total_steps=total_steps)
        return freeze_on_zero_gradient(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(rate)))

    rates = {"lora": learning_rate, "value_head": critic_learning_rate}
    unknown = set(parts) - set(rates)
    if unknown:
        raise ValueError(f"no learning rate for trainable parts {sorted(unknown)}; known: {sorted(rates)}")
    partitioned = optax.multi_transform({name: part(rates[name]) for name in parts},
                                        param_labels={name: name for name in parts})
    return optax.apply_if_finite(partitioned, max_consecutive_errors=NEVER_APPLY_NON_FINITE)
