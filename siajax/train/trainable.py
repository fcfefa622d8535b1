"""The policy the SIA loop trains: base model, tokenizer, train state, mesh, one learner per recipe."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from siajax.agents import LocalPolicyBackend
from siajax.agents.sample_memo import SampleMemo
from siajax.config import RunConfig, total_optimizer_steps
from siajax.models import LoRAConfig, from_pretrained
from siajax.parallel import MeshConfig, make_mesh, replicated, shard_tree
from siajax.rl.custom_loss import load_loss
from siajax.train.checkpoint import restore_pytree, save_pytree
from siajax.train.learner import Learner, bind_learner, place_on_mesh
from siajax.train.optim import default_learning_rate, default_optimizer
from siajax.train.policy import attach_trainable
from siajax.train.state import init_train_state


class TrainablePolicy:
    """A run's policy: the frozen base and its trainable state (adapters, value head, optimiser),
    laid out on the run's mesh, with the learners that update it."""

    def __init__(self, config: RunConfig):
        model, self.tokenizer = from_pretrained(config.model, dtype=config.dtype)
        self.config = config
        self.parts, params, self.frozen = attach_trainable(
            model, LoRAConfig(rank=config.lora_rank, alpha=2.0 * config.lora_rank), seed=config.seed)
        self.learning_rate = config.learning_rate or default_learning_rate(model.config)
        self.optimizer = default_optimizer(self.learning_rate, critic_learning_rate=config.critic_learning_rate,
                                           schedule=config.lr_schedule, warmup_steps=config.warmup_steps,
                                           total_steps=total_optimizer_steps(config))
        self.state = init_train_state(params, self.optimizer, config.seed)
        self.mesh = self.shardings = None
        mesh = config.mesh if config.mesh is not None or jax.process_count() == 1 else "data=-1"
        if mesh is not None:  # over every process's devices: several processes always share one mesh
            self.mesh = make_mesh(MeshConfig.parse(mesh), jax.devices())
            self.state, self.frozen, self.shardings = place_on_mesh(self.state, self.frozen, self.mesh)
        self._learners: dict[str, Learner] = {}
        self.sample_memo = SampleMemo()  # evaluations that ask again for the same samples decode nothing

    def learner(self, recipe: str) -> Learner:
        if recipe not in self._learners:
            cfg = self.config.recipe_config(recipe)  # the recipe's defaults with the run's recipe_settings
            objective = None if self.config.loss is None else load_loss(self.config.loss, [cfg])
            self._learners[recipe] = bind_learner(self.parts, recipe, self.optimizer, cfg=cfg, objective=objective,
                                                  schedule=self.config.schedule(recipe), shardings=self.shardings)
        return self._learners[recipe]

    def restore(self, run_dir: Path, ledger: list[dict]) -> None:
        """Loads the train state named by the ledger's last line (each line carries the latest),
        laid out on this run's mesh whatever mesh saved it."""
        checkpoint = ledger[-1].get("checkpoint") if ledger else None
        if checkpoint:
            self.load(run_dir / checkpoint)

    def learner_inputs(self, samples, rewards):
        """A rollout's training rows and rewards as the learner takes them: as they are with one
        process; with several (each holding every row), laid out over the mesh, rows over its batch
        axes and scalars replicated."""
        rewards = np.asarray(rewards, np.float32)
        if jax.process_count() == 1:
            return samples, rewards

        def place(x):
            return shard_tree(x, self.mesh, prefix="batch") if np.ndim(x) else jax.device_put(x, replicated(self.mesh))

        return jax.tree.map(place, samples), place(rewards)

    def save(self, path: Path) -> None:
        """Writes the train state (every process writes its shards: call it on all of them)."""
        save_pytree(path, self.state)

    def load(self, path: Path) -> None:
        """Loads a saved train state (a kept one or a rolled-back trial) onto this run's mesh."""
        self.state = restore_pytree(path, self.state, None if self.shardings is None else self.shardings.state)

    def snapshot(self):
        """A copy of the train state that survives the donating train step (for a rollback)."""
        return jax.tree.map(jnp.copy, self.state)

    def model(self):
        """The policy as one model: the frozen base with the current adapters."""
        return nnx.merge(self.parts.graphdef, self.state.params["lora"], self.frozen)

    def backend(self, model=None, *, reuse_samples: bool = True) -> LocalPolicyBackend:
        """A sampler over ``model`` (default: the current policy) with this run's decode settings; with
        ``reuse_samples`` a request already answered on the same weights is answered from the run's
        memo (rollouts pass False: each update's weights are new, so they would only crowd it)."""
        return LocalPolicyBackend(self.model() if model is None else model, self.tokenizer, mesh=self.mesh,
                                  retire_finished_rows=self.config.retire_finished_rows,
                                  memo=self.sample_memo if reuse_samples else None)
