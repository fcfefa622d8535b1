"""Task protocol, Task Agent, Feedback-Agent rules and LLM-reply handling, Meta-Agent fallback."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from siajax.agents import (
    Completion, Decision, DecisionRule, DevSummary, EditGrid, llm_decide, run_items, sample_profile,
    validate_decision,
)
from siajax.agents.decide import decide
from siajax.agents.harness_edits import candidate_edits
from siajax.agents.meta import initial_harness
from siajax.harness import patch_harness, retry_feedback
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


@pytest.mark.parametrize("name", ["arithmetic", "arithmetic_tool", "lawbench", "longcot_chess", "rna_denoise", "trimul"])
def test_bundled_splits_share_no_item_and_no_leak_key(name):
    """Independent of the loader's check: every declared split read as stored, compared pairwise."""
    task = resolve_task(name)
    assert task.leak_key is not None
    splits = {split: [json.loads(line) for line in (task.root / path).read_text().splitlines() if line.strip()]
              for split, path in task.spec["splits"].items()}
    assert set(splits) == {"train", "dev", "test"} and len(splits["dev"]) >= task.min_dev_items
    for key in ("id", task.leak_key):
        values = {split: {json.dumps(item[key], sort_keys=True) for item in items} for split, items in splits.items()}
        assert not values["train"] & values["dev"] and not values["train"] & values["test"]
        assert not values["dev"] & values["test"]
    assert set(task.default_harness().slots) <= task.prompt_fields


def test_a_harness_may_not_show_the_reference_answer(digits):
    arithmetic = resolve_task("arithmetic")
    assert "answer" not in arithmetic.prompt_fields and "fact" not in arithmetic.prompt_fields
    harness, origin = initial_harness(arithmetic, ScriptedBackend(['{"template": "{question} ({answer})"}'] * 2),
                                      jax.random.key(0))
    assert harness == arithmetic.default_harness() and "invalid" in origin


def test_bundled_task_loads_and_splits_are_disjoint(digits):
    train, dev, test = (digits.items(s) for s in ("train", "dev", "test"))
    assert len(train) == 64 and len(dev) == 16 and len(test) == 32
    assert not {i["id"] for i in train} & {i["id"] for i in test}
    assert str(digits.private_dir) in str(digits.root / digits.spec["splits"]["test"])


def _append_line(target, source):
    with open(target, "a") as handle:
        handle.write(source.read_text().splitlines()[0] + "\n")


def _declare(root, **fields):
    spec = json.loads((root / "task.json").read_text())
    (root / "task.json").write_text(json.dumps({**spec, **fields}))


@pytest.mark.parametrize("breakage,message", [
    (lambda root: (root / "verifier.py").unlink(), "missing verifier.py"),
    (lambda root: shutil.rmtree(root / "data" / "private"), "missing data/private"),
    (lambda root: (root / "task.json").write_text("{oops"), "task.json does not parse"),
    (lambda root: (root / "harness.json").write_text('{"task": "x"}'), "harness.json is invalid"),
    (lambda root: (root / "verifier.py").write_text("x = 1\n"), "must define score"),
    (lambda root: _declare(root, tools="calculator"), "'tools' must be a list"),
    (lambda root: _declare(root, tools=["abacus"]), "tool 'abacus' is neither built in"),
    (lambda root: (root / "task.json").write_text(json.dumps(
        {"splits": {"test": "data/public/train.jsonl"}})), "test split must live under data/private"),
    (lambda root: _append_line(root / "data/private/test.jsonl", (root / "data/public/train.jsonl")),
     "'id' value.* in both train and test"),
    (lambda root: _append_line(root / "data/public/train.jsonl", (root / "data/public/train.jsonl")),
     "appears twice in its train split"),
    (lambda root: _declare(root, leak_key="question"), "'question' value.* in both train and dev"),
    (lambda root: _declare(root, min_dev_items=17), "dev split has 16 items, fewer than the 17"),
    (lambda root: _declare(root, splits={"train": "data/public/dev.jsonl", "test": "data/private/test.jsonl"}),
     "dev split has 3 items"),  # 16 train items, of which the hash carve holds out 3
])
def test_malformed_task_dirs_name_the_broken_piece(tmp_path, breakage, message):
    root = tmp_path / "digits"
    shutil.copytree(BUNDLED_TASKS / "digits", root)
    breakage(root)
    with pytest.raises(TaskError, match=message):
        load_task(root)


