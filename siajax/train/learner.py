"""One RL update from samples: rewards -> advantages -> jitted step, per recipe.

This is the weight lever's imperative shell. ``Learner`` holds the static parts
(policy structure, recipe, jitted step); the changing parts live in a
:class:`~siajax.train.state.TrainState` that the caller threads through.
"""

from __future__ import annotations

import dataclasses
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
from siajax.parallel import PARTITION_RULES, StepShardings, mesh_context, shard_tree, step_shardings
from siajax.parallel.distributed import global_mean, host_rows, to_global, to_host_local
from siajax.sampling import GenerationResult, generate
from siajax.train.policy import PolicyParts, TrainBatch, make_policy_loss, score_responses, split_policy
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
class Learner:
    """A recipe bound to a policy structure and an optimiser (all static)."""

    parts: PolicyParts
    recipe: str
    cfg: Any
    train_step: Callable  # jitted (state, frozen, batch) -> (state, metrics)
    epochs: int = 1
    shardings: StepShardings | None = None

    @property
    def mesh(self):
        return None if self.shardings is None else self.shardings.mesh

    def policy(self, state: TrainState, frozen) -> Transformer:
        """The current policy as a model (shares, not copies, the arrays)."""
        return nnx.merge(self.parts.graphdef, state.params["lora"], frozen)

    def make_batch(self, state: TrainState, frozen, samples: GenerationResult, rewards, group_size: int):
        """Scores samples under the current and reference policy and attaches advantages.
        ``rewards``: this process's rows (all rows with one process)."""
        tokens = jnp.concatenate([samples.prompt_tokens, samples.tokens], axis=1)
        attention = jnp.concatenate([samples.prompt_mask, samples.mask], axis=1)
        n = samples.tokens.shape[1]
        if self.shardings is not None:
            tokens, attention = shard_tree((tokens, attention), self.mesh, self.shardings.rules, prefix="batch")
        with mesh_context(self.mesh):
            old = score_responses(self.parts, state.params, frozen, tokens, attention, n)
            ref = score_responses(self.parts, state.params, frozen, tokens, attention, n, lora=False)
        rewards = np.asarray(rewards, np.float32)
        rewards = jnp.asarray(rewards) if self.mesh is None else to_global(rewards, self.mesh, self.shardings.rules)
        extra, metrics = _advantages(self.recipe, self.cfg, rewards, old, ref, samples.mask, group_size)
        rl = RLBatch(
            mask=extra.get("mask", samples.mask), old_logprobs=old.logprobs, advantages=extra["advantages"],
            ref_logprobs=ref.logprobs, returns=extra.get("returns"), old_values=old.values,
        )
        return TrainBatch(tokens, attention, rl), metrics

    def update(self, state: TrainState, frozen, samples: GenerationResult, rewards, group_size: int):
        """-> (new state, metrics). ``epochs`` passes over the same batch (PPO style)."""
        batch, metrics = self.make_batch(state, frozen, samples, rewards, group_size)
        for _ in range(self.epochs):
            state, step_metrics = self.train_step(state, frozen, batch)
        return state, {k: float(v) for k, v in {**metrics, **step_metrics}.items()}


def default_optimizer(learning_rate: float = 3e-3) -> optax.GradientTransformation:
    """Adam behind a global-norm clip of 1: the optimiser every siajax learner uses unless given one."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(learning_rate))


def bind_learner(parts: PolicyParts, recipe: str, optimizer: optax.GradientTransformation, *, cfg=None,
                 epochs: int = 1, shardings: StepShardings | None = None) -> Learner:
    """The recipe's loss (default config unless given) compiled into a train step for ``parts``
    (SPMD over ``shardings.mesh`` when given)."""
    cfg = recipe_config(recipe) if cfg is None else cfg
    step = make_train_step(make_policy_loss(parts, RECIPES[recipe][0], cfg), optimizer, shardings=shardings)
    return Learner(parts, recipe, cfg, step, epochs=epochs, shardings=shardings)


def place_on_mesh(state: TrainState, frozen, optimizer: optax.GradientTransformation, mesh, rules=PARTITION_RULES):
    """-> (state, frozen, StepShardings): the train state and frozen base laid out by the rules."""
    shardings = step_shardings(state, optimizer, mesh, rules)
    return jax.device_put(state, shardings.state), shard_tree(frozen, mesh, rules), shardings


def make_learner(model: Transformer, recipe: str, *, cfg=None, lora: LoRAConfig = LoRAConfig(),
                 learning_rate: float = 3e-3, epochs: int = 1, seed: int = 0, mesh=None, rules=PARTITION_RULES):
    """Adds adapters (and a value head for PPO) and returns (learner, state, frozen).
    With a ``mesh``, state and frozen base are sharded by ``rules`` and the step runs SPMD."""
    if not jax.tree.leaves(nnx.state(model, nnx.LoRAParam)):
        add_lora(model, lora, key=jax.random.key(seed))
    value_head = ValueHead(model.config.hidden_size, rngs=nnx.Rngs(seed)) if recipe == "ppo_gae" else None
    parts, params, frozen = split_policy(model, value_head)
    optimizer = default_optimizer(learning_rate)
    state, shardings = init_train_state(params, optimizer, seed), None
    if mesh is not None:
        state, frozen, shardings = place_on_mesh(state, frozen, optimizer, mesh, rules)
    learner = bind_learner(parts, recipe, optimizer, cfg=cfg, epochs=epochs, shardings=shardings)
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
    key = jax.random.key(seed)
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
