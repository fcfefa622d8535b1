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

from siajax.models import LoRAConfig, Transformer, ValueHead, add_lora
from siajax.rl import (
    EntropicConfig, GRPOConfig, PPOConfig, RLBatch, entropic_loss, entropic_token_advantages,
    grpo_advantages, grpo_loss, ppo_gae_advantages, ppo_gae_loss,
)
from siajax.parallel import (
    PARTITION_RULES, StepShardings, batch_shard_count, mesh_context, shard_tree, step_shardings,
)
from siajax.parallel.distributed import global_mean, host_rows, to_global, to_host_local
from siajax.rng import purpose_key
from siajax.sampling import GenerationResult, generate
from siajax.train.policy import (
    PolicyParts, TrainBatch, make_policy_loss, score_responses, split_policy, with_full_batch_normaliser,
)
from siajax.train.state import TrainState, init_train_state, make_train_step

RECIPES: dict[str, tuple[Callable, type]] = {
    "ppo_gae": (ppo_gae_loss, PPOConfig),
    "grpo": (grpo_loss, GRPOConfig),
    "entropic": (entropic_loss, EntropicConfig),
}


def recipe_config(recipe: str, **overrides):
    """The default config of a recipe, with overrides; unknown names fail loudly."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[recipe][1](**overrides)


def _advantages(recipe: str, cfg, rewards, old, ref, mask, group_size: int):
    if recipe == "ppo_gae":
        return ppo_gae_advantages(rewards, old.values, old.logprobs, ref.logprobs, mask, cfg)
    grouped = rewards.reshape(-1, group_size)
    if recipe == "grpo":
        return grpo_advantages(grouped, mask, cfg)
    return entropic_token_advantages(grouped, mask, cfg)


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


# Measured on the bundled model (experiments/rl_learning_curves.py): a second pass over the same
# samples lets Adam's momentum carry the policy past the clip, so PPO takes more, smaller
# minibatches; GRPO and entropic use each sample once, over two minibatches (the clip engages
# on the second).
DEFAULT_SCHEDULES = {"ppo_gae": UpdateSchedule(epochs=2, minibatches=4), "grpo": UpdateSchedule(epochs=1, minibatches=2),
                     "entropic": UpdateSchedule(epochs=1, minibatches=2)}


STEP_OUTCOMES = ("skipped", "no_signal", "kl_stop")  # why a train step left the weights alone


def _take_rows(tree, rows: np.ndarray):
    return jax.tree.map(lambda x: x[rows], tree)


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
        ``rewards``: this process's rows (all rows with one process).

        Metrics include ``logprob_mismatch``: max |old log-prob - sampler log-prob| over
        response tokens, which is ~0 when training sees the distribution that sampled.
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
        with mesh_context(self.mesh):
            old = score_responses(self.parts, state.params, frozen, tokens, attention, n, temperature,
                                  samples.allowed)
            ref = score_responses(self.parts, state.params, frozen, tokens, attention, n, temperature,
                                  samples.allowed, lora=False)
        rewards = np.asarray(rewards, np.float32)
        rewards = jnp.asarray(rewards) if self.mesh is None else to_global(rewards, self.mesh, self.shardings.rules)
        extra, metrics = _advantages(self.recipe, self.cfg, rewards, old, ref, samples.mask, group_size)
        rl = RLBatch(
            mask=extra.get("mask", samples.mask), old_logprobs=old.logprobs, advantages=extra["advantages"],
            ref_logprobs=ref.logprobs, returns=extra.get("returns"), old_values=old.values,
        )
        mismatch = jnp.max(jnp.where(samples.mask, jnp.abs(old.logprobs - samples.logprobs), 0.0))
        return TrainBatch(tokens, attention, rl, temperature, samples.allowed), {**metrics,
                                                                                 "logprob_mismatch": mismatch}

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
            state, step_metrics = self.train_step(state, frozen, minibatch)
            steps.append({k: float(v) for k, v in step_metrics.items()})
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
                yield _take_rows(batch, order[start:start + step_rows])


def default_learning_rate(config) -> float:
    """A LoRA learning rate for a model of this depth: 6e-2 / layers, at most 1e-2.

    With fan-in-scaled A and B = 0, one Adam step changes each adapted projection's
    output by O(lr) relative to it whatever the width, and the changes of 7 projections
    per layer add up over the depth. Calibrated at two depths: 1e-2 is what the
    4-layer bundled model learns well with (experiments/rl_learning_curves.py), and
    2e-3 was the best of 1e-3 / 2e-3 / 4e-3 for the 30-layer SmolLM2-135M on the
    main job (1e-3 slower, 4e-3 unstable; experiments/main_job.toml).
    """
    return min(1e-2, 6e-2 / config.num_layers)


def learning_rate_schedule(learning_rate: float, schedule: str = "constant", *, warmup_steps: int = 0,
                           total_steps: int | None = None):
    """Constant, or linear warm-up then cosine decay to 10% over ``total_steps`` (optax)."""
    if schedule == "cosine":
        if not total_steps:
            raise ValueError("a cosine schedule needs total_steps")
        return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1),
                                                  end_value=0.1 * learning_rate)
    if schedule != "constant":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; use 'constant' or 'cosine'")
    if warmup_steps:
        return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps),
                                     optax.constant_schedule(learning_rate)], [warmup_steps])
    return learning_rate


# The critic's own step size (its own optax partition). Its targets are standardised returns (O(1))
# and its 1/E readout moves V by O(lr) per Adam step. A fast critic learns a predictable return
# quickly (bundled model, return set by the prompt, 64 steps: explained variance 0.05 at 1e-2, 0.2 at
# 5e-2, 0.25-0.35 at 0.1) but on a return it cannot predict it fits noise that goes straight into the
# advantages (dense-reward PPO, 20 updates: reward reaches 1.0 on 3 of 3 seeds at 1e-2 and with a
# frozen critic, on 1 of 3 at 0.1, 0 of 2 at 3e-2; experiments/rl_learning_curves.py). Hence 1e-2:
# 5x SmolLM2's LoRA rate; raise it (RunConfig.critic_learning_rate) where returns are predictable.
DEFAULT_CRITIC_LEARNING_RATE = 1e-2
PARTS = ("lora", "value_head")  # the trainable parts, each with its own clip, Adam state and rate


def freeze_on_zero_gradient(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner``, except that an exactly zero gradient gives a zero update and leaves ``inner``'s state alone.

    Adam with non-zero moments moves the weights on momentum alone: measured, a GRPO run at reward 1.0
    with all-zero advantages drifted for 6 steps and collapsed to reward 0, and the value head (no
    gradient under GRPO or entropic) kept moving on the moments its PPO steps had left.
    """

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
    """One partition per trainable part (``optax.multi_transform``): the adapters and the value head each
    get a global-norm clip of 1, Adam, a learning rate of their own, and a freeze on zero gradient.
    Apart, the critic's gradient can neither swamp nor be swamped by the policy's in one shared clip,
    and a recipe without a critic leaves the value head exactly where it is. ``parts``: the top-level
    keys of the params this optimiser will see (static labels: optax also inits it on placeholders)."""

    def part(rate: float):
        rate = learning_rate_schedule(rate, schedule, warmup_steps=warmup_steps, total_steps=total_steps)
        return freeze_on_zero_gradient(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(rate)))

    rates = {"lora": learning_rate, "value_head": critic_learning_rate}
    unknown = set(parts) - set(rates)
    if unknown:
        raise ValueError(f"no learning rate for trainable parts {sorted(unknown)}; known: {sorted(rates)}")
    return optax.multi_transform({name: part(rates[name]) for name in parts}, param_labels={name: name for name in parts})


