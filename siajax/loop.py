"""The SIA loop: generations of rollouts, a feedback decision, and one lever pulled.

    runs/<run_id>/
      config.json         the run's settings (a resume reads them back)
      ledger.jsonl        one fsynced line per finished generation (append-only)
      harness/            HarnessStore: every harness version, parent, patch
      gen_<g>/            harness.json, trajectory.jsonl, scores.json, decision.json,
                          train_state/ (orbax) when the weights moved

A generation counts once its ledger line is written. ``resume`` restores the
harness HEAD and the train state named by the last line and redoes the
interrupted generation from its start; keys derive from (seed, generation), so
a resumed run's ledger equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from flax import nnx

from siajax.agents import LocalPolicyBackend, OpenAIBackend, heuristic_decision, llm_decision, run_items, summarize
from siajax.agents.meta import initial_harness
from siajax.harness import HarnessError, HarnessStore, to_json
from siajax.harness.store import atomic_write_text
from siajax.models import BUNDLED_TINY_MODEL, LoRAConfig, ValueHead, add_lora, from_pretrained
from siajax.parallel import MeshConfig, make_mesh
from siajax.tasks import resolve_task
from siajax.train import init_train_state, restore_pytree, save_pytree, split_policy
from siajax.train.learner import Learner, bind_learner, default_optimizer, place_on_mesh

LEVER_MODES = {"harness": ("harness",), "weights": ("weights",), "both": ("harness", "weights")}
UNTIMED_LEDGER_KEYS = ("wall_seconds",)
LAYOUT_ONLY_FIELDS = ("mesh",)  # may change on resume: where arrays live, not what is computed


@dataclasses.dataclass(frozen=True)
class RunConfig:
    task: str = "digits"
    model: str = str(BUNDLED_TINY_MODEL)
    levers: str = "both"
    generations: int = 6
    seed: int = 0
    items_per_generation: int = 8
    updates_per_generation: int = 6
    learning_rate: float = 3e-3
    lora_rank: int = 8
    dtype: str = "float32"
    feedback: str = "heuristic"  # or "llm": an OpenAI-compatible endpoint decides
    feedback_model: str | None = None
    feedback_base_url: str | None = None
    mesh: str | None = None  # e.g. "data=2,fsdp=2,tensor=2" over this process's devices; None = one device

    def __post_init__(self):
        if self.mesh is not None:
            MeshConfig.parse(self.mesh)
        if self.levers not in LEVER_MODES:
            raise ValueError(f"levers must be one of {sorted(LEVER_MODES)}, got {self.levers!r}")
        if self.feedback not in ("heuristic", "llm"):
            raise ValueError("feedback must be 'heuristic' or 'llm'")
        if self.feedback == "llm" and not self.feedback_model:
            raise ValueError("feedback='llm' needs feedback_model (and usually feedback_base_url)")


def read_ledger(run_dir: Path) -> list[dict]:
    path = run_dir / "ledger.jsonl"
    if not path.exists():
        return []
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line from a crash: that generation did not finish
    return lines


def _append_ledger(run_dir: Path, entry: dict) -> None:
    with open(run_dir / "ledger.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


class Policy:
    """The local policy with its trainable state and one learner per recipe."""

    def __init__(self, config: RunConfig):
        model, self.tokenizer = from_pretrained(config.model, dtype=config.dtype)
        add_lora(model, LoRAConfig(rank=config.lora_rank, alpha=2.0 * config.lora_rank), key=jax.random.key(config.seed))
        value_head = ValueHead(model.config.hidden_size, rngs=nnx.Rngs(config.seed))
        self.parts, params, self.frozen = split_policy(model, value_head)
        self.optimizer = default_optimizer(config.learning_rate)
        self.state = init_train_state(params, self.optimizer, config.seed)
        self.mesh = self.shardings = None
        if config.mesh is not None:
            if jax.process_count() > 1:
                raise ValueError("the SIA loop drives one process's devices; for multi-host RL use "
                                 "siajax.train.learner.rl_run (see README, 'Scale-out')")
            self.mesh = make_mesh(MeshConfig.parse(config.mesh), jax.local_devices())
            self.state, self.frozen, self.shardings = place_on_mesh(self.state, self.frozen, self.optimizer,
                                                                    self.mesh)
        self._learners: dict[str, Learner] = {}

    def learner(self, recipe: str) -> Learner:
        if recipe not in self._learners:
            self._learners[recipe] = bind_learner(self.parts, recipe, self.optimizer, shardings=self.shardings)
        return self._learners[recipe]

    def restore(self, run_dir: Path, ledger: list[dict]) -> None:
        """Loads the train state named by the ledger's last line (each line carries the latest),
        laid out on this run's mesh whatever mesh saved it."""
        checkpoint = ledger[-1].get("checkpoint") if ledger else None
        if checkpoint:
            self.state = restore_pytree(run_dir / checkpoint, self.state,
                                        None if self.shardings is None else self.shardings.state)

    def backend(self) -> LocalPolicyBackend:
        model = nnx.merge(self.parts.graphdef, self.state.params["lora"], self.frozen)
        return LocalPolicyBackend(model, self.tokenizer, mesh=self.mesh)


def _feedback_backend(config: RunConfig):
    if config.feedback == "llm":
        return OpenAIBackend(config.feedback_model, base_url=config.feedback_base_url)
    return None


