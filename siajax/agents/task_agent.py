"""Task Agent: runs items under a harness with a policy, parses, verifies, retries, logs.

Each trajectory record holds the prompt messages, the sample text, its token ids
and log-probs, any tool calls with their results, the parsed answer, the
verifier's reward and failure kind, and the attempt number.

Tools: when the harness lists tools, a reply holding
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` runs the task's tool
of that name (``TOOLS`` in its verifier module), appends the result as a
``tool`` message and asks the policy again, up to ``MAX_TOOL_ROUNDS`` times.
The weight lever trains on the first turn only.
"""

from __future__ import annotations

import dataclasses
import json
import re

import jax

from siajax import timing
from siajax.harness import Harness, render_messages
from siajax.harness.parsing import parse_answer


@dataclasses.dataclass
class Rollout:
    records: list[dict]
    rewards: list[float]  # first-attempt rewards, grouped item-major (samples_per_prompt each)
    generation: object = None  # GenerationResult of the first attempt (local policy only)


MAX_TOOL_ROUNDS = 3
_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def call_tool(task, harness: Harness, text: str) -> dict | None:
    """Runs the first tool call in ``text``; None when there is none. Errors become results."""
    match = _TOOL_CALL.search(text)
    if match is None:
        return None
    try:
        call = json.loads(match.group(1))
        name, arguments = call["name"], call.get("arguments", {})
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        return {"name": None, "arguments": None, "error": f"malformed tool call: {err}"}
    if name not in {tool.name for tool in harness.tools}:
        return {"name": name, "arguments": arguments, "error": f"unknown tool {name!r}"}
    tools = getattr(task.verifier, "TOOLS", {})
    if name not in tools:
        return {"name": name, "arguments": arguments, "error": f"the task does not implement tool {name!r}"}
    try:
        with timing.phase("verify"):
            result = tools[name](**arguments)
        return {"name": name, "arguments": arguments, "result": result}
    except Exception as err:  # a failing tool is the policy's problem to handle, not a crash
        return {"name": name, "arguments": arguments, "error": f"{type(err).__name__}: {err}"}


def _follow_tool_calls(task, harness: Harness, backend, messages: list[dict], text: str, key) -> tuple[str, list]:
    """Answers tool calls until the reply has none (or the round limit); -> (final text, calls)."""
    calls = []
    single = dataclasses.replace(harness.sampling, samples_per_prompt=1)
    while harness.tools and len(calls) < MAX_TOOL_ROUNDS:
        outcome = call_tool(task, harness, text)
        if outcome is None:
            break
        calls.append(outcome)
        messages = messages + [{"role": "assistant", "content": text},
                               {"role": "tool", "content": json.dumps(outcome, default=str)}]
        key, turn_key = jax.random.split(key)
        text = backend.complete([messages], single, turn_key)[0][0].text
    return text, calls


def _verify(task, harness: Harness, item: dict, text: str) -> dict:
    answer = parse_answer(harness.parser, text)
    try:
        with timing.phase("verify"):
            verdict = task.verifier.score(item, answer, text)
        reward = float(verdict["reward"])
    except Exception as err:  # a verifier fault fails closed: the task's failure reward, logged, never fatal
        return {"answer": answer, "reward": float(getattr(task.verifier, "FAILURE_REWARD", 0.0)),
                "failure": "verifier_error", "metrics": {}, "verifier_error": repr(err)[:2000]}
    return {"answer": answer, "reward": reward, "failure": verdict.get("failure"), "metrics": verdict.get("metrics", {})}


def run_items(task, harness: Harness, backend, items: list[dict], key: jax.Array) -> Rollout:
    """Samples every item ``samples_per_prompt`` times; retries failures the harness says to retry."""
    conversations = [render_messages(harness, **{s: item[s] for s in harness.slots}) for item in items]
    key, first_key = jax.random.split(key)
    if hasattr(backend, "sample"):
        groups, generation = backend.sample(conversations, harness.sampling, first_key, parser=harness.parser)
    else:
        groups, generation = backend.complete(conversations, harness.sampling, first_key), None
    records, rewards = [], []
    for item_index, (item, messages, group) in enumerate(zip(items, conversations, groups)):
        for sample_index, completion in enumerate(group):
            tool_key = jax.random.fold_in(key, item_index * 1000 + sample_index)
            text, calls = _follow_tool_calls(task, harness, backend, messages, completion.text, tool_key)
            verdict = _verify(task, harness, item, text)
            rewards.append(verdict["reward"])
            records.append({"item": item["id"], "sample": sample_index, "attempt": 1, "messages": messages,
                            "text": text, "first_turn": completion.text if calls else None, "tool_calls": calls,
                            "token_ids": list(completion.token_ids),
                            "logprobs": [round(x, 6) for x in completion.logprobs],
                            "finish_reason": completion.finish_reason, **verdict})
    for attempt in range(2, harness.retry.max_attempts + 1):
        retry = [r for r in records if r["attempt"] == attempt - 1 and r["failure"] in harness.retry.retry_on]
        if not retry:
            break
        key, retry_key = jax.random.split(key)
        single = dataclasses.replace(harness.sampling, samples_per_prompt=1)
        again = backend.complete([r["messages"] for r in retry], single, retry_key)
        by_id = {item["id"]: item for item in items}
        for previous, (completion,) in zip(retry, again):
            verdict = _verify(task, harness, by_id[previous["item"]], completion.text)
            records.append({**previous, "attempt": attempt, "text": completion.text,
                            "token_ids": list(completion.token_ids),
                            "logprobs": [round(x, 6) for x in completion.logprobs], **verdict})
    return Rollout(records, rewards, generation)


def final_records(records: list[dict]) -> list[dict]:
    """The last attempt of each (item, sample): what the harness finally produced."""
    last = {}
    for record in records:
        last[(record["item"], record["sample"])] = record
    return list(last.values())
