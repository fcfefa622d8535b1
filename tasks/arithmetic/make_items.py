"""Writes the arithmetic task's items: seeded template word problems whose facts no two splits share.

An item asks one fact: the sum or difference of two one-digit numbers ("3+5",
the same fact as "5+3"; "9-4"). The facts are split first (stratified by
operation, fixed seed): train, dev and test items ask disjoint facts, so a
dev or test problem is never a train problem under another template (the
task's ``leak_key`` is "fact"; the loader refuses a split that shares one).
Each split's items are that split's facts under random templates, names and
objects. Nobody wrote any answer by hand: the answer is the fact's value.

    python tasks/arithmetic/make_items.py   # rewrites data/public/*.jsonl and data/private/test.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SEED = 20261202
SPLITS = {"train": 400, "dev": 48, "test": 96}
# Facts per split and operation (45 sums a+b with a <= b, 45 differences a-b with a >= b, of 1..9):
# dev and test facts are never seen in training, so a gain there is not memorisation.
FACTS_PER_OPERATION = {"train": 25, "dev": 8, "test": 12}
# Single-digit operands: SmolLM2-135M-Instruct (the embedded default) answers about 15% of these
# (lenient parsing), so both levers have room and a group of 8 samples often holds a success.
OPERANDS = range(1, 10)
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena", "Mateo",
         "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq"]
THINGS = ["apples", "books", "coins", "stamps", "marbles", "pencils", "shells", "cards", "stickers", "buttons"]
# (template, operation): {n} name, {t} thing, {a} and {b} the numbers.
TEMPLATES = [
    ("{n} has {a} {t} and finds {b} more. How many {t} does {n} have now?", "+"),
    ("{n} had {a} {t}. A friend gave {n} {b} {t}. How many {t} does {n} have?", "+"),
    ("There are {a} {t} in one box and {b} {t} in another. How many {t} are there in total?", "+"),
    ("{n} collected {a} {t} on Monday and {b} {t} on Tuesday. How many {t} did {n} collect?", "+"),
    ("{n} has {a} {t} and gives away {b} of them. How many {t} are left?", "-"),
    ("A shelf held {a} {t}. Then {b} {t} were taken. How many {t} remain on the shelf?", "-"),
    ("{n} bought {a} {t} and lost {b}. How many {t} does {n} still have?", "-"),
    ("What is {a} plus {b}?", "+"),
    ("What is {a} minus {b}?", "-"),
]


def facts(operation: str) -> list[tuple[int, int]]:
    """Every fact of an operation once: (a, b) with a <= b for sums, a >= b for differences."""
    return [(a, b) for a in OPERANDS for b in OPERANDS if (a <= b if operation == "+" else a >= b)]


def split_facts(rng: random.Random) -> dict[str, list[tuple[str, int, int]]]:
    by_split = {split: [] for split in SPLITS}
    for operation in "+-":
        pool = facts(operation)
        rng.shuffle(pool)
        for split, count in FACTS_PER_OPERATION.items():
            by_split[split] += [(operation, a, b) for a, b in pool[:count]]
            pool = pool[count:]
    return by_split


def item(fact: tuple[str, int, int], rng: random.Random, index: int, split: str) -> dict:
    operation, a, b = fact
    text = rng.choice([t for t, op in TEMPLATES if op == operation])
    if operation == "+" and rng.random() < 0.5:
        a, b = b, a  # the same fact, asked either way round
    question = text.format(n=rng.choice(NAMES), t=rng.choice(THINGS), a=a, b=b)
    return {"id": f"{split}-{index:04d}", "question": question, "fact": f"{min(a, b)}+{max(a, b)}"
            if operation == "+" else f"{a}-{b}", "answer": a + b if operation == "+" else a - b}


def build() -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    splits = {}
    for split, split_facts_ in split_facts(rng).items():
        questions, items = set(), []
        while len(items) < SPLITS[split]:
            candidate = item(split_facts_[len(items) % len(split_facts_)], rng, len(items), split)
            if candidate["question"] not in questions:
                questions.add(candidate["question"])
                items.append(candidate)
        rng.shuffle(items)
        splits[split] = [{**entry, "id": f"{split}-{index:04d}"} for index, entry in enumerate(items)]
    return splits


def main() -> None:
    for split, items in build().items():
        folder = ROOT / "data" / ("private" if split == "test" else "public")
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
        print(f"{split}: {len(items)} items -> {folder / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
