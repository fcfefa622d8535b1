"""Denoising verifier: the agent's denoise(counts) runs sandboxed on a fresh MCV split.

The data set is simulated afresh for every score, in the regime the item names
(``dataset``: cells, genes, latent types, depth, dispersion, dropout; DATA when
it names none).

The training counts go into the sandbox and the denoised matrix comes back as a
framed array over a pipe (the parent opens no file the agent made). Score: the
normalised MSE (0 = no denoising, 1 = the best classical baseline on the same
split, higher is better). Reward: that score when it is >= 0, score / (1 - score)
in (-1, 0) when the output is worse than the raw counts, and FAILURE_REWARD = -1
for parse_error, compile_error, crash, timeout, oom, wrong_shape,
negative_or_nan, so any valid denoiser beats any failure.
"""

from __future__ import annotations

import dataclasses
import secrets
import sys
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


def quality_reward(normalised_mse: float) -> float:
    """Identity on the paper's scale; worse-than-raw squeezed into (-1, 0), above every failure."""
    return float(normalised_mse if normalised_mse >= 0 else normalised_mse / (1.0 - normalised_mse))


def score(item: dict, answer, text: str, seed: int | None = None) -> dict:
    if not answer:
        return _fail("parse_error", "no ```python code block defining denoise(counts) in the reply")
    seed = secrets.randbits(128) if seed is None else seed  # full entropy: no seed search recovers it
    counts, _ = mcv.simulate_counts(**{**DATA, **item.get("dataset", {})}, seed=seed)
    train, test = mcv.split_counts(counts, seed + 1)
    limits = dataclasses.replace(LIMITS, message_bytes=8 * train.size)  # one float64 matrix back, nothing more
    result = run_sandboxed(answer, entry="denoise", arrays={"counts": train}, limits=limits,
                           env={"JAX_PLATFORMS": "cpu"})
    kind = failure_kind(result)
    if kind is not None:
        return _fail(kind, f"{result.status}: {result.error}\n{result.stderr[-1500:]}")
    pred = result.arrays.get("return")
    if pred is None:
        return _fail("wrong_shape", "denoise must return an array")
    if pred.shape != train.shape or pred.dtype.kind not in "biuf":
        return _fail("wrong_shape", f"output shape {pred.shape} ({pred.dtype}) != input shape {train.shape}")
    pred = pred.astype(np.float64)
    if not np.isfinite(pred).all() or (pred < 0).any():
        return _fail("negative_or_nan", "the output must be finite and non-negative")
    baselines = mcv.baseline_table(counts, seed + 1)
    raw = baselines["no_denoising"]
    best = min(baselines.values(), key=lambda m: m["mse"])
    value = {"mse": mcv.mse(pred, test), "poisson": mcv.poisson(pred, test, train)}
    normalised_mse = mcv.normalised(value["mse"], raw["mse"], best["mse"])
    best_poisson = min(m["poisson"] for m in baselines.values())
    return {"reward": quality_reward(normalised_mse), "failure": None, "metrics": {
        **value, "normalised_mse": normalised_mse, "sandbox_layers": result.layers,
        "normalised_poisson": mcv.normalised(value["poisson"], raw["poisson"], best_poisson)}}
