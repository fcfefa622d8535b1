"""The two levers of a generation, each proposing a change and judging it by the acceptance rule.

:func:`search_harness` evaluates the decision's harness candidates on dev and
keeps the best one that :func:`~siajax.agents.acceptance.accept` keeps;
:func:`weights_generation` runs the rollout driver for as many updates as the
budget allows, evaluates the new weights and rolls them back unless accepted.
Both draw from the generation's :class:`~siajax.budget.SampleBudget` (each draw
started only when its worst case fits) and return a :class:`LeverOutcome`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from siajax import timing
from siajax.agents import run_items
from siajax.agents.acceptance import Ruling, Verdict, accept, judge, judge_alone
from siajax.agents.decide import Decision
from siajax.agents.evaluation import Evaluation, tool_use_stats
from siajax.budget import SampleBudget, Spend, evaluation_cost, rollout_cost, updates_within
from siajax.config import RunConfig
from siajax.harness import Harness, HarnessStore, patch_harness
from siajax.protocol import (EvalPlan, evaluate_dev, evaluate_test, rescored_baseline, scored_under,
                             state_record)
from siajax.tasks import Task
from siajax.train.learner import STEP_OUTCOMES
from siajax.train.rollouts import drive_updates
from siajax.train.trainable import TrainablePolicy


@dataclasses.dataclass
class LeverOutcome:
    """What a generation's lever did: the state after it, and how its change was judged."""

    after: dict  # the state record after the generation (the entering one when nothing was kept)
    comparison: dict | None = None  # the judged change's paired comparison with the entering state
    rolled_back: bool = False
    failed: str | None = None  # why the lever could not produce a change to judge
    kept_by: str | None = None  # "score" | "format" (siajax.agents.acceptance.accept)
    accepted_patch: list | None = None
    candidates: list = dataclasses.field(default_factory=list)  # every harness candidate tried, as judged
    train: dict | None = None  # the weights generation's per-update metrics and step counts
    trained_state: str | None = None  # the new weights' checkpoint, kept or not (relative to the run)
    baseline_dev_score: float | None = None  # the entering state under this generation's dev key
    evaluations: tuple[Evaluation, Evaluation] | None = None  # (dev, test) of a kept change

    @property
    def kept(self) -> bool:
        return self.comparison is not None and not self.rolled_back and not self.failed


def no_change(entering: dict) -> LeverOutcome:
    """A harness decision without candidates: nothing tried, nothing changed."""
    return LeverOutcome(after=entering)


def training_harness(harness: Harness, group_size: int) -> Harness:
    """The harness the weight lever samples with: its prompts, temperature, tools and retries (turns
    of the episodes it trains), but untruncated (top_p=1, top_k=0: a trainer can recompute only
    that), ``group_size`` episodes per item, no votes."""
    sampling = dataclasses.replace(harness.sampling, top_p=1.0, top_k=0, samples_per_prompt=group_size, votes=1)
    return dataclasses.replace(harness, sampling=sampling)


def capped_turns(harness: Harness, turns: int) -> Harness:
    """``harness`` with at most ``turns`` replies per episode: tool rounds are kept before retries."""
    rounds = min(harness.tool_call.max_rounds if harness.tools else 0, turns - 1)
    attempts = min(harness.retry.max_attempts, turns - rounds)
    return dataclasses.replace(harness, retry=dataclasses.replace(harness.retry, max_attempts=attempts),
                               tool_call=dataclasses.replace(harness.tool_call, max_rounds=rounds))


def training_plan(budget_left: int, config: RunConfig, group_size: int, dev_cost: int,
                  harness: Harness) -> tuple[int, int]:
    """-> (updates, turns per training episode): the wanted updates at the most turns (tool rounds,
    retries) whose worst case fits beside the dev evaluation, else as many one-turn updates as fit."""
    wanted = config.updates_per_generation

    def fitting(turns: int) -> int:
        return updates_within(budget_left, config.items_per_generation, group_size, dev_cost, wanted, turns)

    turns = harness.max_turns
    while turns > 1 and fitting(turns) < wanted:
        turns -= 1
    return fitting(turns), turns


