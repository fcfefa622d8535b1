"""Meta-Agent: task spec -> harness v0 (the task's default, or an LLM's validated proposal)."""

from __future__ import annotations

import json

from siajax.agents.feedback import first_json_object
from siajax.harness import Harness, HarnessError, SamplingParams, from_dict, to_json

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
    messages = [{"role": "user", "content": META_PROMPT.format(description=task.description,
                                                                 example=to_json(default))}]
    sampling = SamplingParams(temperature=0.2, top_p=1.0, samples_per_prompt=1, max_new_tokens=1024)
    errors = []
    for _ in range(repairs + 1):
        reply = backend.complete([messages], sampling, key)[0][0].text
        try:
            proposal = first_json_object(reply)
            harness = from_dict({**proposal, "task": task.name})
            if harness.slots and not set(harness.slots) <= task.prompt_fields:
                raise HarnessError(f"template slots {harness.slots} are not among the fields a prompt may "
                                  f"show: {sorted(task.prompt_fields)}")
            return harness, "meta-agent (LLM)"
        except (ValueError, HarnessError, json.JSONDecodeError) as err:
            errors.append(str(err))
            messages += [{"role": "assistant", "content": reply},
                         {"role": "user", "content": f"Invalid: {err}. Reply with the corrected JSON object only."}]
    return default, f"task default harness (LLM proposals invalid: {'; '.join(errors)})"
