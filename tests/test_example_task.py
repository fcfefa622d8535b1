"""docs/TASKS.md is all a task author needs: its example task is quoted there file by file, passes
``siajax tasks --check`` and runs through the loop with the real command; a finished run extends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from siajax.models import BUNDLED_TINY_MODEL

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "example_task"
GUIDE = ROOT / "docs" / "TASKS.md"


def siajax(*argv, timeout=600):
    env = {**os.environ, "SIAJAX_COMPILE_CACHE": "0"}
    return subprocess.run([sys.executable, "-m", "siajax", *map(str, argv)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


@pytest.mark.parametrize("name", ["task.json", "harness.json", "verifier.py", "task.md"])
def test_the_guide_quotes_each_file_of_its_example_as_it_is(name):
    assert (EXAMPLE / name).read_text() in GUIDE.read_text()


def test_the_guide_names_every_task_json_field_and_verifier_hook_siajax_reads():
    import re

    guide = GUIDE.read_text()
    sources = "\n".join(p.read_text() for p in (ROOT / "siajax").rglob("*.py"))
    fields = set(re.findall(r'task\.spec(?:\.get)?\(?\[?"([a-z_]+)"', sources))
    hooks = set(re.findall(r'getattr\(task\.verifier, "([A-Za-z_]+)"', sources))
    hints = set(re.findall(r'\.get\("harness_hints", \{\}\)\.get\("([a-z_]+)"', sources))
    hints |= set(re.findall(r'hints\.get\("([a-z_]+)"', sources))
    assert fields and hooks and hints
    missing = [name for name in sorted(fields | hooks | hints) if not re.search(rf"`{name}[`(]", guide)]
    assert not missing, f"docs/TASKS.md does not document {missing}"


def test_the_example_task_passes_the_check_and_runs_one_generation_then_extends(tmp_path):
    checked = siajax("tasks", "--check", EXAMPLE)
    assert checked.returncode == 0 and checked.stdout.strip().endswith("OK"), checked.stdout + checked.stderr
    run_dir = tmp_path / "run"
    common = ["--model", BUNDLED_TINY_MODEL, "--dev-items", 4, "--test-items", 4]
    done = siajax("run", "--task", EXAMPLE, "--levers", "harness", "--generations", 1, *common, "--run-dir", run_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert len(ledger) == 1 and ledger[0]["before"]["dev"]["items"] == 4

    shorter = siajax("resume", run_dir, "--generations", 0)
    assert shorter.returncode == 2 and "finished 1 generations" in shorter.stderr
    extended = siajax("resume", run_dir, "--generations", 2)
    assert extended.returncode == 0, extended.stderr[-2000:]
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert [entry["generation"] for entry in ledger] == [0, 1]
    assert json.loads((run_dir / "config.json").read_text())["generations"] == 2
    _check_html_report(run_dir, ledger)


def _check_html_report(run_dir: Path, ledger: list[dict]) -> None:
    """``siajax report RUN --html``: one self-contained page holding the ledger's numbers."""
    import collections
    import re
    import shutil

    reported = siajax("report", run_dir, "--html")
    assert reported.returncode == 0 and "html: " in reported.stdout, reported.stderr[-2000:]
    page = (run_dir / "report.html").read_text()
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing fetched: the plot is inlined
    assert page.count('src="data:image/png;base64,') == 1
    for entry in ledger:
        assert f"generation {entry['generation']}: {entry['decision']['lever']}" in page
        for candidate in entry["candidates"]:
            assert f"<td class=n>{candidate['dev_score']:.3f}</td>" in page
        records = [json.loads(line) for line in
                   (run_dir / entry["eval_records_from"] / "eval_dev.jsonl").read_text().splitlines()]
        kinds = collections.Counter(record["failure"] or "success" for record in records)
        for kind, count in kinds.items():
            assert f"<td>{kind}</td><td class=n>{count}</td>" in page
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser:  # where a browser is installed: it renders the page (a screenshot is written)
        shot = run_dir / "report.png"
        subprocess.run([browser, "--headless", "--no-sandbox", f"--screenshot={shot}", (run_dir / "report.html")
                        .as_uri()], capture_output=True, timeout=120)
        assert shot.stat().st_size > 10_000
