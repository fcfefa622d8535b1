"""GPQA items from the user's own copy: no GPQA text ships with siajax.

GPQA is CC BY 4.0, and its authors ask that its questions not be published in
plain text (to keep them out of training crawls). Point ``SIAJAX_GPQA`` at your
copy, or drop it at ``tasks/gpqa/data/private/gpqa.csv`` / ``gpqa.json``:

  * the Hugging Face CSV (Idavidrein/gpqa, e.g. gpqa_diamond.csv): columns
    Question, Correct Answer, Incorrect Answer 1-3 (and Record ID,
    High-level domain if present);
  * or a JSON list in the official SIA implementation's shape: objects with
    question, options {A..D} (or fields A..D), answer (a letter), optional
    id and domain.

The four options are shuffled deterministically, seeded on the question text,
so every run and machine sees the same letters. A stable hash of the question
puts 40% of the items in train, 10% in dev and 50% in test.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent
LETTERS = "ABCD"
DEFAULT_PATHS = (ROOT / "data" / "private" / "gpqa.csv", ROOT / "data" / "private" / "gpqa.json")
HOW_TO_GET = ("GPQA is gated: accept its terms at https://huggingface.co/datasets/Idavidrein/gpqa, download "
              "gpqa_diamond.csv, then set SIAJAX_GPQA=/path/to/gpqa_diamond.csv (or copy it to "
              "tasks/gpqa/data/private/gpqa.csv)")


def data_path() -> Path:
    configured = os.environ.get("SIAJAX_GPQA")
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"SIAJAX_GPQA={configured} is not a file. {HOW_TO_GET}")
        return path
    for path in DEFAULT_PATHS:
        if path.is_file():
            return path
    raise FileNotFoundError(f"no GPQA data. {HOW_TO_GET}")


def shuffled(question: str, correct: str, incorrect: list[str]) -> tuple[dict, str]:
    """The options under letters A-D, in an order seeded on the question, and the right letter."""
    seed = int(hashlib.sha256(question.encode("utf-8")).hexdigest()[:16], 16)
    options = [correct] + list(incorrect)
    order = list(range(4))
    random.Random(seed).shuffle(order)
    lettered = {LETTERS[slot]: options[index] for slot, index in enumerate(order)}
    return lettered, LETTERS[order.index(0)]


def split_of(question: str) -> str:
    value = int(hashlib.sha256(f"gpqa-split:{question}".encode("utf-8")).hexdigest()[:8], 16) / 2**32
    return "test" if value < 0.5 else "dev" if value < 0.6 else "train"


def _from_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    needed = {"Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"}
    if not rows or not needed <= set(rows[0]):
        raise ValueError(f"{path} lacks the GPQA columns {sorted(needed)}")
    items = []
    for index, row in enumerate(rows):
        question = row["Question"].strip()
        options, answer = shuffled(question, row["Correct Answer"].strip(),
                                   [row[f"Incorrect Answer {k}"].strip() for k in (1, 2, 3)])
        items.append({"id": row.get("Record ID") or f"gpqa-{index:04d}", "question": question, **options,
                      "answer": answer, "domain": row.get("High-level domain", "")})
    return items


def _from_json(path: Path) -> list[dict]:
    rows = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(rows, list):
        raise ValueError(f"{path} must hold a JSON list of questions")
    items = []
    for index, row in enumerate(rows):
        options = row.get("options") or {letter: row[letter] for letter in LETTERS}
        answer = str(row["answer"]).strip().upper()
        if set(options) != set(LETTERS) or answer not in LETTERS:
            raise ValueError(f"{path}: question {index} needs options A-D and an answer letter")
        correct = options[answer]
        incorrect = [options[letter] for letter in LETTERS if letter != answer]
        question = str(row["question"]).strip()
        lettered, letter = shuffled(question, correct, incorrect)
        items.append({"id": str(row.get("id", f"gpqa-{index:04d}")), "question": question, **lettered,
                      "answer": letter, "domain": row.get("domain", "")})
    return items


@lru_cache(maxsize=4)
def _all_items(path: str, mtime: float) -> tuple:
    path = Path(path)
    return tuple(_from_json(path) if path.suffix == ".json" else _from_csv(path))


def items(split: str) -> list[dict]:
    path = data_path()
    return [dict(item) for item in _all_items(str(path), path.stat().st_mtime) if split_of(item["question"]) == split]
