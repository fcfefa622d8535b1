"""The one acceptance rule (siajax.agents.acceptance): pure functions of paired dev scores."""

from __future__ import annotations

from siajax.agents.acceptance import accept, judge, judge_alone
from siajax.agents.evaluation import Evaluation
from siajax.agents.rules import AcceptanceRule
from siajax.stats import holm


def _evaluation(scores, failures=None):
    failures = [None] * len(scores) if failures is None else failures
    return Evaluation("dev", [str(i) for i in range(len(scores))], scores, scores, [], 0, 0, failures=failures)


def test_a_format_fix_is_kept_on_fewer_parse_errors_when_its_score_gain_is_within_noise():
    """From a 0% start a lenient parser may gain 2 items of 32 (not significant) while it turns 32
    parse errors into 4: the rule keeps it on the format comparison, unless the score dropped or the
    run's rules switch the format rule off."""
    n = 32
    current = {"dev": {"item_scores": [0.0] * n, "item_fixable": [1.0] * n}}
    lenient = _evaluation([1.0, 1.0] + [0.0] * (n - 2), [None, None] + ["wrong_answer"] * 26 + ["parse_error"] * 4)
    verdict, ruling = judge_alone(lenient, current["dev"], AcceptanceRule(), seed=0)
    assert not verdict.comparison.better and verdict.format_comparison.better and ruling.keep and \
        ruling.kept_by == "format"

    assert not judge_alone(lenient, current["dev"], AcceptanceRule(keep_format_fixes=False), seed=0)[1].keep

    worse = {"dev": {"item_scores": [1.0] * 3 + [0.0] * (n - 3), "item_fixable": [0.0] * 3 + [1.0] * (n - 3)}}
    fewer_errors_lower_score = _evaluation([0.0] * n, ["wrong_answer"] * n)
    assert not judge_alone(fewer_errors_lower_score, worse["dev"], AcceptanceRule(), seed=0)[1].keep

    better = _evaluation([1.0] * 12 + [0.0] * (n - 12), [None] * 12 + ["parse_error"] * (n - 12))
    verdict, ruling = judge_alone(better, current["dev"], AcceptanceRule(), seed=0)
    assert ruling.keep and ruling.kept_by == "score" and verdict.comparison.better and ruling.rank[0] == 1


def test_one_acceptance_rule_corrects_for_the_candidates_tried():
    """Holm over a generation's candidates: a gain that passes alone at alpha 0.1 (p ~ 0.05) is not kept
    when it is the best of four, while a clear gain still is; weights are judged by the same rule."""
    assert holm([0.01, 0.04, 0.03, 0.2], 0.1) == [True, True, True, False]  # 0.01<=0.025, 0.03<=0.033, 0.04<=0.05
    assert holm([0.05, 0.5, 0.6, 0.7], 0.1) == [False] * 4  # 0.05 > 0.1 / 4

    n = 32
    current = {"dev": {"item_scores": [0.0] * n}}
    rule = AcceptanceRule(keep_format_fixes=False)
    small, alone = judge_alone(_evaluation([1.0] * 3 + [0.0] * (n - 3)), current["dev"], rule, seed=0)
    assert 0.025 < small.comparison.p_not_better <= 0.1 and alone.keep  # alone: kept
    nulls = [judge(_evaluation([0.0] * n), current["dev"], rule, seed=s) for s in (1, 2, 3)]
    assert not any(r.keep for r in accept([small, *nulls], rule))  # best of four: not beyond noise
    clear = judge(_evaluation([1.0] * 8 + [0.0] * (n - 8)), current["dev"], rule, seed=4)
    assert [r.keep for r in accept([clear, *nulls], rule)] == [True, False, False, False]
