"""arithmetic verifier: reward 1 when the parsed answer is the problem's integer result."""

from __future__ import annotations

import re


def score(item: dict, answer, text: str) -> dict:
    if answer is None:
        return {"reward": 0.0, "failure": "parse_error", "metrics": {}}
    digits = re.fullmatch(r"\s*(-?\d+)\s*", str(answer))
    if digits is None:
        return {"reward": 0.0, "failure": "parse_error", "metrics": {"answer": str(answer)[:40]}}
    correct = int(digits.group(1)) == int(item["answer"])
    return {"reward": 1.0 if correct else 0.0, "failure": None if correct else "wrong_answer",
            "metrics": {"error": int(digits.group(1)) - int(item["answer"])}}


def demonstration(item: dict) -> str:
    """The ideal reply for a few-shot example: the number alone."""
    return str(item["answer"])
