"""The SIA loop: each generation the Feedback-Agent picks a lever, and held-out dev items judge it.

    runs/<run_id>/
      config.json         the run's settings and its FeedbackRules (a resume reads them back)
      ledger.jsonl        one fsynced line per finished generation (append-only)
      initial/            eval_dev.jsonl, eval_test.jsonl of harness v0 with the base weights
      harness/            HarnessStore: every harness version tried, parent, patch, why kept or rolled back
      gen_<g>/            harness.json (entering), decision.json, candidates.json, trajectory.jsonl
                          (training rollouts), eval_dev.jsonl / eval_test.jsonl (the evaluation
                          after the lever), train_state/ (orbax) when the weights moved

Evaluation protocol: the state entering generation 0 (harness v0, base
weights) and the state after every generation's lever are scored on fixed
dev items (what decisions read) and test items (reported only; no agent sees
them, nothing trains on them), with fixed decoding keys, so generations are
compared item by item. A harness candidate is kept only when a paired
bootstrap on dev says it beats the current harness; weights that made dev
worse beyond noise are rolled back. The harness lever may spend per
generation as many samples (evaluating candidates) as the weight lever spends
on training rollouts, so SIA-H and SIA-W+H run at equal budgets; the ledger
records every generation's spend.

A generation counts once its ledger line is written; ``resume`` restores the
harness HEAD, train state and dev scores named by the last line and redoes
the interrupted generation. Keys derive from (seed, generation).
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
import jax.numpy as jnp
import numpy as np
from flax import nnx

from siajax.agents import LocalPolicyBackend, OpenAIBackend, run_items
from siajax.agents.evaluation import Evaluation, evaluate
from siajax.agents.feedback import FeedbackRules, heuristic_decision, llm_decision, summarize, weights_problem
from siajax.agents.harness_edits import FIXABLE_FAILURES
from siajax.agents.meta import initial_harness
from siajax.harness import Harness, HarnessStore, patch_harness, to_json
from siajax.harness.store import atomic_write_text
from siajax.models import BUNDLED_TINY_MODEL, LoRAConfig, ValueHead, add_lora, from_pretrained
from siajax.parallel import MeshConfig, make_mesh
from siajax.stats import paired_bootstrap
from siajax.tasks import Task, resolve_task
from siajax.train import init_train_state, restore_pytree, save_pytree, split_policy
from siajax.train.learner import (
    DEFAULT_SCHEDULES, RECIPES, Learner, UpdateSchedule, bind_learner, default_learning_rate, default_optimizer,
    place_on_mesh,
)

LEVER_MODES = {"harness": ("harness",), "weights": ("weights",), "both": ("harness", "weights")}
UNTIMED_LEDGER_KEYS = ("wall_seconds",)
LAYOUT_ONLY_FIELDS = ("mesh",)  # may change on resume: where arrays live, not what is computed
LR_SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    task: str = "digits"
    model: str = str(BUNDLED_TINY_MODEL)
    levers: str = "both"
    generations: int = 6
    seed: int = 0
    items_per_generation: int = 8  # train prompts per weight update
    updates_per_generation: int = 6  # weight updates per weights generation
    samples_per_prompt: int | None = None  # training group size; None: the harness's
    recipe: str | None = None  # force the weight lever's recipe; None: the Feedback-Agent's rule
    temperature: float | None = None  # sets the initial harness's sampling temperature
    epochs: int | None = None  # None: the recipe's default schedule
    minibatches: int | None = None
    micro_batches: int = 1
    target_kl: float | None = 0.05
    learning_rate: float | None = None  # None: siajax.train.learner.default_learning_rate(model)
    lr_schedule: str = "constant"  # or "cosine" (decays over all the run's optimiser steps)
    warmup_steps: int = 0
    lora_rank: int = 8
    dtype: str = "float32"
    dev_items: int | None = None  # evaluate at most this many dev items (None: all)
    test_items: int | None = None
    eval_split: str = "dev"  # the split decisions read ("dev"; "train" only for tasks without one)
    feedback: str = "heuristic"  # or "llm": an OpenAI-compatible endpoint decides
    feedback_model: str | None = None
    feedback_base_url: str | None = None
    mesh: str | None = None  # e.g. "data=2,fsdp=2,tensor=2" over this process's devices; None = one device
    feedback_rules: FeedbackRules = FeedbackRules()

    def __post_init__(self):
        if self.mesh is not None:
            MeshConfig.parse(self.mesh)
        if self.levers not in LEVER_MODES:
            raise ValueError(f"levers must be one of {sorted(LEVER_MODES)}, got {self.levers!r}")
        if self.feedback not in ("heuristic", "llm"):
            raise ValueError("feedback must be 'heuristic' or 'llm'")
        if self.feedback == "llm" and not self.feedback_model:
            raise ValueError("feedback='llm' needs feedback_model (and usually feedback_base_url)")
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {sorted(RECIPES)} (or unset), got {self.recipe!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.eval_split not in ("dev", "train"):
            raise ValueError(f"eval_split must be 'dev' (or 'train' for a task without dev), got {self.eval_split!r}")
        if self.temperature is not None and not 0 <= self.temperature <= 5:
            raise ValueError(f"temperature must be in [0, 5], got {self.temperature}")
        positive = {"generations": self.generations, "items_per_generation": self.items_per_generation,
                    "updates_per_generation": self.updates_per_generation, "micro_batches": self.micro_batches,
                    "lora_rank": self.lora_rank}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.samples_per_prompt is not None and self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if isinstance(self.feedback_rules, dict):
            object.__setattr__(self, "feedback_rules", FeedbackRules.from_dict(self.feedback_rules))

    def schedule(self, recipe: str) -> UpdateSchedule:
        default = DEFAULT_SCHEDULES[recipe]
        return UpdateSchedule(epochs=self.epochs or default.epochs, minibatches=self.minibatches or default.minibatches,
                              micro_batches=self.micro_batches, target_kl=self.target_kl)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown run settings {sorted(unknown)}; known: {sorted(fields)}")
        return cls(**data)


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


def total_optimizer_steps(config: RunConfig) -> int:
    """An upper bound on the run's optimiser steps (the cosine schedule's horizon)."""
    most = max(config.schedule(r).epochs * config.schedule(r).minibatches for r in RECIPES)
    return config.generations * config.updates_per_generation * most


class Policy:
    """The local policy with its trainable state and one learner per recipe."""

    def __init__(self, config: RunConfig):
        model, self.tokenizer = from_pretrained(config.model, dtype=config.dtype)
        self.config = config
        add_lora(model, LoRAConfig(rank=config.lora_rank, alpha=2.0 * config.lora_rank),
                 key=jax.random.key(config.seed))
        value_head = ValueHead(model.config.hidden_size, rngs=nnx.Rngs(config.seed))
        self.parts, params, self.frozen = split_policy(model, value_head)
        self.learning_rate = config.learning_rate or default_learning_rate(model.config)
        self.optimizer = default_optimizer(self.learning_rate, schedule=config.lr_schedule,
                                           warmup_steps=config.warmup_steps,
                                           total_steps=total_optimizer_steps(config))
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
            self._learners[recipe] = bind_learner(self.parts, recipe, self.optimizer,
                                                  schedule=self.config.schedule(recipe), shardings=self.shardings)
        return self._learners[recipe]

    def restore(self, run_dir: Path, ledger: list[dict]) -> None:
        """Loads the train state named by the ledger's last line (each line carries the latest),
        laid out on this run's mesh whatever mesh saved it."""
        checkpoint = ledger[-1].get("checkpoint") if ledger else None
        if checkpoint:
            self.state = restore_pytree(run_dir / checkpoint, self.state,
                                        None if self.shardings is None else self.shardings.state)

    def snapshot(self):
        """A copy of the train state that survives the donating train step (for a rollback)."""
        return jax.tree.map(jnp.copy, self.state)

    def backend(self) -> LocalPolicyBackend:
        model = nnx.merge(self.parts.graphdef, self.state.params["lora"], self.frozen)
        return LocalPolicyBackend(model, self.tokenizer, mesh=self.mesh)


