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
from siajax.rl.losses import PolicyOutputs, SurrogateCoefficients, clipped_policy_loss
from siajax.sampling import GenerationResult
from siajax.prompts import SharedPrompts, prompt_sharing
from siajax.train.policy import (PolicyParts, TrainBatch, logprob_gap, make_policy_loss, score_responses,
                                 take_rows, with_full_batch_normaliser)
from siajax.train.state import TrainState, compile_step, train_step_fn


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
    run_schedule: Callable  # jitted (state, frozen, batch) -> (state, (per-step metrics, steps run))
    schedule: UpdateSchedule = UpdateSchedule()
    shardings: StepShardings | None = None
    coefficients_as_data: bool = False  # the loss reads cfg's numbers from the batch (SurrogateCoefficients)

    @property
    def mesh(self):
        return None if self.shardings is None else self.shardings.mesh

    def policy(self, state: TrainState, frozen) -> Transformer:
        """The current policy as a model (shares, not copies, the arrays)."""
        return nnx.merge(self.parts.graphdef, state.params["lora"], frozen)

    def make_batch(self, state: TrainState, frozen, samples: GenerationResult, rewards, group_size: int):
        """Scores samples under the current (old) policy, and the reference one when a KL term of the
        recipe reads it, at the behaviour distribution
        (the samples' temperature and allowed sets) and attaches advantages.
        ``rewards``: NumPy, this process's rows (all rows with one process), or a jax.Array
        already laid out over the mesh's batch axes.

        Recipes whose advantages read only log-probs (``Recipe.reads_old_forward`` false) take the
        sampler's as the old ones and skip the old policy's forward pass. Otherwise metrics include
        ``logprob_mismatch``: max |old log-prob - sampler log-prob| over the policy's tokens (every
        turn of an episode), ~0 when training sees the distribution that sampled; for the others
        :meth:`update` reports it from the first step (its minibatch's tokens). Environment tokens
        (``samples.policy_mask``) are context only.
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
        recipe, trained = get_recipe(self.recipe), samples.trained_mask
        score = partial(score_responses, self.parts, state.params, frozen, tokens, attention, n, temperature,
                        samples.allowed, shared=shared)
        with mesh_context(self.mesh), timing.phase("score"):
            # The old policy is the one that sampled: its forward pass only when the advantages read more
            # than its log-probs (the first train step measures the sampler's against training's forward).
            old = score() if recipe.reads_old_forward else None
            ref = score(lora=False) if recipe.uses_reference(self.cfg) else None  # the frozen base
            jax.block_until_ready((old, ref))
        if self.mesh is None:
            rewards = jnp.asarray(rewards, jnp.float32)
        elif not isinstance(rewards, jax.Array):
            rewards = to_global(np.asarray(rewards, np.float32), self.mesh, self.shardings.rules)
        with mesh_context(self.mesh):
            old, extra, metrics = _rollout_targets(self.recipe, self.cfg, group_size, rewards, old, ref, trained,
                                                   samples.logprobs)
        rl = RLBatch(
            mask=extra.get("mask", trained), old_logprobs=old.logprobs, advantages=extra["advantages"],
            ref_logprobs=None if ref is None else ref.logprobs, returns=extra.get("returns"), old_values=old.values,
        )
        if self.coefficients_as_data:
            rl = self._with_coefficients(rl)
        return TrainBatch(tokens, attention, rl, temperature, samples.allowed, shared), metrics

    def _with_coefficients(self, rl: RLBatch) -> RLBatch:
        """``rl`` with the config's numbers as data (:class:`SurrogateCoefficients`) and, when the recipe
        reads no reference, the old log-probs standing in for it (its KL term has weight 0): every
        clipped-surrogate recipe's step is then one program."""
        coefficients = SurrogateCoefficients.of(self.cfg, rl.mask.shape[0])
        if self.mesh is not None:
            coefficients = shard_tree(coefficients, self.mesh, self.shardings.rules, prefix="batch")
        reference = rl.old_logprobs if rl.ref_logprobs is None else rl.ref_logprobs
        return rl._replace(ref_logprobs=reference, coefficients=coefficients)

    def _shared_prompts(self, samples: GenerationResult) -> SharedPrompts | None:
        """The samples' distinct prompts and their common prefix, each run once per forward (one device,
        one micro-batch; a mesh or micro-batches run every row's prompt: their batch is split by rows)."""
        if self.mesh is not None or self.schedule.micro_batches > 1:
            return None
        return prompt_sharing(samples.prompt_tokens, samples.prompt_mask)

    def update(self, state: TrainState, frozen, samples: GenerationResult, rewards, group_size: int):
        """-> (new state, metrics): the schedule's epochs x minibatches optimiser steps, run as one
        compiled program (:func:`scheduled_steps`) that the host waits on once.

        Step metrics are averaged over the steps run (``grad_norm`` over those that
        ran a backward pass: not a ``kl_stop`` step); ``clip_fraction_last`` is
        the final step's; ``optimizer_steps`` counts the steps run,
        ``applied_steps`` those that changed the weights, and ``skipped`` /
        ``no_signal`` / ``kl_stop`` the others by reason.
        """
        batch, metrics = self.make_batch(state, frozen, samples, rewards, group_size)
        shards = 1 if self.mesh is None else batch_shard_count(self.mesh)
        self.schedule.check_rows(batch.tokens.shape[0], shards)
        with timing.phase("train_step"):
            state, (per_step, steps_run) = self.run_schedule(state, frozen, batch)
            per_step, steps_run = jax.device_get((per_step, steps_run))
        steps = {k: np.asarray(v)[:int(steps_run)] for k, v in per_step.items()}
        if self.coefficients_as_data and not self.cfg.kl_coef:
            steps.pop("kl_ref")  # the KL term the shared program carries at weight 0: not this recipe's
        timing.count("train_tokens", int(steps.pop("train_tokens").sum()))
        # Before the first step the policy is the one that sampled: with the sampler's log-probs as the
        # old ones, that step's change is the sampler-vs-training mismatch (no dropout: LoRA's is 0 by default).
        first_change = float(steps.pop("logprob_change")[0])
        metrics.setdefault("logprob_mismatch", first_change)
        averaged = {k: float(np.mean(v)) for k, v in steps.items()}
        backward = steps["kl_stop"] == 0  # a kl_stop step runs no backward pass: it has no gradient norm
        averaged["grad_norm"] = float(np.mean(steps["grad_norm"][backward])) if backward.any() else 0.0
        averaged.update({counted: float(steps[counted].sum()) for counted in STEP_OUTCOMES})  # counts, not means
        averaged["clip_fraction_last"] = float(steps["clip_fraction"][-1])
        averaged["optimizer_steps"] = int(steps_run)
        averaged["applied_steps"] = int(steps_run) - sum(averaged[counted] for counted in STEP_OUTCOMES)
        return state, {**{k: float(v) for k, v in metrics.items()}, **averaged}


