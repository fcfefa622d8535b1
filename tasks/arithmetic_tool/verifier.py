"""arithmetic_tool verifier: reward 1 when the parsed answer is the problem's integer result."""

from __future__ import annotations

import re


def score(item: dict, answer, text: str) -> dict:
    number = re.fullmatch(r"\s*(-?\d+)\s*", str(answer).replace(",", "")) if answer is not None else None
    if number is None:
        return {"reward": 0.0, "failure": "parse_error", "metrics": {}}
    correct = int(number.group(1)) == int(item["answer"])
    return {"reward": 1.0 if correct else 0.0, "failure": None if correct else "wrong_answer", "metrics": {}}


def demonstration(item: dict) -> str:
    """The ideal final reply of a worked example."""
    return f"Answer: {item['answer']}"


def tool_arguments(item: dict, tool: str) -> dict | None:
    """The call a worked example makes to ``tool`` (None: this task does not demonstrate that tool)."""
    return {"expression": item["expression"]} if tool == "calculator" else None
