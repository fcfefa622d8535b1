"""word_length verifier: reward 1 when the parsed answer is the word's letter count."""


def score(item: dict, answer: str, text: str) -> dict:
    """``answer`` is what the harness's parser read (here the regex's group: a string of digits);
    siajax never calls score() when nothing parsed, it records a parse_error itself."""
    correct = int(answer) == item["answer"]
    return {"reward": 1.0 if correct else 0.0, "failure": None if correct else "wrong_answer",
            "metrics": {"off_by": abs(int(answer) - item["answer"])}}


def demonstration(item: dict) -> str:
    """The ideal reply, for few-shot examples (siajax tasks --check makes sure it passes score())."""
    return str(item["answer"])
