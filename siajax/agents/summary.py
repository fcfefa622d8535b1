"""What the Feedback-Agent reads about the current state: one typed summary, one meaning per field."""

from __future__ import annotations

import collections
import dataclasses



@dataclasses.dataclass(frozen=True)
class DevSummary:
    """The current state (harness + weights) on dev.

    The scores are the evaluation's (what acceptance compares, under the
    generation's key); the reward shape, retries and examples are read from
    that evaluation's sample records.
    """

    score: float  # mean item score: voted answers, retries included
    success_rate: float  # share of items scoring > 0
    pass_at_1: float  # share of items whose first sample's first attempt succeeds
    failure_rates: dict  # failure kind -> share of the final samples that failed that way
    items: int
    samples: int  # replies the evaluation drew: every turn of every episode (votes, tool turns, retries)
    binary_rewards: bool  # every episode's final reward is 0 or 1
    retries: int  # episodes that answered more than once
    examples: dict  # outcome ("success" or a failure kind) -> a few {"item", "text", "answer"}
    task_metrics: dict = dataclasses.field(default_factory=dict)
    tool_use: dict = dataclasses.field(default_factory=dict)  # evaluation.tool_use_stats, when tools are exposed

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def sample_profile(records: list[dict], examples_per_kind: int = 2, chars: int = 160) -> dict:
    """From episode records: whether rewards are binary, how many episodes retried, and a few
    examples per outcome (the best-scored, shortest first: chosen by outcome, not file order)."""
    examples = collections.defaultdict(list)
    for r in sorted(records, key=lambda r: (-r["reward"], len(r["text"]))):
        kind = r["failure"] or "success"
        if len(examples[kind]) < examples_per_kind:
            examples[kind].append({"item": r["item"], "text": r["text"][:chars], "answer": str(r["answer"])[:chars]})
    return {"binary_rewards": {r["reward"] for r in records} <= {0.0, 1.0},
            "retries": sum(r["attempt"] > 1 for r in records), "examples": dict(examples)}


def dev_summary(dev: dict, records: list[dict]) -> DevSummary:
    """``dev``: the state's dev record (``Evaluation.summary()`` plus per-item fields); ``records``:
    the sample records of an evaluation of that state."""
    return DevSummary(score=dev["score"], success_rate=dev["success_rate"], pass_at_1=dev["pass_at_1"],
                      failure_rates=dict(dev["failure_rates"]), items=dev["items"], samples=dev["samples"],
                      task_metrics=dict(dev.get("task_metrics", {})), tool_use=dict(dev.get("tool_use", {})),
                      **sample_profile(records))
