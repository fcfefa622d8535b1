"""longcot_chess verifier: LongCoT's strict rules (python-chess) for the reward; the official SIA
implementation's loose scorer (lists as sets) reported beside it."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from chess_rules import loose_correct, strict_correct  # noqa: E402


def score(item: dict, answer, text: str) -> dict:
    verdict, detail = strict_correct(item, text)
    metrics = {"strict": float(bool(verdict)), "loose": float(loose_correct(item, text)), "detail": detail,
               "template": item["template"]}
    if verdict is None:
        return {"reward": 0.0, "failure": "parse_error", "metrics": metrics}
    return {"reward": 1.0 if verdict else 0.0, "failure": None if verdict else "wrong_answer", "metrics": metrics}


def aggregate(records: list[dict]) -> dict:
    """LongCoT's accuracy = correct / (correct + incorrect) over answered items, overall = correct / all;
    the loose scorer's accuracy over submitted answers, as the official SIA task reports it."""
    answered = [r for r in records if r["failure"] != "parse_error"]
    correct = sum(r["metrics"].get("strict", 0.0) for r in records)
    loose = sum(r["metrics"].get("loose", 0.0) for r in answered)
    return {"accuracy_answered": correct / max(len(answered), 1), "overall": correct / max(len(records), 1),
            "loose_accuracy_submitted": loose / max(len(answered), 1), "answered": len(answered)}