def test_task_agent_parses_verifies_and_retries_within_the_episode(digits):
    harness = patch_harness(digits.default_harness(), [
        {"op": "replace", "path": "/sampling/samples_per_prompt", "value": 2},
        {"op": "replace", "path": "/retry/max_attempts", "value": 2}])
    backend = ScriptedBackend(["42", "forty-two", "17", "  7 ", "9"])  # episode 1 fails to parse, its retry says 9
    items = digits.items("train")[:2]
    rollout = run_items(digits, harness, backend, items, jax.random.key(0))
    assert [r["first_reward"] for r in rollout.records] == [1.0, 0.0, 1.0, 1.0]
    assert [r["attempt"] for r in rollout.records] == [1, 2, 1, 1] and rollout.rewards == [1.0] * 4
    retried = rollout.records[1]
    assert retried["answer"] == "9" and retried["failure"] is None and retried["turns"] == 2
    # The retry is the next turn of the same conversation: the failed reply, then the harness's feedback.
    assert [len(call) for call in backend.calls] == [4, 1]
    assert backend.calls[1][0][-2:] == [{"role": "assistant", "content": "forty-two"},
                                         {"role": "user", "content": retry_feedback(harness, "parse_error")}]
    assert [s["role"] for s in retried["segments"]] == ["assistant", "user", "assistant"]
    profile = sample_profile(rollout.records)
    assert profile["retries"] == 1 and profile["binary_rewards"]
    assert rollout.replies == 5


def _summary(success, parse_error=0.0):
    return DevSummary(score=success, success_rate=success, pass_at_1=success,
                      failure_rates={"parse_error": parse_error} if parse_error else {}, items=32, samples=32,
                      binary_rewards=True, retries=0, examples={})


RULES = DecisionRule()
GRID = EditGrid()
BOTH = ("harness", "weights")


def heuristic_decision(summary, history, harness, task, levers, rule, *, group_size):
    """The built-in decision with the edit library's untried candidates, as the loop builds them."""
    return decide(summary, history, harness, task, levers, rule, group_size=group_size,
                  candidates=tuple(candidate_edits(harness, task, GRID)))


def llm_decision(backend, summary, history, harness, task, levers, rule, key, *, group_size):
    return llm_decide(backend, summary, history, harness, task, levers, rule, key, group_size=group_size,
                      candidates=tuple(candidate_edits(harness, task, GRID)))


def _entry(generation, lever, better):
    return {"generation": generation, "decision": {"lever": lever, "recipe": None, "candidates": []},
            "comparison": {"better": better}, "before": {"dev": {"score": 0.5}}, "after": {"dev": {"score": 0.5}}}


def test_feedback_rules_pick_lever_and_recipe_from_the_declared_reward_kind(digits):
    harness = digits.default_harness()
    decide = lambda summary, history=(), levers=BOTH, task=digits: heuristic_decision(  # noqa: E731
        summary, list(history), harness, task, levers, RULES, group_size=8)
    fix = decide(_summary(0.0, parse_error=1.0))
    assert fix.lever == "harness" and fix.candidates and fix.candidates[0].kind == "lenient_parser"
    assert decide(_summary(0.03)).recipe == "entropic"  # rare successes
    assert decide(_summary(0.4)).recipe == "grpo"  # digits declares binary rewards
    scalar = resolve_task("trimul")
    assert heuristic_decision(_summary(0.4), [], scalar.default_harness(), scalar, ("weights",), RULES,
                              group_size=8).recipe == "ppo_gae"
    assert decide(_summary(0.0, parse_error=1.0), levers=("weights",)).lever == "weights"
    stuck = [_entry(g, "weights", False) for g in range(2)]
    switched = decide(_summary(0.5, parse_error=0.2), stuck)
    assert switched.lever == "harness" and "plateau" in switched.rationale
    harness_stuck = [_entry(g, "harness", False) for g in range(2)]
    assert decide(_summary(0.5, parse_error=0.9), harness_stuck).lever == "weights"


