"""One RL update from samples: rewards -> advantages -> jitted step, per recipe.

This is the weight lever's imperative shell. ``Learner`` holds the static parts
(policy structure, recipe, jitted step); the changing parts live in a
:class:`~siajax.train.state.TrainState` that the caller threads through.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from siajax import timing
from siajax.models import Transformer
from siajax.parallel import PARTITION_RULES, StepShardings, batch_shard_count, mesh_context, shard_tree, step_shardings
from siajax.parallel.distributed import to_global
from siajax.rl import RLBatch, get_recipe, recipe_config
from siajax.sampling import GenerationResult
from siajax.sampling import SharedPrompts, distinct_prompts
from siajax.train.policy import (PolicyParts, TrainBatch, make_policy_loss, score_responses, take_rows,
                                 with_full_batch_normaliser)
from siajax.train.state import TrainState, make_train_step


@dataclasses.dataclass(frozen=True)
class UpdateSchedule:
    """How one update consumes its batch: ``epochs`` passes, each over ``minibatches``
    shuffled minibatches (one optimiser step each), each step split into
    ``micro_batches`` for memory (exact: the micro-batches' losses add up).

    More than one optimiser step per batch is what makes the ratio move away
    from 1, so that PPO's clip (and any recipe's) engages. Adam's momentum
    carries a policy past the clip on a second pass over the same samples, so
    the update stops early once the policy's approx-KL to the sampling policy
    exceeds 1.5 x ``target_kl`` (as Spinning Up's PPO does), checked before
    each step inside the train step; None never stops.
    """

    epochs: int = 2
    minibatches: int = 2
    micro_batches: int = 1
    target_kl: float | None = 0.05

    def __post_init__(self):
        if min(self.epochs, self.minibatches, self.micro_batches) < 1:
            raise ValueError(f"epochs, minibatches and micro_batches must be >= 1, got {self}")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ValueError(f"target_kl must be > 0 or None, got {self.target_kl}")

    def check_rows(self, rows: int, shards: int = 1) -> int:
        """Rows per optimiser step; fails clearly when the batch does not split evenly."""
        step_rows = rows // self.minibatches
        if rows % self.minibatches or step_rows % self.micro_batches or (step_rows // self.micro_batches) % shards:
            raise ValueError(f"{rows} rows do not split into {self.minibatches} minibatches x {self.micro_batches} "
                             f"micro-batches{f' x {shards} batch shards' if shards > 1 else ''}; change "
                             "samples_per_prompt, items or the schedule")
        return step_rows


# PPO takes more, smaller minibatches (a second pass over the same samples lets Adam's momentum carry
# the policy past the clip); GRPO and entropic use each sample once, over two minibatches, so the clip
# engages on the second (experiments/RESULTS.md, "Learning curves").
DEFAULT_SCHEDULES = {"ppo_gae": UpdateSchedule(epochs=2, minibatches=4), "grpo": UpdateSchedule(epochs=1, minibatches=2),
                     "entropic": UpdateSchedule(epochs=1, minibatches=2)}


STEP_OUTCOMES = ("skipped", "no_signal", "kl_stop")  # why a train step left the weights alone


@dataclasses.dataclass(frozen=True)
class Learner:
    """A recipe bound to a policy structure and an optimiser (all static)."""

    parts: PolicyParts
    recipe: str
    cfg: Any
    train_step: Callable  # jitted (state, frozen, batch) -> (state, metrics)
    schedule: UpdateSchedule = UpdateSchedule()
    shardings: StepShardings | None = None

    @property
    def mesh(self):
        return None if self.shardings is None else self.shardings.mesh

    def policy(self, state: TrainState, frozen) -> Transformer:
        """The current policy as a model (shares, not copies, the arrays)."""
        return nnx.merge(self.parts.graphdef, state.params["lora"], frozen)

    def make_batch(self, state: TrainState, frozen, samples: GenerationResult, rewards, group_size: int):
        """Scores samples under the current (old) and reference policy at the behaviour distribution
        (the samples' temperature and allowed sets) and attaches advantages.
        ``rewards``: NumPy, this process's rows (all rows with one process), or a jax.Array
        already laid out over the mesh's batch axes.

        Metrics include ``logprob_mismatch``: max |old log-prob - sampler log-prob| over
        the policy's tokens (every turn of an episode), which is ~0 when training sees the
        distribution that sampled. Environment tokens (``samples.policy_mask``) are context only.
        """
        if samples.truncated:
            raise ValueError("the weight lever trains on samples drawn with top_p=1 and top_k=0: a top-p/top-k "
                             "cut depends on the policy's own logits and cannot be recomputed as the policy moves")
        if float(samples.temperature) <= 0:
            raise ValueError("the weight lever needs samples drawn at temperature > 0 (greedy samples have no "
                             "distribution to train)")
        tokens = jnp.concatenate([samples.prompt_tokens, samples.tokens], axis=1)
        attention = jnp.concatenate([samples.prompt_mask, samples.mask], axis=1)
        temperature = jnp.full(tokens.shape[:1], samples.temperature, jnp.float32)
        n = samples.tokens.shape[1]
        if self.shardings is not None:
            tokens, attention, temperature = shard_tree((tokens, attention, temperature), self.mesh,
                                                        self.shardings.rules, prefix="batch")
        shared = self._shared_prompts(samples)
        with mesh_context(self.mesh), timing.phase("score"):
            old = score_responses(self.parts, state.params, frozen, tokens, attention, n, temperature,
                                  samples.allowed, shared=shared)
            ref = jax.block_until_ready(score_responses(self.parts, state.params, frozen, tokens, attention, n,
                                                        temperature, samples.allowed, lora=False, shared=shared))
        if self.mesh is None:
            rewards = jnp.asarray(rewards, jnp.float32)
        elif not isinstance(rewards, jax.Array):
            rewards = to_global(np.asarray(rewards, np.float32), self.mesh, self.shardings.rules)
        trained = samples.trained_mask
        with mesh_context(self.mesh):
            extra, metrics = _rollout_targets(self.recipe, self.cfg, group_size, rewards, old, ref, trained,
                                              samples.logprobs)
        rl = RLBatch(
            mask=extra.get("mask", trained), old_logprobs=old.logprobs, advantages=extra["advantages"],
            ref_logprobs=ref.logprobs, returns=extra.get("returns"), old_values=old.values,
        )
        return TrainBatch(tokens, attention, rl, temperature, samples.allowed, shared), metrics

    def _shared_prompts(self, samples: GenerationResult) -> SharedPrompts | None:
        """The samples' distinct prompts, run once per forward (one device, one micro-batch; a mesh or
        micro-batches run every row's prompt: their batch is split by rows)."""
        if self.mesh is not None or self.schedule.micro_batches > 1:
            return None
        return distinct_prompts(samples.prompt_tokens, samples.prompt_mask)

    def update(self, state: TrainState, frozen, samples: GenerationResult, rewards, group_size: int):
        """-> (new state, metrics): the schedule's epochs x minibatches optimiser steps.

        Rows are reshuffled every epoch (seeded by the state's step count, so a
        resumed run repeats the order). Step metrics are averaged over steps;
        ``clip_fraction_last`` is the final step's; ``optimizer_steps`` counts the
        steps run, ``applied_steps`` those that changed the weights, and
        ``skipped`` / ``no_signal`` / ``kl_stop`` the others by reason.
        """
        batch, metrics = self.make_batch(state, frozen, samples, rewards, group_size)
        rows = batch.tokens.shape[0]
        shards = 1 if self.mesh is None else batch_shard_count(self.mesh)
        step_rows = self.schedule.check_rows(rows, shards)
        shuffle = np.random.default_rng(int(jax.device_get(state.step)))
        steps = []
        for minibatch in self._minibatches(batch, rows, step_rows, shuffle):
            with timing.phase("train_step"):
                state, step_metrics = self.train_step(state, frozen, minibatch)
                steps.append({k: float(v) for k, v in step_metrics.items()})  # waits for the step
            if minibatch.rl.mask.is_fully_addressable:
                timing.count("train_tokens", int(jnp.sum(minibatch.rl.mask)))
            if steps[-1]["kl_stop"]:
                break
        averaged = {k: float(np.mean([m[k] for m in steps])) for k in steps[0]}
        for counted in STEP_OUTCOMES:  # counts of steps, not means
            averaged[counted] = float(sum(m[counted] for m in steps))
        averaged["clip_fraction_last"] = steps[-1]["clip_fraction"]
        averaged["optimizer_steps"] = len(steps)
        averaged["applied_steps"] = len(steps) - sum(averaged[counted] for counted in STEP_OUTCOMES)
        return state, {**{k: float(v) for k, v in metrics.items()}, **averaged}

    def _minibatches(self, batch, rows: int, step_rows: int, shuffle: np.random.Generator):
        """Epochs of shuffled minibatches (the whole batch, ungathered, when there is one: multi-host safe)."""
        for _ in range(self.schedule.epochs):
            if self.schedule.minibatches == 1:
                yield batch
                continue
            order = shuffle.permutation(rows)
            for start in range(0, rows, step_rows):
                with mesh_context(self.mesh):
                    minibatch = _take_rows(batch, jnp.asarray(order[start:start + step_rows]))
                yield minibatch  # outside the context: the caller's step must not run inside a suspended one


@partial(jax.jit, static_argnums=(0, 1, 2))
def _rollout_targets(recipe: str, cfg, group_size: int, rewards, old, ref, trained, sampler_logprobs):
    """The recipe's advantages and metrics, and the on-policy check, as one program: op-by-op on arrays
    that span processes, each op is its own collective program, and processes that dispatch them out
    of step deadlock (seen under gloo). So a recipe's ``advantages`` must be jittable."""
    extra, metrics = get_recipe(recipe).advantages(cfg, rewards, old, ref, trained, group_size)
    mismatch = jnp.max(jnp.where(trained, jnp.abs(old.logprobs - sampler_logprobs), 0.0))
    return extra, {**metrics, "logprob_mismatch": mismatch}


_take_rows = jax.jit(take_rows)  # one program per minibatch gather, for the same reason


def bind_learner(parts: PolicyParts, recipe: str, optimizer: optax.GradientTransformation, *, cfg=None,
                 schedule: UpdateSchedule | None = None, shardings: StepShardings | None = None,
                 objective: Callable | None = None) -> Learner:
    """The recipe's loss (or ``objective``, any function with the loss signature) and update schedule
    (defaults unless given) compiled into a train step for ``parts`` (SPMD over ``shardings.mesh``)."""
    cfg = recipe_config(recipe) if cfg is None else cfg
    schedule = DEFAULT_SCHEDULES[recipe] if schedule is None else schedule
    objective = get_recipe(recipe).loss if objective is None else objective
    step = make_train_step(make_policy_loss(parts, objective, cfg), optimizer,
                           micro_batches=schedule.micro_batches,
                           prepare_batch=partial(with_full_batch_normaliser, aggregation=cfg.aggregation),
                           shardings=shardings,
                           max_approx_kl=None if schedule.target_kl is None else 1.5 * schedule.target_kl)
    return Learner(parts, recipe, cfg, step, schedule=schedule, shardings=shardings)


def place_on_mesh(state: TrainState, frozen, mesh, rules=PARTITION_RULES):
    """-> (state, frozen, StepShardings): the train state and frozen base laid out by the rules."""
    shardings = step_shardings(state, mesh, rules)
    return jax.device_put(state, shardings.state), shard_tree(frozen, mesh, rules), shardings
