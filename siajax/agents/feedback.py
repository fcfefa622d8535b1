"""Feedback-Agent: trajectory summary + history -> a validated decision for the next generation.

Decision: {"lever": "harness" | "weights", "recipe": "ppo_gae" | "entropic" |
"grpo" | None, "patch": [RFC 6902 ops] | None, "rationale": str}. The built-in
heuristic controller encodes the paper's rule; an LLM backend may decide
instead, with one repair round for a bad reply and the heuristic as fallback.
"""

from __future__ import annotations

import collections
import dataclasses
import json

from siajax.agents.task_agent import final_records
from siajax.harness import Harness, HarnessError, SamplingParams, patch_harness, to_json

LEVERS = ("harness", "weights")
RECIPE_NAMES = ("ppo_gae", "entropic", "grpo")
HARNESS_FIXABLE = ("parse_error", "invalid_label")
PLATEAU_EPS = 0.01


@dataclasses.dataclass(frozen=True)
class Decision:
    lever: str
    recipe: str | None = None
    patch: list | None = None
    rationale: str = ""
    source: str = "heuristic"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def summarize(records: list[dict], examples_per_kind: int = 2, chars: int = 160) -> dict:
    """What a decision needs: score, failure mix, reward shape, a few examples by outcome."""
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


def validate_decision(data, levers: tuple[str, ...], harness: Harness) -> Decision:
    """Checks an (LLM-written) decision object; raises ValueError naming the problem."""
    if not isinstance(data, dict):
        raise ValueError("the decision must be a JSON object")
    lever = data.get("lever")
    if lever not in levers:
        raise ValueError(f"lever must be one of {list(levers)}, got {lever!r}")
    recipe, patch = data.get("recipe"), data.get("patch")
    if lever == "weights" and recipe not in RECIPE_NAMES:
        raise ValueError(f"a weights decision needs recipe in {list(RECIPE_NAMES)}, got {recipe!r}")
    if lever == "harness":
        if not isinstance(patch, list):
            raise ValueError("a harness decision needs 'patch': a list of JSON Patch operations")
        try:
            patch_harness(harness, patch)
        except HarnessError as err:
            raise ValueError(str(err)) from None
    return Decision(lever, recipe if lever == "weights" else None, patch if lever == "harness" else None,
                    str(data.get("rationale", "")), data.get("source", "llm"))


def harness_edits(summary: dict, harness: Harness, hints: dict, min_fixable: float = 0.3) -> list[tuple[list, str]]:
    """The library of harness edits for the failures seen (when at least ``min_fixable`` of
    samples fail in a harness-fixable way), best first."""
    edits = []
    fixable = sum(summary["failure_rates"].get(k, 0.0) for k in HARNESS_FIXABLE)
    if fixable >= min_fixable and fixable > 0:
        if harness.parser.labels and not harness.parser.constrained:
            edits.append(([{"op": "replace", "path": "/parser/constrained", "value": True}],
                          f"{fixable:.0%} of samples name no valid label; decode only within the label set"))
        lenient = hints.get("lenient_answer_pattern")
        if harness.parser.kind == "regex" and lenient and harness.parser.pattern != lenient:
            edits.append(([{"op": "replace", "path": "/parser/pattern", "value": lenient}],
                          f"{fixable:.0%} of samples fail to parse; accept the answer anywhere in the reply"))
        instruction = hints.get("format_instruction")
        if instruction and instruction not in harness.system_prompt:
            edits.append(([{"op": "replace", "path": "/system_prompt",
                            "value": (harness.system_prompt + " " + instruction).strip()}],
                          "state the answer format in the system prompt"))
        if harness.retry.max_attempts < 2:
            edits.append(([{"op": "replace", "path": "/retry/max_attempts", "value": 2}],
                          "retry samples that fail to parse once"))
    return edits