@dataclasses.dataclass(frozen=True)
class EvalPlan:
    """The fixed held-out items and decoding keys every generation is scored with."""

    dev: list
    test: list
    dev_key: jax.Array
    test_key: jax.Array


def evaluation_plan(task: Task, config: RunConfig) -> EvalPlan:
    root = jax.random.key(config.seed)
    dev = task.items(config.eval_split) if config.eval_split == "train" else task.dev_items()
    test = task.items("test")
    return EvalPlan(dev[:config.dev_items], test[:config.test_items],
                    jax.random.fold_in(root, 7_000_001), jax.random.fold_in(root, 7_000_002))


def evaluate_state(task: Task, harness: Harness, policy: Policy, plan: EvalPlan) -> tuple[Evaluation, Evaluation]:
    backend = policy.backend()
    return (evaluate(task, harness, backend, plan.dev, plan.dev_key, split="dev"),
            evaluate(task, harness, backend, plan.test, plan.test_key, split="test"))


def fixable_indicators(evaluation: Evaluation) -> list[float]:
    """Per item: 1.0 when its answer failed in a way the harness can fix (parse error, invalid label)."""
    return [float(f in FIXABLE_FAILURES) for f in evaluation.failures]


def _state_record(dev: Evaluation, test: Evaluation) -> dict:
    return {"dev": {**dev.summary(), "item_scores": dev.scores, "item_fixable": fixable_indicators(dev)},
            "test": test.summary()}


