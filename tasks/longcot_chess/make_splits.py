"""Builds the longcot_chess splits from LongCoT's chess problems (outputs are committed for the default).

Default (``--selection paper``): the SIA paper's 50-item task — hard.json question ids
1 and 10-19 (best_3_moves) and 151-189 (knight_path) — is the private test split; the
other hard.json items of those two templates are train, with a stable-hash fifth of
them set aside as dev.

``--selection full --difficulty hard medium easy --templates best_move ...`` picks any part
of the 500 questions; a stable hash of the question id then puts half in test, a
tenth in dev and the rest in train.

    python tasks/longcot_chess/make_splits.py [--selection full --difficulty medium]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DIFFICULTIES = ("easy", "medium", "hard")
PAPER_TEST_IDS = {"1", *map(str, range(10, 20)), *map(str, range(151, 190))}
PAPER_TEMPLATES = ("best_3_moves", "knight_path")


def load(difficulty: str) -> list[dict]:
    questions = json.loads((ROOT / "source" / f"{difficulty}.json").read_text(encoding="utf-8"))["questions"]
    return [{"id": f"{difficulty}-{q['question_id']}", "question_id": q["question_id"], "difficulty": difficulty,
             "template": q["problem"]["template"], "prompt": q["prompt"], "problem": q["problem"],
             "answer": q["answer"]} for q in questions]


def stable_fraction(item_id: str) -> float:
    return int(hashlib.sha256(f"longcot-chess:{item_id}".encode()).hexdigest()[:8], 16) / 2**32


def paper_splits() -> dict[str, list[dict]]:
    items = [i for i in load("hard") if i["template"] in PAPER_TEMPLATES]
    test = [i for i in items if i["question_id"] in PAPER_TEST_IDS]
    rest = [i for i in items if i["question_id"] not in PAPER_TEST_IDS]
    return {"train": [i for i in rest if stable_fraction(i["id"]) >= 0.2],
            "dev": [i for i in rest if stable_fraction(i["id"]) < 0.2], "test": test}


def full_splits(difficulties, templates) -> dict[str, list[dict]]:
    items = [i for d in difficulties for i in load(d) if not templates or i["template"] in templates]
    if not items:
        raise SystemExit(f"no questions of templates {templates} in {difficulties}")
    bucket = lambda i: "test" if stable_fraction(i["id"]) < 0.5 else "dev" if stable_fraction(i["id"]) < 0.6 \
        else "train"  # noqa: E731
    return {name: [i for i in items if bucket(i) == name] for name in ("train", "dev", "test")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--selection", choices=["paper", "full"], default="paper")
    parser.add_argument("--difficulty", nargs="+", choices=DIFFICULTIES, default=list(DIFFICULTIES))
    parser.add_argument("--templates", nargs="*", default=[])
    parser.add_argument("--out", type=Path, default=ROOT / "data")
    args = parser.parse_args(argv)
    splits = paper_splits() if args.selection == "paper" else full_splits(args.difficulty, args.templates)
    for name, rows in splits.items():
        folder = args.out / ("private" if name == "test" else "public")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                               encoding="utf-8")
        print(name, len(rows))


if __name__ == "__main__":
    main()
