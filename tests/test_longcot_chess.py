"""LongCoT chess verifier: every template with right, wrong, illegal, malformed and unreadable answers."""

from __future__ import annotations

import json
import sys

import chess
import pytest

from siajax.tasks import resolve_task

TASK = resolve_task("longcot_chess")
sys.path.insert(0, str(TASK.root))
from make_splits import PAPER_TEST_IDS, load  # noqa: E402

ALL = {item["template"]: item for difficulty in ("easy", "medium", "hard") for item in load(difficulty)}


def verdict(item, text):
    result = TASK.verifier.score(item, None, text)
    return result["failure"] or "right"


def test_the_default_test_split_is_the_papers_50_items():
    test = TASK.items("test")
    assert len(test) == 50 and {i["question_id"] for i in test} == PAPER_TEST_IDS
    assert {i["template"] for i in test} == {"best_3_moves", "knight_path"}
    train_dev = {i["id"] for i in TASK.items("train") + TASK.items("dev")}
    assert not train_dev & {i["id"] for i in test}
    assert TASK.spec["splits"]["test"].startswith("data/private/")


@pytest.mark.parametrize("template", ["piece_combinations", "knight_path", "knight_game", "max_rooks",
                                      "knight_path_enemy"])
def test_integer_templates(template):
    item = ALL[template]
    answer = int(str(item["answer"]))
    assert verdict(item, f"Let me count... solution = {answer}") == "right"
    assert verdict(item, f"First 12, then 7; the answer is {answer}") == "right"  # the last integer, no marker
    assert verdict(item, f"solution = {answer + 1}") == "wrong_answer"
    assert verdict(item, "I cannot tell.") == "parse_error"


def test_best_3_moves_in_order_suffixes_stripped():
    item = next(i for i in TASK.items("test") if i["template"] == "best_3_moves")
    a, b, c = item["answer"]
    assert verdict(item, f"solution = [{a}+, {b}, {c}#]") == "right"
    assert verdict(item, f"solution = 1. {a} {b} 2. {c}") == "right"
    assert verdict(item, f"... the line [{a}, {b}, {c}] wins") == "right"  # the last triple, no marker
    reordered = TASK.verifier.score(item, None, f"solution = [{c}, {b}, {a}]")
    assert reordered["failure"] == "wrong_answer" and reordered["metrics"]["loose"] == 1.0  # the loose scorer
    assert verdict(item, "solution = [Zz9, Qq0, hello]") == "parse_error"


def test_best_move():
    item = ALL["best_move"]
    assert verdict(item, f"solution = {item['answer']}+!") == "right"
    assert verdict(item, f"I like Ke2 but solution = {item['answer']}") == "right"
    assert item["answer"] != "a3" and verdict(item, "solution = a3") == "wrong_answer"
    assert verdict(item, "no move here") == "parse_error"


def test_uci_to_fen_compares_piece_placement():
    item = ALL["uci_to_fen"]
    placement, *_ = item["answer"].split()
    assert verdict(item, f"solution = {item['answer']}") == "right"
    assert verdict(item, f"solution = {placement} b - - 0 1") == "right"  # other counters: placement decides
    board = chess.Board(item["answer"])
    board.remove_piece_at(next(iter(board.piece_map())))
    assert verdict(item, f"solution = {board.fen()}") == "wrong_answer"
    assert verdict(item, "solution = not/a/fen") == "parse_error"


def test_forced_checkmate_needs_the_exact_move_dict():
    item = ALL["forced_checkmate"]
    assert verdict(item, "solution = " + json.dumps(item["answer"])) == "right"
    wrong = {**item["answer"], "1": "a3 a6"}
    assert verdict(item, "solution = " + json.dumps(wrong)) == "wrong_answer"
    assert verdict(item, "solution = {'1': 'Qg8+ Nxg8', broken") == "parse_error"


def _reconstruct_item():
    board = chess.Board()
    line = ["e4", "e5", "Nf3", "Nc6", "Bb5", "a6", "Ba4", "Nf6"]
    for move in line:
        board.push_san(move)
    return {"template": "reconstruct_moves", "answer": "",
            "problem": {"final_fen": board.fen(), "forced_moves": {"2": "Nf3 Nc6", "4": "Ba4 Nf6"}}}


def test_reconstruct_moves_is_replayed_with_forced_moves():
    item = _reconstruct_item()
    good = {"1": "e4 e5", "2": "Nf3 Nc6", "3": "Bb5 a6", "4": "Ba4 Nf6"}
    assert verdict(item, "solution = " + json.dumps(good)) == "right"
    assert verdict(item, f"solution = {good!r}") == "right"  # a Python literal dict is read too
    illegal = {**good, "3": "Bb5 Ke7"}
    assert verdict(item, "solution = " + json.dumps(illegal)) == "wrong_answer"
    unforced = {"1": "e4 e5", "2": "Nf3 Nc6", "3": "Bb5 a6", "4": "Bc4 Nf6"}
    assert verdict(item, "solution = " + json.dumps(unforced)) == "wrong_answer"
    elsewhere = {"1": "e4 e5", "2": "Nf3 Nc6", "3": "Bb5 a6", "4": "Ba4 Nf6", "5": "O-O Be7"}
    assert verdict(item, "solution = " + json.dumps(elsewhere)) == "wrong_answer"  # another final position
    assert verdict(item, "solution = 1. e4 e5 2. Nf3") == "parse_error"


def test_aggregate_reports_answered_overall_and_loose_accuracy():
    item = next(i for i in TASK.items("test") if i["template"] == "best_3_moves")
    a, b, c = item["answer"]
    records = [TASK.verifier.score(item, None, text) for text in
               (f"solution = [{a}, {b}, {c}]", f"solution = [{c}, {b}, {a}]", "nothing")]
    summary = TASK.verifier.aggregate(records)
    assert summary["overall"] == pytest.approx(1 / 3) and summary["accuracy_answered"] == pytest.approx(1 / 2)
    assert summary["loose_accuracy_submitted"] == pytest.approx(1.0)
