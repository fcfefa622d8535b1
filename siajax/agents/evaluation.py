"""Scoring a (harness, policy) pair on fixed held-out items with fixed decoding seeds.

Every generation is evaluated on the same dev items (the Feedback-Agent decides
on these) and test items (reported only) with the same keys, so consecutive
generations are compared item by item. Per item: ``votes`` samples under the
harness's decoding, retries as the harness says, then the majority answer
(self-consistency); ``first_attempt`` keeps the first sample's first try
(pass@1) apart from that with-retries, with-votes score.
"""

from __future__ import annotations

import collections
import dataclasses
import json

import jax

from siajax import timing
from siajax.agents.task_agent import run_items
from siajax.harness import Harness
from siajax.tools import ILL_FORMED


@dataclasses.dataclass
class Evaluation:
    split: str
    item_ids: list[str]
    scores: list[float]  # per item: the voted answer's reward, retries included
    first_attempt: list[float]  # per item: sample 0's first answer (pass@1)
    records: list[dict]  # one per episode
    samples: int  # replies drawn: every turn of every episode
    tokens: int  # tokens generated (the policy's, every turn)
    task_metrics: dict = dataclasses.field(default_factory=dict)  # the task's own aggregate (verifier.aggregate)
    failures: list = dataclasses.field(default_factory=list)  # per item: the voted answer's failure kind or None
    tool_use: dict = dataclasses.field(default_factory=dict)  # tool_use_stats when the harness exposes tools

    def summary(self) -> dict:
        n = max(len(self.scores), 1)
        failures = collections.Counter(r["failure"] for r in self.records if r["failure"])
        return {
            "split": self.split, "items": len(self.scores), "score": sum(self.scores) / n,
            "pass_at_1": sum(self.first_attempt) / n, "success_rate": sum(s > 0 for s in self.scores) / n,
            "failure_rates": {k: v / max(len(self.records), 1) for k, v in sorted(failures.items())},
            "samples": self.samples, "tokens": self.tokens, **({"task_metrics": self.task_metrics}
                                                                 if self.task_metrics else {}),
            **({"tool_use": self.tool_use} if self.tool_use else {}),
        }


def tool_use_stats(records: list[dict]) -> dict:
    """How episodes used their tools: the share that called one, the share of calls that were
    well-formed (valid JSON naming an exposed tool, with the arguments its schema names), the share
    whose final answer is a result a tool returned, and the calls' failures by kind."""
    calls = [call for r in records for call in r["tool_calls"]]
    malformed = sum(call.get("failure") in ILL_FORMED for call in calls)

    def answered_with_result(record) -> bool:
        results = {str(c["result"]).strip().replace(",", "") for c in record["tool_calls"] if "result" in c}
        return record["answer"] is not None and str(record["answer"]).strip().replace(",", "") in results

    return {"episodes_calling": sum(bool(r["tool_calls"]) for r in records) / max(len(records), 1),
            "calls_well_formed": (len(calls) - malformed) / len(calls) if calls else 0.0,
            "answers_with_result": sum(map(answered_with_result, records)) / max(len(records), 1),
            "calls": len(calls), "failures": dict(collections.Counter(c["failure"] for c in calls if c.get("failure")))}


def _answer_key(answer) -> str | None:
    if answer is None:
        return None
    return json.dumps(answer, sort_keys=True, ensure_ascii=False, default=str)


def majority_record(records: list[dict]) -> dict:
    """The first record whose parsed answer is the most common one (unparsed answers never win
    unless nothing parsed); ties go to the earliest sample."""
    keys = [_answer_key(r["answer"]) for r in records]
    counts = collections.Counter(k for k in keys if k is not None)
    if not counts:
        return records[0]
    best = max(counts.values())
    winner = next(k for k in keys if k is not None and counts[k] == best)
    return records[keys.index(winner)]


def evaluate(task, harness: Harness, backend, items: list[dict], key: jax.Array, *, split: str) -> Evaluation:
    """Scores ``items`` under ``harness`` with ``backend``; ``key`` fixes the decoding noise."""
    voting = dataclasses.replace(harness, sampling=dataclasses.replace(
        harness.sampling, samples_per_prompt=harness.sampling.votes))
    with timing.stage("evaluation"):
        rollout = run_items(task, voting, backend, items, key)
    scores, first, chosen = [], [], []
    for item in items:
        mine = [r for r in rollout.records if r["item"] == item["id"]]
        chosen.append(majority_record(sorted(mine, key=lambda r: r["sample"])))
        scores.append(float(chosen[-1]["reward"]))
        first.append(float(next(r["first_reward"] for r in mine if r["sample"] == 0)))
    aggregate = getattr(task.verifier, "aggregate", None)
    return Evaluation(split, [item["id"] for item in items], scores, first, rollout.records,
                      samples=rollout.replies, tokens=rollout.tokens,
                      task_metrics=aggregate(chosen) if aggregate is not None else {},
                      failures=[record["failure"] for record in chosen],
                      tool_use=tool_use_stats(rollout.records) if harness.tools else {})
