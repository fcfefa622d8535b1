"""Verifier verdicts are checked before anything trusts them: a verdict outside the contract is a
verifier_error with the task's failure reward, and an unparsed answer is a parse_error whatever the
verifier says."""

from __future__ import annotations

import json
import math
import shutil
import types

import jax
import numpy as np
import pytest

from siajax.tasks import TaskError, load_task, resolve_task
from siajax.verdicts import checked_verdict, score_answer


def fake_task(score, *, reward="binary", failure_reward=None, failure_kinds=(), **spec):
    verifier = types.SimpleNamespace(score=score)
    if failure_reward is not None:
        verifier.FAILURE_REWARD = failure_reward
    return types.SimpleNamespace(name="fake", verifier=verifier, reward_kind=reward,
                                 spec={"failure_kinds": list(failure_kinds), **spec})


@pytest.mark.parametrize("verdict,reason", [
    ({"reward": "1.0"}, "real number, got str"),
    ({"reward": True}, "real number, got bool"),
    ({"reward": None}, "real number, got NoneType"),
    ({"reward": math.nan}, "finite"),
    ({"reward": 1e30}, "binary task's reward is 0 or 1"),
    ({"reward": 0.5}, "binary task's reward is 0 or 1"),
    ({"reward": 1.0, "failure": "bad_luck"}, "not a known kind"),
    ({"reward": 1.0, "metrics": [1, 2]}, "metrics must be a dict"),
    ({"score": 1.0}, "with a 'reward'"),
    (None, "with a 'reward', got NoneType"),
])
def test_a_verdict_outside_the_contract_fails_closed_with_its_reason(verdict, reason):
    task = fake_task(lambda item, answer, text: verdict, failure_reward=-1.0)
    scored = score_answer(task, {"id": "x"}, "42", "Answer: 42")
    assert scored["reward"] == -1.0 and scored["failure"] == "verifier_error"
    assert reason in scored["verifier_error"]


def test_a_verifier_that_raises_is_a_verifier_error_not_a_crash():
    def score(item, answer, text):
        raise KeyError("answer")

    scored = score_answer(fake_task(score), {"id": "x"}, "42", "42")
    assert scored == {"reward": 0.0, "failure": "verifier_error", "metrics": {}, "verifier_error": "KeyError('answer')"}


def test_a_verifier_that_hangs_is_a_timeout_at_the_tasks_deadline_and_the_run_goes_on():
    import threading

    released, finished = threading.Event(), threading.Event()

    def hangs(item, answer, text):
        released.wait(30)
        finished.set()
        return {"reward": 1.0}

    task = fake_task(hangs, failure_reward=-1.0, score_timeout_s=0.2)
    verdict = score_answer(task, {"id": "a"}, "42", "42")
    assert not finished.is_set()  # answered while the verifier was still stuck
    assert verdict == {"reward": -1.0, "failure": "timeout", "metrics": {},
                       "verifier_error": "fake score() did not finish within 0.2 s"}
    released.set()


def test_a_verifier_that_calls_sys_exit_is_a_verifier_error_not_the_end_of_the_run():
    import sys

    verdict = score_answer(fake_task(lambda item, answer, text: sys.exit(3)), {"id": "a"}, "42", "42")
    assert verdict["failure"] == "verifier_error" and "SystemExit(3)" in verdict["verifier_error"]


def test_valid_verdicts_pass_as_floats_in_the_tasks_range():
    assert checked_verdict(fake_task(None), {"reward": np.int64(1)}) == {"reward": 1.0, "failure": None, "metrics": {}}
    assert checked_verdict(fake_task(None, failure_reward=-1.0), {"reward": -1, "failure": "crash"})["reward"] == -1.0
    scalar = fake_task(None, reward="scalar")
    assert checked_verdict(scalar, {"reward": np.float32(-3.25), "metrics": {"t": 1}})["reward"] == -3.25
    with pytest.raises(ValueError, match="finite"):
        checked_verdict(scalar, {"reward": -math.inf})
    declared = fake_task(None, failure_kinds=("illegal_move",))
    assert checked_verdict(declared, {"reward": 0.0, "failure": "illegal_move"})["failure"] == "illegal_move"


