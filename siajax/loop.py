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
worse beyond noise are rolled back, and weights that applied no optimiser
step are a failed generation (not evaluated, not kept). Every generation
draws from one hard sample budget (``siajax.budget``): candidates' dev
evaluations, training rollouts and the dev evaluation of new weights, votes
and retries included, each started only when its worst case fits; test
evaluation is reported apart. Both arms of a comparison get the same budget,
and the ledger records what each generation spent.

A generation counts once its ledger line is written; ``resume`` restores the
harness HEAD, train state and dev scores named by the last line and redoes
the interrupted generation. Keys derive from the seed and a purpose tag
(``siajax.rng.purpose_key``), per generation by fold-in.
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
from siajax.budget import SampleBudget, evaluation_cost, rollout_cost, updates_within
from siajax.harness import Harness, HarnessStore, patch_harness, to_json
from siajax.harness.store import atomic_write_text
from siajax.models import BUNDLED_TINY_MODEL, LoRAConfig, ValueHead, add_lora, from_pretrained
from siajax.parallel import MeshConfig, make_mesh
from siajax.rl.custom_loss import load_loss
from siajax.rng import purpose_key
from siajax.stats import holm, paired_bootstrap
from siajax.tasks import Task, resolve_task
from siajax.tracking import Trackers, check_tracker_names
from siajax.train import init_train_state, restore_pytree, save_pytree, split_policy
from siajax.train.learner import (
    DEFAULT_CRITIC_LEARNING_RATE, DEFAULT_SCHEDULES, RECIPES, STEP_OUTCOMES, Learner, UpdateSchedule, bind_learner,
    default_learning_rate, default_optimizer, place_on_mesh, recipe_config,
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
    loss: str | None = None  # "package.module:function" replacing every recipe's loss (siajax.rl.custom_loss)
    temperature: float | None = None  # sets the initial harness's sampling temperature
    epochs: int | None = None  # None: the recipe's default schedule
    minibatches: int | None = None
    micro_batches: int = 1
    target_kl: float | None = 0.05
    learning_rate: float | None = None  # None: siajax.train.learner.default_learning_rate(model)
    critic_learning_rate: float = DEFAULT_CRITIC_LEARNING_RATE  # the PPO value head's own rate (own partition)
    lr_schedule: str = "constant"  # or "cosine" (decays over all the run's optimiser steps)
    warmup_steps: int = 0
    lora_rank: int = 8
    dtype: str = "float32"
    # Samples a generation may draw to propose and judge a change (candidates' dev evaluations, rollouts,
    # the dev evaluation of new weights; votes and retries included); None: one weights generation's
    # rollouts plus one worst-case dev evaluation of the initial harness. Test evaluation is apart.
    generation_budget: int | None = None
    dev_items: int | None = None  # evaluate at most this many dev items (None: all)
    test_items: int | None = None
    feedback: str = "heuristic"  # or "llm": an OpenAI-compatible endpoint decides
    feedback_model: str | None = None
    feedback_base_url: str | None = None
    meta: str = "default"  # who writes harness v0: the task's harness.json, or "llm" from task.md
    meta_model: str | None = None
    meta_base_url: str | None = None
    trackers: str = ""  # comma-separated: "tensorboard", "wandb" (siajax.tracking); the ledger is always written
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
        check_tracker_names(self.tracker_names)
        if self.meta not in ("default", "llm"):
            raise ValueError("meta must be 'default' or 'llm'")
        if self.meta == "llm" and not self.meta_model:
            raise ValueError("meta='llm' needs meta_model (and usually meta_base_url)")
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {sorted(RECIPES)} (or unset), got {self.recipe!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
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
        if self.generation_budget is not None and self.generation_budget < 1:
            raise ValueError(f"generation_budget must be >= 1 samples (or unset), got {self.generation_budget}")
        if not self.critic_learning_rate > 0:
            raise ValueError(f"critic_learning_rate must be > 0, got {self.critic_learning_rate}")
        if isinstance(self.feedback_rules, dict):
            object.__setattr__(self, "feedback_rules", FeedbackRules.from_dict(self.feedback_rules))

    def schedule(self, recipe: str) -> UpdateSchedule:
        default = DEFAULT_SCHEDULES[recipe]
        return UpdateSchedule(epochs=self.epochs or default.epochs, minibatches=self.minibatches or default.minibatches,
                              micro_batches=self.micro_batches, target_kl=self.target_kl)

    @property
    def tracker_names(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.trackers.split(",") if name.strip())

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
                 key=purpose_key(config.seed, "lora_init"))
        value_head = ValueHead(model.config.hidden_size, rngs=nnx.Rngs(config.seed))
        self.parts, params, self.frozen = split_policy(model, value_head)
        self.learning_rate = config.learning_rate or default_learning_rate(model.config)
        self.optimizer = default_optimizer(self.learning_rate, critic_learning_rate=config.critic_learning_rate,
                                           schedule=config.lr_schedule,
                                           warmup_steps=config.warmup_steps,
                                           total_steps=total_optimizer_steps(config))
        self.state = init_train_state(params, self.optimizer, config.seed)
        self.mesh = self.shardings = None
        if config.mesh is not None:
            if jax.process_count() > 1:
                raise ValueError("the SIA loop drives one process's devices; for multi-host RL use "
                                 "siajax.train.learner.rl_run (see README, 'Scale-out')")
            self.mesh = make_mesh(MeshConfig.parse(config.mesh), jax.local_devices())
            self.state, self.frozen, self.shardings = place_on_mesh(self.state, self.frozen, self.mesh)
        self._learners: dict[str, Learner] = {}

    def learner(self, recipe: str) -> Learner:
        if recipe not in self._learners:
            objective = None if self.config.loss is None else load_loss(self.config.loss, [recipe_config(recipe)])
            self._learners[recipe] = bind_learner(self.parts, recipe, self.optimizer, objective=objective,
                                                  schedule=self.config.schedule(recipe), shardings=self.shardings)
        return self._learners[recipe]

    def restore(self, run_dir: Path, ledger: list[dict]) -> None:
        """Loads the train state named by the ledger's last line (each line carries the latest),
        laid out on this run's mesh whatever mesh saved it."""
        checkpoint = ledger[-1].get("checkpoint") if ledger else None
        if checkpoint:
            self.load(run_dir / checkpoint)

    def load(self, path: Path) -> None:
        """Loads a saved train state (a kept one or a rolled-back trial) onto this run's mesh."""
        self.state = restore_pytree(path, self.state, None if self.shardings is None else self.shardings.state)

    def snapshot(self):
        """A copy of the train state that survives the donating train step (for a rollback)."""
        return jax.tree.map(jnp.copy, self.state)

    def model(self):
        """The policy as one model: the frozen base with the current adapters."""
        return nnx.merge(self.parts.graphdef, self.state.params["lora"], self.frozen)

    def backend(self) -> LocalPolicyBackend:
        return LocalPolicyBackend(self.model(), self.tokenizer, mesh=self.mesh)


@dataclasses.dataclass(frozen=True)
class EvalPlan:
    """The fixed held-out items, and the decoding keys they are scored with.

    Test is scored with one key throughout (reported only). Dev gets a fresh key
    each generation (:meth:`dev_key_at`): the current state is re-scored with it
    and every change of that generation is compared with that, so comparisons
    stay paired (same items, same noise) while selection cannot fit one fixed
    draw of sampling noise generation after generation.
    """

    dev: list
    test: list
    dev_key: jax.Array
    test_key: jax.Array

    def dev_key_at(self, index: int) -> jax.Array:
        """The dev decoding key of generation ``index`` (0 also scores the starting state)."""
        return jax.random.fold_in(self.dev_key, index)


def evaluation_plan(task: Task, config: RunConfig) -> EvalPlan:
    dev = task.dev_items()
    test = task.items("test")
    return EvalPlan(dev[:config.dev_items], test[:config.test_items],
                    purpose_key(config.seed, "dev_eval"), purpose_key(config.seed, "test_eval"))


def evaluate_state(task: Task, harness: Harness, policy: Policy, plan: EvalPlan,
                   key_index: int) -> tuple[Evaluation, Evaluation]:
    backend = policy.backend()
    return (evaluate(task, harness, backend, plan.dev, plan.dev_key_at(key_index), split="dev"),
            evaluate(task, harness, backend, plan.test, plan.test_key, split="test"))


def fixable_indicators(evaluation: Evaluation) -> list[float]:
    """Per item: 1.0 when its answer failed in a way the harness can fix (parse error, invalid label)."""
    return [float(f in FIXABLE_FAILURES) for f in evaluation.failures]


def _dev_record(dev: Evaluation, key_index: int) -> dict:
    return {**dev.summary(), "item_scores": dev.scores, "item_fixable": fixable_indicators(dev), "key_index": key_index}


def _state_record(dev: Evaluation, test: Evaluation, key_index: int) -> dict:
    return {"dev": _dev_record(dev, key_index), "test": test.summary()}


def _judge_candidate(dev: Evaluation, current: dict, rules: FeedbackRules, seed: int) -> dict:
    """Paired comparisons of a candidate (harness edit or new weights) with the current state on the
    same dev items: scores, and (``rules.keep_format_fixes``) harness-fixable failures.
    -> {"comparison", "format_comparison", "keep", "rank"}, ``keep`` as if it were the only candidate."""
    comparison = _compare(dev.scores, current["dev"]["item_scores"], rules, seed)
    fewer = None
    baseline_fixable = current["dev"].get("item_fixable")
    if rules.keep_format_fixes and baseline_fixable is not None:
        fewer = _compare([1.0 - f for f in fixable_indicators(dev)], [1.0 - f for f in baseline_fixable], rules,
                         seed + 50_000)
    verdict = {"comparison": comparison, "format_comparison": fewer}
    return {**verdict, **accept([verdict], rules)[0]}


def accept(verdicts: list[dict], rules: FeedbackRules) -> list[dict]:
    """The one acceptance rule, for both levers: a change is kept when it beats the current state
    beyond noise on dev, Holm-corrected over the changes tried this generation (family-wise level
    ``rules.alpha``); or, with ``rules.keep_format_fixes``, when it makes significantly fewer items
    fail in a harness-fixable way (same correction) without a lower mean score.
    -> per verdict {"keep", "kept_by": "score" | "format" | None, "rank"} (higher rank wins)."""
    by_score = holm([v["comparison"].p_not_better for v in verdicts], rules.alpha)
    by_format = holm([v["format_comparison"].p_not_better if v["format_comparison"] else 1.0 for v in verdicts],
                     rules.alpha)
    out = []
    for verdict, score, fewer in zip(verdicts, by_score, by_format):
        gain = verdict["comparison"].mean_difference
        format_fix = rules.keep_format_fixes and fewer and gain >= 0
        kept_by = "score" if score else "format" if format_fix else None
        fewer_gain = verdict["format_comparison"].mean_difference if verdict["format_comparison"] else 0.0
        out.append({"keep": kept_by is not None, "kept_by": kept_by,
                    "rank": (1 if score else 0, gain, fewer_gain if kept_by == "format" else 0.0)})
    return out


def _rescored_baseline(task: Task, harness: Harness, policy: Policy, plan: EvalPlan, current: dict, generation: int,
                       budget: SampleBudget, spend: dict) -> dict:
    """The current state's dev scores under this generation's key (re-scored, and charged, unless they
    already are): what every change of the generation is compared with, item by item."""
    if _scored_under(current, generation):
        return current
    dev = evaluate(task, harness, policy.backend(), plan.dev, plan.dev_key_at(generation), split="dev")
    budget.charge(dev.samples)
    spend.update(baseline_samples=dev.samples, baseline_tokens=dev.tokens)
    return {"dev": _dev_record(dev, generation)}


def _scored_under(state_record: dict, generation: int) -> bool:
    """Whether a state's dev scores were drawn with ``generation``'s dev key (no re-scoring needed)."""
    return state_record["dev"].get("key_index") == generation


def _kept(outcome: dict) -> bool:
    """Whether the generation's change was kept (accepted by :func:`accept`)."""
    return bool(outcome.get("comparison")) and not outcome.get("rolled_back", False) and not outcome.get("failed")


def _compare(after: list[float], before: list[float], rules: FeedbackRules, seed: int):
    return paired_bootstrap(after, before, alpha=rules.alpha, resamples=rules.bootstrap_resamples, seed=seed)


def _agent_backend(setting: str, model: str | None, base_url: str | None):
    """The Meta- or Feedback-Agent's LLM endpoint; None when the agent is the built-in rule."""
    return OpenAIBackend(model, base_url=base_url) if setting == "llm" else None


def training_harness(harness: Harness, group_size: int) -> Harness:
    """The harness the weight lever samples with: its prompts and temperature, but untruncated
    (top_p=1, top_k=0: a trainer can recompute only that), one attempt, ``group_size`` samples."""
    sampling = dataclasses.replace(harness.sampling, top_p=1.0, top_k=0, samples_per_prompt=group_size, votes=1)
    return dataclasses.replace(harness, sampling=sampling, retry=dataclasses.replace(harness.retry, max_attempts=1))


def _search_harness(decision, store: HarnessStore, task: Task, policy: Policy, plan: EvalPlan, current: dict,
                    baseline: dict, key_index: int, budget: SampleBudget, rules: FeedbackRules, seed: int,
                    emit) -> dict:
    """Evaluates candidates on dev, each only when its worst-case cost still fits the budget, and keeps
    the best that beats the current harness beyond noise; the others are stored and rolled back."""
    head = store.head
    harness, backend = store.get(head), policy.backend()
    tried, judged, spent, tokens, best = [], [], 0, 0, None
    for index, candidate in enumerate(decision.candidates):
        patched = patch_harness(harness, candidate.patch)
        if not budget.fits(evaluation_cost(patched, len(plan.dev))):
            continue  # a cheaper candidate further down may still fit
        emit("candidate", {"index": index, "of": len(decision.candidates), "kind": candidate.kind})
        dev = evaluate(task, patched, backend, plan.dev, plan.dev_key_at(key_index), split="dev")
        budget.charge(dev.samples)
        spent, tokens = spent + dev.samples, tokens + dev.tokens
        verdict = _judge_candidate(dev, baseline, rules, seed + index)
        comparison, fewer = verdict["comparison"], verdict["format_comparison"]
        version = store.put(patched, parent=head, patch=candidate.patch,
                            reason=f"candidate ({candidate.kind}): {candidate.why}")
        tried.append({**candidate.to_dict(), "version": version, "dev_score": dev.summary()["score"],
                      "dev_samples": dev.samples, "comparison": comparison.to_dict(),
                      **({"format_comparison": fewer.to_dict()} if fewer is not None else {})})
        judged.append((candidate, dev, verdict, version))
    for record, (candidate, dev, verdict, version), ruling in zip(tried, judged, accept([j[2] for j in judged], rules)):
        record["kept_by"] = ruling["kept_by"]
        if ruling["keep"] and (best is None or ruling["rank"] > best[4]):
            best = (candidate, dev, verdict["comparison"], version, ruling["rank"], ruling["kept_by"])
    store.rollback(head)
    outcome = {"candidates": tried, "spend": {"candidate_samples": spent, "candidate_tokens": tokens}}
    if best is None:
        return {**outcome, "after": current, "comparison": None, "rolled_back": True, "accepted_patch": None}
    candidate, dev, comparison, version, _, kept_by = best
    store.rollback(version)
    test = evaluate(task, store.get(), backend, plan.test, plan.test_key, split="test")
    outcome["spend"].update(test_samples=test.samples, test_tokens=test.tokens)
    return {**outcome, "after": _state_record(dev, test, key_index), "comparison": comparison.to_dict(),
            "rolled_back": False, "kept_by": kept_by,
            "accepted_patch": candidate.patch, "eval": (dev, test)}


def _train_weights(policy: Policy, task: Task, harness: Harness, recipe: str, config: RunConfig, generation: int,
                   key, emit, updates: int) -> dict:
    """``updates`` rounds of fresh train rollouts -> one learner update each."""
    learner = policy.learner(recipe)
    group = config.samples_per_prompt or harness.sampling.samples_per_prompt
    sampling_harness = training_harness(harness, group)
    train_items = task.train_items()
    history, records, spend = [], [], {"rollout_samples": 0, "rollout_tokens": 0, "train_tokens": 0}
    for update in range(updates):
        rng = np.random.RandomState(config.seed * 100_003 + generation * 101 + update)
        picks = rng.choice(len(train_items), size=min(config.items_per_generation, len(train_items)), replace=False)
        key, sample_key = jax.random.split(key)
        emit("rollouts", {"generation": generation, "update": update})
        rollout = run_items(task, sampling_harness, policy.backend(), [train_items[i] for i in sorted(picks)],
                            sample_key)
        emit("train_step", {"generation": generation, "update": update, "of": updates})
        policy.state, metrics = learner.update(policy.state, policy.frozen, rollout.generation,
                                               np.asarray(rollout.rewards), group)
        response_tokens = int(np.asarray(rollout.generation.mask).sum())
        spend["rollout_samples"] += len(rollout.records)
        spend["rollout_tokens"] += response_tokens
        spend["train_tokens"] += response_tokens * metrics["optimizer_steps"] // learner.schedule.minibatches
        records += [{**r, "update": update} for r in rollout.records]
        history.append({"update": update, "reward": float(np.mean(rollout.rewards)),
                        **metrics})  # every metric of the learner and its loss (a configured loss's too)
        if metrics["skipped"]:
            emit("warning", {"generation": generation, "message": f"update {update}: {metrics['skipped']:.0f} of "
                             f"{metrics['optimizer_steps']} steps skipped (non-finite loss or gradient)"})
    return {"recipe": recipe, "updates": history, "records": records, "spend": spend,
            "logprob_mismatch": max(h["logprob_mismatch"] for h in history),
            "applied_steps": sum(h["applied_steps"] for h in history),
            "skipped_steps": sum(h["skipped"] for h in history)}


def checked_budget(config: RunConfig, initial_harness: Harness, dev_items: int) -> int:
    """The generation budget, refused when it cannot re-score the state and judge one change."""
    limit = generation_budget(config, initial_harness, dev_items)
    judge_one_change = 2 * evaluation_cost(initial_harness, dev_items)
    if limit < judge_one_change:
        raise ValueError(f"generation_budget={limit} samples cannot re-score and judge one change on {dev_items} "
                         f"dev items (needs >= {judge_one_change})")
    return limit


def generation_budget(config: RunConfig, initial_harness: Harness, dev_items: int) -> int:
    """The samples every generation may draw (both arms of a comparison get the same): the config's,
    or one weights generation's rollouts plus two worst-case dev evaluations under the initial
    harness (the current state re-scored under the generation's key, and the new weights)."""
    if config.generation_budget is not None:
        return config.generation_budget
    group = config.samples_per_prompt or initial_harness.sampling.samples_per_prompt
    return (rollout_cost(config.items_per_generation, group, config.updates_per_generation)
            + 2 * evaluation_cost(initial_harness, dev_items))


def weights_failure(trained: dict) -> str | None:
    """Why a weights generation changed nothing (None when it applied a step): such a generation
    is marked failed in the ledger, neither evaluated nor kept."""
    if trained["applied_steps"]:
        return None
    steps = sum(h["optimizer_steps"] for h in trained["updates"])
    reasons = ", ".join(f"{sum(h[k] for h in trained['updates']):.0f} {k}" for k in STEP_OUTCOMES)
    return f"no optimiser step applied ({steps} steps: {reasons})"


def _resolve_start(config: RunConfig, run_dir: Path) -> tuple[Task, bool]:
    """Checks everything a run needs before anything is written; -> (task, resuming?)."""
    task = resolve_task(config.task)
    dev = task.dev_items()[:config.dev_items]  # data a task loads itself (e.g. GPQA) must exist before a run starts
    if len(dev) < task.min_dev_items:
        raise ValueError(f"dev_items={config.dev_items} leaves {len(dev)} dev items; task {task.name!r} decides on "
                         f"no fewer than {task.min_dev_items}")
    task.items("test")
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
        if config.loss is not None:  # before the model loads: a loss that cannot serve costs nothing
            load_loss(config.loss, [recipe_config(recipe) for recipe in recipes])
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
    trackers = Trackers(config.tracker_names, run_dir, config.to_dict(), config.updates_per_generation)

    def emit(kind: str, payload: dict) -> None:
        trackers.on_event(kind, payload)
        if on_event is not None:
            on_event(kind, payload)

    rules = config.feedback_rules
    levers = LEVER_MODES[config.levers]
    store = HarnessStore(run_dir / "harness")
    ledger = read_ledger(run_dir)
    root_key = purpose_key(config.seed, "loop")
    feedback_backend = _agent_backend(config.feedback, config.feedback_model, config.feedback_base_url)
    plan = evaluation_plan(task, config)

    if ledger:
        store.rollback(ledger[-1]["next_harness"])
        policy.restore(run_dir, ledger)
        current = ledger[-1]["after"]
        limit = checked_budget(config, store.get(ledger[0]["harness_version"]), len(plan.dev))
    else:
        meta_backend = _agent_backend(config.meta, config.meta_model, config.meta_base_url)
        harness, origin = initial_harness(task, meta_backend, purpose_key(config.seed, "meta_agent"))
        if config.temperature is not None:
            harness = dataclasses.replace(harness, sampling=dataclasses.replace(harness.sampling,
                                                                                temperature=config.temperature))
        limit = checked_budget(config, harness, len(plan.dev))  # before the first evaluation is spent
        store.put(harness, reason=origin)
        emit("evaluation", {"generation": -1})
        initial = evaluate_state(task, harness, policy, plan, key_index=0)
        current = _state_record(*initial, key_index=0)
        (run_dir / "initial").mkdir(exist_ok=True)
        _write_jsonl(run_dir / "initial" / "eval_dev.jsonl", initial[0].records)
        _write_jsonl(run_dir / "initial" / "eval_test.jsonl", initial[1].records)
    group = config.samples_per_prompt

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
        budget = SampleBudget(limit)
        spend = {"candidate_samples": 0, "candidate_tokens": 0, "rollout_samples": 0, "rollout_tokens": 0,
                 "train_tokens": 0, "baseline_samples": 0, "baseline_tokens": 0, "dev_eval_samples": 0,
                 "dev_eval_tokens": 0, "test_samples": 0, "test_tokens": 0}
        outcome: dict = {"candidates": [], "train": None, "logprob_mismatch": None}
        if decision.lever == "harness" and decision.candidates:
            baseline = _rescored_baseline(task, harness, policy, plan, current, generation, budget, spend)
            outcome["baseline_dev_score"] = baseline["dev"]["score"]
            searched = _search_harness(decision, store, task, policy, plan, current, baseline, generation, budget,
                                       rules, config.seed * 1000 + generation, emit)
            spend.update(searched.pop("spend"))
            evaluations = searched.pop("eval", None)
            outcome.update(searched)
            atomic_write_text(gen_dir / "candidates.json", json.dumps(outcome["candidates"], indent=1,
                                                                     ensure_ascii=False))
        elif decision.lever == "weights":
            dev_cost = evaluation_cost(harness, len(plan.dev))
            rescore = 0 if _scored_under(current, generation) else dev_cost
            updates = updates_within(limit - rescore, config.items_per_generation, group_size, dev_cost,
                                     config.updates_per_generation)
            evaluations = None
            if not updates:
                failed = (f"budget: one update ({rollout_cost(config.items_per_generation, group_size, 1)} samples) "
                          f"and the dev evaluation ({dev_cost}) do not fit in {limit} samples")
                emit("warning", {"generation": generation, "message": f"weights generation failed: {failed}"})
                outcome.update(failed=failed, rolled_back=True, after=current, comparison=None)
            else:
                baseline = _rescored_baseline(task, harness, policy, plan, current, generation, budget, spend)
                outcome["baseline_dev_score"] = baseline["dev"]["score"]
                snapshot = policy.snapshot()
                trained = _train_weights(policy, task, harness, decision.recipe, config, generation, train_key, emit,
                                         updates)
                spend.update(trained.pop("spend"))
                budget.charge(spend["rollout_samples"])
                _write_jsonl(gen_dir / "trajectory.jsonl", trained.pop("records"))
                outcome["train"], outcome["logprob_mismatch"] = trained, trained["logprob_mismatch"]
                if failed := weights_failure(trained):
                    emit("warning", {"generation": generation, "message": f"weights generation failed: {failed}"})
                    outcome.update(failed=failed, rolled_back=True, after=current, comparison=None)
                else:
                    # Saved whether or not it is kept: a rolled-back trial stays inspectable.
                    outcome["trained_state"] = f"gen_{generation:03d}/train_state"
                    emit("checkpoint", {"generation": generation})
                    save_pytree(run_dir / outcome["trained_state"], policy.state)
                    emit("evaluation", {"generation": generation})
                    evaluations = evaluate_state(task, harness, policy, plan, key_index=generation)
                    budget.charge(evaluations[0].samples)
                    spend.update(dev_eval_samples=evaluations[0].samples, dev_eval_tokens=evaluations[0].tokens,
                                 test_samples=evaluations[1].samples, test_tokens=evaluations[1].tokens)
                    verdict = _judge_candidate(evaluations[0], baseline, rules, config.seed * 1000 + generation)
                    outcome.update(comparison=verdict["comparison"].to_dict(), kept_by=verdict["kept_by"])
                    if not verdict["keep"]:  # the same rule as a harness edit: better beyond noise, or rolled back
                        policy.state, evaluations = snapshot, None
                        outcome.update(rolled_back=True, after=current)
                    else:
                        checkpoint = outcome["trained_state"]
                        outcome.update(rolled_back=False, after=_state_record(*evaluations, key_index=generation))
        else:
            evaluations = None
            outcome.update(after=current, comparison=None, rolled_back=False, accepted_patch=None)
        if evaluations is not None:
            _write_jsonl(gen_dir / "eval_dev.jsonl", evaluations[0].records)
            _write_jsonl(gen_dir / "eval_test.jsonl", evaluations[1].records)
        after = outcome["after"]
        spend.update(budget_samples=limit, spent_samples=budget.spent)
        entry = {
            "generation": generation, "decision": decision.to_dict(), "harness_version": harness.version,
            "next_harness": store.head, "checkpoint": checkpoint, "trained_state": outcome.get("trained_state"),
            "before": current, "after": after,
            "comparison": outcome.get("comparison"), "rolled_back": outcome.get("rolled_back", False),
            "failed": outcome.get("failed"), "kept": _kept(outcome),
            "kept_by": outcome.get("kept_by") if _kept(outcome) else None,  # "score" or "format" (accept)
            "baseline_dev_score": outcome.get("baseline_dev_score"),  # the entering state under this gen's key
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
    trackers.close()
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


def saved_policy(run_dir: str | os.PathLike, generation: int | None = None):
    """A finished generation of a run (the last by default) with its weights loaded;
    -> (config, ledger, generation, policy)."""
    run_dir = Path(run_dir)
    config = load_config(run_dir)
    ledger = read_ledger(run_dir)
    if not ledger:
        raise FileNotFoundError(f"{run_dir} has no finished generation")
    generation = len(ledger) - 1 if generation is None else generation
    if not 0 <= generation < len(ledger):
        raise ValueError(f"generation {generation} is not in {run_dir} (it has 0..{len(ledger) - 1})")
    policy = Policy(config)
    policy.restore(run_dir, ledger[:generation + 1])
    return config, ledger, generation, policy


def evaluate_saved(run_dir: str | os.PathLike, generation: int | None = None, split: str = "test") -> dict:
    """Re-scores a saved generation's harness and weights (the last one by default) on ``split``."""
    run_dir = Path(run_dir)
    config, ledger, generation, policy = saved_policy(run_dir, generation)
    task = resolve_task(config.task)
    harness = HarnessStore(run_dir / "harness").get(ledger[generation]["next_harness"])
    plan = evaluation_plan(task, config)
    dev_key = plan.dev_key_at(ledger[generation]["after"]["dev"].get("key_index", 0))
    items, key = (plan.dev, dev_key) if split == "dev" else (plan.test, plan.test_key)
    if split not in ("dev", "test"):
        raise ValueError(f"split must be 'dev' or 'test', got {split!r}")
    return {"generation": generation, "harness": harness.version,
            **evaluate(task, harness, policy.backend(), items, key, split=split).summary()}
