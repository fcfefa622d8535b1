"""Denoising verifier: the agent's denoise(counts) runs sandboxed on a fresh MCV split.

Reward = normalised MSE score (0 = no denoising, 1 = best classical baseline on
the same split; higher is better, can exceed 1 or go below 0), or -1 on a
failure: parse_error, compile_error, crash, timeout, wrong_shape, negative_or_nan, cheat.
"""

from __future__ import annotations

import secrets
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import mcv  # noqa: E402
from siajax.sandbox import SandboxLimits, failure_kind, run_sandboxed  # noqa: E402
from siajax.tasks import failed_verdict  # noqa: E402

FAILURE_REWARD = -1.0
LIMITS = SandboxLimits(wall_seconds=120, cpu_seconds=300, memory_bytes=4 << 30)
DATA = dict(n_cells=300, n_genes=1000, n_types=5)


def _fail(kind: str, detail: str) -> dict:
    return failed_verdict(kind, detail, FAILURE_REWARD)


def score(item: dict, answer, text: str, seed: int | None = None) -> dict:
    if not answer:
        return _fail("parse_error", "no ```python code block defining denoise(counts) in the reply")
    seed = secrets.randbits(31) if seed is None else seed
    counts, _ = mcv.simulate_counts(**DATA, seed=seed)
    train, test = mcv.split_counts(counts, seed + 1)
    with tempfile.TemporaryDirectory(prefix="denoise-") as scratch:
        scratch = Path(scratch)
        np.save(scratch / "train.npy", train)
        result = run_sandboxed((ROOT / "checker.py").read_text(), entry="main", limits=LIMITS, scratch_dir=scratch,
                               kwargs={"train_path": str(scratch / "train.npy"),
                                       "output_path": str(scratch / "output.npy"), "agent_source": answer},
                               forbidden_dirs=[ROOT / "data" / "private"], forbidden_modules=("mcv",))
        kind = failure_kind(result)
        if kind is not None:
            return _fail(kind, f"{result.status}: {result.error}\n{result.stderr[-1500:]}")
        pred = np.load(scratch / "output.npy", allow_pickle=False)
    if pred.shape != train.shape:
        return _fail("wrong_shape", f"output shape {pred.shape} != input shape {train.shape}")
    if not np.isfinite(pred).all() or (pred < 0).any():
        return _fail("negative_or_nan", "the output must be finite and non-negative")
    baselines = mcv.baseline_table(counts, seed + 1)
    raw = baselines["no_denoising"]
    best = min(baselines.values(), key=lambda m: m["mse"])
    value = {"mse": mcv.mse(pred, test), "poisson": mcv.poisson(pred, test, train)}
    normalised_mse = mcv.normalised(value["mse"], raw["mse"], best["mse"])
    best_poisson = min(m["poisson"] for m in baselines.values())
    return {"reward": float(np.clip(normalised_mse, -5, 5)), "failure": None, "metrics": {
        **value, "normalised_mse": normalised_mse,
        "normalised_poisson": mcv.normalised(value["poisson"], raw["poisson"], best_poisson)}}
