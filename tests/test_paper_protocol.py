"""The experiment protocol end to end: an LLM Feedback-Agent behind a real HTTP endpoint, and the
SIA-H vs SIA-W+H comparison script at reduced size."""

from __future__ import annotations

import json
import shutil

import pytest
from scripted_openai import ScriptedOpenAI, is_feedback, scripted_feedback

from siajax.config import RunConfig
from siajax.loop import run
from siajax.models import BUNDLED_TINY_MODEL

SMALL = dict(task="digits", model=str(BUNDLED_TINY_MODEL), items_per_generation=4, updates_per_generation=2, seed=1)  # see tests/test_loop.py


def _patch(*ops, why="because"):
    return json.dumps({"lever": "harness", "patch": list(ops), "recipe": None, "rationale": why})


def test_llm_feedback_agent_good_bad_and_slot_breaking_patches(tmp_path):
    lenient = {"op": "replace", "path": "/parser/pattern", "value": "(\\d+)"}
    server = ScriptedOpenAI(scripted_feedback([
        _patch({"op": "replace", "path": "/template", "value": "{nonexistent}"}),  # breaks a slot: repaired
        _patch(lenient, why="accept digits anywhere"),                              # good: kept
        _patch({"op": "replace", "path": "/parser/pattern", "value": "^NEVER$"}),   # valid but harmful: rolled back
        "I think you should try harder.", '{"lever": "harness", "patch": [{"op": "remove", "path": "/nope"}]}',
    ]))
    try:
        ledger = run(RunConfig(levers="harness", generations=3, feedback="llm", feedback_model="scripted",
                               feedback_base_url=server.url, **SMALL), tmp_path / "run")
    finally:
        server.close()
    first, second, third = ledger
    assert first["decision"]["source"] == "llm" and first["accepted_patch"] == [lenient]
    assert first["after"]["dev"]["score"] > first["before"]["dev"]["score"]
    repair = [m for m in server.conversations if len(m) > 1 and is_feedback(m)][0]
    assert "not fields of the task's items" in repair[-1]["content"]
    assert second["decision"]["source"] == "llm" and second["rolled_back"]
    assert second["next_harness"] == first["next_harness"]
    assert third["decision"]["source"] == "fallback" and "invalid" in third["decision"]["rationale"]
    # The Feedback-Agent saw the history: generation 0's kept patch is in generation 1's prompt.
    feedback_prompts = [m[0]["content"] for m in server.conversations if is_feedback(m)]
    assert '"significant": true' in feedback_prompts[2]


@pytest.mark.slow
def test_compare_levers_writes_table_plot_and_summary(tmp_path):
    from experiments.paper.compare_levers import RESULTS, main, results_rows

    recorded = RESULTS.read_text()

    args = ["--task", "digits", "--model", str(BUNDLED_TINY_MODEL), "--seeds", "0", "1", "--generations", "2",
            "--items-per-generation", "4", "--updates-per-generation", "2", "--out", str(tmp_path / "out"),
            "--keep", str(tmp_path / "kept")]
    summary = main(args)
    out = tmp_path / "out" / "digits"
    assert (out / "test_by_generation.png").stat().st_size > 10_000
    table = (out / "table.md").read_text()
    assert "SIA-H" in table and "SIA-W+H" in table
    assert set(summary) == {"SIA-H", "SIA-W+H"}
    assert all(len(row["test_final_per_seed"]) == 2 for row in summary.values())
    assert summary["SIA-H"]["weights_generations"] == [0, 0]
    assert RESULTS.read_text() == recorded  # only --record touches the tracked results
    rows = results_rows(summary, "digits", "tiny-llama", 2).splitlines()
    assert len(rows) == 3 and "W+H - H (paired t)" in rows[2] and "cludes 0" in rows[2]
    spent = summary["SIA-H"]["samples_spent"]
    assert rows[0].endswith(f"| {spent[0]}, {spent[1]} |")

    # finished runs are kept (config + ledger) and a second comparison reuses them without running
    assert sorted(p.name for p in (tmp_path / "kept" / "digits").iterdir()) == ["both-s0", "both-s1",
                                                                                "harness-s0", "harness-s1"]
    shutil.rmtree(out / "runs")
    assert main(args) == summary and not (out / "runs").exists()
    # a kept run of another config (here: 1 generation) is refused before anything runs
    with pytest.raises(ValueError, match="holds a run of another config"):
        main([*args, "--seeds", "0", "--generations", "1"])
    assert not (out / "runs").exists()


def _point(score, tool_use=None):
    return {"score": score, **({"tool_use": tool_use} if tool_use is not None else {})}


def test_tool_use_table_averages_each_generation_over_seeds_and_plots_a_second_panel(tmp_path):
    from experiments.paper.compare_levers import plot, tool_use_table

    def ledger(calling_after):  # start without tools, then one generation whose harness exposes one
        use = {"episodes_calling": calling_after, "calls_well_formed": 0.5, "answers_with_result": calling_after / 2}
        return [{"before": {"test": _point(0.0)}, "after": {"test": _point(0.25, use)}}]

    results = {"SIA-H": [ledger(0.2), ledger(0.4)], "SIA-W+H": [ledger(1.0), ledger(0.6)]}
    rows = tool_use_table(results, "arithmetic_tool").splitlines()[2:]
    assert rows == ["| arithmetic_tool | SIA-H | start | 0.000 | 0.000 | 0.000 |",
                    "| arithmetic_tool | SIA-H | 0 | 0.300 | 0.500 | 0.150 |",
                    "| arithmetic_tool | SIA-W+H | start | 0.000 | 0.000 | 0.000 |",
                    "| arithmetic_tool | SIA-W+H | 0 | 0.800 | 0.500 | 0.400 |"]
    without_tools = {arm: [[{"before": {"test": _point(0.0)}, "after": {"test": _point(0.1)}}]] for arm in results}
    assert tool_use_table(without_tools, "digits") == ""
    one_panel = plot(without_tools, tmp_path / "one.png", "digits").stat().st_size
    two_panels = plot(results, tmp_path / "two.png", "arithmetic_tool").stat().st_size
    assert two_panels > one_panel > 10_000
