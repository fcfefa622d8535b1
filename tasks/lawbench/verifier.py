"""LawBench 3-3 verifier: reward 1 when the first predicted charge is a true charge (the SIA paper's
top-1 accuracy); LawBench's set-F1 is reported beside it."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from charges import parse_charges, set_f1, top1_correct  # noqa: E402


def score(item: dict, answer, text: str) -> dict:
    if not answer:
        return {"reward": 0.0, "failure": "parse_error", "metrics": {"top1": 0.0, "set_f1": 0.0}}
    predicted, invalid = parse_charges(answer)
    metrics = {"top1": float(top1_correct(predicted, item["labels"])), "set_f1": set_f1(predicted, item["labels"]),
               "predicted": predicted, "invalid": invalid}
    if not predicted:
        return {"reward": 0.0, "failure": "invalid_label", "metrics": metrics}
    correct = metrics["top1"] == 1.0
    return {"reward": 1.0 if correct else 0.0, "failure": None if correct else "wrong_label", "metrics": metrics}
