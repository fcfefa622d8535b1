"""LawBench 3-3: splits, whole-label parsing and both metrics, constrained decoding, the task in the loop."""

from __future__ import annotations

import sys

import jax
import pytest

from siajax.models import BUNDLED_TINY_MODEL, from_pretrained
from siajax.harness.constrained import label_automaton
from siajax.sampling import generate
from siajax.tasks import resolve_task

TASK = resolve_task("lawbench")
sys.path.insert(0, str(TASK.root))
from charges import LABELS, parse_charges, set_f1  # noqa: E402


def test_splits_are_disjoint_seeded_and_test_is_private():
    splits = {name: TASK.items(name) for name in ("train", "dev", "test")}
    # the paper's 5,332 train (dev carved, 18 whose facts are a dev/test case's dropped) / 913 test
    assert [len(v) for v in splits.values()] == [5038, 276, 913]
    for key in ("id", "facts"):
        values = [{i[key] for i in v} for v in splits.values()]
        assert not (values[0] & values[1] or values[0] & values[2] or values[1] & values[2])
    assert TASK.spec["splits"]["test"].startswith("data/private/")
    assert len(LABELS) == 191
    assert all(item["labels"][0] in LABELS for item in splits["test"])


@pytest.mark.parametrize("answer,labels,invalid", [
    ("盗窃", ["盗窃"], []),
    ("盗窃罪；诈骗", ["盗窃", "诈骗"], []),                      # full-width separator, trailing 罪
    (" 罪名：故意伤害 , 故意毁坏财物<eoa>后面的话", ["故意伤害", "故意毁坏财物"], []),
    ("[罪名]单位受贿<eoa>", ["单位受贿"], []),                   # no substring credit for 受贿
    ("[罪名][生产、销售]假药<eoa>", ["[生产、销售]假药"], []),      # 、 inside a bracketed label
    ("[窝藏、包庇];盗窃", ["[窝藏、包庇]", "盗窃"], []),
    ("盗窃、诈骗", ["盗窃", "诈骗"], []),                         # 、-joined labels
    ("杀人;盗窃;盗窃", ["盗窃"], ["杀人"]),                        # unknown label kept apart, repeats dropped
])
def test_answers_parse_to_whole_labels(answer, labels, invalid):
    assert parse_charges(answer) == (labels, invalid)


def test_verifier_reports_top1_and_set_f1_and_failure_kinds():
    item = {"labels": ["受贿", "诈骗"]}
    score = TASK.verifier.score
    assert score(item, "受贿;盗窃", "")["reward"] == 1.0
    wrong = score(item, "盗窃;诈骗", "")
    assert wrong["failure"] == "wrong_label" and wrong["metrics"]["set_f1"] == pytest.approx(0.5)
    assert score(item, "单位受贿", "")["failure"] == "wrong_label"  # the substring hole is closed
    assert score(item, "杀人", "")["failure"] == "invalid_label"
    assert score(item, None, "no answer")["failure"] == "parse_error"
    assert set_f1(["受贿", "诈骗"], ["诈骗", "受贿"]) == 1.0


@pytest.fixture(scope="module")
def tiny():
    return from_pretrained(BUNDLED_TINY_MODEL)


def test_constrained_decoding_only_writes_valid_label_answers(tiny):
    model, tokenizer = tiny
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    automaton = label_automaton(encode, LABELS, prefix="[罪名]", separator=";", terminator="<eoa>",
                                stop_token_id=tokenizer.eos_token_id)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "事实:被告人盗窃手机一部。"}],
                                           add_generation_prompt=True)["input_ids"]
    for temperature in (1.5, 0.0):
        result = generate(model, [prompt] * 12, key=jax.random.key(1), max_new_tokens=64, temperature=temperature,
                          stop_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                          constraint=automaton)
        completed = 0
        for row, length in zip(result.tokens, result.lengths):
            ids = [int(t) for t in row[: int(length)]]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            assert text.startswith("[罪名]")
            if ids[-1] == tokenizer.eos_token_id:  # a completed answer: whole labels, then the terminator
                completed += 1
                assert text.endswith("<eoa>")
                labels, invalid = parse_charges(text)
                assert labels and not invalid
            else:  # "label (; label)*" has no length bound: a row may meet the token limit mid-list
                assert len(ids) == 64
                labels, invalid = parse_charges(text.rsplit(";", 1)[0])  # every label before the cut is whole
                assert not invalid
        assert completed >= 6, f"only {completed} of 12 samples closed their answer at T={temperature}"


def test_unconstrained_tiny_model_fails_to_parse_and_feedback_turns_constraints_on(tmp_path):
    from siajax.config import RunConfig
    from siajax.loop import run

    ledger = run(RunConfig(task="lawbench", model=str(BUNDLED_TINY_MODEL), levers="both", generations=1, items_per_generation=2,
                           updates_per_generation=1, seed=0, dev_items=8, test_items=8), tmp_path / "run")
    decision = ledger[0]["decision"]
    assert decision["lever"] == "harness" and decision["candidates"][0]["patch"] == [
        {"op": "replace", "path": "/parser/constrained", "value": True}]
