"""Task protocol, Task Agent, Feedback-Agent rules and LLM-reply handling, Meta-Agent fallback."""

from __future__ import annotations

import json
import shutil

import jax
import pytest

from siajax.agents import Completion, Decision, heuristic_decision, llm_decision, run_items, summarize
from siajax.agents.meta import initial_harness
from siajax.harness import patch_harness
from siajax.tasks import BUNDLED_TASKS, TaskError, load_task, resolve_task


class ScriptedBackend:
    """Replies with canned texts in order (an LLM stand-in that can be wrong on purpose)."""

    def __init__(self, replies):
        self.replies, self.calls = list(replies), []

    def complete(self, conversations, sampling, key=None):
        self.calls.append(conversations)
        return [[Completion(self.replies.pop(0) if self.replies else "") for _ in range(sampling.samples_per_prompt)]
                for _ in conversations]


@pytest.fixture
def digits():
    return resolve_task("digits")


def test_bundled_task_loads_and_splits_are_disjoint(digits):
    train, dev, test = (digits.items(s) for s in ("train", "dev", "test"))
    assert len(train) == 64 and len(dev) == 16 and len(test) == 32
    assert not {i["id"] for i in train} & {i["id"] for i in test}
    assert str(digits.private_dir) in str(digits.root / digits.spec["splits"]["test"])


@pytest.mark.parametrize("breakage,message", [
    (lambda root: (root / "verifier.py").unlink(), "missing verifier.py"),
    (lambda root: shutil.rmtree(root / "data" / "private"), "missing data/private"),
    (lambda root: (root / "task.json").write_text("{oops"), "task.json does not parse"),
    (lambda root: (root / "harness.json").write_text('{"task": "x"}'), "harness.json is invalid"),
    (lambda root: (root / "verifier.py").write_text("x = 1\n"), "must define score"),
    (lambda root: (root / "task.json").write_text(json.dumps(
        {"splits": {"test": "data/public/train.jsonl"}})), "test split must live under data/private"),
])
def test_malformed_task_dirs_name_the_broken_piece(tmp_path, breakage, message):
    root = tmp_path / "digits"
    shutil.copytree(BUNDLED_TASKS / "digits", root)
    breakage(root)
    with pytest.raises(TaskError, match=message):
        load_task(root)


def test_task_agent_parses_verifies_and_retries(digits):
    harness = patch_harness(digits.default_harness(), [
        {"op": "replace", "path": "/sampling/samples_per_prompt", "value": 2},
        {"op": "replace", "path": "/retry/max_attempts", "value": 2}])
    backend = ScriptedBackend(["42", "forty-two", "17", "  7 ", "9"])  # item 1 sample 1 fails, retry says 9
    items = digits.items("train")[:2]
    rollout = run_items(digits, harness, backend, items, jax.random.key(0))
    firsts = [r for r in rollout.records if r["attempt"] == 1]
    assert [r["reward"] for r in firsts] == [1.0, 0.0, 1.0, 1.0] and rollout.rewards == [1.0, 0.0, 1.0, 1.0]
    assert firsts[1]["failure"] == "parse_error"
    retry = [r for r in rollout.records if r["attempt"] == 2]
    assert len(retry) == 1 and retry[0]["answer"] == "9" and retry[0]["reward"] == 1.0
    summary = summarize(rollout.records)
    assert summary["score"] == 1.0 and summary["retries"] == 1  # the retry fixed the only failure


def _summary(success, parse_error=0.0, binary=True):
    return {"score": success, "success_rate": success, "failure_rates": {"parse_error": parse_error} if parse_error
            else {}, "binary_rewards": binary, "samples": 32, "retries": 0, "examples": {}}


def test_feedback_rules_pick_lever_and_recipe(digits):
    harness, hints = digits.default_harness(), digits.spec["harness_hints"]
    both = ("harness", "weights")
    fix = heuristic_decision(_summary(0.0, parse_error=1.0), [], harness, hints, both)
    assert fix.lever == "harness" and fix.patch[0]["path"] == "/parser/pattern"
    assert heuristic_decision(_summary(0.03), [], harness, hints, both).recipe == "entropic"
    assert heuristic_decision(_summary(0.4), [], harness, hints, both).recipe == "grpo"
    assert heuristic_decision(_summary(0.4, binary=False), [], harness, hints, both).recipe == "ppo_gae"
    assert heuristic_decision(_summary(0.0, parse_error=1.0), [], harness, hints, ("weights",)).lever == "weights"
    stuck = [{"generation": g, "score": 0.5, "decision": {"lever": "weights"}} for g in range(2)]
    switched = heuristic_decision(_summary(0.5, parse_error=0.2), stuck, harness, hints, both)
    assert switched.lever == "harness" and "plateau" in switched.rationale


