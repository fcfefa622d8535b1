"""The built wheel works without the checkout: tasks and kernels ship inside the package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_the_wheels_package_list_names_every_siajax_package():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "siajax").rglob("__init__.py")}
    assert found <= listed


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from this checkout, installed with pip --target (its dependencies come from
    the test environment), and a working directory outside the repo."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(root / "dist"), str(REPO)], check=True, capture_output=True, cwd=root)
    [wheel] = (root / "dist").glob("siajax-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(root / "site"),
                    str(wheel)], check=True, capture_output=True, cwd=root)
    env = {**os.environ, "PYTHONPATH": str(root / "site")}
    env.pop("SIAJAX_TASKS_PATH", None)
    return wheel, root / "site", env, root


def _siajax(installed, *args, timeout=600):
    _, _, env, cwd = installed
    return subprocess.run([sys.executable, "-m", "siajax", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_the_wheel_holds_tasks_and_kernels_inside_the_package_only(installed):
    wheel, site, _, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"siajax", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    for required in ("siajax/_bundled/tasks/arithmetic/task.json", "siajax/_bundled/tasks/trimul/verifier.py",
                     "siajax/_bundled/kernels/trimul/reference.py", "siajax/assets/tiny-llama/model.safetensors"):
        assert required in names
    assert not any("__pycache__" in name for name in names)


def test_the_installed_package_lists_the_bundled_tasks_and_runs_a_generation(installed):
    _, site, _, cwd = installed
    where = _siajax(installed, "tasks")
    assert where.returncode == 0, where.stderr[-2000:]
    for name in ("arithmetic", "digits", "lawbench", "trimul", "rna_denoise", "longcot_chess"):
        assert name in where.stdout
    model = site / "siajax" / "assets" / "tiny-llama"
    result = _siajax(installed, "run", "--task", "digits", "--model", str(model), "--levers", "harness",
                     "--generations", "1", "--dev-items", "4", "--test-items", "4", "--run-dir", str(cwd / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    [entry] = [json.loads(line) for line in (cwd / "run" / "ledger.jsonl").read_text().splitlines()]
    assert entry["after"]["test"]["items"] == 4
    config = json.loads((cwd / "run" / "config.json").read_text())
    assert config["task"] == "digits"
    imported = subprocess.run([sys.executable, "-c", "import siajax, siajax.tasks as t; t.resolve_task('trimul'); "
                               "import siajax._bundled.kernels.trimul.reference as r; "
                               "print(siajax.__file__); print(r.__file__)"],
                              env=installed[2], cwd=cwd, capture_output=True, text=True, check=True).stdout
    assert all(line.startswith(str(site)) for line in imported.split())  # not the checkout


def test_the_checkout_does_not_shadow_the_hugging_face_kernels_package():
    """transformers imports Hugging Face's ``kernels``; run from the repo root (``python -m siajax``,
    pytest), a top-level ``kernels`` package of ours would be imported in its place and break it."""
    probe = ("import kernels, transformers; transformers.LlamaConfig(); "
             "import siajax._bundled.kernels.trimul.reference as r; print(kernels.__file__); print(r.__file__)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    theirs, ours = result.stdout.split()
    assert "site-packages" in theirs and ours == str(REPO / "kernels" / "trimul" / "reference.py")