def _judge_candidate(dev: Evaluation, current: dict, rules: FeedbackRules, seed: int) -> dict:
    """Score comparison on the same dev items, and (``rules.keep_format_fixes``) the fixable-failure
    comparison: -> {"comparison", "format_comparison", "keep", "rank"}."""
    comparison = _compare(dev.scores, current["dev"]["item_scores"], rules, seed)
    verdict = {"comparison": comparison, "format_comparison": None, "keep": comparison.better,
               "rank": (1, comparison.mean_difference, 0.0)}
    baseline_fixable = current["dev"].get("item_fixable")
    if rules.keep_format_fixes and not comparison.better and baseline_fixable is not None:
        fewer = _compare([1.0 - f for f in fixable_indicators(dev)], [1.0 - f for f in baseline_fixable], rules,
                         seed + 50_000)
        verdict["format_comparison"] = fewer
        if fewer.better and comparison.mean_difference >= 0:
            verdict.update(keep=True, rank=(0, comparison.mean_difference, fewer.mean_difference))
    return verdict


def _compare(after: list[float], before: list[float], rules: FeedbackRules, seed: int):
    return paired_bootstrap(after, before, alpha=rules.alpha, resamples=rules.bootstrap_resamples, seed=seed)


def _feedback_backend(config: RunConfig):
    if config.feedback == "llm":
        return OpenAIBackend(config.feedback_model, base_url=config.feedback_base_url)
    return None


def training_harness(harness: Harness, group_size: int) -> Harness:
    """The harness the weight lever samples with: its prompts and temperature, but untruncated
    (top_p=1, top_k=0: a trainer can recompute only that), one attempt, ``group_size`` samples."""
    sampling = dataclasses.replace(harness.sampling, top_p=1.0, top_k=0, samples_per_prompt=group_size, votes=1)
    return dataclasses.replace(harness, sampling=sampling, retry=dataclasses.replace(harness.retry, max_attempts=1))


def _search_harness(decision, store: HarnessStore, task: Task, policy: Policy, plan: EvalPlan, current: dict,
                    budget: int, rules: FeedbackRules, seed: int, emit) -> dict:
    """Evaluates candidates on dev (at least one, then while the sample budget lasts) and keeps the
    best that beats the current harness beyond noise; the others are stored and rolled back."""
    head = store.head
    harness, backend = store.get(head), policy.backend()
    tried, spent, tokens, best = [], 0, 0, None
    for index, candidate in enumerate(decision.candidates):
        if tried and spent >= budget:
            break
        emit("candidate", {"index": index, "of": len(decision.candidates), "kind": candidate.kind})
        patched = patch_harness(harness, candidate.patch)
        dev = evaluate(task, patched, backend, plan.dev, plan.dev_key, split="dev")
        spent, tokens = spent + dev.samples, tokens + dev.tokens
        verdict = _judge_candidate(dev, current, rules, seed + index)
        comparison, fewer = verdict["comparison"], verdict["format_comparison"]
        version = store.put(patched, parent=head, patch=candidate.patch,
                            reason=f"candidate ({candidate.kind}): {candidate.why}")
        tried.append({**candidate.to_dict(), "version": version, "dev_score": dev.summary()["score"],
                      "dev_samples": dev.samples, "comparison": comparison.to_dict(),
                      **({"format_comparison": fewer.to_dict()} if fewer is not None else {}),
                      "kept_by": ("score" if comparison.better else "format") if verdict["keep"] else None})
        if verdict["keep"] and (best is None or verdict["rank"] > best[4]):
            best = (candidate, dev, comparison, version, verdict["rank"])
    store.rollback(head)
    outcome = {"candidates": tried, "spend": {"candidate_samples": spent, "candidate_tokens": tokens}}
    if best is None:
        return {**outcome, "after": current, "comparison": None, "rolled_back": True, "accepted_patch": None}
    candidate, dev, comparison, version, _ = best
    store.rollback(version)
    test = evaluate(task, store.get(), backend, plan.test, plan.test_key, split="test")
    return {**outcome, "after": _state_record(dev, test), "comparison": comparison.to_dict(), "rolled_back": False,
            "accepted_patch": candidate.patch, "eval": (dev, test)}


