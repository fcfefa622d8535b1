"""Feedback-Agent: dev results + history -> a validated decision for the next generation.

Decision: {"lever": "harness" | "weights", "recipe": "ppo_gae" | "entropic" |
"grpo" | None, "candidates": [harness patches to try] | None, "rationale": str}.
The built-in heuristic evaluates :class:`FeedbackRules` (frozen data, saved
with the run); an LLM backend may decide instead, seeing the whole history,
with one repair round for a bad reply and the heuristic as the logged fallback.
Either way the loop judges a lever by a paired test on dev, not by trust.
"""

from __future__ import annotations

import collections
import dataclasses
import json

from siajax.agents.harness_edits import EDIT_KINDS, FIXABLE_FAILURES, Candidate, candidate_edits
from siajax.agents.task_agent import final_records
from siajax.harness import Harness, HarnessError, SamplingParams, patch_harness, to_json

LEVERS = ("harness", "weights")
RECIPE_NAMES = ("ppo_gae", "entropic", "grpo")
GROUP_MINIMUM = {"ppo_gae": 1, "grpo": 2, "entropic": 3}


@dataclasses.dataclass(frozen=True)
class FeedbackRules:
    """The rule that steers a run, as data (written into config.json beside the results).

    Acceptance (one rule for both levers, ``siajax.loop.accept``): a change is kept
    when the paired bootstrap's p-value of "no gain" on dev passes Holm's
    correction at family-wise level ``alpha`` over the changes tried that
    generation (or by the format rule below); a lever has "plateaued" when its
    last ``plateau_window`` generations kept nothing.
    """

    alpha: float = 0.1
    bootstrap_resamples: int = 2000
    min_fixable_failures: float = 0.3  # harness-fixable failure share on dev that calls the harness lever
    plateau_window: int = 2
    edit_order: tuple[str, ...] = EDIT_KINDS
    few_shot_k: tuple[int, ...] = (3, 1)
    few_shot_seed: int = 0
    vote_counts: tuple[int, ...] = (5,)
    temperatures: tuple[float, ...] = (0.3, 1.0)
    rare_success_rate: float = 0.1  # below it the weight lever uses entropic weighting
    recipe_by_reward: tuple[tuple[str, str], ...] = (("binary", "grpo"), ("scalar", "ppo_gae"))
    # Keep a harness edit that makes significantly fewer dev items fail in a harness-fixable way (parse
    # errors, invalid labels) while its score is not lower on average: a format fix is judged on format,
    # since from a 0% start the score gain of the first fix is often too small to clear the noise.
    keep_format_fixes: bool = True

    def __post_init__(self):
        unknown = set(self.edit_order) - set(EDIT_KINDS)
        if unknown:
            raise ValueError(f"unknown harness edits {sorted(unknown)} in edit_order; choose from {EDIT_KINDS}")
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {self.alpha}")

    @classmethod
    def from_dict(cls, data: dict) -> FeedbackRules:
        tuples = {f.name for f in dataclasses.fields(cls) if str(f.type).startswith("tuple")}
        return cls(**{k: (tuple(tuple(x) if isinstance(x, list) else x for x in v) if k in tuples else v)
                      for k, v in data.items()})


@dataclasses.dataclass(frozen=True)
class Decision:
    lever: str
    recipe: str | None = None
    candidates: tuple[Candidate, ...] = ()
    rationale: str = ""
    source: str = "heuristic"

    def to_dict(self) -> dict:
        return {"lever": self.lever, "recipe": self.recipe, "candidates": [c.to_dict() for c in self.candidates],
                "rationale": self.rationale, "source": self.source}


def summarize(records: list[dict], examples_per_kind: int = 2, chars: int = 160) -> dict:
    """What a decision needs from a set of samples: score, failure mix, reward shape, a few
    examples by outcome (chosen by outcome, not by file order)."""
    final = final_records(records)
    n = max(len(final), 1)
    failures = collections.Counter(r["failure"] for r in final if r["failure"])
    rewards = [r["reward"] for r in final]
    examples = collections.defaultdict(list)
    for r in sorted(final, key=lambda r: (-r["reward"], len(r["text"]))):
        kind = r["failure"] or "success"
        if len(examples[kind]) < examples_per_kind:
            examples[kind].append({"item": r["item"], "text": r["text"][:chars], "answer": str(r["answer"])[:chars]})
    return {
        "score": sum(rewards) / n, "samples": len(final), "success_rate": sum(x > 0 for x in rewards) / n,
        "failure_rates": {k: v / n for k, v in sorted(failures.items())},
        "binary_rewards": set(rewards) <= {0.0, 1.0}, "retries": sum(r["attempt"] > 1 for r in records),
        "examples": dict(examples),
    }