def search_harness(decision: Decision, store: HarnessStore, task: Task, policy: TrainablePolicy, plan: EvalPlan,
                   entering: dict, generation: int, budget: SampleBudget, spend: Spend, config: RunConfig,
                   emit) -> LeverOutcome:
    """Evaluates candidates on dev, each only when its worst-case cost still fits the budget, and keeps
    the best that the acceptance rule keeps; every candidate is stored, the others rolled back."""
    head = store.head
    harness, backend = store.get(head), policy.backend()
    baseline = rescored_baseline(task, harness, backend, plan, entering, generation, budget, spend)
    seed = config.seed * 1000 + generation
    tried, judged = [], []
    for index, candidate in enumerate(decision.candidates):
        patched = patch_harness(harness, candidate.patch)
        if not budget.fits(evaluation_cost(patched, len(plan.dev))):
            continue  # a cheaper candidate further down may still fit
        emit("candidate", {"index": index, "of": len(decision.candidates), "kind": candidate.kind})
        dev = evaluate_dev(task, patched, backend, plan, generation)
        budget.charge(dev.samples)
        spend.candidate_samples += dev.samples
        spend.candidate_tokens += dev.tokens
        verdict = judge(dev, baseline["dev"], config.acceptance_rule, seed + index)
        version = store.put(patched, parent=head, patch=candidate.patch,
                            reason=f"candidate ({candidate.kind}): {candidate.why}")
        tried.append(_candidate_record(candidate, version, dev, verdict))
        judged.append((candidate, dev, verdict, version))
    rulings = accept([verdict for _, _, verdict, _ in judged], config.acceptance_rule)
    for record, ruling in zip(tried, rulings):
        record["kept_by"] = ruling.kept_by
    store.rollback(head)
    outcome = LeverOutcome(after=entering, candidates=tried, baseline_dev_score=baseline["dev"]["score"],
                           rolled_back=True)
    best = _best_kept(judged, rulings)
    if best is None:
        return outcome
    (candidate, dev, verdict, version), ruling = best
    store.rollback(version)
    test = evaluate_test(task, store.get(), backend, plan)
    spend.test_samples, spend.test_tokens = test.samples, test.tokens
    return dataclasses.replace(outcome, after=state_record(dev, test, generation), rolled_back=False,
                               comparison=verdict.comparison.to_dict(), kept_by=ruling.kept_by,
                               accepted_patch=candidate.patch, evaluations=(dev, test))


def _candidate_record(candidate, version: str, dev: Evaluation, verdict: Verdict) -> dict:
    return {**candidate.to_dict(), "version": version, "dev_score": dev.summary()["score"], "dev_samples": dev.samples,
            "comparison": verdict.comparison.to_dict(),
            **({"format_comparison": verdict.format_comparison.to_dict()} if verdict.format_comparison else {})}


def _best_kept(judged: list, rulings: list[Ruling]):
    """The kept candidate of highest rank (the first among equals); None when none is kept."""
    best = None
    for entry, ruling in zip(judged, rulings):
        if ruling.keep and (best is None or ruling.rank > best[1].rank):
            best = (entry, ruling)
    return best


def weights_generation(decision: Decision, policy: TrainablePolicy, task: Task, harness: Harness, plan: EvalPlan,
                       entering: dict, generation: int, budget: SampleBudget, spend: Spend, config: RunConfig,
                       key: jax.Array, emit, checkpoints: Path) -> tuple[LeverOutcome, list[dict]]:
    """Trains for the updates the budget allows, then keeps the new weights only when the acceptance
    rule does (else the train state is restored); -> (outcome, the training rollouts' records)."""
    group_size = config.group_size(harness)
    dev_cost = evaluation_cost(harness, len(plan.dev))
    rescore = 0 if scored_under(entering, generation) else dev_cost
    updates, turns = training_plan(budget.limit - rescore, config, group_size, dev_cost, harness)
    if not updates:
        one_update = rollout_cost(config.items_per_generation, group_size, 1)
        failed = (f"budget: one update ({one_update} samples) and the dev evaluation ({dev_cost}) do not fit in "
                  f"{budget.limit} samples")
        emit("warning", {"generation": generation, "message": f"weights generation failed: {failed}"})
        return LeverOutcome(after=entering, failed=failed, rolled_back=True), []
    baseline = rescored_baseline(task, harness, policy.backend(), plan, entering, generation, budget, spend)
    snapshot = policy.snapshot()
    trained, records = train_weights(policy, task, capped_turns(harness, turns), decision.recipe, config, generation,
                                     key, emit, updates, spend)
    budget.charge(spend.rollout_samples)
    outcome = LeverOutcome(after=entering, train=trained, baseline_dev_score=baseline["dev"]["score"],
                           rolled_back=True)
    if failed := weights_failure(trained):
        emit("warning", {"generation": generation, "message": f"weights generation failed: {failed}"})
        policy.state = snapshot  # the whole state, its key too: a resumed run restarts from the last checkpoint
        return dataclasses.replace(outcome, failed=failed), records
    # Saved whether or not it is kept: a rolled-back trial stays inspectable.
    outcome.trained_state = f"gen_{generation:03d}/train_state"
    emit("checkpoint", {"generation": generation})
    with timing.phase("checkpoint"):
        policy.save(checkpoints / outcome.trained_state)
    emit("evaluation", {"generation": generation})
    dev = evaluate_dev(task, harness, policy.backend(), plan, generation)
    budget.charge(dev.samples)
    spend.dev_eval_samples, spend.dev_eval_tokens = dev.samples, dev.tokens
    verdict, ruling = judge_alone(dev, baseline["dev"], config.acceptance_rule, config.seed * 1000 + generation)
    outcome = dataclasses.replace(outcome, comparison=verdict.comparison.to_dict(), kept_by=ruling.kept_by)
    if not ruling.keep:
        policy.state = snapshot
        return outcome, records
    test = evaluate_test(task, harness, policy.backend(), plan)
    spend.test_samples, spend.test_tokens = test.samples, test.tokens
    return dataclasses.replace(outcome, rolled_back=False, after=state_record(dev, test, generation),
                               evaluations=(dev, test)), records


