"""The SIA loop end to end: both levers on the bundled task, resume after SIGKILL, CLI report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from siajax.loop import RunConfig, read_ledger, run
from siajax.report import report

SMALL = dict(task="digits", items_per_generation=4, updates_per_generation=2, seed=3)


def _timeless(ledger):
    return [{k: v for k, v in entry.items() if k != "wall_seconds"} for entry in ledger]


@pytest.mark.slow
def test_both_levers_run_and_the_score_moves(tmp_path):
    ledger = run(RunConfig(levers="both", generations=5, **SMALL), tmp_path / "run")
    levers = [e["decision"]["lever"] for e in ledger]
    assert "harness" in levers and "weights" in levers
    assert ledger[-1]["score"] > ledger[0]["score"]
    gen = tmp_path / "run" / "gen_000"
    for name in ("harness.json", "trajectory.jsonl", "scores.json", "decision.json"):
        assert (gen / name).exists()
    first_record = json.loads((gen / "trajectory.jsonl").read_text().splitlines()[0])
    assert {"messages", "text", "token_ids", "logprobs", "answer", "reward", "failure"} <= set(first_record)
    weights_gen = next(e for e in ledger if e["decision"]["lever"] == "weights")["generation"]
    assert (tmp_path / "run" / f"gen_{weights_gen:03d}" / "train_state").is_dir()
    png = report(tmp_path / "run")
    assert png.exists() and png.stat().st_size > 10_000


def test_harness_only_mode_never_touches_weights(tmp_path):
    ledger = run(RunConfig(levers="harness", generations=2, **SMALL), tmp_path / "run")
    assert all(e["decision"]["lever"] == "harness" and e["checkpoint"] is None for e in ledger)
    assert ledger[1]["harness_version"] != ledger[0]["harness_version"]  # the patch was applied


def _cli(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "siajax", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(process, path: Path, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"run exited before {path} appeared: {process.stderr.read().decode()[-2000:]}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("levers,generations,marker", [
    ("both", 3, "gen_001/harness.json"),   # killed during gen 1's rollouts
    ("weights", 2, "gen_001/scores.json"),  # killed during gen 1's training
], ids=["during-rollouts", "during-training"])
def test_sigkilled_run_resumes_to_the_same_ledger(tmp_path, levers, generations, marker):
    config = RunConfig(levers=levers, generations=generations, **SMALL)
    reference = run(config, tmp_path / "reference")
    run_dir = tmp_path / "killed"
    process = _cli("run", "--run-dir", str(run_dir), "--task", "digits", "--levers", levers,
                   "--generations", str(generations), "--seed", "3", "--items-per-generation", "4",
                   "--updates-per-generation", "2")
    _kill_when(process, run_dir / marker)
    assert len(read_ledger(run_dir)) < generations
    resumed = _cli("resume", str(run_dir))
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr.decode()[-3000:]
    assert _timeless(read_ledger(run_dir)) == _timeless(reference)


def test_a_run_dir_refuses_a_different_config(tmp_path):
    run(RunConfig(levers="harness", generations=1, **SMALL), tmp_path / "run")
    with pytest.raises(ValueError, match="different config"):
        run(RunConfig(levers="weights", generations=1, **SMALL), tmp_path / "run")


def test_trimul_task_runs_in_the_loop_on_cpu(tmp_path):
    ledger = run(RunConfig(task="trimul", levers="both", generations=2, items_per_generation=1,
                           updates_per_generation=1, seed=0), tmp_path / "run")
    assert len(ledger) == 2
    first = ledger[0]
    assert first["decision"]["lever"] == "harness"  # the tiny model writes no code block: a parse failure
    assert first["failure_rates"].get("parse_error", 0) > 0.5


def test_rna_denoise_task_runs_in_the_loop_on_cpu(tmp_path):
    ledger = run(RunConfig(task="rna_denoise", levers="both", generations=1, items_per_generation=1,
                           updates_per_generation=1, seed=0), tmp_path / "run")
    assert len(ledger) == 1 and ledger[0]["decision"]["lever"] == "harness"