def minibatch_orders(state: TrainState, rows: int, schedule: UpdateSchedule):
    """-> (state with its key advanced, rows of each step [epochs x minibatches, rows / minibatches]):
    each epoch a permutation of all rows drawn from the state's key (a resumed run repeats it)."""
    rng, shuffle_key = jax.random.split(jax.random.wrap_key_data(state.rng))
    if schedule.minibatches == 1:  # every step sees the whole batch: no order to draw
        orders = jnp.broadcast_to(jnp.arange(rows), (schedule.epochs, rows))
    else:
        orders = jax.vmap(lambda key: jax.random.permutation(key, rows))(jax.random.split(shuffle_key, schedule.epochs))
    steps = schedule.epochs * schedule.minibatches
    return state.replace(rng=jax.random.key_data(rng)), orders.reshape(steps, rows // schedule.minibatches)


def scheduled_steps(train_step: Callable, schedule: UpdateSchedule) -> Callable:
    """The pure ``(state, frozen, batch) -> (state, (per-step metrics [S], steps run))`` of one update:
    ``epochs`` passes over ``minibatches`` minibatches, in one ``lax.while_loop``, so the host syncs
    once per update rather than once per step. Rows come in :func:`minibatch_orders`'s order; the
    loop ends after the step that finds the policy past the KL limit (``kl_stop``: that step is not
    applied). Slots after the last step run are zeros."""
    total = schedule.epochs * schedule.minibatches

    @jax.jit  # traced once: eval_shape below and the loop body then share that trace
    def step_on(state, frozen, batch, rows):
        minibatch = batch if schedule.minibatches == 1 else take_rows(batch, rows)
        state, metrics = train_step(state, frozen, minibatch)
        return state, {**metrics, "train_tokens": jnp.sum(minibatch.rl.mask.astype(jnp.int32))}

    def run(state: TrainState, frozen, batch):
        state, orders = minibatch_orders(state, batch.tokens.shape[0], schedule)
        shapes = jax.eval_shape(step_on, state, frozen, batch, orders[0])[1]
        per_step = jax.tree.map(lambda x: jnp.zeros((total, *x.shape), x.dtype), shapes)

        def more(carry):
            index, _, _, stopped = carry
            return (index < total) & ~stopped

        def one_step(carry):
            index, state, per_step, _ = carry
            state, metrics = step_on(state, frozen, batch, orders[index])
            per_step = jax.tree.map(lambda buffer, value: buffer.at[index].set(value), per_step, metrics)
            return index + 1, state, per_step, metrics["kl_stop"] > 0

        steps_run, state, per_step, _ = jax.lax.while_loop(more, one_step, (0, state, per_step, False))
        return state, (per_step, steps_run)

    return run


@partial(jax.jit, static_argnums=(0, 1, 2))
def _rollout_targets(recipe: str, cfg, group_size: int, rewards, old, ref, trained, sampler_logprobs):
    """The recipe's advantages and metrics, and the on-policy check, as one program: op-by-op on arrays
    that span processes, each op is its own collective program, and processes that dispatch them out
    of step deadlock (seen under gloo). So a recipe's ``advantages`` must be jittable.
    ``old`` None: the old policy is the sampler's log-probs (0 off the trained tokens); -> (old, ...)."""
    if old is None:  # the first train step measures how far training's forward is from them
        old = PolicyOutputs(jnp.where(trained, sampler_logprobs, 0.0), None)
        metrics = {}
    else:
        metrics = {"logprob_mismatch": logprob_gap(old.logprobs, sampler_logprobs, trained)}
    extra, recipe_metrics = get_recipe(recipe).advantages(cfg, rewards, old, ref, trained, group_size)
    return old, extra, {**recipe_metrics, **metrics}


def bind_learner(parts: PolicyParts, recipe: str, optimizer: optax.GradientTransformation, *, cfg=None,
                 schedule: UpdateSchedule | None = None, shardings: StepShardings | None = None,
                 objective: Callable | None = None) -> Learner:
    """The recipe's loss (or ``objective``, any function with the loss signature) and update schedule
    (defaults unless given) compiled into a train step for ``parts`` (SPMD over ``shardings.mesh``)."""
    cfg = recipe_config(recipe) if cfg is None else cfg
    schedule = DEFAULT_SCHEDULES[recipe] if schedule is None else schedule
    objective = get_recipe(recipe).loss if objective is None else objective
    step = train_step_fn(make_policy_loss(parts, objective, cfg), optimizer, micro_batches=schedule.micro_batches,
                         prepare_batch=partial(with_full_batch_normaliser, aggregation=cfg.aggregation),
                         max_approx_kl=None if schedule.target_kl is None else 1.5 * schedule.target_kl)
    return Learner(parts, recipe, cfg, compile_step(scheduled_steps(step, schedule), shardings), schedule=schedule,
                   shardings=shardings, coefficients_as_data=objective is clipped_policy_loss)


def place_on_mesh(state: TrainState, frozen, mesh, rules=PARTITION_RULES):
    """-> (state, frozen, StepShardings): the train state and frozen base laid out by the rules."""
    shardings = step_shardings(state, mesh, rules)
    return jax.device_put(state, shardings.state), shard_tree(frozen, mesh, rules), shardings