def _train_weights(policy: Policy, task: Task, harness: Harness, recipe: str, config: RunConfig, generation: int,
                   key, emit) -> dict:
    """``updates_per_generation`` rounds of fresh train rollouts -> one learner update each."""
    learner = policy.learner(recipe)
    group = config.samples_per_prompt or harness.sampling.samples_per_prompt
    sampling_harness = training_harness(harness, group)
    train_items = task.train_items()
    history, records, spend = [], [], {"rollout_samples": 0, "rollout_tokens": 0, "train_tokens": 0}
    for update in range(config.updates_per_generation):
        rng = np.random.RandomState(config.seed * 100_003 + generation * 101 + update)
        picks = rng.choice(len(train_items), size=min(config.items_per_generation, len(train_items)), replace=False)
        key, sample_key = jax.random.split(key)
        emit("rollouts", {"generation": generation, "update": update})
        rollout = run_items(task, sampling_harness, policy.backend(), [train_items[i] for i in sorted(picks)],
                            sample_key)
        emit("train_step", {"generation": generation, "update": update, "of": config.updates_per_generation})
        policy.state, metrics = learner.update(policy.state, policy.frozen, rollout.generation,
                                               np.asarray(rollout.rewards), group)
        response_tokens = int(np.asarray(rollout.generation.mask).sum())
        spend["rollout_samples"] += len(rollout.records)
        spend["rollout_tokens"] += response_tokens
        spend["train_tokens"] += response_tokens * metrics["optimizer_steps"] // learner.schedule.minibatches
        records += [{**r, "update": update} for r in rollout.records]
        history.append({"update": update, "reward": float(np.mean(rollout.rewards)), **{
            k: metrics[k] for k in ("loss", "grad_norm", "clip_fraction", "approx_kl", "entropy", "logprob_mismatch",
                                    "optimizer_steps", "skipped", "no_signal") if k in metrics}})
    return {"recipe": recipe, "updates": history, "records": records, "spend": spend,
            "logprob_mismatch": max(h["logprob_mismatch"] for h in history)}


def _resolve_start(config: RunConfig, run_dir: Path) -> tuple[Task, bool]:
    """Checks everything a run needs before anything is written; -> (task, resuming?)."""
    task = resolve_task(config.task)
    task.dev_items(), task.items("test")  # data a task loads itself (e.g. GPQA) must exist before a run starts
    if config.levers != "harness":
        harness = task.default_harness()
        if config.temperature is not None:
            harness = dataclasses.replace(harness, sampling=dataclasses.replace(harness.sampling,
                                                                                temperature=config.temperature))
        group = config.samples_per_prompt or harness.sampling.samples_per_prompt
        recipes = [config.recipe] if config.recipe else sorted(RECIPES)
        if config.recipe and (problem := weights_problem(config.recipe, harness, group)):
            raise ValueError(f"--recipe {config.recipe}: {problem}")
        for recipe in recipes:
            config.schedule(recipe).check_rows(config.items_per_generation * group)
    config_path = run_dir / "config.json"
    if not config_path.exists():
        return task, False
    stored = RunConfig.from_dict(json.loads(config_path.read_text()))
    layout = {name: getattr(config, name) for name in LAYOUT_ONLY_FIELDS}
    if dataclasses.replace(stored, **layout) != config:
        raise ValueError(f"{run_dir} was started with a different config; use `siajax resume {run_dir}`")
    return task, True


