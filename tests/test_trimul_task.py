"""The TriMul task's verifier: a correct kernel scores, and each known cheat is caught."""

from __future__ import annotations

import os
import textwrap

import pytest
from conftest import host_processes_named

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
    assert 1 / 3 < verdict["metrics"]["speedup"] < 3  # the same code, timed twice
    assert verdict["reward"] == pytest.approx(verifier.speed_reward(verdict["metrics"]["speedup"]))
    assert verdict["metrics"]["sandbox_layers"]["landlock"]["abi"] >= 1


def test_no_code_block_is_a_parse_error(verifier):
    assert verifier.score({"id": "t"}, None, "I would use Triton.")["failure"] == "parse_error"


@pytest.mark.slow
@pytest.mark.parametrize("name,source,failure", [
    ("syntax", "def custom_kernel(x, mask, weights):\n    return (", "compile_error"),
    ("no entry", "def kernel(x, mask, weights):\n    return x", "compile_error"),
    # The repo's kernels are not in the jail at all: importing or reading them just fails.
    ("imports the reference",
     "from kernels.trimul.reference import trimul_reference\n"
     "def custom_kernel(x, mask, weights):\n    return trimul_reference(x, mask, weights)", "crash"),
    ("reads the reference file",
     f"SRC = open({str(resolve_task('trimul').root.parent.parent / 'kernels' / 'trimul' / 'reference.py')!r}).read()\n"
     "def custom_kernel(x, mask, weights):\n    return x", "crash"),
    ("returns its input", "def custom_kernel(x, mask, weights):\n    return x", "wrong_result"),
    ("caches the first output", REFERENCE + "\n_first = custom_kernel\n_cache = {}\n"
     "def custom_kernel(x, mask, weights):\n"
     "    if 'out' not in _cache:\n        _cache['out'] = _first(x, mask, weights)\n    return _cache['out']",
     "wrong_result"),
    ("hard-codes the published shapes", REFERENCE + "\nimport numpy as np\n_real = custom_kernel\n"
     "def custom_kernel(x, mask, weights):\n"
     "    if x.shape[1] in (32, 64, 128, 256, 512, 768, 1024):\n        return _real(x, mask, weights)\n"
     "    return np.zeros(x.shape, np.float32)", "wrong_result"),
    ("memoises outputs by input shape", REFERENCE + "\n_real = custom_kernel\n_memo = {}\n"
     "def custom_kernel(x, mask, weights):\n"
     "    return _memo.setdefault(x.shape, _real(x, mask, weights))", "wrong_result"),
    ("returns NaN", "import numpy as np\ndef custom_kernel(x, mask, weights):\n    return np.full(x.shape, np.nan)",
     "wrong_result"),
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
def test_timing_from_outside_cannot_be_gamed(verifier):
    """Patching the clock, padding timings, throttling the reference with a leftover process:
    the parent times every call and the reference runs only once the agent's jail is gone."""
    patched = ("import time, sys\ntime.perf_counter = lambda: 0.0\ntime.monotonic = lambda: 0.0\n" + REFERENCE)
    verdict = score(verifier, patched)
    assert verdict["failure"] is None and verdict["metrics"]["speedup"] < 5, verdict
    # Burners forked around the tripwire (ctypes): the jail's pid 1 and a double-forked daemon clear their
    # parent-death signal and leave the session (speed-up 12 against 1.07 honest, when they survived)
    marker = f"sxt{os.getpid() % 100000}"
    throttle = textwrap.dedent(f"""
        import ctypes, os
        libc = ctypes.CDLL(None)
        libc.prctl(1, 0, 0, 0, 0)
        libc.setsid()
        for _ in range(2):
            if libc.fork() == 0:
                libc.prctl(1, 0, 0, 0, 0)
                libc.setsid()
                if libc.fork() == 0:
                    libc.prctl(15, {marker!r}.encode(), 0, 0, 0)
                    while True:
                        pass
                os._exit(0)
    """) + REFERENCE
    verdict = score(verifier, throttle)
    assert not host_processes_named(marker), "a burner outlived the score"
    assert verdict["failure"] is None and verdict["metrics"]["speedup"] < 5, verdict


@pytest.mark.slow
def test_every_correct_kernel_scores_above_every_failure(verifier):
    slow = REFERENCE + ("\n_fast = custom_kernel\nimport time\n"
                        "def custom_kernel(x, mask, weights):\n    time.sleep(0.2)\n    return _fast(x, mask, weights)")
    slow_verdict = score(verifier, slow)
    assert slow_verdict["failure"] is None and slow_verdict["metrics"]["speedup"] < 1
    assert 0 < slow_verdict["reward"] < 0.5 and slow_verdict["reward"] > verifier.FAILURE_REWARD
    rewards = [verifier.speed_reward(s) for s in (0.01, 0.5, 1, 2, 100)]
    assert rewards == sorted(rewards) and rewards[0] > verifier.FAILURE_REWARD and rewards[-1] < 1


CUDA_ANSWER = r'''
#include <cuda_runtime.h>
__global__ void zero(float* out, long n) {
  long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i < n) out[i] = 0.f;
}
extern "C" cudaError_t trimul_launch(cudaStream_t stream, const float* x, const float* mask, const float* norm_w,
                                     const float* norm_b, const float* w_in_t, const float* out_norm_w,
                                     const float* out_norm_b, const float* w_out_t, float* out, int batch, int n,
                                     int c_dim, int h_dim) {
  long total = (long)batch * n * n * c_dim;
  zero<<<(total + 255) / 256, 256, 0, stream>>>(out, total);
  return cudaGetLastError();
}
'''


@pytest.mark.skipif(__import__("shutil").which("nvcc") is None, reason="needs nvcc")
def test_cuda_answers_compile_in_the_jail_and_need_a_gpu_to_score(verifier):
    """CPU here: a CUDA answer is compiled inside the sandbox; without a GPU it cannot be checked,
    so it scores the failure reward as needs_gpu; a broken one is a compile error."""
    if verifier._gpu_devices():
        pytest.skip("a GPU is present: the answer would run (and be wrong: it writes zeros)")
    assert verifier.is_cuda(CUDA_ANSWER) and not verifier.is_cuda(REFERENCE)
    verdict = score(verifier, CUDA_ANSWER)
    assert verdict["failure"] == "needs_gpu" and verdict["reward"] == verifier.FAILURE_REWARD, verdict
    broken = score(verifier, CUDA_ANSWER.replace("cudaGetLastError();", "cudaGetLastError()"))
    assert broken["failure"] == "compile_error", broken


def test_timed_inputs_come_from_full_entropy_seeds(verifier, monkeypatch):
    """A score's seed and every call's inputs seed are 128-bit: an agent that sees one call's inputs
    cannot search the seed space for the next (31-bit seeds could be searched in a few budgets)."""
    import numpy as np

    seen = []

    def recorded(source, seed, **kwargs):
        seen.append(seed)
        return {"reward": -1.0, "failure": "compile_error", "metrics": {}}, {}

    monkeypatch.setattr(verifier, "time_kernel", recorded)
    verifier.score({"id": "t"}, "def custom_kernel(x, mask, weights):\n    return x", "")
    assert seen[0].bit_length() > 100
    rng = np.random.default_rng(seen[0])
    calls = [verifier._child_seed(rng) for _ in range(4)]
    assert len(set(calls)) == 4 and min(c.bit_length() for c in calls) > 100
    x, _, _ = verifier.generate_inputs(seqlen=8, bs=1, dim=4, hiddendim=4, seed=calls[0], nomask=True)
    assert x.shape == (1, 8, 8, 4)
