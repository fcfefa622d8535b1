"""Reading charges out of a model's answer, and LawBench's two metrics.

Parsing closes LawBench's substring hole (its scorer counts a charge when the
name appears anywhere, and 29 names are substrings of others, e.g. 受贿 in
单位受贿): the answer is normalised (full-width punctuation, spaces, the
[罪名] / 罪名: prefix, <eoa>), split on ; and , and each segment must be a
whole label (a trailing 罪 is dropped; a segment joined by 、 counts when every
part is a label). Anything else is an invalid label.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

LABELS = tuple(json.loads((Path(__file__).resolve().parent / "charges.json").read_text(encoding="utf-8")))
_LABEL_SET = frozenset(LABELS)
_FULL_TO_HALF = str.maketrans({"；": ";", "，": ",", "：": ":", "［": "[", "］": "]", "　": " "})


def normalise(text: str) -> str:
    text = text.translate(_FULL_TO_HALF)
    text = re.sub(r"<eoa>.*", "", text, flags=re.DOTALL)
    text = re.sub(r"\[?罪名\]?\s*:?", "", text)
    return re.sub(r"\s+", "", text)


def _segment_labels(segment: str) -> list[str] | None:
    for candidate in (segment, segment.removesuffix("罪")):
        if candidate in _LABEL_SET:
            return [candidate]
    parts = [p.removesuffix("罪") for p in segment.split("、")]
    if len(parts) > 1 and all(p in _LABEL_SET for p in parts):
        return parts
    return None


def parse_charges(answer: str) -> tuple[list[str], list[str]]:
    """-> (valid labels in order, without repeats; segments that are not labels)."""
    valid, invalid = [], []
    for segment in (s for s in re.split(r"[;,]", normalise(answer)) if s):
        labels = _segment_labels(segment)
        if labels is None:
            invalid.append(segment)
        else:
            valid += [label for label in labels if label not in valid]
    return valid, invalid


def top1_correct(predicted: list[str], gold: list[str]) -> bool:
    return bool(predicted) and predicted[0] in gold


def set_f1(predicted: list[str], gold: list[str]) -> float:
    """F1 between the predicted and true charge sets of one case."""
    hits = len(set(predicted) & set(gold))
    if hits == 0:
        return 0.0
    precision, recall = hits / len(set(predicted)), hits / len(set(gold))
    return 2 * precision * recall / (precision + recall)
