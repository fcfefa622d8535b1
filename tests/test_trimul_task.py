"""The TriMul task's verifier: a correct kernel scores, and each known cheat is caught."""

from __future__ import annotations

import math

import pytest

from siajax.tasks import resolve_task

SEED = 1234
REFERENCE = (resolve_task("trimul").root / "reference_kernel.py").read_text()


@pytest.fixture(scope="module")
def verifier():
    return resolve_task("trimul").verifier


def score(verifier, source):
    return verifier.score({"id": "t"}, source, source, seed=SEED)


@pytest.mark.slow
def test_a_correct_kernel_scores_about_speedup_one(verifier):
    verdict = score(verifier, REFERENCE)
    assert verdict["failure"] is None, verdict
    assert abs(verdict["reward"]) < math.log(3)  # the same code, timed twice: speed-up near 1


def test_no_code_block_is_a_parse_error(verifier):
    assert verifier.score({"id": "t"}, None, "I would use Triton.")["failure"] == "parse_error"


@pytest.mark.slow
@pytest.mark.parametrize("name,source,failure", [
    ("syntax", "def custom_kernel(x, mask, weights):\n    return (", "compile_error"),
    ("no entry", "def kernel(x, mask, weights):\n    return x", "compile_error"),
    ("imports the reference",
     "from kernels.trimul.reference import trimul_reference\n"
     "def custom_kernel(x, mask, weights):\n    return trimul_reference(x, mask, weights)", "cheat"),
    ("reads the reference file",
     "import glob\nSRC = open(glob.glob('/**/kernels/trimul/reference.py', recursive=True)[0]).read()\n"
     "def custom_kernel(x, mask, weights):\n    return x", "cheat"),
    ("returns its input", "def custom_kernel(x, mask, weights):\n    return x", "wrong_result"),
    ("caches the first output", REFERENCE + "\n_first = custom_kernel\n_cache = {}\n"
     "def custom_kernel(x, mask, weights):\n"
     "    if 'out' not in _cache:\n        _cache['out'] = _first(x, mask, weights)\n    return _cache['out']",
     "wrong_result"),
    ("hard-codes the published shapes", REFERENCE + "\nimport numpy as np\n_real = custom_kernel\n"
     "def custom_kernel(x, mask, weights):\n"
     "    if x.shape[1] in (32, 64, 128, 256, 512, 768, 1024):\n        return _real(x, mask, weights)\n"
     "    return np.zeros(x.shape, np.float32)", "wrong_result"),
    ("writes into its input", REFERENCE + "\n_real = custom_kernel\n"
     "def custom_kernel(x, mask, weights):\n    out = _real(x, mask, weights)\n    x[...] = 0\n    return out",
     "cheat"),
    ("crashes", "def custom_kernel(x, mask, weights):\n    raise RuntimeError('boom')", "crash"),
    ("hangs", "def custom_kernel(x, mask, weights):\n    while True:\n        pass", "timeout"),
])
def test_cheats_and_faults_are_classified(verifier, monkeypatch, name, source, failure):
    if failure == "timeout":
        monkeypatch.setattr(verifier, "LIMITS", verifier.SandboxLimits(wall_seconds=8, cpu_seconds=30))
    verdict = score(verifier, source)
    assert verdict["failure"] == failure, (name, verdict)
    assert verdict["reward"] == verifier.FAILURE_REWARD


@pytest.mark.slow
def test_patching_the_clock_does_not_buy_a_speedup(verifier):
    patched = "import time\ntime.perf_counter = lambda: 0.0\n" + REFERENCE
    verdict = score(verifier, patched)
    assert verdict["failure"] is None and verdict["reward"] < math.log(3), verdict
    slowed_reference = ("import jax.numpy as jnp\n_einsum = jnp.einsum\n"
                        "jnp.einsum = lambda *a, **k: (__import__('time').sleep(0.05), _einsum(*a, **k))[1]\n"
                        + REFERENCE)
    verdict = score(verifier, slowed_reference)  # slows only itself: the reference runs in its own process
    assert verdict["failure"] is None and verdict["reward"] < math.log(3), verdict
