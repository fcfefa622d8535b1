"""Writes the arithmetic task's items: seeded template word problems, disjoint splits.

Each item is one two-number word problem (addition or subtraction of one-digit numbers) drawn from a fixed seed; an item's identity is (template, a, b), and
no identity appears in two splits. Nobody wrote any answer by hand: the
answer is the template's operation applied to the drawn numbers.

    python tasks/arithmetic/make_items.py   # rewrites data/public/*.jsonl and data/private/test.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SEED = 20261128
SPLITS = {"train": 400, "dev": 48, "test": 96}
# Single-digit operands: SmolLM2-135M-Instruct (the embedded default) answers about 15% of these
# (lenient parsing, greedy), so both levers have room and a group of 8 samples often holds a success.
OPERANDS = (1, 9)
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


def draw(rng: random.Random) -> tuple[int, int, int]:
    template = rng.randrange(len(TEMPLATES))
    a, b = rng.randint(*OPERANDS), rng.randint(*OPERANDS)
    if TEMPLATES[template][1] == "-" and b > a:
        a, b = b, a
    return template, a, b


def item(identity: tuple[int, int, int], rng: random.Random, index: int, split: str) -> dict:
    template, a, b = identity
    text, operation = TEMPLATES[template]
    question = text.format(n=rng.choice(NAMES), t=rng.choice(THINGS), a=a, b=b)
    return {"id": f"{split}-{index:04d}", "question": question, "answer": a + b if operation == "+" else a - b}


def build() -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    seen, splits = set(), {}
    for split, count in SPLITS.items():
        items = []
        while len(items) < count:
            identity = draw(rng)
            if identity in seen:
                continue
            seen.add(identity)
            items.append(item(identity, rng, len(items), split))
        splits[split] = items
    return splits


def main() -> None:
    for split, items in build().items():
        folder = ROOT / "data" / ("private" if split == "test" else "public")
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
        print(f"{split}: {len(items)} items -> {folder / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
