"""GPQA verifier: the answer letter must equal the correct option's letter (exact match)."""

from __future__ import annotations

import collections

LETTERS = "ABCD"


def score(item: dict, answer, text: str) -> dict:
    domain = {"domain": item.get("domain", "")}
    if answer is None:
        return {"reward": 0.0, "failure": "parse_error", "metrics": {**domain, "outcome": "missing"}}
    letter = str(answer).strip().strip("().").upper()
    if letter not in LETTERS or len(letter) != 1:
        return {"reward": 0.0, "failure": "invalid_label", "metrics": {**domain, "outcome": "invalid"}}
    correct = letter == item["answer"]
    return {"reward": float(correct), "failure": None if correct else "wrong_answer",
            "metrics": {**domain, "outcome": "correct" if correct else "incorrect"}}


def aggregate(records: list[dict]) -> dict:
    """Counts of each outcome; the official accuracy correct / (correct + incorrect) over
    answered questions; accuracy over all questions; accuracy per domain."""
    outcomes = collections.Counter(r["metrics"].get("outcome", "missing") for r in records)
    by_domain = collections.defaultdict(list)
    for r in records:
        by_domain[r["metrics"].get("domain", "")].append(r["reward"])
    answered = outcomes["correct"] + outcomes["incorrect"]
    return {"counts": dict(outcomes), "accuracy": outcomes["correct"] / max(answered, 1),
            "accuracy_all": outcomes["correct"] / max(len(records), 1),
            "by_domain": {domain: sum(v) / len(v) for domain, v in sorted(by_domain.items())}}


def demonstration(item: dict) -> str:
    return f"Answer: {item['answer']}"
