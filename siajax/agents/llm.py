"""Asking an LLM agent for a JSON object until it validates: one loop for the Meta- and Feedback-Agent."""

from __future__ import annotations

from typing import Callable, TypeVar

from siajax.harness import SamplingParams
from siajax.harness.parsing import first_json_object

T = TypeVar("T")


def ask_until_valid(backend, prompt: str, validate: Callable[[dict], T], key, *, max_new_tokens: int,
                    repairs: int = 1) -> tuple[T | None, list[str]]:
    """Sends ``prompt``; a reply whose first JSON object ``validate`` rejects (``ValueError``, its message
    shown back to the model) gets up to ``repairs`` corrections. -> (validated value or None, problems)."""
    sampling = SamplingParams(temperature=0.2, top_p=1.0, samples_per_prompt=1, max_new_tokens=max_new_tokens)
    messages = [{"role": "user", "content": prompt}]
    problems = []
    for _ in range(repairs + 1):
        reply = backend.complete([messages], sampling, key)[0][0].text
        try:
            proposal = first_json_object(reply)
            if proposal is None:
                raise ValueError("no JSON object in the reply")
            return validate(proposal), problems
        except ValueError as err:
            problems.append(str(err))
            messages += [{"role": "assistant", "content": reply},
                         {"role": "user", "content": f"That reply is invalid: {err}. Reply with the corrected "
                                                     "JSON object only."}]
    return None, problems
