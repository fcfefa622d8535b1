"""The evaluation protocol: which held-out items score a state, with which keys, at what cost.

The state entering generation 0 (harness v0, base weights) and the state after
every generation's lever are scored on fixed dev items (what decisions read)
and test items (reported only; no agent sees them, nothing trains on them).
Dev gets a fresh decoding key each generation, and the entering state is
re-scored with it before any change of that generation is judged, so every
comparison is paired (same items, same noise) while selection cannot fit one
fixed draw of sampling noise. A state record is the JSON the ledger keeps:
``{"dev": summary + item_scores + item_fixable + key_index, "test": summary}``.
"""

from __future__ import annotations

import dataclasses

import jax

from siajax.agents.acceptance import fixable_indicators
from siajax.agents.evaluation import Evaluation, evaluate
from siajax.budget import SampleBudget, Spend, evaluation_cost, rollout_cost
from siajax.config import RunConfig
from siajax.harness import Harness
from siajax.rng import purpose_key
from siajax.tasks import Task


@dataclasses.dataclass(frozen=True)
class EvalPlan:
    """The fixed held-out items, and the decoding keys they are scored with (test: one key
    throughout; dev: :meth:`dev_key_at` per generation)."""

    dev: list
    test: list
    dev_key: jax.Array
    test_key: jax.Array

    def dev_key_at(self, index: int) -> jax.Array:
        """The dev decoding key of generation ``index`` (0 also scores the starting state)."""
        return jax.random.fold_in(self.dev_key, index)


def evaluation_plan(task: Task, config: RunConfig) -> EvalPlan:
    return EvalPlan(task.dev_items()[:config.dev_items], task.items("test")[:config.test_items],
                    purpose_key(config.seed, "dev_eval"), purpose_key(config.seed, "test_eval"))


def evaluate_dev(task: Task, harness: Harness, backend, plan: EvalPlan, key_index: int) -> Evaluation:
    """The dev evaluation of a (harness, policy) state under generation ``key_index``'s key."""
    return evaluate(task, harness, backend, plan.dev, plan.dev_key_at(key_index), split="dev")


def evaluate_test(task: Task, harness: Harness, backend, plan: EvalPlan) -> Evaluation:
    """The test evaluation of a state: run only for a state that is kept (a rolled-back change's test
    score would be reported nowhere, and no decision may read it)."""
    return evaluate(task, harness, backend, plan.test, plan.test_key, split="test")


def evaluate_state(task: Task, harness: Harness, backend, plan: EvalPlan,
                   key_index: int) -> tuple[Evaluation, Evaluation]:
    """-> (dev, test) evaluations of a (harness, policy) state; dev under generation ``key_index``'s key."""
    return evaluate_dev(task, harness, backend, plan, key_index), evaluate_test(task, harness, backend, plan)


def dev_record(dev: Evaluation, key_index: int) -> dict:
    return {**dev.summary(), "item_scores": dev.scores, "item_fixable": fixable_indicators(dev), "key_index": key_index}


def state_record(dev: Evaluation, test: Evaluation, key_index: int) -> dict:
    return {"dev": dev_record(dev, key_index), "test": test.summary()}


def scored_under(state: dict, generation: int) -> bool:
    """Whether a state's dev scores were drawn with ``generation``'s dev key (no re-scoring needed)."""
    return state["dev"].get("key_index") == generation


def rescored_baseline(task: Task, harness: Harness, backend, plan: EvalPlan, entering: dict, generation: int,
                      budget: SampleBudget, spend: Spend) -> dict:
    """The entering state's dev record under this generation's key (re-scored, and charged, unless it
    already is): what every change of the generation is compared with, item by item."""
    if scored_under(entering, generation):
        return entering
    dev = evaluate_dev(task, harness, backend, plan, generation)
    budget.charge(dev.samples)
    spend.baseline_samples, spend.baseline_tokens = dev.samples, dev.tokens
    return {"dev": dev_record(dev, generation)}


def reachable_turns(harness: Harness, task: Task) -> int:
    """The most turns an episode of ``task`` may take under ``harness`` or any harness the lever
    reaches from it by exposing one of the task's offered tools (the call rounds count)."""
    tools = bool(harness.tools or task.spec.get("tools"))
    return harness.retry.max_attempts + (harness.tool_call.max_rounds if tools else 0)


def generation_budget(config: RunConfig, initial_harness: Harness, dev_items: int, task: Task) -> int:
    """The samples every generation may draw (both arms of a comparison get the same): the config's,
    or one weights generation's rollouts plus two worst-case dev evaluations, every episode counted at
    its reachable turns: sized on a one-turn start, a task that offers a tool would train on
    episodes cut before the tool's result comes back."""
    if config.generation_budget is not None:
        return config.generation_budget
    group, turns = config.group_size(initial_harness), reachable_turns(initial_harness, task)
    return (rollout_cost(config.items_per_generation, group, config.updates_per_generation, turns)
            + 2 * evaluation_cost(initial_harness, dev_items, turns))


def checked_budget(config: RunConfig, initial_harness: Harness, dev_items: int, task: Task) -> int:
    """The generation budget, refused when it cannot re-score the state and judge one change."""
    limit = generation_budget(config, initial_harness, dev_items, task)
    judge_one_change = 2 * evaluation_cost(initial_harness, dev_items)
    if limit < judge_one_change:
        raise ValueError(f"generation_budget={limit} samples cannot re-score and judge one change on {dev_items} "
                         f"dev items (needs >= {judge_one_change})")
    return limit
