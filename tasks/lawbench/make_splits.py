"""Builds the task's splits from the SIA paper's LawBench data (run once; outputs are committed).

Source: ``train.csv`` (5,332 labelled cases), ``test.csv`` + ``test_labels.csv``
(913 cases) and ``classes.json`` (191 labels), as the official implementation
ships them. The 913 test cases go to ``data/private/test.jsonl`` unchanged; a
dev split is carved from train by a stable hash of the case id
(sha256("lawbench-sia-dev:<id>") mod 100 < 5, about 5%); the rest is train,
less the 18 training cases whose fact text is also a dev or test case's (the
task's leak key is "facts": the loader refuses a split that shares one).

    python tasks/lawbench/make_splits.py [--source ../shared/data/lawbench-sia]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEV_PERCENT = 5


def is_dev(case_id: str) -> bool:
    return int(hashlib.sha256(f"lawbench-sia-dev:{case_id}".encode()).hexdigest(), 16) % 100 < DEV_PERCENT


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, default=ROOT.parents[2] / "shared" / "data" / "lawbench-sia")
    args = parser.parse_args()
    labels = set(json.loads((args.source / "classes.json").read_text(encoding="utf-8")))
    splits = {"train": [], "dev": [], "test": []}
    for row in read_csv(args.source / "train.csv"):
        assert row["label"] in labels, row["label"]
        item = {"id": f"train-{row['id']}", "facts": row["text"].strip(), "labels": [row["label"]]}
        splits["dev" if is_dev(row["id"]) else "train"].append(item)
    gold = {row["id"]: row["label"] for row in read_csv(args.source / "test_labels.csv")}
    for row in read_csv(args.source / "test.csv"):
        splits["test"].append({"id": f"test-{row['id']}", "facts": row["text"].strip(), "labels": [gold[row["id"]]]})
    held_out = {item["facts"] for item in splits["dev"] + splits["test"]}
    splits["train"] = [item for item in splits["train"] if item["facts"] not in held_out]
    for name, rows in splits.items():
        folder = "private" if name == "test" else "public"
        with open(ROOT / "data" / folder / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(name, len(rows))


if __name__ == "__main__":
    main()