def bind_learner(parts: PolicyParts, recipe: str, optimizer: optax.GradientTransformation, *, cfg=None,
                 schedule: UpdateSchedule | None = None, shardings: StepShardings | None = None,
                 objective: Callable | None = None) -> Learner:
    """The recipe's loss (or ``objective``, any function with the loss signature) and update schedule
    (defaults unless given) compiled into a train step for ``parts`` (SPMD over ``shardings.mesh``)."""
    cfg = recipe_config(recipe) if cfg is None else cfg
    schedule = DEFAULT_SCHEDULES[recipe] if schedule is None else schedule
    objective = RECIPES[recipe][0] if objective is None else objective
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


def make_learner(model: Transformer, recipe: str, *, cfg=None, lora: LoRAConfig = LoRAConfig(),
                 learning_rate: float = 1e-2, critic_learning_rate: float = DEFAULT_CRITIC_LEARNING_RATE,
                 schedule: UpdateSchedule | None = None, seed: int = 0, mesh=None, rules=PARTITION_RULES,
                 objective: Callable | None = None):
    """Adds adapters (and a value head for PPO) and returns (learner, state, frozen).
    With a ``mesh``, state and frozen base are sharded by ``rules`` and the step runs SPMD."""
    if not jax.tree.leaves(nnx.state(model, nnx.LoRAParam)):
        add_lora(model, lora, key=purpose_key(seed, "lora_init"))
    value_head = ValueHead(model.config.hidden_size, rngs=nnx.Rngs(seed)) if recipe == "ppo_gae" else None
    parts, params, frozen = split_policy(model, value_head)
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
    """Sample -> reward -> update, ``updates`` times; -> (final state, per-update metrics).

    reward_fn(tokens [B, N], mask [B, N]) -> rewards [B] (NumPy). Each prompt is
    sampled ``group_size`` times (rows grouped, as the group recipes expect).
    Multi-host ready: when the learner's mesh spans several processes, each
    samples and rewards its own block of ``prompts``; updates are global.
    """
    own_prompts = prompts[host_rows(len(prompts))] if learner.mesh is not None else prompts
    batch_prompts = [p for p in own_prompts for _ in range(group_size)]
    rules = learner.shardings.rules if learner.shardings else PARTITION_RULES
    key = purpose_key(seed, "rollouts")
    history = []
    for update in range(updates):
        key, sample_key = jax.random.split(key)
        samples = generate(learner.policy(state, frozen), batch_prompts, key=sample_key,
                           max_new_tokens=max_new_tokens, temperature=temperature, pad_token_id=pad_token_id,
                           stop_token_ids=stop_token_ids, mesh=learner.mesh, rules=rules)
        tokens, mask = to_host_local((samples.tokens, samples.mask))
        rewards = np.asarray(reward_fn(tokens, mask), np.float32)
        state, metrics = learner.update(state, frozen, samples, rewards, group_size)
        metrics = {"update": update, "reward": metrics["reward_mean"],
                   "success_rate": global_mean((rewards > 0).mean()), **metrics}
        history.append(metrics)
        if on_update is not None:
            on_update(update, metrics)
    return state, history


def rl_run(model: Transformer, prompts: list[list[int]], reward_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
           recipe: str, *, updates: int, group_size: int = 8, max_new_tokens: int = 16, temperature: float = 1.0,
           seed: int = 0, pad_token_id: int = 0, stop_token_ids=(), on_update=None, **learner_kwargs) -> list[dict]:
    """Fresh adapters on ``model``, then :func:`rl_updates`; returns the per-update metrics.
    ``learner_kwargs`` go to :func:`make_learner` (cfg, lora, learning_rate, mesh, rules, ...)."""
    learner, state, frozen = make_learner(model, recipe, seed=seed, **learner_kwargs)
    return rl_updates(learner, state, frozen, prompts, reward_fn, updates=updates, group_size=group_size,
                      max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                      pad_token_id=pad_token_id, stop_token_ids=stop_token_ids, on_update=on_update)[1]