def test_llm_decision_is_validated_repaired_then_falls_back(digits):
    harness, hints = digits.default_harness(), digits.spec["harness_hints"]
    args = (_summary(0.4), [], harness, hints, ("harness", "weights"), jax.random.key(0))
    good = ScriptedBackend(['Sure: {"lever": "weights", "recipe": "ppo_gae", "patch": null, "rationale": "r"}'])
    assert llm_decision(good, *args) == Decision("weights", "ppo_gae", None, "r", "llm")
    repaired = ScriptedBackend(['{"lever": "weights", "recipe": "sgd"}',
                                '{"lever": "harness", "patch": [{"op": "replace", "path": "/sampling/temperature", '
                                '"value": 0.5}], "rationale": "calmer"}'])
    decision = llm_decision(repaired, *args)
    assert decision.lever == "harness" and len(repaired.calls) == 2
    assert "recipe" in repaired.calls[1][0][-1]["content"]  # the repair names the problem
    broken = ScriptedBackend(["no json here", '{"lever": "harness", "patch": [{"op": "remove", "path": "/nope"}]}'])
    fallback = llm_decision(broken, *args)
    assert fallback.source == "fallback" and fallback.recipe == "grpo" and "invalid" in fallback.rationale


def test_meta_agent_uses_a_valid_llm_harness_or_falls_back(digits):
    default = digits.default_harness()
    proposal = json.loads(json.dumps(default.__class__.__dict__ and __import__("dataclasses").asdict(default)))
    proposal["system_prompt"] = "Answer with digits."
    harness, origin = initial_harness(digits, ScriptedBackend([json.dumps(proposal)]), jax.random.key(0))
    assert harness.system_prompt == "Answer with digits." and origin == "meta-agent (LLM)"
    harness, origin = initial_harness(digits, ScriptedBackend(["nope", '{"template": "{nonexistent}"}']),
                                      jax.random.key(0))
    assert harness == default and "invalid" in origin


def test_tool_calls_are_run_and_answered(digits, tmp_path):
    root = tmp_path / "digits"
    shutil.copytree(BUNDLED_TASKS / "digits", root)
    with open(root / "verifier.py", "a") as handle:
        handle.write("\n\ndef count(things):\n    return len(things)\n\n\nTOOLS = {'count': count}\n")
    task = load_task(root)
    harness = patch_harness(task.default_harness(), [
        {"op": "replace", "path": "/sampling/samples_per_prompt", "value": 1},
        {"op": "add", "path": "/tools/-", "value": {"name": "count", "description": "count a list",
                                                    "parameters": {"type": "object"}}}])
    backend = ScriptedBackend(['<tool_call>{"name": "count", "arguments": {"things": [1, 2, 3]}}</tool_call>',
                               '<tool_call>{"name": "rm_rf"}</tool_call>', "3", "0"])  # first turns batched
    rollout = run_items(task, harness, backend, task.items("train")[:2], jax.random.key(0))
    first, second = rollout.records
    assert first["tool_calls"] == [{"name": "count", "arguments": {"things": [1, 2, 3]}, "result": 3}]
    assert first["text"] == "3" and first["reward"] == 1.0
    assert backend.calls[1][0][-1] == {"role": "tool", "content": json.dumps(first["tool_calls"][0])}
    assert "unknown tool" in second["tool_calls"][0]["error"] and second["reward"] == 1.0


def test_a_task_can_name_its_expected_recipe():
    task = resolve_task("rna_denoise")
    hints = task.spec["harness_hints"]
    scalar = _summary(0.5, binary=False)
    assert heuristic_decision(scalar, [], task.default_harness(), hints, ("weights",)).recipe == "grpo"
    assert heuristic_decision(_summary(0.05, binary=False), [], task.default_harness(), hints,
                              ("weights",)).recipe == "entropic"  # rare successes still go entropic