def test_an_unparsed_answer_is_a_parse_error_without_asking_the_verifier():
    def score(item, answer, text):
        raise AssertionError("a verifier is not asked about an answer that did not parse")

    assert score_answer(fake_task(score, failure_reward=-1.0), {"id": "x"}, None, "no answer here") == {
        "reward": -1.0, "failure": "parse_error", "metrics": {}}


def test_a_task_whose_verifier_returns_strings_scores_nothing_in_a_real_rollout(tmp_path):
    """arithmetic with a verifier that answers "1.0" for everything: every record is a verifier_error
    with reward 0 (it used to score 1.000 on dev and test)."""
    from siajax.agents import LocalPolicyBackend, run_items
    from siajax.harness import patch_harness
    from siajax.models import BUNDLED_TINY_MODEL, from_pretrained

    root = tmp_path / "lenient"
    shutil.copytree(resolve_task("arithmetic").root, root)
    (root / "verifier.py").write_text("def score(item, answer, text):\n    return {'reward': '1.0', 'failure': None}\n")
    task = load_task(root)
    harness = patch_harness(task.default_harness(), [
        {"op": "replace", "path": "/parser", "value": {"kind": "raw"}},
        {"op": "replace", "path": "/sampling/max_new_tokens", "value": 4}])
    rollout = run_items(task, harness, LocalPolicyBackend(*from_pretrained(BUNDLED_TINY_MODEL)),
                        task.items("train")[:2], jax.random.key(0))
    assert rollout.records and all(r["failure"] in ("verifier_error", "parse_error") for r in rollout.records)
    assert any(r["failure"] == "verifier_error" for r in rollout.records)
    assert not np.asarray(rollout.rewards).any()


def test_task_json_failure_kinds_must_be_names(tmp_path):
    root = tmp_path / "kinds"
    shutil.copytree(resolve_task("digits").root, root)
    spec = json.loads((root / "task.json").read_text())
    (root / "task.json").write_text(json.dumps({**spec, "failure_kinds": "illegal_move"}))
    with pytest.raises(TaskError, match="failure_kinds must be a list of snake_case names"):
        load_task(root)


def test_a_run_whose_verifier_keeps_failing_is_flagged_then_halts_and_resumes_once_fixed(tmp_path):
    """Generations scored mostly by verifier errors are flagged in the ledger; after
    halt_after_verifier_errors of them in a row the run stops with one line, its ledger intact, and a
    resume with the verifier fixed goes on (and is not flagged)."""
    from siajax.config import RunConfig
    from siajax.health import RunHalted
    from siajax.loop import resume, run
    from siajax.models import BUNDLED_TINY_MODEL
    from siajax.rundir import load_config, read_ledger, replace_task_copy

    root = tmp_path / "broken"
    shutil.copytree(resolve_task("digits").root, root)
    harness = json.loads((root / "harness.json").read_text())
    (root / "harness.json").write_text(json.dumps({**harness, "parser": {"kind": "raw"}}))  # every reply parses
    fixed = (root / "verifier.py").read_text()
    (root / "verifier.py").write_text("def score(item, answer, text):\n    raise RuntimeError('lost the key')\n")
    config = RunConfig(task=str(root), model=str(BUNDLED_TINY_MODEL), levers="harness", generations=3, seed=1,
                       items_per_generation=4, dev_items=4, test_items=4, halt_after_flagged=2)
    with pytest.raises(RunHalted, match="generations 0-1 scored mostly verifier errors"):
        run(config, tmp_path / "run")
    ledger = read_ledger(tmp_path / "run")
    assert [e["flags"] for e in ledger] == [["dev_verifier_errors", "test_verifier_errors"]] * 2
    (root / "verifier.py").write_text(fixed)
    replace_task_copy(load_config(tmp_path / "run"), tmp_path / "run")  # siajax resume RUN --update-task
    ledger = resume(tmp_path / "run")
    assert len(ledger) == 3 and ledger[-1]["flags"] == []
    assert ledger[-1]["before"]["dev"]["failure_rates"].get("verifier_error", 0.0) == 0.0  # the state scored again
    kept_from = tmp_path / "run" / ledger[1]["eval_records_from"]
    assert all(r["failure"] == "verifier_error"
               for r in map(json.loads, (kept_from / "before_rescoring" / "eval_dev.jsonl").read_text().splitlines()))
