"""A verifier's verdict, checked before anything trusts it.

A task's ``score(item, answer, text)`` is task code: it may return the string
"1.0", NaN, 1e30 on a pass/fail task, a failure kind nobody counts, or raise.
The framework fails closed: a verdict that breaks the contract below becomes a
``verifier_error`` with the task's failure reward, and the reason is kept in the
record. An answer the harness's parser could not read is a ``parse_error`` by
the framework's say, whatever the verifier would have made of it, so every task
reports the failure the harness lever fixes the same way.

The contract: a dict with ``reward`` a finite real number (``binary`` tasks: 0
or 1, or the task's ``FAILURE_REWARD``), ``failure`` None or one of the known
kinds (the harness schema's, plus task.json ``failure_kinds``), ``metrics`` a
dict (optional).
"""

from __future__ import annotations

import math
import numbers

from siajax import timing
from siajax.deadline import DeadlineExceeded, call_with_deadline
from siajax.harness.schema import FAILURE_KINDS


class VerdictError(ValueError):
    """A verdict outside the contract; the message says which part, in one line."""


def failure_reward(task) -> float:
    """What a failed sample scores on ``task`` (its verifier's ``FAILURE_REWARD``, default 0)."""
    return float(getattr(task.verifier, "FAILURE_REWARD", 0.0))


def known_failures(task) -> tuple[str, ...]:
    return FAILURE_KINDS + tuple(task.spec.get("failure_kinds", ()))


def checked_verdict(task, verdict) -> dict:
    """``verdict`` as {"reward": float, "failure", "metrics"}; VerdictError when it breaks the contract."""
    if not isinstance(verdict, dict) or "reward" not in verdict:
        raise VerdictError(f"score() must return a dict with a 'reward', got {type(verdict).__name__}")
    reward = verdict["reward"]
    if isinstance(reward, bool) or not isinstance(reward, numbers.Real):
        raise VerdictError(f"reward must be a real number, got {type(reward).__name__} {str(reward)[:40]!r}")
    reward = float(reward)
    if not math.isfinite(reward):
        raise VerdictError(f"reward must be finite, got {reward}")
    if task.reward_kind == "binary" and reward not in (0.0, 1.0, failure_reward(task)):
        raise VerdictError(f"a binary task's reward is 0 or 1 (or its FAILURE_REWARD), got {reward}")
    failure = verdict.get("failure")
    if failure is not None and failure not in known_failures(task):
        raise VerdictError(f"failure {str(failure)[:40]!r} is not a known kind (declare it in task.json failure_kinds)")
    metrics = verdict.get("metrics", {})
    if not isinstance(metrics, dict):
        raise VerdictError(f"metrics must be a dict, got {type(metrics).__name__}")
    return {"reward": reward, "failure": failure, "metrics": metrics}


SCORE_SECONDS = 300.0  # the default per-item deadline of score(); task.json "score_timeout_s" sets a task's own


def score_deadline(task) -> float:
    return float(task.spec.get("score_timeout_s", SCORE_SECONDS))


def score_answer(task, item: dict, answer, text: str) -> dict:
    """The checked verdict on one parsed answer (the record's reward, failure and metrics);
    ``parse_error`` when nothing parsed, ``verifier_error`` when the verifier raises or breaks the
    contract, ``timeout`` when it has not returned by the task's deadline (never fatal: the run goes
    on, the reason is in ``verifier_error``)."""
    if answer is None:
        return {"reward": failure_reward(task), "failure": "parse_error", "metrics": {}}
    try:
        with timing.phase("verify"):
            verdict = call_with_deadline(score_deadline(task), task.verifier.score, item, answer, text,
                                         name=f"{task.name} score()")
        return checked_verdict(task, verdict)
    except DeadlineExceeded as err:
        return {"reward": failure_reward(task), "failure": "timeout", "metrics": {}, "verifier_error": str(err)}
    except Exception as err:  # task code: anything it raises is its verdict's fault, not the run's
        reason = str(err) if isinstance(err, VerdictError) else repr(err)
        return {"reward": failure_reward(task), "failure": "verifier_error", "metrics": {},
                "verifier_error": reason[:2000]}
