"""Meta-Agent: task spec -> harness v0 (the task's default, or an LLM's validated proposal)."""

from __future__ import annotations

from siajax.agents.llm import ask_until_valid
from siajax.harness import Harness, HarnessError, from_dict, to_json

META_PROMPT = """Write the harness for this task as one JSON object with exactly the fields of the example.

Task description:
{description}

Example harness (valid schema; improve it for the task):
{example}

Reply with the JSON object only."""


def initial_harness(task, backend=None, key=None, repairs: int = 1) -> tuple[Harness, str]:
    """-> (harness, how it was made). Without a backend the task's default harness is used."""
    default = task.default_harness()
    if backend is None:
        return default, "task default harness"

    def validate(proposal: dict) -> Harness:
        harness = from_dict({**proposal, "task": task.name})
        if harness.slots and not set(harness.slots) <= task.prompt_fields:
            raise HarnessError(f"template slots {harness.slots} are not among the fields a prompt may "
                               f"show: {sorted(task.prompt_fields)}")
        return harness

    prompt = META_PROMPT.format(description=task.description, example=to_json(default))
    harness, problems = ask_until_valid(backend, prompt, validate, key, max_new_tokens=1024, repairs=repairs)
    if harness is None:
        return default, f"task default harness (LLM proposals invalid: {'; '.join(problems)})"
    return harness, "meta-agent (LLM)"