def run(config: RunConfig, run_dir: str | os.PathLike, *, on_event: Callable[[str, dict], None] | None = None,
        stop_after: int | None = None) -> list[dict]:
    """Runs (or resumes) a run to ``config.generations``; returns the ledger."""
    run_dir = Path(run_dir)
    task, resuming = _resolve_start(config, run_dir)
    policy = Policy(config)  # loads the model before the run directory exists: a bad model leaves nothing
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.json"
    if not resuming or json.loads(config_path.read_text()) != config.to_dict():
        atomic_write_text(config_path, json.dumps(config.to_dict(), indent=1))
    emit = on_event or (lambda *_: None)
    rules = config.feedback_rules
    levers = LEVER_MODES[config.levers]
    store = HarnessStore(run_dir / "harness")
    ledger = read_ledger(run_dir)
    root_key = jax.random.key(config.seed)
    feedback_backend = _feedback_backend(config)
    plan = evaluation_plan(task, config)

    if ledger:
        store.rollback(ledger[-1]["next_harness"])
        policy.restore(run_dir, ledger)
        current = ledger[-1]["after"]
    else:
        harness, origin = initial_harness(task, feedback_backend, jax.random.fold_in(root_key, 10**6))
        if config.temperature is not None:
            harness = dataclasses.replace(harness, sampling=dataclasses.replace(harness.sampling,
                                                                                temperature=config.temperature))
        store.put(harness, reason=origin)
        emit("evaluation", {"generation": -1})
        initial = evaluate_state(task, harness, policy, plan)
        current = _state_record(*initial)
        (run_dir / "initial").mkdir(exist_ok=True)
        _write_jsonl(run_dir / "initial" / "eval_dev.jsonl", initial[0].records)
        _write_jsonl(run_dir / "initial" / "eval_test.jsonl", initial[1].records)
    group = config.samples_per_prompt
    budget = config.updates_per_generation * config.items_per_generation

    for generation in range(len(ledger), config.generations):
        if stop_after is not None and generation >= stop_after:
            break
        start = time.perf_counter()
        gen_dir = run_dir / f"gen_{generation:03d}"
        if gen_dir.exists():
            shutil.rmtree(gen_dir)  # leftovers of an interrupted attempt
        gen_dir.mkdir()
        feedback_key, train_key = jax.random.split(jax.random.fold_in(root_key, generation))
        harness = store.get()
        group_size = group or harness.sampling.samples_per_prompt
        atomic_write_text(gen_dir / "harness.json", to_json(harness))
        tried = {c["version"] for entry in ledger for c in entry.get("candidates", [])}
        summary = {**summarize(_read_eval_records(run_dir, ledger)), **current["dev"]}
        summary.pop("item_scores", None)
        summary.pop("item_fixable", None)
        emit("deciding", {"generation": generation})
        common = dict(group_size=group_size, tried=tried, forced_recipe=config.recipe)
        if feedback_backend is None:
            decision = heuristic_decision(summary, ledger, harness, task, levers, rules, **common)
        else:
            decision = llm_decision(feedback_backend, summary, ledger, harness, task, levers, rules, feedback_key,
                                    **common)
        atomic_write_text(gen_dir / "decision.json", json.dumps(decision.to_dict(), indent=1, ensure_ascii=False))
        checkpoint = ledger[-1].get("checkpoint") if ledger else None
        spend = {"candidate_samples": 0, "candidate_tokens": 0, "rollout_samples": 0, "rollout_tokens": 0,
                 "train_tokens": 0}
        outcome: dict = {"candidates": [], "train": None, "logprob_mismatch": None}
        if decision.lever == "harness" and decision.candidates:
            searched = _search_harness(decision, store, task, policy, plan, current, budget * group_size, rules,
                                       config.seed * 1000 + generation, emit)
            spend.update(searched.pop("spend"))
            evaluations = searched.pop("eval", None)
            outcome.update(searched)
            atomic_write_text(gen_dir / "candidates.json", json.dumps(outcome["candidates"], indent=1,
                                                                     ensure_ascii=False))
        elif decision.lever == "weights":
            snapshot = policy.snapshot() if rules.rollback_worse_weights else None
            trained = _train_weights(policy, task, harness, decision.recipe, config, generation, train_key, emit)
            spend.update(trained.pop("spend"))
            _write_jsonl(gen_dir / "trajectory.jsonl", trained.pop("records"))
            outcome["train"], outcome["logprob_mismatch"] = trained, trained["logprob_mismatch"]
            emit("evaluation", {"generation": generation})
            evaluations = evaluate_state(task, harness, policy, plan)
            comparison = _compare(evaluations[0].scores, current["dev"]["item_scores"], rules,
                                  config.seed * 1000 + generation)
            outcome["comparison"] = comparison.to_dict()
            if comparison.worse and snapshot is not None:
                policy.state, evaluations = snapshot, None
                outcome.update(rolled_back=True, after=current)
            else:
                checkpoint = f"gen_{generation:03d}/train_state"
                emit("checkpoint", {"generation": generation})
                save_pytree(run_dir / checkpoint, policy.state)
                outcome.update(rolled_back=False, after=_state_record(*evaluations))
        else:
            evaluations = None
            outcome.update(after=current, comparison=None, rolled_back=False, accepted_patch=None)
        if evaluations is not None:
            _write_jsonl(gen_dir / "eval_dev.jsonl", evaluations[0].records)
            _write_jsonl(gen_dir / "eval_test.jsonl", evaluations[1].records)
        after = outcome["after"]
        spend["eval_samples"] = after["dev"]["samples"] + after["test"]["samples"]
        spend["eval_tokens"] = after["dev"]["tokens"] + after["test"]["tokens"]
        entry = {
            "generation": generation, "decision": decision.to_dict(), "harness_version": harness.version,
            "next_harness": store.head, "checkpoint": checkpoint, "before": current, "after": after,
            "comparison": outcome.get("comparison"), "rolled_back": outcome.get("rolled_back", False),
            "accepted_patch": outcome.get("accepted_patch"), "candidates": outcome["candidates"],
            "train": None if outcome["train"] is None else {k: v for k, v in outcome["train"].items()},
            "logprob_mismatch": outcome["logprob_mismatch"], "spend": spend,
            "eval_records_from": f"gen_{generation:03d}" if evaluations is not None else
            (ledger[-1]["eval_records_from"] if ledger else "initial"),
            "wall_seconds": round(time.perf_counter() - start, 3),
        }
        _append_ledger(run_dir, entry)
        ledger.append(entry)
        current = after
        emit("generation", entry)
    return ledger


