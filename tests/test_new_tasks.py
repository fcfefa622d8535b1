"""GPQA from user-supplied data (a synthetic fixture here), and every new task in the loop on CPU."""

from __future__ import annotations

import json

import pytest

from siajax.config import RunConfig
from siajax.models import BUNDLED_TINY_MODEL
from siajax.loop import run
from siajax.tasks import TaskError, resolve_task

FIXTURE = __import__("pathlib").Path(__file__).resolve().parent / "fixtures" / "gpqa_synthetic.csv"


@pytest.fixture
def gpqa(monkeypatch):
    monkeypatch.setenv("SIAJAX_GPQA", str(FIXTURE))
    return resolve_task("gpqa")


def test_gpqa_options_are_shuffled_deterministically_and_splits_are_disjoint(gpqa):
    splits = {name: gpqa.items(name) for name in ("train", "dev", "test")}
    assert sum(len(v) for v in splits.values()) == 40 and all(splits.values())
    assert not set.intersection(*({i["id"] for i in v} for v in splits.values()))
    for item in splits["test"]:
        a, b = [int(x) for x in item["question"].split("what is ")[1].rstrip("?").split(" + ")]
        assert item[item["answer"]] == str(a + b)  # the letter points at the correct option
    letters = [i["answer"] for v in splits.values() for i in v]
    assert len(set(letters)) == 4  # the right answer is not always in one place
    assert resolve_task("gpqa").items("test") == splits["test"]  # same order, same letters, every time


def test_gpqa_scoring_counts_outcomes_and_domains(gpqa):
    item = gpqa.items("test")[0]
    wrong = next(letter for letter in "ABCD" if letter != item["answer"])
    score = gpqa.verifier.score
    records = [score(item, item["answer"], ""), score(item, wrong, ""), score(item, "E", ""), score(item, None, "")]
    assert [r["failure"] for r in records] == [None, "wrong_answer", "invalid_label", "parse_error"]
    summary = gpqa.verifier.aggregate(records)
    assert summary["counts"] == {"correct": 1, "incorrect": 1, "invalid": 1, "missing": 1}
    assert summary["accuracy"] == 0.5 and summary["accuracy_all"] == 0.25
    assert summary["by_domain"] == {item["domain"]: 0.25}


def test_gpqa_json_in_the_official_shape_loads_too(tmp_path, monkeypatch):
    rows = [{"id": f"q{i}", "question": f"SYNTHETIC {i}: pick the vowel", "options": {"A": "b", "B": "a", "C": "c",
                                                                                    "D": "d"}, "answer": "B"}
            for i in range(80)]
    (tmp_path / "gpqa.json").write_text(json.dumps(rows))
    monkeypatch.setenv("SIAJAX_GPQA", str(tmp_path / "gpqa.json"))
    task = resolve_task("gpqa")
    items = [i for split in ("train", "dev", "test") for i in task.items(split)]
    assert len(items) == 80 and all(i[i["answer"]] == "a" for i in items)


def test_missing_gpqa_data_stops_with_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("SIAJAX_GPQA", str(tmp_path / "nope.csv"))
    with pytest.raises(TaskError, match="huggingface.co/datasets/Idavidrein/gpqa"):
        resolve_task("gpqa").items("test")
    with pytest.raises(TaskError, match="Idavidrein"):
        run(RunConfig(task="gpqa", model=str(BUNDLED_TINY_MODEL), generations=1), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing was written


@pytest.mark.parametrize("name", ["longcot_chess", "gpqa", "arithmetic"])
def test_new_tasks_run_in_the_loop_with_the_bundled_model(name, tmp_path, monkeypatch):
    monkeypatch.setenv("SIAJAX_GPQA", str(FIXTURE))
    ledger = run(RunConfig(task=name, model=str(BUNDLED_TINY_MODEL), levers="both", generations=1, items_per_generation=1, updates_per_generation=1,
                           samples_per_prompt=4, dev_items=4, test_items=2, seed=0), tmp_path / "run")
    assert len(ledger) == 1 and ledger[0]["after"]["test"]["items"] == 2
