"""The LLM Feedback-Agent: it sees the harness, the dev summary and the whole history, and replies
with a decision that is validated like any untrusted input.

A reply that does not validate gets a correction round (``siajax.agents.llm``);
after that the built-in rule (:func:`siajax.agents.decide.decide`) decides and
the ledger says so (``source: "fallback"``).
"""

from __future__ import annotations

import dataclasses
import json

from siajax.agents.decide import Decision, decide, improved, weights_problem
from siajax.agents.harness_edits import Candidate
from siajax.agents.llm import ask_until_valid
from siajax.agents.rules import DecisionRule
from siajax.agents.summary import DevSummary
from siajax.harness import Harness, HarnessError, patch_harness, to_json


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
Tools the task offers (expose one by adding its spec to /tools; the summary's tool_use says how they are used):
{tools}

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


def llm_decide(backend, summary: DevSummary, history: list[dict], harness: Harness, task, levers: tuple[str, ...],
               rule: DecisionRule, key, *, candidates: tuple[Candidate, ...], group_size: int,
               forced_recipe: str | None = None, repairs: int = 1) -> Decision:
    """Asks the LLM; a bad reply gets ``repairs`` corrections, then :func:`decide` decides (logged)."""
    fields = task.prompt_fields
    tools = json.dumps([dataclasses.asdict(spec) for spec in task.offered_tools().values()])
    prompt = FEEDBACK_PROMPT.format(levers=list(levers), fields=sorted(fields), harness=to_json(harness), tools=tools,
                                    summary=json.dumps(summary.to_dict(), ensure_ascii=False),
                                    history=json.dumps(history_for_prompt(history)))

    def validate(reply: dict) -> Decision:
        return validate_decision({**reply, "source": "llm"}, levers, harness, group_size=group_size,
                                 item_fields=fields)

    decision, problems = ask_until_valid(backend, prompt, validate, key, max_new_tokens=512, repairs=repairs)
    if decision is not None:
        if decision.lever == "weights" and forced_recipe:
            decision = dataclasses.replace(decision, recipe=forced_recipe)
        return decision
    fallback = decide(summary, history, harness, task, levers, rule, candidates=candidates, group_size=group_size,
                      forced_recipe=forced_recipe)
    return dataclasses.replace(fallback, source="fallback",
                               rationale=f"LLM reply invalid ({'; '.join(problems)}); heuristic: {fallback.rationale}")
