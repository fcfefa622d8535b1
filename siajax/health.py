"""Generations that measured or changed nothing, named in the ledger and on the console.

A verifier that fails on most answers makes a split's score a sum of failure
rewards; a lever that could not run (a weights generation whose every step was
non-finite or without signal, or that did not fit the budget) spends a
generation on nothing. Such a generation is flagged in its ledger line
(``flags``) and on the console. After ``halt_after_flagged`` generations in a
row scored mostly by verifier errors the run stops instead of spending its
budget on scores that measure nothing; a resume then re-scores the state it
continues from (the fixed verifier's scores, not the broken one's).
"""

from __future__ import annotations


class RunHalted(RuntimeError):
    """The run stopped itself (its ledger is complete up to here and it can be resumed); says why."""


VERIFIER_ERROR_SHARE = 0.5  # of a split's scored samples, from which its score is not a measurement
VERIFIER_FLAGS = ("dev_verifier_errors", "test_verifier_errors")


def _verifier_flagged(entry: dict) -> bool:
    return bool(set(entry.get("flags", ())) & set(VERIFIER_FLAGS))


def generation_flags(entry: dict) -> list[str]:
    """The flags of a finished generation's ledger line: ``<split>_verifier_errors``, ``lever_failed``."""
    flags = [f"{split}_verifier_errors" for split in ("dev", "test")
             if (entry["after"].get(split) or {}).get("failure_rates", {}).get("verifier_error", 0.0)
             >= VERIFIER_ERROR_SHARE]
    return flags + (["lever_failed"] if entry.get("failed") else [])


def flag_message(flag: str, entry: dict) -> str:
    if flag == "lever_failed":
        return f"the {entry['decision']['lever']} lever changed nothing: {entry['failed']}"
    split = flag.split("_")[0]
    return (f"{VERIFIER_ERROR_SHARE:.0%} or more of the {split} answers were verifier errors: the {split} score "
            "is failure rewards, not a measurement (the records' verifier_error says why)")


def halt_reason(ledger: list[dict], limit: int) -> str | None:
    """Why the run stops now: its last ``limit`` generations were scored mostly by verifier errors
    (``limit`` 0: never). A lever that could not run is flagged, not halted on: the next generation
    may pull the other lever, and its scores still measure."""
    recent = ledger[-limit:] if limit else []
    if not recent or len(recent) < limit or not all(map(_verifier_flagged, recent)):
        return None
    span = f"generations {recent[0]['generation']}-{recent[-1]['generation']}" if limit > 1 else \
        f"generation {recent[0]['generation']}"
    return (f"{span} scored mostly verifier errors (the records' verifier_error says why): fix the task's "
            "verifier, then siajax resume RUN --update-task")


def needs_rescoring(ledger: list[dict]) -> bool:
    """Whether a resume must score its entering state again: the last line's scores were verifier errors."""
    return bool(ledger) and _verifier_flagged(ledger[-1])