def test_weights_decisions_need_groups_and_a_positive_temperature(digits):
    harness = digits.default_harness()
    single = heuristic_decision(_summary(0.4), [], harness, digits, BOTH, RULES, group_size=1)
    assert single.lever == "harness"  # GRPO needs >= 2 samples per prompt: search the harness instead
    assert heuristic_decision(_summary(0.03), [], harness, digits, ("weights",), RULES,
                              group_size=2).lever == "harness"  # entropic LOO needs 3
    greedy = patch_harness(harness, [{"op": "replace", "path": "/sampling/temperature", "value": 0.0}])
    blocked = heuristic_decision(_summary(0.4), [], greedy, digits, ("weights",), RULES, group_size=8)
    assert blocked.lever == "harness" and "temperature" in blocked.rationale
    fields = set(digits.items("train")[0])
    with pytest.raises(ValueError, match="at least 3 samples"):
        validate_decision({"lever": "weights", "recipe": "entropic"}, BOTH, harness, group_size=2,
                          item_fields=fields)
    with pytest.raises(ValueError, match="not fields of the task's items"):
        validate_decision({"lever": "harness", "patch": [{"op": "replace", "path": "/template",
                                                          "value": "{nonexistent}"}]}, BOTH, harness,
                          group_size=8, item_fields=fields)


def test_llm_decision_sees_the_history_is_validated_repaired_then_falls_back(digits):
    harness = digits.default_harness()
    history = [_entry(0, "harness", True)]
    args = (_summary(0.4), history, harness, digits, BOTH, RULES, jax.random.key(0))
    good = ScriptedBackend(['Sure: {"lever": "weights", "recipe": "ppo_gae", "patch": null, "rationale": "r"}'])
    assert llm_decision(good, *args, group_size=8) == Decision("weights", "ppo_gae", (), "r", "llm")
    assert '"significant": true' in good.calls[0][0][0]["content"]  # the prompt carries the history
    repaired = ScriptedBackend(['{"lever": "weights", "recipe": "sgd"}',
                                '{"lever": "harness", "patch": [{"op": "replace", "path": "/sampling/temperature", '
                                '"value": 0.5}], "rationale": "calmer"}'])
    decision = llm_decision(repaired, *args, group_size=8)
    assert decision.lever == "harness" and decision.candidates[0].patch[0]["value"] == 0.5
    assert len(repaired.calls) == 2 and "recipe" in repaired.calls[1][0][-1]["content"]
    broken = ScriptedBackend(["no json here", '{"lever": "harness", "patch": [{"op": "remove", "path": "/nope"}]}'])
    fallback = llm_decision(broken, *args, group_size=8)
    assert fallback.source == "fallback" and fallback.recipe == "grpo" and "invalid" in fallback.rationale


def test_generic_harness_edits_apply_to_any_task(digits):
    kinds = [c.kind for c in candidate_edits(digits.default_harness(), digits, GRID)]
    assert kinds[:2] == ["lenient_parser", "format_instruction"] and "few_shot" in kinds
    few_shot = next(c for c in candidate_edits(digits.default_harness(), digits, GRID) if c.kind == "few_shot")
    shots = few_shot.patch[0]["value"]
    pairs = {(item["question"], digits.verifier.demonstration(item)) for item in digits.items("train")}
    assert len(shots) == 3 and all((shot["input"], shot["output"]) in pairs for shot in shots)
    labelled = resolve_task("lawbench")
    assert "constrained_decoding" in [c.kind for c in candidate_edits(labelled.default_harness(), labelled, GRID)]
    tried = {patch_harness(digits.default_harness(), c.patch).version
             for c in candidate_edits(digits.default_harness(), digits, GRID)[:2]}
    assert [c.kind for c in candidate_edits(digits.default_harness(), digits, GRID, tried)][0] != "lenient_parser"


