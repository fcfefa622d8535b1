"""Writes the arithmetic_tool task's items: multi-digit word problems no two splits share an operand pair of.

An item asks one fact: a + b, a - b or a x b with two- and three-digit
operands (a x b: one of them two-digit). Facts are drawn at random (fixed
seed) and split so that no unordered operand pair {a, b} appears in two splits
(the task's ``leak_key`` is "operands"): a dev or test item is never a train
fact, nor the same numbers under another operation. The answer is computed.

    python tasks/arithmetic_tool/make_items.py   # rewrites data/public/*.jsonl and data/private/test.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SEED = 20261204
SPLITS = {"train": 400, "dev": 48, "test": 96}
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b}
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena", "Mateo",
         "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq"]
THINGS = ["apples", "books", "coins", "stamps", "marbles", "pencils", "shells", "cards", "stickers", "buttons"]
# (template, operation): {n} name, {t} thing, {a} and {b} the numbers.
TEMPLATES = [
    ("{n} has {a} {t} and finds {b} more. How many {t} does {n} have now?", "+"),
    ("A shop sold {a} {t} in the morning and {b} {t} in the afternoon. How many {t} did it sell?", "+"),
    ("What is {a} plus {b}?", "+"),
    ("{n} has {a} {t} and gives away {b} of them. How many {t} are left?", "-"),
    ("A warehouse held {a} {t}. Then {b} {t} were shipped out. How many {t} remain?", "-"),
    ("What is {a} minus {b}?", "-"),
    ("{n} fills {a} boxes with {b} {t} each. How many {t} is that in total?", "x"),
    ("A hall has {a} rows of {b} seats. How many seats are there?", "x"),
    ("What is {a} times {b}?", "x"),
]


def draw_fact(rng: random.Random) -> tuple[str, int, int]:
    operation = rng.choice(list(OPERATIONS))
    if operation == "x":
        return operation, rng.randint(10, 999), rng.randint(10, 99)
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    return (operation, max(a, b), min(a, b)) if operation == "-" else (operation, a, b)


def item(fact: tuple[str, int, int], rng: random.Random, split: str, index: int) -> dict:
    operation, a, b = fact
    question = rng.choice([t for t, op in TEMPLATES if op == operation]).format(
        n=rng.choice(NAMES), t=rng.choice(THINGS), a=a, b=b)
    symbol = "*" if operation == "x" else operation
    return {"id": f"{split}-{index:04d}", "question": question, "operands": f"{min(a, b)},{max(a, b)}",
            "expression": f"{a} {symbol} {b}", "answer": OPERATIONS[operation](a, b)}


def build() -> dict[str, list[dict]]:
    rng, used, splits = random.Random(SEED), set(), {}
    for split, count in SPLITS.items():
        items = []
        while len(items) < count:
            fact = draw_fact(rng)
            pair = (min(fact[1:]), max(fact[1:]))
            if pair not in used:  # one operand pair, one item, one split
                used.add(pair)
                items.append(item(fact, rng, split, len(items)))
        splits[split] = items
    return splits


def main() -> None:
    for split, items in build().items():
        folder = ROOT / "data" / ("private" if split == "test" else "public")
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
        print(f"{split}: {len(items)} items -> {folder / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