def _read_eval_records(run_dir: Path, ledger: list[dict]) -> list[dict]:
    """The dev evaluation records of the current state (for failure examples in the summary)."""
    path = run_dir / (ledger[-1]["eval_records_from"] if ledger else "initial") / "eval_dev.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_config(run_dir: str | os.PathLike) -> RunConfig:
    config_path = Path(run_dir) / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a siajax run (no config.json)")
    return RunConfig.from_dict(json.loads(config_path.read_text()))


def resume(run_dir: str | os.PathLike, **kwargs) -> list[dict]:
    """Continues a run from its last finished generation with its stored config."""
    return run(load_config(run_dir), run_dir, **kwargs)


def evaluate_saved(run_dir: str | os.PathLike, generation: int | None = None, split: str = "test") -> dict:
    """Re-scores a saved generation's harness and weights (the last one by default) on ``split``."""
    run_dir = Path(run_dir)
    config = load_config(run_dir)
    ledger = read_ledger(run_dir)
    if not ledger:
        raise FileNotFoundError(f"{run_dir} has no finished generation to evaluate")
    generation = len(ledger) - 1 if generation is None else generation
    if not 0 <= generation < len(ledger):
        raise ValueError(f"generation {generation} is not in {run_dir} (it has 0..{len(ledger) - 1})")
    task = resolve_task(config.task)
    policy = Policy(config)
    policy.restore(run_dir, ledger[:generation + 1])
    harness = HarnessStore(run_dir / "harness").get(ledger[generation]["next_harness"])
    plan = evaluation_plan(task, config)
    items, key = (plan.dev, plan.dev_key) if split == "dev" else (plan.test, plan.test_key)
    if split not in ("dev", "test"):
        raise ValueError(f"split must be 'dev' or 'test', got {split!r}")
    return {"generation": generation, "harness": harness.version,
            **evaluate(task, harness, policy.backend(), items, key, split=split).summary()}
