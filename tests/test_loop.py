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


@pytest.mark.skipif(__import__("jax").device_count() < 8, reason="needs 8 devices (conftest sets XLA_FLAGS)")
def test_sharded_run_resumes_on_another_mesh(tmp_path):
    """Weights trained on a (2, 2, 2) mesh continue on (1, 8, 1) and on one device."""
    import jax
    import numpy as np

    from siajax.loop import Policy
    from siajax.parallel import path_string

    config = RunConfig(levers="weights", generations=1, mesh="data=2,fsdp=2,tensor=2", **SMALL)
    ledger = run(config, tmp_path / "run")
    assert ledger[0]["checkpoint"] == "gen_000/train_state"

    policies = []
    for mesh in ("fsdp=8", None):
        policy = Policy(RunConfig(**{**config.__dict__, "mesh": mesh}))
        policy.restore(tmp_path / "run", ledger)
        policies.append(policy)
    resharded, single = ({path_string(p): x for p, x in jax.tree_util.tree_leaves_with_path(pol.state.params)}
                         for pol in policies)
    for path, value in resharded.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(single[path]))
    assert resharded["lora/layers/0/attn/q_proj/lora_a"].sharding.spec[0] == "fsdp"
    assert int(policies[0].state.step) == SMALL["updates_per_generation"]

    config_path = tmp_path / "run" / "config.json"
    config_path.write_text(config_path.read_text().replace('"generations": 1', '"generations": 2'))
    moved = RunConfig(**{**json.loads(config_path.read_text()), "mesh": "fsdp=8"})
    ledger = run(moved, tmp_path / "run")  # `siajax resume RUN --mesh fsdp=8`
    assert len(ledger) == 2 and ledger[1]["decision"]["lever"] == "weights"
    assert json.loads(config_path.read_text())["mesh"] == "fsdp=8"
