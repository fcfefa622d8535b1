"""Task Agent: runs items under a harness with a policy, parses, verifies, retries, logs.

Each trajectory record holds the prompt messages, the sample text, its token ids
and log-probs, the parsed answer, the verifier's reward and failure kind, and
the attempt number.
"""

from __future__ import annotations

import dataclasses

import jax

from siajax.harness import Harness, render_messages
from siajax.harness.parsing import parse_answer


@dataclasses.dataclass
class Rollout:
    records: list[dict]
    rewards: list[float]  # first-attempt rewards, grouped item-major (samples_per_prompt each)
    generation: object = None  # GenerationResult of the first attempt (local policy only)


def _verify(task, harness: Harness, item: dict, text: str) -> dict:
    answer = parse_answer(harness.parser, text)
    try:
        verdict = task.verifier.score(item, answer, text)
        reward = float(verdict["reward"])
    except Exception as err:  # a verifier fault is logged per sample, never fatal
        return {"answer": answer, "reward": 0.0, "failure": "crash", "metrics": {}, "verifier_error": repr(err)}
    return {"answer": answer, "reward": reward, "failure": verdict.get("failure"), "metrics": verdict.get("metrics", {})}


def run_items(task, harness: Harness, backend, items: list[dict], key: jax.Array) -> Rollout:
    """Samples every item ``samples_per_prompt`` times; retries failures the harness says to retry."""
    conversations = [render_messages(harness, **{s: item[s] for s in harness.slots}) for item in items]
    key, first_key = jax.random.split(key)
    if hasattr(backend, "sample"):
        groups, generation = backend.sample(conversations, harness.sampling, first_key)
    else:
        groups, generation = backend.complete(conversations, harness.sampling, first_key), None
    records, rewards = [], []
    for item, messages, group in zip(items, conversations, groups):
        for sample_index, completion in enumerate(group):
            verdict = _verify(task, harness, item, completion.text)
            rewards.append(verdict["reward"])
            records.append({"item": item["id"], "sample": sample_index, "attempt": 1, "messages": messages,
                            "text": completion.text, "token_ids": list(completion.token_ids),
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