def train_weights(policy: TrainablePolicy, task: Task, harness: Harness, recipe: str, config: RunConfig,
                  generation: int, key: jax.Array, emit, updates: int, spend: Spend) -> tuple[dict, list[dict]]:
    """``updates`` rounds of fresh train rollouts (the rollout driver) -> one learner update each;
    -> (the ``train`` ledger field, the rollouts' records)."""
    learner = policy.learner(recipe)
    group = config.group_size(harness)
    sampling_harness = training_harness(harness, group)
    train_items = task.train_items()
    records, response_tokens = [], []

    def rollout(update: int, model, sample_key):
        rng = np.random.RandomState(config.seed * 100_003 + generation * 101 + update)
        picks = rng.choice(len(train_items), size=min(config.items_per_generation, len(train_items)), replace=False)
        emit("rollouts", {"generation": generation, "update": update})
        backend = policy.backend(model, reuse_samples=False)  # the weights of this update
        result = run_items(task, sampling_harness, backend, [train_items[i] for i in sorted(picks)], sample_key)
        records.extend({**r, "update": update} for r in result.records)
        spend.rollout_samples += result.replies
        response_tokens.append(result.tokens)
        emit("train_step", {"generation": generation, "update": update, "of": updates})
        return (*policy.learner_inputs(result.training_rows(backend.decoding.pad_token_id), result.rewards),
                {"reward": float(np.mean(result.rewards))})

    def account(update: int, metrics: dict):
        spend.rollout_tokens += response_tokens[update]
        spend.train_tokens += response_tokens[update] * metrics["optimizer_steps"] // learner.schedule.minibatches
        if metrics["skipped"]:
            emit("warning", {"generation": generation, "message": f"update {update}: {metrics['skipped']:.0f} of "
                             f"{metrics['optimizer_steps']} steps skipped (non-finite loss or gradient)"})

    policy.state, history = drive_updates(learner, policy.state, policy.frozen, rollout, updates=updates, key=key,
                                          group_size=group, on_update=account)
    return {"recipe": recipe, "recipe_config": dataclasses.asdict(learner.cfg), "updates": history,
            "logprob_mismatch": max(h["logprob_mismatch"] for h in history),
            "applied_steps": sum(h["applied_steps"] for h in history),
            "skipped_steps": sum(h["skipped"] for h in history), "turns_per_episode": harness.max_turns,
            **({"tool_use": tool_use_stats(records)} if harness.tools else {})}, records


def weights_failure(trained: dict) -> str | None:
    """Why a weights generation changed nothing (None when it applied a step): such a generation
    is marked failed in the ledger, neither evaluated nor kept."""
    if trained["applied_steps"]:
        return None
    steps = sum(h["optimizer_steps"] for h in trained["updates"])
    reasons = ", ".join(f"{sum(h[k] for h in trained['updates']):.0f} {k}" for k in STEP_OUTCOMES)
    return f"no optimiser step applied ({steps} steps: {reasons})"
