"""A hard per-generation budget, in samples, that both levers draw from.

SIA-H and SIA-W+H are compared at equal spend only if every sample a generation
draws to propose and judge its change counts: harness candidates' dev
evaluations, training rollouts, and the dev evaluation of new weights, votes
and retries included. Test evaluation is reported apart (it decides nothing).
A draw is started only when its worst case fits, so a generation never
exceeds the budget.
"""

from __future__ import annotations

import dataclasses

from siajax.harness import Harness


class BudgetError(ValueError):
    """A lever cannot run within the generation's budget."""


def evaluation_cost(harness: Harness, items: int, turns: int | None = None) -> int:
    """The most samples (replies) evaluating ``items`` under ``harness`` can draw: every vote's
    episode run to ``turns`` (default: the harness's most turns, its retries and tool rounds)."""
    return items * harness.sampling.votes * (harness.max_turns if turns is None else turns)


def rollout_cost(items_per_update: int, group_size: int, updates: int, turns: int = 1) -> int:
    """The most samples of the weight lever's training rollouts: ``group_size`` episodes per item of
    at most ``turns`` replies each (no votes)."""
    return items_per_update * group_size * updates * turns


@dataclasses.dataclass
class SampleBudget:
    """What one generation may still draw. ``charge`` refuses any overdraw (a bug, not a condition)."""

    limit: int
    spent: int = 0

    @property
    def left(self) -> int:
        return self.limit - self.spent

    def fits(self, cost: int) -> bool:
        return cost <= self.left

    def charge(self, samples: int) -> None:
        if samples > self.left:
            raise BudgetError(f"{samples} samples overdraw the generation's budget ({self.left} of {self.limit} left)")
        self.spent += samples


def updates_within(budget: int, items_per_update: int, group_size: int, dev_cost: int, wanted: int,
                   turns: int = 1) -> int:
    """How many weight updates fit beside the dev evaluation that judges them (at most ``wanted``)."""
    return max(0, min(wanted, (budget - dev_cost) // max(rollout_cost(items_per_update, group_size, 1, turns), 1)))


@dataclasses.dataclass
class Spend:
    """What one generation drew, by purpose: samples and the tokens they generated (``train_tokens``:
    response tokens the optimiser stepped on). Test evaluation is counted apart from the budget."""

    candidate_samples: int = 0
    candidate_tokens: int = 0
    rollout_samples: int = 0
    rollout_tokens: int = 0
    train_tokens: int = 0
    baseline_samples: int = 0
    baseline_tokens: int = 0
    dev_eval_samples: int = 0
    dev_eval_tokens: int = 0
    test_samples: int = 0
    test_tokens: int = 0

    def to_dict(self, budget: SampleBudget) -> dict:
        return {**dataclasses.asdict(self), "budget_samples": budget.limit, "spent_samples": budget.spent}