def fixable_share(summary: dict) -> float:
    return sum(summary["failure_rates"].get(k, 0.0) for k in FIXABLE_FAILURES)


def choose_recipe(summary: dict, task, rules: FeedbackRules) -> tuple[str, str]:
    """The paper's rule, read from the task's declared reward kind: rare successes -> entropic;
    otherwise the task's preferred recipe, else the one its reward kind calls for."""
    if summary["success_rate"] < rules.rare_success_rate:
        return "entropic", f"success rate {summary['success_rate']:.0%} on dev: up-weight the rare successes"
    preferred = task.spec.get("harness_hints", {}).get("preferred_recipe")
    if preferred in RECIPE_NAMES:
        return preferred, f"the task's expected recipe ({preferred})"
    recipe = dict(rules.recipe_by_reward).get(task.reward_kind, "ppo_gae")
    why = {"grpo": "pass/fail rewards compare within a group; no value network needed",
           "ppo_gae": "clean scalar outcome rewards: PPO with a learned baseline (GAE)",
           "entropic": "rewards call for entropic weighting"}[recipe]
    return recipe, f"{task.reward_kind} rewards: {why}"


def weights_problem(recipe: str, harness: Harness, group_size: int) -> str | None:
    """Why a weights decision cannot run as configured (None when it can)."""
    if recipe not in RECIPE_NAMES:
        return f"a weights decision needs recipe in {list(RECIPE_NAMES)}, got {recipe!r}"
    if group_size < GROUP_MINIMUM[recipe]:
        return (f"{recipe} needs at least {GROUP_MINIMUM[recipe]} samples per prompt, the run has {group_size}; "
                "raise samples_per_prompt")
    if harness.sampling.temperature <= 0:
        return "the weight lever samples at the harness temperature, which is 0 (greedy); set temperature > 0"
    return None


def harness_problem(harness: Harness, patch: list, item_fields: set[str]) -> str | None:
    """Why a patch cannot apply (None when it can): schema, values, template slots the items lack."""
    try:
        patched = patch_harness(harness, patch)
    except HarnessError as err:
        return str(err)
    missing = set(patched.slots) - item_fields
    if missing:
        return f"template slots {sorted(missing)} are not fields of the task's items ({sorted(item_fields)})"
    return None


def improved(entry: dict) -> bool:
    """The generation's change was kept (ledgers before the one acceptance rule: its comparison was better)."""
    return bool(entry["kept"]) if "kept" in entry else bool((entry.get("comparison") or {}).get("better"))


def plateaued(history: list[dict], lever: str, rules: FeedbackRules) -> bool:
    recent = [h for h in history if h["decision"]["lever"] == lever][-rules.plateau_window:]
    return len(recent) == rules.plateau_window and not any(improved(h) for h in recent)


def heuristic_decision(summary: dict, history: list[dict], harness: Harness, task, levers: tuple[str, ...],
                       rules: FeedbackRules, *, group_size: int, tried: set[str] = frozenset(),
                       forced_recipe: str | None = None) -> Decision:
    """Harness-fixable failures -> search harness edits; otherwise weights with the rule's recipe.
    A lever whose last ``plateau_window`` generations brought no significant dev gain yields to
    the other while the other can still move."""
    candidates = tuple(candidate_edits(harness, task, rules, tried)) if "harness" in levers else ()
    recipe, why = (forced_recipe, "recipe set by the run") if forced_recipe else choose_recipe(summary, task, rules)
    problem = weights_problem(recipe, harness, group_size) if "weights" in levers else "weights lever off"
    harness_stuck, weights_stuck = plateaued(history, "harness", rules), plateaued(history, "weights", rules)
    fixable = fixable_share(summary)
    search = Decision("harness", None, candidates, "search the harness edit library on dev")
    if candidates and problem is None and fixable >= rules.min_fixable_failures and not harness_stuck:
        return dataclasses.replace(search, rationale=f"{fixable:.0%} of dev samples fail in a harness-fixable way")
    if candidates and problem is None and summary["success_rate"] == 0 and not harness_stuck:
        # No success on dev: every recipe's signal is a contrast between samples, and there is none to learn
        # from (measured on a new task: entropic chosen at 0%, every step without signal, two generations lost).
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


