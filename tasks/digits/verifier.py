"""digits verifier: reward 1 when the parsed answer is a non-negative integer."""


def score(item: dict, answer, text: str) -> dict:
    if answer is None:
        return {"reward": 0.0, "failure": "parse_error", "metrics": {}}
    ok = isinstance(answer, str) and answer.isdigit() and len(answer) <= 12
    return {"reward": 1.0 if ok else 0.0, "failure": None if ok else "wrong_answer",
            "metrics": {"digits": len(answer) if ok else 0}}


def demonstration(item: dict) -> str:
    """A well-formed reply for a few-shot example: the questions have no single true count,
    so any non-negative integer is right; derive one from the item id."""
    return str(sum(map(ord, item["id"])) % 90 + 10)