def _train(policy: Policy, task, harness, recipe: str, rollout, items_for_update: Callable, config: RunConfig,
           key, on_step=None) -> dict:
    """Updates the weights: first on this generation's rollouts, then on fresh ones."""
    learner = policy.learner(recipe)
    group = harness.sampling.samples_per_prompt
    history = []
    samples, rewards = rollout.generation, rollout.rewards
    for update in range(config.updates_per_generation):
        if update > 0:
            key, sample_key = jax.random.split(key)
            fresh = run_items(task, harness, policy.backend(), items_for_update(update), sample_key)
            samples, rewards = fresh.generation, fresh.rewards
        policy.state, metrics = learner.update(policy.state, policy.frozen, samples, np.asarray(rewards), group)
        if metrics.get("skipped"):
            metrics["note"] = "non-finite loss or gradient: update skipped, state kept"
        history.append({"update": update, "reward": float(np.mean(rewards)), **{
            k: metrics[k] for k in ("loss", "grad_norm", "clip_fraction", "entropy") if k in metrics}})
        if on_step:
            on_step(update)
    return {"recipe": recipe, "updates": history}


def run(config: RunConfig, run_dir: str | os.PathLike, *, on_event: Callable[[str, dict], None] | None = None,
        stop_after: int | None = None) -> list[dict]:
    """Runs (or resumes) a run to ``config.generations``; returns the ledger."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.json"
    stored = RunConfig(**json.loads(config_path.read_text())) if config_path.exists() else None
    layout = {name: getattr(config, name) for name in LAYOUT_ONLY_FIELDS}
    if stored is not None and dataclasses.replace(stored, **layout) != config:
        raise ValueError(f"{run_dir} was started with a different config; use `siajax resume {run_dir}`")
    if stored != config:  # a new run, or a resume onto another mesh
        atomic_write_text(config_path, json.dumps(dataclasses.asdict(config), indent=1))
    emit = on_event or (lambda *_: None)
    task = resolve_task(config.task)
    levers = LEVER_MODES[config.levers]
    hints = task.spec.get("harness_hints", {})
    store = HarnessStore(run_dir / "harness")
    ledger = read_ledger(run_dir)
    policy = Policy(config)
    root_key = jax.random.key(config.seed)
    feedback_backend = _feedback_backend(config)

    if ledger:
        store.rollback(ledger[-1]["next_harness"])
        policy.restore(run_dir, ledger)
    else:
        harness, origin = initial_harness(task, feedback_backend, jax.random.fold_in(root_key, 10**6))
        store.put(harness, reason=origin)
    train_items = task.items("train")

    def items_for(generation: int, update: int = 0) -> list[dict]:
        rng = np.random.RandomState(config.seed * 100_003 + generation * 101 + update)
        picks = rng.choice(len(train_items), size=min(config.items_per_generation, len(train_items)), replace=False)
        return [train_items[i] for i in sorted(picks)]

    for generation in range(len(ledger), config.generations):
        if stop_after is not None and generation >= stop_after:
            break
        start = time.perf_counter()
        gen_dir = run_dir / f"gen_{generation:03d}"
        if gen_dir.exists():
            shutil.rmtree(gen_dir)  # leftovers of an interrupted attempt
        gen_dir.mkdir()
        key = jax.random.fold_in(root_key, generation)
        rollout_key, feedback_key, train_key = jax.random.split(key, 3)
        harness = store.get()
        atomic_write_text(gen_dir / "harness.json", to_json(harness))
        emit("rollouts", {"generation": generation})
        rollout = run_items(task, harness, policy.backend(), items_for(generation), rollout_key)
        _write_jsonl(gen_dir / "trajectory.jsonl", rollout.records)
        summary = summarize(rollout.records)
        atomic_write_text(gen_dir / "scores.json", json.dumps(summary, ensure_ascii=False, indent=1))

        if feedback_backend is None:
            decision = heuristic_decision(summary, ledger, harness, hints, levers)
        else:
            decision = llm_decision(feedback_backend, summary, ledger, harness, hints, levers, feedback_key)
        outcome = {}
        if decision.lever == "harness" and decision.patch:
            try:
                store.apply(decision.patch, reason=decision.rationale)
            except HarnessError as err:
                outcome["rejected_patch"] = str(err)
        checkpoint = ledger[-1].get("checkpoint") if ledger else None
        if decision.lever == "weights":
            emit("training", {"generation": generation, "recipe": decision.recipe})
            outcome["train"] = _train(policy, task, harness, decision.recipe, rollout,
                                      lambda update: items_for(generation, update), config, train_key,
                                      on_step=lambda u: emit("train_step", {"generation": generation, "update": u}))
            checkpoint = f"gen_{generation:03d}/train_state"
            save_pytree(run_dir / checkpoint, policy.state)
        atomic_write_text(gen_dir / "decision.json", json.dumps({**decision.to_dict(), **outcome}, indent=1,
                                                                ensure_ascii=False))
        entry = {
            "generation": generation, "score": summary["score"], "success_rate": summary["success_rate"],
            "failure_rates": summary["failure_rates"], "harness_version": harness.version,
            "next_harness": store.head, "decision": decision.to_dict(), "checkpoint": checkpoint,
            "train_reward_last": outcome["train"]["updates"][-1]["reward"] if "train" in outcome else None,
            "wall_seconds": round(time.perf_counter() - start, 3),
        }
        _append_ledger(run_dir, entry)
        ledger.append(entry)
        emit("generation", entry)
    return ledger


def resume(run_dir: str | os.PathLike, **kwargs) -> list[dict]:
    """Continues a run from its last finished generation with its stored config."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a siajax run (no config.json)")
    return run(RunConfig(**json.loads(config_path.read_text())), run_dir, **kwargs)
