"""The SIA loop end to end: both levers on the bundled task, resume after SIGKILL, CLI report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from siajax.agents import DecisionRule
from siajax.config import RunConfig
from siajax.loop import run
from siajax.models import BUNDLED_TINY_MODEL
from siajax.rundir import TIMING_FIELDS, read_ledger
from siajax.report import report

# Seed 1 with the bundled model (2026-12-05, five generations, plateau window 1): dev 0 -> 0.625 (lenient
# parser) -> 0.81 (a second harness edit), a GRPO generation rolled back, then one kept at dev 1.0 / test 0.94.
SMALL = dict(task="digits", model=str(BUNDLED_TINY_MODEL), items_per_generation=4, updates_per_generation=2, seed=1)


def _digits_task_with(tmp_path, name: str, harness_patch: dict | None = None, verifier: str | None = None) -> Path:
    """A copy of the bundled digits task with its initial harness or verifier changed."""
    import shutil

    task_dir = tmp_path / name
    shutil.copytree(Path(__file__).resolve().parent.parent / "tasks" / "digits", task_dir)
    if harness_patch:
        harness = json.loads((task_dir / "harness.json").read_text())
        (task_dir / "harness.json").write_text(json.dumps({**harness, **harness_patch}))
    if verifier:
        (task_dir / "verifier.py").write_text(verifier)
    return task_dir


def _timeless(ledger):
    return [{k: v for k, v in entry.items() if k not in TIMING_FIELDS} for entry in ledger]


@pytest.mark.slow
def test_both_levers_run_scored_on_dev_and_test_every_generation(tmp_path):
    # One generation without a significant dev gain counts as a plateau here (rules are data).
    quick = DecisionRule(plateau_window=1)
    ledger = run(RunConfig(levers="both", generations=5, decision_rule=quick, **SMALL), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["decision_rule"]["plateau_window"] == 1
    levers = [e["decision"]["lever"] for e in ledger]
    assert "harness" in levers and "weights" in levers
    start = ledger[0]["before"]
    assert start["dev"]["items"] == 16 and start["test"]["items"] == 32  # every dev and test item, every time
    for previous, entry in zip(ledger, ledger[1:]):
        assert entry["before"] == previous["after"]  # each generation starts where the last one ended
    for entry in ledger:
        for split in ("dev", "test"):
            assert {"score", "pass_at_1", "samples", "tokens"} <= set(entry["after"][split])
        assert (entry["kept_by"] in ("score", "format")) == entry["kept"]  # why it was kept, in the ledger
        spend = entry["spend"]
        assert spend["spent_samples"] <= spend["budget_samples"]  # a hard budget, evaluation included
        assert spend["spent_samples"] == (spend["candidate_samples"] + spend["rollout_samples"]
                                          + spend["dev_eval_samples"] + spend["baseline_samples"])
        assert (spend["test_samples"] > 0) == entry["kept"]  # test scores only the states that are kept
        if entry["decision"]["lever"] == "weights" and not entry["failed"]:
            assert entry["logprob_mismatch"] <= 1e-4  # trained on the distribution that sampled
            assert spend["rollout_samples"] > 0 and spend["dev_eval_samples"] > 0
    # From generation 1 on, the entering state is re-scored under the generation's fresh dev key.
    assert ledger[0]["spend"]["baseline_samples"] == 0
    assert all(e["spend"]["baseline_samples"] > 0 for e in ledger[1:] if e["candidates"] or e["train"])
    assert ledger[-1]["after"]["dev"]["score"] > start["dev"]["score"]
    assert (tmp_path / "run" / "initial" / "eval_test.jsonl").exists()
    weights_gen = next(e for e in ledger if e["decision"]["lever"] == "weights")["generation"]
    gen = tmp_path / "run" / f"gen_{weights_gen:03d}"
    first_record = json.loads((gen / "trajectory.jsonl").read_text().splitlines()[0])
    assert {"messages", "text", "segments", "token_ids", "answer", "reward", "failure"} <= set(first_record)
    assert {"role", "token_ids", "logprobs"} <= set(first_record["segments"][0])
    png = report(tmp_path / "run")
    assert png.exists() and png.stat().st_size > 10_000


def test_harness_only_mode_keeps_only_edits_that_beat_dev(tmp_path):
    ledger = run(RunConfig(levers="harness", generations=2, **SMALL), tmp_path / "run")
    assert all(e["decision"]["lever"] == "harness" and e["checkpoint"] is None for e in ledger)
    assert ledger[0]["candidates"]
    for entry in ledger:
        # kept_by marks every candidate the acceptance rule would keep; one of them, the best ranked, is kept
        kept_by_rule = [c for c in entry["candidates"] if c["kept_by"] is not None]
        assert entry["kept"] == bool(kept_by_rule)
        assert sum(c["version"] == entry["next_harness"] for c in entry["candidates"]) == int(entry["kept"])
        assert (entry["next_harness"] != entry["harness_version"]) == entry["kept"]  # nothing else moves HEAD
        for candidate in entry["candidates"]:
            kept = candidate["version"] == entry["next_harness"]
            assert kept == (candidate["kept_by"] is not None and entry["accepted_patch"] == candidate["patch"])
            if kept:  # beat the entering state on dev, by the rule's test
                assert candidate["comparison"]["better"] or (candidate.get("format_comparison") or {}).get("better")
    # Rolled-back candidates stay in the store, with their parent.
    from siajax.harness import HarnessStore

    store = HarnessStore(tmp_path / "run" / "harness")
    rejected = [c for e in ledger for c in e["candidates"] if c["version"] != e["next_harness"]]
    for candidate in rejected:
        assert store.history(candidate["version"])[-1]["reason"].startswith("candidate")


def test_siajax_eval_rescores_a_saved_generation(tmp_path):
    from siajax.rundir import evaluate_saved

    ledger = run(RunConfig(levers="harness", generations=1, **SMALL), tmp_path / "run")
    again = evaluate_saved(tmp_path / "run", 0, "test")
    assert again["score"] == ledger[0]["after"]["test"]["score"] and again["items"] == 32
    assert evaluate_saved(tmp_path / "run", split="dev")["score"] == ledger[0]["after"]["dev"]["score"]


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
    ("both", 3, "gen_001/harness.json"),   # killed during gen 1's candidate evaluations
    ("weights", 2, "gen_001/decision.json"),  # killed during gen 1's training
], ids=["during-rollouts", "during-training"])
def test_sigkilled_run_resumes_to_the_same_ledger(tmp_path, levers, generations, marker):
    config = RunConfig(levers=levers, generations=generations, **SMALL)
    reference = run(config, tmp_path / "reference")
    run_dir = tmp_path / "killed"
    process = _cli("run", "--run-dir", str(run_dir), "--task", "digits", "--model", str(BUNDLED_TINY_MODEL),
                   "--levers", levers,
                   "--generations", str(generations), "--seed", str(SMALL["seed"]), "--items-per-generation", "4",
                   "--updates-per-generation", "2")
    _kill_when(process, run_dir / marker)
    assert len(read_ledger(run_dir)) < generations
    resumed = _cli("resume", str(run_dir))
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr.decode()[-3000:]
    assert _timeless(read_ledger(run_dir)) == _timeless(reference)


@pytest.mark.parametrize("change,message", [
    (dict(dev_items=3), "leaves 3 dev items; task 'digits' decides on no fewer than 4"),
    (dict(generation_budget=10), "cannot re-score and judge one change"),
])
def test_a_run_that_cannot_decide_is_refused_before_it_evaluates(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        run(RunConfig(levers="both", generations=1, **SMALL, **change), tmp_path / "run")
    assert not (tmp_path / "run" / "initial").exists()  # no evaluation was spent
    with pytest.raises(ValueError, match="eval_split"):
        RunConfig.from_dict({**RunConfig(**SMALL).to_dict(), "eval_split": "train"})  # decisions never read train


def test_a_loss_named_in_the_config_trains_and_tensorboard_gets_every_series(tmp_path, monkeypatch):
    """loss = "my_losses:reinforce" (a module of the user's): every update reports the loss's own metric
    and applies steps; a spec that does not resolve stops the run before the model loads. With
    trackers = "tensorboard" the event file, read back by TensorBoard's own reader, holds each update's
    metrics and the generation's scores and spend, equal to the ledger's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from siajax.rl.custom_loss import LossSpecError

    (tmp_path / "my_losses.py").write_text(
        "import jax.numpy as jnp\n\n"
        "def reinforce(policy, batch, cfg):\n"
        "    term = -jnp.sum(jnp.where(batch.mask, batch.advantages * policy.logprobs, 0.0)) / jnp.sum(batch.mask)\n"
        "    return term, {'reinforce_term': term}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    lenient = {"parser": {"kind": "regex", "pattern": "\\s*(\\d+)\\s*", "pick": "last", "format_hint": "42"}}
    base = dict(task=str(_digits_task_with(tmp_path, "lenient", harness_patch=lenient)), levers="weights",
                generations=1, items_per_generation=2, updates_per_generation=2, recipe="grpo",
                samples_per_prompt=4, dev_items=4, test_items=4, seed=1, trackers="tensorboard")
    with pytest.raises(LossSpecError, match="has no function nope"):
        run(RunConfig(**base, loss="my_losses:nope"), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    [entry] = run(RunConfig(**base, loss="my_losses:reinforce"), tmp_path / "run")
    updates = entry["train"]["updates"]
    assert all("reinforce_term" in u and u["applied_steps"] >= 1 and u["approx_kl"] >= 0 for u in updates), updates

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/reinforce_term", "train/grad_norm", "dev/score", "test/score", "spend/spent_samples"} <= tags
    logged = [e.value for e in events.Scalars("train/reinforce_term")]
    np.testing.assert_allclose(logged, [u["reinforce_term"] for u in updates], rtol=1e-6)
    assert [e.step for e in events.Scalars("train/reinforce_term")] == [0, 1]
    [score] = events.Scalars("test/score")
    assert score.step == 0 and score.value == pytest.approx(entry["after"]["test"]["score"])
    assert events.Tags()["tensors"] == ["decision/text_summary"]  # the decision, as text
    assert events.Scalars("time/train_step")[0].value == pytest.approx(entry["time"]["phases"]["train_step"])
    _check_time_accounting(entry)
    console = Console(record=True, width=250, force_terminal=False)
    report(tmp_path / "run", console=console)
    printed = console.export_text()
    assert "where the time went" in printed and f"{entry['time']['phases']['train_step']:.1f}" in printed


def _check_time_accounting(entry: dict) -> None:
    """The ledger's time breakdown of a weights generation that trained, saved and evaluated: every phase
    it went through has time, the phases add up to the wall time, and the token counts equal what the
    records of every draw hold (the spend, counted from the records' token ids)."""
    time = entry["time"]
    phases = time["phases"]
    assert all(phases[name] > 0 for name in ("prefill", "decode", "score", "train_step", "checkpoint")), time
    assert sum(phases.values()) == pytest.approx(entry["wall_seconds"], rel=0.05)
    assert time["stages"]["training"] > phases["train_step"] and time["stages"]["evaluation"] > 0
    drawn = [name for name in entry["spend"] if name.endswith("_tokens") and name != "train_tokens"]
    assert time["counts"]["generated_tokens"] == sum(entry["spend"][name] for name in drawn)  # from the records
    assert time["counts"]["train_tokens"] == entry["spend"]["train_tokens"]


def test_a_run_dir_refuses_a_different_config(tmp_path):
    run(RunConfig(levers="harness", generations=1, **SMALL), tmp_path / "run")
    with pytest.raises(ValueError, match="different config"):
        run(RunConfig(levers="weights", generations=1, **SMALL), tmp_path / "run")
    # where arrays live and how a step is split for memory may change (the same sums, laid out anew)
    again = run(RunConfig(levers="harness", generations=1, micro_batches=2, **SMALL), tmp_path / "run")
    assert len(again) == 1 and json.loads((tmp_path / "run" / "config.json").read_text())["micro_batches"] == 2


def test_trimul_task_runs_in_the_loop_on_cpu(tmp_path):
    ledger = run(RunConfig(task="trimul", model=str(BUNDLED_TINY_MODEL), levers="both", generations=2, items_per_generation=1,
                           updates_per_generation=1, seed=0), tmp_path / "run")
    assert len(ledger) == 2
    first = ledger[0]
    assert first["decision"]["lever"] == "harness"  # the tiny model writes no code block: a parse failure
    assert first["before"]["dev"]["failure_rates"].get("parse_error", 0) > 0.5


def test_rna_denoise_task_runs_in_the_loop_on_cpu(tmp_path):
    ledger = run(RunConfig(task="rna_denoise", model=str(BUNDLED_TINY_MODEL), levers="both", generations=1, items_per_generation=1,
                           updates_per_generation=1, seed=0), tmp_path / "run")
    assert len(ledger) == 1 and ledger[0]["decision"]["lever"] == "harness"


@pytest.mark.skipif(__import__("jax").device_count() < 8, reason="needs 8 devices (conftest sets XLA_FLAGS)")
def test_sharded_run_resumes_on_another_mesh(tmp_path):
    """Weights trained on a (2, 2, 2) mesh continue on (1, 8, 1) and on one device."""
    import jax
    import numpy as np

    from siajax.train.trainable import TrainablePolicy
    from siajax.parallel import path_string

    # A parser that finds the answer anywhere, so the tiny model has successes to learn from.
    lenient = {"parser": {"kind": "regex", "pattern": "\\s*(\\d+)\\s*", "pick": "last", "format_hint": "42"}}
    task = _digits_task_with(tmp_path, "lenient", harness_patch=lenient)
    config = RunConfig(levers="weights", generations=1, mesh="data=2,fsdp=2,tensor=2", **{**SMALL, "task": str(task)})
    ledger = run(config, tmp_path / "run")
    trained = ledger[0]["trained_state"]  # saved whether the weights were kept or rolled back
    assert trained == "gen_000/train_state" and ledger[0]["checkpoint"] in (trained, None)

    policies = []
    for mesh in ("fsdp=8", None):
        policy = TrainablePolicy(RunConfig(**{**config.__dict__, "mesh": mesh}))
        policy.load(tmp_path / "run" / trained)
        policies.append(policy)
    resharded, single = ({path_string(p): x for p, x in jax.tree_util.tree_leaves_with_path(pol.state.params)}
                         for pol in policies)
    for path, value in resharded.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(single[path]))
    assert resharded["lora/layers/attn/q_proj/lora_a"].sharding.spec[1] == "fsdp"
    # The step counter counts applied steps: not the skipped (non-finite) nor the signal-free ones.
    steps = sum(u["applied_steps"] for u in ledger[0]["train"]["updates"])
    assert int(policies[0].state.step) == int(policies[1].state.step) == steps

    config_path = tmp_path / "run" / "config.json"
    config_path.write_text(config_path.read_text().replace('"generations": 1', '"generations": 2'))
    moved = RunConfig(**{**json.loads(config_path.read_text()), "mesh": "fsdp=8"})
    ledger = run(moved, tmp_path / "run")  # `siajax resume RUN --mesh fsdp=8`
    assert len(ledger) == 2 and ledger[1]["decision"]["lever"] == "weights"
    assert json.loads(config_path.read_text())["mesh"] == "fsdp=8"


def test_a_weights_generation_that_applied_no_step_is_marked_failed(tmp_path):
    """Every reward 0: no group has a contrast, so every GRPO step is signal-free. Before, such a
    generation was evaluated, found "not worse" on dev and logged as kept."""
    task_dir = _digits_task_with(tmp_path, "never", verifier=(
        'def score(item, answer, text):\n    return {"reward": 0.0, "failure": "wrong_answer", "metrics": {}}\n'))
    ledger = run(RunConfig(**{**SMALL, "task": str(task_dir)}, levers="weights", recipe="grpo", generations=1),
                 tmp_path / "run")
    entry = ledger[0]
    assert entry["failed"].startswith("no optimiser step applied") and entry["train"]["applied_steps"] == 0
    assert entry["rolled_back"] and entry["comparison"] is None and entry["checkpoint"] is None
    assert entry["after"] == entry["before"]
    from siajax.report import verdict
    assert verdict(entry) == "failed"


def test_a_run_whose_sampler_retires_finished_rows_trains_on_what_it_drew(tmp_path, monkeypatch):
    """With ``retire_finished_rows`` every sampler call of the loop (evaluation, rollouts) lets rows that
    stopped leave the batch; the learner re-scores those samples to the sampler's log-probs."""
    import siajax.sampling as sampling

    batches, retiring = [], sampling._retiring_decode

    def spying(*args, **kwargs):
        buffers, sizes = retiring(*args, **kwargs)
        batches.append(sizes)
        return buffers, sizes

    monkeypatch.setattr(sampling, "_retiring_decode", spying)
    ledger = run(RunConfig(**SMALL, levers="weights", recipe="grpo", generations=1, retire_finished_rows=4),
                 tmp_path / "run")
    train = ledger[0]["train"]
    assert train["applied_steps"] > 0 and train["logprob_mismatch"] < 1e-4, train
    assert any(sizes[-1] < sizes[0] for sizes in batches), batches  # some call's batch shrank


def test_both_arms_spend_within_the_same_hard_budget(tmp_path):
    """SIA-H and SIA-W+H draw from one per-generation budget that counts candidates, rollouts and the
    dev evaluation of new weights. Before, SIA-H overspent (936-1,798 samples against 896): the search
    ran one more candidate while under budget and evaluation counted nowhere."""
    base = dict(SMALL, generations=2, decision_rule=DecisionRule(plateau_window=1))
    totals = {}
    for levers in ("harness", "both"):
        ledger = run(RunConfig(levers=levers, **base), tmp_path / levers)
        budgets = {e["spend"]["budget_samples"] for e in ledger}
        assert len(budgets) == 1
        for entry in ledger:
            assert entry["spend"]["spent_samples"] <= entry["spend"]["budget_samples"], entry["spend"]
        totals[levers] = (sum(e["spend"]["spent_samples"] for e in ledger), budgets.pop())
    assert totals["harness"][1] == totals["both"][1]  # the same budget for both arms
    assert all(spent <= 2 * budget for spent, budget in totals.values())


def test_a_run_keeps_its_task_and_eval_uses_that_copy_after_the_task_changes_or_moves(tmp_path):
    import shutil

    from siajax.rundir import evaluate_saved, task_digest
    from siajax.tasks import TaskChanged

    task_dir = _digits_task_with(tmp_path, "mine")
    run_dir = tmp_path / "run"
    run(RunConfig(**{**SMALL, "task": str(task_dir)}, levers="harness", generations=1, dev_items=4, test_items=4),
        run_dir)
    assert task_digest(run_dir / "task") == task_digest(task_dir)
    scored = evaluate_saved(run_dir, split="test")
    assert scored["score"] < 1.0
    (task_dir / "verifier.py").write_text('def score(item, answer, text):\n    return {"reward": 1.0}\n')
    with pytest.warns(TaskChanged, match="has changed since this run started"):
        assert evaluate_saved(run_dir, split="test")["score"] == scored["score"]  # the copy's verifier
    shutil.rmtree(task_dir)  # gone (or run from another directory): the copy is the task
    assert evaluate_saved(run_dir, split="test")["score"] == scored["score"]
