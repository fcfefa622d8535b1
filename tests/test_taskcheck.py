"""A task is read end to end before a run trusts it: every split, slot and demonstration; one line
naming the file, the split or the item; a broken or hanging task module never hides the others."""

from __future__ import annotations

import json
import shutil

import pytest

from siajax import tasks as tasks_module
from siajax.cli import main
from siajax.config import RunConfig
from siajax.loop import run
from siajax.models import BUNDLED_TINY_MODEL
from siajax.taskcheck import check_task
from siajax.tasks import find_tasks, resolve_task


@pytest.fixture
def digits_copy(tmp_path):
    """A writable copy of the bundled ``digits`` task (64 train, 16 dev, 32 test items)."""
    root = tmp_path / "tasks" / "mine"
    shutil.copytree(resolve_task("digits").root, root)
    return root


def _rewrite_line(path, number: int, content: bytes) -> None:
    lines = path.read_bytes().splitlines()
    lines[number - 1] = content
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_the_bundled_tasks_with_shipped_data_pass_the_check():
    for name in ("digits", "arithmetic", "arithmetic_tool", "lawbench", "longcot_chess", "rna_denoise", "trimul"):
        assert check_task(name) == [], name


@pytest.mark.parametrize("content, message", [
    (b'{"id": "q003", "question": "caf\xe9?"}', "dev.jsonl:3: not UTF-8"),
    (b'{"id": "q003", "question": ', "dev.jsonl:3: not valid JSON"),
    (b'{"question": "no id"}', 'dev.jsonl:3: an item must be a JSON object with an "id"'),
    (b'["q003"]', 'dev.jsonl:3: an item must be a JSON object with an "id"'),
])
def test_a_bad_line_is_named_by_file_and_line(digits_copy, content, message):
    _rewrite_line(digits_copy / "data/public/dev.jsonl", 3, content)
    problems = check_task(str(digits_copy))
    assert len(problems) == 1 and message in problems[0]


def test_a_template_slot_an_item_lacks_is_named_with_the_split_and_item(digits_copy):
    _rewrite_line(digits_copy / "data/private/test.jsonl", 5, b'{"id": "t_odd", "wrd": "no question"}')
    (problem,) = check_task(str(digits_copy))
    assert "1 test item(s) lack the template slot {question}, e.g. id 't_odd'" in problem


def test_an_empty_dev_split_and_a_repeated_id_are_refused(digits_copy):
    (digits_copy / "data/public/dev.jsonl").write_text("")
    assert "its dev split has 0 items" in check_task(str(digits_copy))[0]
    shutil.copy(resolve_task("digits").root / "data/public/dev.jsonl", digits_copy / "data/public/dev.jsonl")
    _rewrite_line(digits_copy / "data/public/dev.jsonl", 2, (digits_copy / "data/public/dev.jsonl")
                  .read_bytes().splitlines()[0])
    assert "appears twice in its dev split" in check_task(str(digits_copy))[0]


def test_a_demonstration_the_default_parser_cannot_read_is_a_problem(digits_copy):
    verifier = digits_copy / "verifier.py"
    verifier.write_text(verifier.read_text().replace('return str(sum(map(ord, item["id"])) % 90 + 10)',
                                                     'return f"The answer is {sum(map(ord, item[\'id\'])) % 90}."'))
    (problem,) = check_task(str(digits_copy))
    assert "the demonstration of train item 'q000'" in problem and "fails its own check: parse_error" in problem


def test_a_verifier_with_a_syntax_error_is_listed_invalid_and_hides_no_other_task(digits_copy, monkeypatch, capsys):
    (digits_copy / "verifier.py").write_text("def score(item, answer, text)\n    return {}\n")
    monkeypatch.setenv("SIAJAX_TASKS_PATH", str(digits_copy.parent))
    found = find_tasks()
    assert "digits" in found and not isinstance(found["digits"], Exception)
    assert main(["tasks"]) == 1
    lines = capsys.readouterr().out.splitlines()
    (mine,) = [line for line in lines if line.startswith("mine")]
    assert "INVALID: mine/verifier.py fails to import: SyntaxError: expected ':' (verifier.py, line 1)" in mine
    assert any(line.startswith("arithmetic_tool") for line in lines)


def test_a_verifier_that_hangs_at_import_is_reported_not_waited_for(digits_copy, monkeypatch):
    (digits_copy / "verifier.py").write_text("import time\ntime.sleep(30)\n")
    monkeypatch.setattr(tasks_module, "IMPORT_SECONDS", 0.5)
    (problem,) = check_task(str(digits_copy))
    assert problem == "importing mine/verifier.py did not finish within 0.5 s"


def test_tasks_check_exits_1_with_each_problem_and_0_when_sound(digits_copy, capsys):
    assert main(["tasks", "--check", "digits"]) == 0
    assert capsys.readouterr().out == "digits: OK\n"
    _rewrite_line(digits_copy / "data/public/train.jsonl", 7, b"{")
    assert main(["tasks", "--check", str(digits_copy)]) == 1
    out = capsys.readouterr().out
    assert "1 problem(s)" in out and "train.jsonl:7: not valid JSON" in out


def test_run_refuses_a_broken_task_before_writing_anything(digits_copy, tmp_path):
    items = [json.loads(line) for line in (digits_copy / "data/private/test.jsonl").read_text().splitlines()]
    items[0].pop("question")
    (digits_copy / "data/private/test.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    with pytest.raises(ValueError, match="lack the template slot"):
        run(RunConfig(task=str(digits_copy), model=str(BUNDLED_TINY_MODEL), generations=1), tmp_path / "run")
    assert not (tmp_path / "run").exists()
