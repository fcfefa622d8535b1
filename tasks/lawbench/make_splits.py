"""Builds the task's splits from LawBench 3-3 (run once; outputs are committed).

Seeded hash split of the 500 zero-shot items: sha256("lawbench-3-3:<question>")
as an integer mod 100 -> < 60 train, < 70 dev (public), else test (private).

    python tasks/lawbench/make_splits.py [--source ../shared/data/lawbench]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def bucket(question: str) -> str:
    value = int(hashlib.sha256(f"lawbench-3-3:{question}".encode("utf-8")).hexdigest(), 16) % 100
    return "train" if value < 60 else "dev" if value < 70 else "test"


def gold_labels(answer: str) -> list[str]:
    return [label.strip() for label in answer.split(":", 1)[1].split(";") if label.strip()]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, default=ROOT.parents[2] / "shared" / "data" / "lawbench")
    args = parser.parse_args()
    items = json.loads((args.source / "3-3.zero_shot.json").read_text(encoding="utf-8"))
    splits = {"train": [], "dev": [], "test": []}
    for index, item in enumerate(items):
        facts = item["question"].strip().removeprefix("事实:").strip()
        splits[bucket(item["question"])].append(
            {"id": f"law{index:03d}", "facts": facts, "labels": gold_labels(item["answer"])})
    for name, rows in splits.items():
        folder = "private" if name == "test" else "public"
        with open(ROOT / "data" / folder / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(name, len(rows))


if __name__ == "__main__":
    main()
