"""The one acceptance rule, for both levers: is a change better than the state it would replace?

A change (a harness edit or new weights) is judged on the same dev items, under
the same decoding key, as the current state re-scored that generation
(:func:`judge`); :func:`accept` then decides over all the changes tried in the
generation together, so trying more candidates does not make keeping a null
change likelier. Pure functions of scores and an :class:`AcceptanceRule`.
"""

from __future__ import annotations

import dataclasses

from siajax.agents.evaluation import Evaluation
from siajax.agents.harness_edits import FIXABLE_FAILURES
from siajax.agents.rules import AcceptanceRule
from siajax.stats import PairedComparison, holm, paired_bootstrap

FORMAT_SEED_OFFSET = 50_000  # the format comparison's bootstrap stream, apart from the score's


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A change against the current state on paired dev items: its scores, and (when the rule keeps
    format fixes) its share of items *without* a harness-fixable failure."""

    comparison: PairedComparison
    format_comparison: PairedComparison | None = None


@dataclasses.dataclass(frozen=True)
class Ruling:
    """What :func:`accept` made of a verdict: kept or not, by which test, and its rank among the kept."""

    keep: bool
    kept_by: str | None  # "score" | "format" | None
    rank: tuple  # higher wins: (beats on score, mean gain, format gain when kept by format)


def fixable_indicators(evaluation: Evaluation) -> list[float]:
    """Per item: 1.0 when its answer failed in a way the harness can fix (parse error, invalid label)."""
    return [float(f in FIXABLE_FAILURES) for f in evaluation.failures]


def judge(candidate: Evaluation, baseline_dev: dict, rule: AcceptanceRule, seed: int) -> Verdict:
    """Paired comparisons of a candidate's dev evaluation with the current state's dev record
    (``item_scores``, ``item_fixable``) on the same items."""
    comparison = _compare(candidate.scores, baseline_dev["item_scores"], rule, seed)
    baseline_fixable = baseline_dev.get("item_fixable")
    if not rule.keep_format_fixes or baseline_fixable is None:
        return Verdict(comparison)
    unfixable = [1.0 - f for f in fixable_indicators(candidate)]
    return Verdict(comparison, _compare(unfixable, [1.0 - f for f in baseline_fixable], rule,
                                        seed + FORMAT_SEED_OFFSET))


def accept(verdicts: list[Verdict], rule: AcceptanceRule) -> list[Ruling]:
    """A change is kept when it beats the current state beyond noise on dev, Holm-corrected over the
    changes tried this generation (family-wise level ``rule.alpha``); or, with
    ``rule.keep_format_fixes``, when it makes significantly fewer items fail in a harness-fixable
    way (same correction) without a lower mean score."""
    by_score = holm([v.comparison.p_not_better for v in verdicts], rule.alpha)
    by_format = holm([v.format_comparison.p_not_better if v.format_comparison else 1.0 for v in verdicts],
                     rule.alpha)
    rulings = []
    for verdict, score, fewer in zip(verdicts, by_score, by_format):
        gain = verdict.comparison.mean_difference
        kept_by = "score" if score else "format" if rule.keep_format_fixes and fewer and gain >= 0 else None
        fewer_gain = verdict.format_comparison.mean_difference if verdict.format_comparison else 0.0
        rulings.append(Ruling(kept_by is not None, kept_by,
                              (1 if score else 0, gain, fewer_gain if kept_by == "format" else 0.0)))
    return rulings


def judge_alone(candidate: Evaluation, baseline_dev: dict, rule: AcceptanceRule, seed: int) -> tuple[Verdict, Ruling]:
    """A single change (the weights of a generation): judged and ruled on as the only one tried."""
    verdict = judge(candidate, baseline_dev, rule, seed)
    return verdict, accept([verdict], rule)[0]


def _compare(after: list[float], before: list[float], rule: AcceptanceRule, seed: int) -> PairedComparison:
    return paired_bootstrap(after, before, alpha=rule.alpha, resamples=rule.bootstrap_resamples, seed=seed)