def choose_recipe(summary: dict, hints: dict | None = None) -> tuple[str, str]:
    """The paper's rule for the weight lever: the reward signal and failure mode pick the recipe.
    A task may name its expected recipe (``preferred_recipe``); rare successes still go entropic."""
    if summary["success_rate"] < 0.1:
        return "entropic", f"success rate {summary['success_rate']:.0%}: up-weight the rare successes"
    preferred = (hints or {}).get("preferred_recipe")
    if preferred in RECIPE_NAMES:
        return preferred, f"the task's expected recipe ({preferred})"
    if summary["binary_rewards"]:
        return "grpo", "pass/fail rewards compare within a group; no value network needed"
    return "ppo_gae", "clean scalar outcome rewards: PPO with a learned baseline (GAE)"


def _plateaued(history: list[dict], lever: str) -> bool:
    recent = [h for h in history if h["decision"]["lever"] == lever][-2:]
    if len(recent) < 2:
        return False
    return recent[-1]["score"] - recent[0]["score"] <= PLATEAU_EPS


def heuristic_decision(summary: dict, history: list[dict], harness: Harness, hints: dict,
                       levers: tuple[str, ...]) -> Decision:
    """Harness-fixable failures -> a harness edit; otherwise weights with the rule's recipe;
    a lever that stopped paying for two generations yields to the other."""
    edits = harness_edits(summary, harness, hints) if "harness" in levers else []
    fixable = sum(summary["failure_rates"].get(k, 0.0) for k in HARNESS_FIXABLE)
    if edits and (fixable >= 0.3 or "weights" not in levers) and not _plateaued(history, "harness"):
        patch, why = edits[0]
        return Decision("harness", None, patch, why)
    if "weights" in levers:
        recipe, why = choose_recipe(summary, hints)
        fallback_edits = harness_edits(summary, harness, hints, min_fixable=0.05) if "harness" in levers else []
        if _plateaued(history, "weights") and fallback_edits:
            patch, edit_why = fallback_edits[0]
            return Decision("harness", None, patch, f"weights plateaued; {edit_why}")
        return Decision("weights", recipe, None, why)
    if edits:
        patch, why = edits[0]
        return Decision("harness", None, patch, why)
    return Decision("harness", None, [], "no harness edit left in the library; keep the harness")


FEEDBACK_PROMPT = """You improve an AI agent. Each generation you pick one lever:
"harness" (edit the prompt/parser/sampling with an RFC 6902 JSON Patch against the harness JSON) or
"weights" (train the policy with recipe "ppo_gae" for clean scalar rewards, "entropic" when successes are
rare, "grpo" for pass/fail rewards compared within a group). Allowed levers: {levers}.

Current harness:
{harness}

This generation's trajectory summary:
{summary}

Score history (oldest first):
{history}

Reply with one JSON object only:
{{"lever": ..., "recipe": ... or null, "patch": [...] or null, "rationale": "..."}}"""


def first_json_object(text: str):
    decoder = json.JSONDecoder()
    for start in range(len(text)):
        if text[start] == "{":
            try:
                return decoder.raw_decode(text[start:])[0]
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON object in the reply")


def llm_decision(backend, summary: dict, history: list[dict], harness: Harness, hints: dict,
                 levers: tuple[str, ...], key, repairs: int = 1) -> Decision:
    """Asks an LLM; a bad reply gets ``repairs`` corrections, then the heuristic decides (logged)."""
    sampling = SamplingParams(temperature=0.2, top_p=1.0, samples_per_prompt=1, max_new_tokens=512)
    messages = [{"role": "user", "content": FEEDBACK_PROMPT.format(
        levers=list(levers), harness=to_json(harness), summary=json.dumps(summary, ensure_ascii=False),
        history=json.dumps([{"generation": h["generation"], "score": h["score"], "lever": h["decision"]["lever"]}
                            for h in history]))}]
    problems = []
    for _ in range(repairs + 1):
        reply = backend.complete([messages], sampling, key)[0][0].text
        try:
            return validate_decision({**first_json_object(reply), "source": "llm"}, levers, harness)
        except ValueError as err:
            problems.append(str(err))
            messages += [{"role": "assistant", "content": reply},
                         {"role": "user", "content": f"That reply is invalid: {err}. Reply with the JSON object only."}]
    fallback = heuristic_decision(summary, history, harness, hints, levers)
    return dataclasses.replace(fallback, source="fallback",
                               rationale=f"LLM reply invalid ({'; '.join(problems)}); heuristic: {fallback.rationale}")
