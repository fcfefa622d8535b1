"""The built-in Feedback-Agent: which lever (and recipe) next, as a pure function of rules and results.

:func:`decide` reads the current state's :class:`~siajax.agents.summary.DevSummary`,
the ledger so far and a :class:`~siajax.agents.rules.DecisionRule`; the harness
candidates it may choose are built by the caller (the edit library under the
run's :class:`~siajax.agents.rules.EditGrid`). Whatever it decides, the loop
judges the change by the acceptance rule on dev, not by trust.
"""

from __future__ import annotations

import dataclasses

from siajax.agents.harness_edits import FIXABLE_FAILURES, Candidate
from siajax.agents.rules import DecisionRule
from siajax.agents.summary import DevSummary
from siajax.harness import Harness
from siajax.rl import RECIPES


@dataclasses.dataclass(frozen=True)
class Decision:
    lever: str  # "harness" | "weights"
    recipe: str | None = None  # a key of siajax.rl.RECIPES for a weights decision
    candidates: tuple[Candidate, ...] = ()  # harness patches to try on dev
    rationale: str = ""
    source: str = "heuristic"  # "heuristic" | "llm" | "fallback" (an invalid LLM reply)

    def to_dict(self) -> dict:
        return {"lever": self.lever, "recipe": self.recipe, "candidates": [c.to_dict() for c in self.candidates],
                "rationale": self.rationale, "source": self.source}


def fixable_share(summary: DevSummary) -> float:
    """The share of dev samples that fail in a way a harness edit can fix."""
    return sum(summary.failure_rates.get(k, 0.0) for k in FIXABLE_FAILURES)


def choose_recipe(summary: DevSummary, task, rule: DecisionRule) -> tuple[str, str]:
    """The paper's rule, read from the task's declared reward kind: rare successes -> entropic;
    otherwise the task's preferred recipe, else the one its reward kind calls for."""
    if summary.success_rate < rule.rare_success_rate:
        return "entropic", f"success rate {summary.success_rate:.0%} on dev: up-weight the rare successes"
    preferred = task.spec.get("harness_hints", {}).get("preferred_recipe")
    if preferred in RECIPES:
        return preferred, f"the task's expected recipe ({preferred})"
    recipe = dict(rule.recipe_by_reward).get(task.reward_kind, "ppo_gae")
    why = {"grpo": "pass/fail rewards compare within a group; no value network needed",
           "ppo_gae": "clean scalar outcome rewards: PPO with a learned baseline (GAE)",
           "entropic": "rewards call for entropic weighting"}[recipe]
    return recipe, f"{task.reward_kind} rewards: {why}"


def weights_problem(recipe: str, harness: Harness, group_size: int) -> str | None:
    """Why a weights decision cannot run as configured (None when it can)."""
    if recipe not in RECIPES:
        return f"a weights decision needs recipe in {sorted(RECIPES)}, got {recipe!r}"
    minimum = RECIPES[recipe].min_group_size
    if group_size < minimum:
        return (f"{recipe} needs at least {minimum} samples per prompt, the run has {group_size}; "
                "raise samples_per_prompt")
    if harness.sampling.temperature <= 0:
        return "the weight lever samples at the harness temperature, which is 0 (greedy); set temperature > 0"
    return None


def improved(entry: dict) -> bool:
    """The generation's change was kept (ledgers before the one acceptance rule: its comparison was better)."""
    return bool(entry["kept"]) if "kept" in entry else bool((entry.get("comparison") or {}).get("better"))


def plateaued(history: list[dict], lever: str, rule: DecisionRule) -> bool:
    """The lever's last ``rule.plateau_window`` generations kept nothing."""
    recent = [h for h in history if h["decision"]["lever"] == lever][-rule.plateau_window:]
    return len(recent) == rule.plateau_window and not any(improved(h) for h in recent)


def decide(summary: DevSummary, history: list[dict], harness: Harness, task, levers: tuple[str, ...],
           rule: DecisionRule, *, candidates: tuple[Candidate, ...], group_size: int,
           forced_recipe: str | None = None) -> Decision:
    """Harness-fixable failures -> search ``candidates``; otherwise weights with the rule's recipe.
    A lever whose last ``plateau_window`` generations kept nothing yields to the other while the
    other can still move; with no dev success there is no contrast for any recipe to learn from."""
    candidates = candidates if "harness" in levers else ()
    recipe, why = (forced_recipe, "recipe set by the run") if forced_recipe else choose_recipe(summary, task, rule)
    problem = weights_problem(recipe, harness, group_size) if "weights" in levers else "weights lever off"
    harness_stuck, weights_stuck = plateaued(history, "harness", rule), plateaued(history, "weights", rule)
    fixable = fixable_share(summary)
    search = Decision("harness", None, candidates, "search the harness edit library on dev")
    if candidates and problem is None and fixable >= rule.min_fixable_failures and not harness_stuck:
        return dataclasses.replace(search, rationale=f"{fixable:.0%} of dev samples fail in a harness-fixable way")
    if candidates and problem is None and summary.success_rate == 0 and not harness_stuck:
        return dataclasses.replace(search, rationale="no dev sample succeeds, so no success to learn from: "
                                                     "search harness edits")
    if problem is None:
        if candidates and weights_stuck and not harness_stuck:
            return dataclasses.replace(search, rationale="the weights plateaued on dev; search harness edits")
        if harness_stuck and candidates:
            why = f"the harness plateaued on dev; {why}"
        return Decision("weights", recipe, (), why)
    if candidates:
        return search
    return Decision("harness", None, (), "no untried harness edit left" + (f"; weights blocked: {problem}"
                                                                             if "weights" in levers else ""))