def test_paired_bootstrap_separates_a_real_gain_from_noise():
    from siajax.stats import paired_bootstrap

    rng = np.random.RandomState(0)
    baseline = rng.binomial(1, 0.5, 200).astype(float)
    better = np.maximum(baseline, rng.binomial(1, 0.3, 200))  # fixes ~30% of the failures
    assert paired_bootstrap(better, baseline).better
    shuffled = rng.permutation(baseline)  # same mean, different items: no gain
    same = paired_bootstrap(shuffled, baseline)
    assert not same.better and not same.worse or abs(same.mean_difference) > 0.05
    assert paired_bootstrap(baseline, better).worse
    small = paired_bootstrap([1, 1, 0, 1], [0, 1, 0, 1])  # one item better out of four: noise
    assert not small.better
    with pytest.raises(ValueError, match="equal"):
        paired_bootstrap([1, 0], [1])


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
                               '<tool_call>{"name": "rm_rf"}</tool_call>', "3", "0"])
    rollout = run_items(task, harness, backend, task.items("train")[:2], jax.random.key(0))
    first, second = rollout.records
    assert first["tool_calls"] == [{"name": "count", "arguments": {"things": [1, 2, 3]}, "result": "3"}]
    assert first["text"] == "3" and first["reward"] == 1.0 and first["turns"] == 2
    assert [len(call) for call in backend.calls] == [2, 2]  # each turn of both episodes in one call
    assert backend.calls[1][0][-2:] == [{"role": "assistant", "content": backend.calls[1][0][-2]["content"]},
                                         {"role": "tool", "content": "3"}]
    assert second["tool_calls"][0]["failure"] == "unknown_tool" and second["reward"] == 1.0
    assert backend.calls[1][1][-1] == {"role": "tool", "content": "error: unknown tool 'rm_rf'"}


def test_a_task_can_name_its_expected_recipe():
    task = resolve_task("rna_denoise")
    decide = lambda summary: heuristic_decision(summary, [], task.default_harness(), task, ("weights",), RULES,  # noqa: E731
                                                group_size=8)
    assert decide(_summary(0.5)).recipe == "grpo"
    assert decide(_summary(0.05)).recipe == "entropic"  # rare successes still go entropic


def test_add_tool_exposes_an_offered_tool_with_a_worked_call_and_remove_tool_undoes_it():
    """On arithmetic_tool: add_tool adds the calculator's spec and one worked example whose tool result
    is the tool's real output on a train item, and the task's sentence on when to use it; the rendered
    prompt then describes the tool and shows the call, the result and the answer as turns; remove_tool
    gives back the harness it started from."""
    from siajax.agents.harness_edits import candidate_edits
    from siajax.harness import render_messages
    from siajax.tools import calculator

    task = resolve_task("arithmetic_tool")
    start = task.default_harness()
    assert not start.tools and "add_tool" in [c.kind for c in candidate_edits(start, task, EditGrid())]
    added = patch_harness(start, next(c for c in candidate_edits(start, task, EditGrid()) if c.kind == "add_tool").patch)
    assert [t.name for t in added.tools] == ["calculator"]
    shot = added.few_shot[0]
    expression = json.loads(shot.call[len("<tool_call>"):-len("</tool_call>")])["arguments"]["expression"]
    assert shot.tool_result == calculator(expression) and shot.output == f"Answer: {shot.tool_result}"
    roles = [m["role"] for m in render_messages(added, question="What is 12 times 13?")]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert "calculator" in render_messages(added, question="?")[0]["content"]
    instruction = task.spec["harness_hints"]["tool_instructions"]["calculator"]
    assert added.system_prompt == f"{start.system_prompt} {instruction}"
    candidates = candidate_edits(added, task, EditGrid())
    assert "add_tool" not in [c.kind for c in candidates]
    assert patch_harness(added, next(c for c in candidates if c.kind == "remove_tool").patch) == start


def test_add_tool_without_a_task_instruction_says_when_to_use_the_tool_and_the_answer_format():
    from siajax.agents.harness_edits import tool_use_instruction

    task = resolve_task("arithmetic_tool")
    generic = dataclasses.replace(task, spec={k: v for k, v in task.spec.items() if k != "harness_hints"})
    text = tool_use_instruction(task.default_harness(), generic, "calculator")
    assert text == "Use the calculator tool when it can help; then give your final answer as: Answer: 1234."
