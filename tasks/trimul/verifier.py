"""TriMul verifier: run the agent's kernel sandboxed, check it on fresh inputs, time it.

Reward = log(reference time / kernel time) (0 = as fast as the jnp reference),
or -1 on any failure: parse_error (no code block), compile_error, crash,
timeout, wrong_result, cheat. Cheats defeated (see tests/test_trimul_task.py):
importing or reading the reference (module and directory forbidden in the
sandbox); caching outputs (every case has fresh inputs, and the last timed
output is checked too); returning inputs (correctness); shape hard-coding (a
random shape outside the published list is always checked); writing into its
inputs (checksums before/after); altering timing (the clock is bound before
the agent's code runs, the reference is timed in its own sandbox run, and a
time below the machine's physical floor is rejected).
"""

from __future__ import annotations

import math
import secrets
import tempfile
from functools import lru_cache
from pathlib import Path

import sys

import numpy as np

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent.parent
KERNELS_DIR = REPO / "kernels"
if str(REPO) not in sys.path:  # the verifier (not the agent) uses the repo's reference
    sys.path.append(str(REPO))

from kernels.trimul.reference import flops, generate_inputs, trimul_reference  # noqa: E402
from siajax.sandbox import SandboxLimits, failure_kind, run_sandboxed  # noqa: E402
from siajax.tasks import failed_verdict  # noqa: E402
CHECK_SHAPES = [dict(seqlen=32, bs=1, dim=128, hiddendim=128, nomask=True, distribution="normal"),
                dict(seqlen=32, bs=1, dim=128, hiddendim=128, nomask=False, distribution="cauchy")]
TIME_SHAPE = dict(seqlen=64, bs=1, dim=128, hiddendim=128, nomask=True, distribution="normal")
FAILURE_REWARD = -1.0
CPU_PEAK_FLOPS = 2e12  # far above what 2 CPU cores reach: anything faster is a lie
LIMITS = SandboxLimits(wall_seconds=180, cpu_seconds=600, memory_bytes=6 << 30)
REPEATS = 5


def _random_unlisted_shape(rng) -> dict:
    return dict(seqlen=int(rng.choice([24, 40, 48, 56])), bs=int(rng.choice([1, 2])), dim=int(rng.choice([32, 96])),
                hiddendim=int(rng.choice([16, 48])), nomask=bool(rng.integers(2)), distribution="normal")


def _cases(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    shapes = {f"check{i}": s for i, s in enumerate(CHECK_SHAPES)}
    shapes["check_unlisted"] = _random_unlisted_shape(rng)
    shapes["time0"] = TIME_SHAPE
    cases = {}
    for name, shape in shapes.items():
        x, mask, weights = generate_inputs(**shape, seed=int(rng.integers(2**31)))
        cases[name] = (shape, x, mask, weights)
    return cases


def _save_cases(path: Path, cases: dict) -> None:
    arrays = {}
    for name, (_, x, mask, weights) in cases.items():
        arrays[f"{name}/x"], arrays[f"{name}/mask"] = x, mask
        arrays.update({f"{name}/w/{k}": v for k, v in weights.items()})
    np.savez(path, **arrays)


def run_kernel(source: str, cases: dict, repeats: int = REPEATS):
    """-> (SandboxResult, outputs dict or None)."""
    with tempfile.TemporaryDirectory(prefix="trimul-") as scratch:
        scratch = Path(scratch)
        _save_cases(scratch / "cases.npz", cases)
        result = run_sandboxed(
            (ROOT / "checker.py").read_text(), entry="main", limits=LIMITS, scratch_dir=scratch,
            kwargs={"cases_path": str(scratch / "cases.npz"), "outputs_path": str(scratch / "outputs.npz"),
                    "agent_source": source, "repeats": repeats},
            forbidden_dirs=[KERNELS_DIR, ROOT / "data" / "private"], forbidden_modules=("kernels",),
        )
        outputs = None
        if result.ok and (scratch / "outputs.npz").exists():
            with np.load(scratch / "outputs.npz") as archive:
                outputs = {k: archive[k] for k in archive.files}
        return result, outputs


REFERENCE_SOURCE = (ROOT / "reference_kernel.py").read_text()


@lru_cache(maxsize=4)
def reference_seconds(seed: int) -> float:
    """The jnp reference timed the same way, in its own sandbox run (no agent code beside it)."""
    result, _ = run_kernel(REFERENCE_SOURCE, _cases(seed))
    if not result.ok:
        raise RuntimeError(f"reference kernel failed in the sandbox: {result.status} {result.error}")
    return float(np.median(result.value["times"]["time0"]))


def _fail(kind: str, detail: str) -> dict:
    return failed_verdict(kind, detail, FAILURE_REWARD)


def score(item: dict, answer, text: str, seed: int | None = None) -> dict:
    if not answer:
        return _fail("parse_error", "no ```python code block with custom_kernel in the reply")
    seed = secrets.randbits(31) if seed is None else seed
    cases = _cases(seed)
    result, outputs = run_kernel(answer, cases)
    kind = failure_kind(result)
    if kind is not None:
        detail = result.error if kind != "crash" else f"{result.status}: {result.error}\n{result.stderr[-1500:]}"
        return _fail(kind, detail)
    if result.value["modified_inputs"]:
        return _fail("cheat", f"the kernel wrote into its inputs ({result.value['modified_inputs']})")
    for name, (shape, x, mask, weights) in cases.items():
        expected = np.asarray(trimul_reference(x, mask, weights))
        for key in [name] + ([name + "_last"] if name.startswith("time") else []):
            got = outputs.get(key)
            if got is None or got.shape != expected.shape or not np.isfinite(got).all() or not np.allclose(
                    got, expected, rtol=2e-2, atol=2e-2):
                return _fail("wrong_result", f"case {key} (shape {shape}) differs from the reference")
    seconds = float(np.median(result.value["times"]["time0"]))
    floor = flops(TIME_SHAPE["bs"], TIME_SHAPE["seqlen"], TIME_SHAPE["dim"], TIME_SHAPE["hiddendim"]) / CPU_PEAK_FLOPS
    if seconds < floor:
        return _fail("cheat", f"reported {seconds:.2e}s is below the physical floor {floor:.2e}s")
    baseline = reference_seconds(seed)
    speedup = baseline / seconds
    return {"reward": float(np.clip(math.log(speedup), -5, 5)), "failure": None,
            "metrics": {"seconds": seconds, "reference_seconds": baseline, "speedup": speedup}}