def validate_decision(data, levers: tuple[str, ...], harness: Harness, *, group_size: int,
                      item_fields: set[str]) -> Decision:
    """Checks an (LLM-written) decision object; raises ValueError naming the problem."""
    if not isinstance(data, dict):
        raise ValueError("the decision must be a JSON object")
    lever = data.get("lever")
    if lever not in levers:
        raise ValueError(f"lever must be one of {list(levers)}, got {lever!r}")
    recipe, patch = data.get("recipe"), data.get("patch")
    if lever == "weights":
        problem = weights_problem(recipe, harness, group_size)
        if problem:
            raise ValueError(problem)
        return Decision("weights", recipe, (), str(data.get("rationale", "")), data.get("source", "llm"))
    if not isinstance(patch, list) or not patch:
        raise ValueError("a harness decision needs 'patch': a non-empty list of JSON Patch operations")
    problem = harness_problem(harness, patch, item_fields)
    if problem:
        raise ValueError(problem)
    rationale = str(data.get("rationale", ""))
    return Decision("harness", None, (Candidate("llm", patch, rationale),), rationale, data.get("source", "llm"))


FEEDBACK_PROMPT = """You improve an AI agent. Each generation you pick one lever:
"harness" (edit the prompt/parser/sampling with an RFC 6902 JSON Patch against the harness JSON) or
"weights" (train the policy with recipe "ppo_gae" for clean scalar rewards, "entropic" when successes are
rare, "grpo" for pass/fail rewards compared within a group). Allowed levers: {levers}.
Every change is scored on held-out dev items; a harness patch that does not beat the current harness
beyond noise is rolled back. Template slots must be fields of the task's items: {fields}.

Current harness:
{harness}

Dev results of the current harness and weights:
{summary}

History (oldest first: lever, recipe, patch, dev score before -> after, significant?, rolled back?):
{history}

Reply with one JSON object only:
{{"lever": ..., "recipe": ... or null, "patch": [...] or null, "rationale": "..."}}"""


def history_for_prompt(history: list[dict]) -> list[dict]:
    return [{"generation": h["generation"], "lever": h["decision"]["lever"], "recipe": h["decision"]["recipe"],
             "patch": h.get("accepted_patch"), "tried": [c["patch"] for c in h["decision"].get("candidates", [])],
             "dev_before": h["before"]["dev"]["score"], "dev_after": h["after"]["dev"]["score"],
             "significant": improved(h), "rolled_back": h.get("rolled_back", False)} for h in history]


def first_json_object(text: str):
    decoder = json.JSONDecoder()
    for start in range(len(text)):
        if text[start] == "{":
            try:
                return decoder.raw_decode(text[start:])[0]
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON object in the reply")


def llm_decision(backend, summary: dict, history: list[dict], harness: Harness, task, levers: tuple[str, ...],
                 rules: FeedbackRules, key, *, group_size: int, tried: set[str] = frozenset(),
                 forced_recipe: str | None = None, repairs: int = 1) -> Decision:
    """Asks an LLM; a bad reply gets ``repairs`` corrections, then the heuristic decides (logged)."""
    fields = task.prompt_fields
    sampling = SamplingParams(temperature=0.2, top_p=1.0, samples_per_prompt=1, max_new_tokens=512)
    messages = [{"role": "user", "content": FEEDBACK_PROMPT.format(
        levers=list(levers), fields=sorted(fields), harness=to_json(harness),
        summary=json.dumps(summary, ensure_ascii=False), history=json.dumps(history_for_prompt(history)))}]
    problems = []
    for _ in range(repairs + 1):
        reply = backend.complete([messages], sampling, key)[0][0].text
        try:
            decision = validate_decision({**first_json_object(reply), "source": "llm"}, levers, harness,
                                         group_size=group_size, item_fields=fields)
            if decision.lever == "weights" and forced_recipe:
                decision = dataclasses.replace(decision, recipe=forced_recipe)
            return decision
        except ValueError as err:
            problems.append(str(err))
            messages += [{"role": "assistant", "content": reply},
                         {"role": "user", "content": f"That reply is invalid: {err}. Reply with the JSON object only."}]
    fallback = heuristic_decision(summary, history, harness, task, levers, rules, group_size=group_size, tried=tried,
                                  forced_recipe=forced_recipe)
    return dataclasses.replace(fallback, source="fallback",
                               rationale=f"LLM reply invalid ({'; '.join(problems)}); heuristic: {fallback.rationale}")
