"""Generations whose scores are not measurements, named in the ledger and on the console.

A verifier that fails on most answers makes a split's score a sum of failure
rewards. Such a generation is flagged in its ledger line (``flags``) and on the
console, and a run stops after ``halt_after_verifier_errors`` of them in a row
instead of spending its budget on them. (A weights generation that could not
teach, every step non-finite or without signal, is already ``failed`` in the
ledger, with the reason.)
"""

from __future__ import annotations

VERIFIER_ERROR_SHARE = 0.5  # of a split's scored samples, from which its score is not a measurement


def generation_flags(entry: dict) -> list[str]:
    """The flags of a finished generation's ledger line: ``<split>_verifier_errors``."""
    return [f"{split}_verifier_errors" for split in ("dev", "test")
            if (entry["after"].get(split) or {}).get("failure_rates", {}).get("verifier_error", 0.0)
            >= VERIFIER_ERROR_SHARE]


def flag_message(flag: str) -> str:
    split = flag.split("_")[0]
    return (f"{VERIFIER_ERROR_SHARE:.0%} or more of the {split} answers were verifier errors: the {split} score "
            "is failure rewards, not a measurement (the records' verifier_error says why)")


def halt_reason(ledger: list[dict], limit: int) -> str | None:
    """Why the run stops now: its last ``limit`` generations were all flagged."""
    recent = ledger[-limit:]
    if len(recent) < limit or not all(entry.get("flags") for entry in recent):
        return None
    return (f"generations {recent[0]['generation']}-{recent[-1]['generation']} scored mostly verifier errors "
            "(the records' verifier_error says why): fix the task's verifier, then resume the run")
