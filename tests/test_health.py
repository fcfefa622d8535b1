"""Flags on generations that measured or changed nothing, and when they halt a run."""

from __future__ import annotations

from siajax.health import flag_message, generation_flags, halt_reason, needs_rescoring


def entry(generation, verifier_errors=0.0, failed=None, lever="weights"):
    rates = {"verifier_error": verifier_errors} if verifier_errors else {}
    return {"generation": generation, "decision": {"lever": lever}, "failed": failed,
            "after": {"dev": {"failure_rates": rates}, "test": {"failure_rates": rates}}}


def flagged(*entries):
    return [{**e, "flags": generation_flags(e)} for e in entries]


def test_a_split_mostly_of_verifier_errors_and_a_lever_that_could_not_run_are_flagged():
    assert generation_flags(entry(0)) == []
    assert generation_flags(entry(0, verifier_errors=0.49)) == []
    assert generation_flags(entry(0, verifier_errors=0.5)) == ["dev_verifier_errors", "test_verifier_errors"]
    failed = entry(1, failed="no optimiser step applied (4 steps: 0 skipped, 4 no_signal, 0 kl_stop)")
    assert generation_flags(failed) == ["lever_failed"]
    assert flag_message("lever_failed", failed) == ("the weights lever changed nothing: no optimiser step applied "
                                                    "(4 steps: 0 skipped, 4 no_signal, 0 kl_stop)")


def test_the_run_halts_after_the_limit_of_verifier_error_generations_in_a_row_only():
    broken = flagged(entry(0, verifier_errors=1.0), entry(1), entry(2, verifier_errors=0.9))
    assert halt_reason(broken, 2) is None  # not in a row
    broken += flagged(entry(3, verifier_errors=0.6))
    assert halt_reason(broken, 2) == ("generations 2-3 scored mostly verifier errors (the records' verifier_error "
                                      "says why): fix the task's verifier, then siajax resume RUN --update-task")
    assert halt_reason(broken, 1).startswith("generation 3 scored mostly verifier errors")
    assert halt_reason(broken, 0) is None  # 0: never
    failing = flagged(entry(4, failed="no optimiser step applied"), entry(5, failed="budget"))
    assert halt_reason(failing, 2) is None  # a lever that could not run is flagged, not halted on
    assert needs_rescoring(broken) and not needs_rescoring(failing) and not needs_rescoring([])
