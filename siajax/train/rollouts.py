"""The one rollout driver: sample -> reward -> learner update, round after round.

:func:`drive_updates` is what the SIA loop's weight lever, :func:`rl_updates`
(token-level rewards on raw prompts, multi-host ready) and the experiments all
run; only the rollout function differs. :func:`make_learner` sets up a fresh
learner on a model for the drivers that do not come through the loop.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from siajax import timing
from siajax.models import LoRAConfig, Transformer
from siajax.parallel import PARTITION_RULES
from siajax.parallel.distributed import global_mean, host_rows, to_host_local
from siajax.rl import get_recipe
from siajax.rng import purpose_key
from siajax.sampling import GenerationResult, generate
from siajax.train.learner import Learner, UpdateSchedule, bind_learner, place_on_mesh
from siajax.train.optim import DEFAULT_CRITIC_LEARNING_RATE, default_optimizer
from siajax.train.policy import attach_trainable
from siajax.train.state import TrainState, init_train_state

# rollout_fn(update, policy model, key) -> (samples, rewards [B] NumPy, info: what the update's record adds)
RolloutFn = Callable[[int, Transformer, jax.Array], tuple[GenerationResult, np.ndarray, dict]]


def drive_updates(learner: Learner, state: TrainState, frozen, rollout_fn: RolloutFn, *, updates: int,
                  key: jax.Array, group_size: int, on_update: Callable[[int, dict], None] | None = None):
    """``updates`` rounds of ``rollout_fn`` under the current policy, then one ``learner.update``
    each; -> (final state, per-update records ``{"update", **info, **learner metrics}``).
    Each round samples with a fresh split of ``key``."""
    history = []
    for update in range(updates):
        key, sample_key = jax.random.split(key)
        with timing.stage("rollouts"):
            samples, rewards, info = rollout_fn(update, learner.policy(state, frozen), sample_key)
        with timing.stage("training"):
            state, metrics = learner.update(state, frozen, samples, rewards, group_size)
        history.append({"update": update, **info, **metrics})
        if on_update is not None:
            on_update(update, history[-1])
    return state, history


def make_learner(model: Transformer, recipe: str, *, cfg=None, lora: LoRAConfig = LoRAConfig(),
                 learning_rate: float = 1e-2, critic_learning_rate: float = DEFAULT_CRITIC_LEARNING_RATE,
                 schedule: UpdateSchedule | None = None, seed: int = 0, mesh=None, rules=PARTITION_RULES,
                 objective: Callable | None = None):
    """Adds adapters (and a value head when the recipe has a critic) and returns (learner, state, frozen).
    With a ``mesh``, state and frozen base are sharded by ``rules`` and the step runs SPMD."""
    parts, params, frozen = attach_trainable(model, lora, seed=seed, value_head=get_recipe(recipe).uses_critic)
    optimizer = default_optimizer(learning_rate, critic_learning_rate=critic_learning_rate, parts=tuple(params))
    state, shardings = init_train_state(params, optimizer, seed), None
    if mesh is not None:
        state, frozen, shardings = place_on_mesh(state, frozen, mesh, rules)
    learner = bind_learner(parts, recipe, optimizer, cfg=cfg, schedule=schedule, shardings=shardings,
                           objective=objective)
    return learner, state, frozen


def rl_updates(learner: Learner, state: TrainState, frozen, prompts: list[list[int]],
               reward_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], *, updates: int, group_size: int = 8,
               max_new_tokens: int = 16, temperature: float = 1.0, seed: int = 0, pad_token_id: int = 0,
               stop_token_ids=(), on_update: Callable[[int, dict], None] | None = None):
    """:func:`drive_updates` on raw prompts with a token-level reward; -> (final state, per-update records).

    reward_fn(tokens [B, N], mask [B, N]) -> rewards [B] (NumPy). Each prompt is
    sampled ``group_size`` times (rows grouped, as the group recipes expect).
    Multi-host ready: when the learner's mesh spans several processes, each
    samples and rewards its own block of ``prompts``; updates are global.
    """
    own_prompts = prompts[host_rows(len(prompts))] if learner.mesh is not None else prompts
    batch_prompts = [p for p in own_prompts for _ in range(group_size)]
    rules = learner.shardings.rules if learner.shardings else PARTITION_RULES

    success_rates = []

    def rollout(update: int, policy: Transformer, key: jax.Array):
        samples = generate(policy, batch_prompts, key=key, max_new_tokens=max_new_tokens, temperature=temperature,
                           pad_token_id=pad_token_id, stop_token_ids=stop_token_ids, mesh=learner.mesh, rules=rules)
        tokens, mask = to_host_local((samples.tokens, samples.mask))
        rewards = np.asarray(reward_fn(tokens, mask), np.float32)
        success_rates.append((rewards > 0).mean())
        return samples, rewards, {}

    def report(update: int, record: dict):
        # Cross-process means only after the update: every process then runs the same collectives in order.
        record.update(reward=record["reward_mean"], success_rate=global_mean(success_rates[update]))
        if on_update is not None:
            on_update(update, record)

    return drive_updates(learner, state, frozen, rollout, updates=updates, key=purpose_key(seed, "rollouts"),
                         group_size=group_size, on_update=report)


def rl_run(model: Transformer, prompts: list[list[int]], reward_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
           recipe: str, *, updates: int, group_size: int = 8, max_new_tokens: int = 16, temperature: float = 1.0,
           seed: int = 0, pad_token_id: int = 0, stop_token_ids=(), on_update=None, **learner_kwargs) -> list[dict]:
    """Fresh adapters on ``model``, then :func:`rl_updates`; returns the per-update records.
    ``learner_kwargs`` go to :func:`make_learner` (cfg, lora, learning_rate, mesh, rules, ...)."""
    learner, state, frozen = make_learner(model, recipe, seed=seed, **learner_kwargs)
    return rl_updates(learner, state, frozen, prompts, reward_fn, updates=updates, group_size=group_size,
                      max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                      pad_token_id=pad_token_id, stop_token_ids=stop_token_ids, on_update=on_update)[1]
