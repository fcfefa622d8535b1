"""TriMul verifier: the agent's kernel runs in the sandbox; the parent checks and times it.

Protocol (``siajax.sandbox.SandboxSession``): the kernel is loaded once, then
called over a pipe. Correctness: fixed check shapes (normal and Cauchy inputs,
with and without a mask) and a random shape outside the published list, each on
fresh inputs, compared with the float32 reference (rtol = atol = 2e-2). Timing,
at the shape the item names (``time_shape``; TIME_SHAPE when it names none):
the parent's clock around each call (inputs in, output back), on a fresh,
distinct input for every timed repeat, every timed output checked - nothing in
the agent's process can touch the clock, replay an output or memoise an input.
The jnp reference is timed the same way in its own session, only after the
agent's jail is shown gone (its cgroup empty, or its launcher's "reaped"; a
kernel whose jail cannot be shown gone is a cheat). A time below the machine's physical
floor is a cheat.

Languages (the harness switch): Python (jnp, or Pallas, lowered natively on a
GPU) or CUDA C++ defining ``extern "C" cudaError_t trimul_launch(...)`` (see
``cuda_mode/ffi_wrapper.cc``), compiled with nvcc inside the jail and called
through XLA FFI with a NaN-filled output buffer aliased to the result. Without
a GPU, CUDA answers are compiled and reported as ``needs_gpu`` (not verifiable).

Reward: every failure (parse_error, compile_error, crash, timeout, oom,
wrong_result, cheat, needs_gpu) scores FAILURE_REWARD = -1; a correct kernel scores
speed-up / (1 + speed-up) in (0, 1) - 0.5 at the reference's speed - so any
correct kernel, however slow, beats any failure.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from functools import lru_cache
from pathlib import Path

import numpy as np

from siajax._bundled.kernels.trimul.reference import flops, generate_inputs, trimul_reference
from siajax.sandbox import SandboxLimits, SandboxSession, failure_kind
from siajax.tasks import failed_verdict

ROOT = Path(__file__).resolve().parent

CHECK_SHAPES = [dict(seqlen=32, bs=1, dim=128, hiddendim=128, nomask=True, distribution="normal"),
                dict(seqlen=32, bs=1, dim=128, hiddendim=128, nomask=False, distribution="cauchy")]
TIME_SHAPE = dict(seqlen=64, bs=1, dim=128, hiddendim=128, nomask=True, distribution="normal")
FAILURE_REWARD = -1.0
CPU_PEAK_FLOPS = 2e12  # far above what 2 CPU cores reach: anything faster is a lie
LIMITS = SandboxLimits(wall_seconds=180, cpu_seconds=600, memory_bytes=6 << 30)
REPEATS = 5
JAIL_ENV = {"JAX_PLATFORMS": "cpu"}


def _random_unlisted_shape(rng) -> dict:
    return dict(seqlen=int(rng.choice([24, 40, 48, 56])), bs=int(rng.choice([1, 2])), dim=int(rng.choice([32, 96])),
                hiddendim=int(rng.choice([16, 48])), nomask=bool(rng.integers(2)), distribution="normal")


def _arrays(x, mask, weights) -> dict:
    return {"x": x, "mask": mask, **{f"weights/{name}": value for name, value in weights.items()}}


def _fail(kind: str, detail: str) -> dict:
    return failed_verdict(kind, detail, FAILURE_REWARD)


def speed_reward(speedup: float) -> float:
    """speed-up / (1 + speed-up): bounded, increasing, 0.5 at parity, above every failure."""
    return float(speedup / (1.0 + speedup))


def is_cuda(source: str) -> bool:
    """The harness switch: a CUDA answer (defines a __global__ kernel and trimul_launch), else Python
    (jnp, or Pallas, which lowers natively on a GPU)."""
    return "__global__" in source and "trimul_launch" in source


def cuda_program(cuda_source: str) -> str:
    """The trusted prelude around an agent's CUDA source: compile with nvcc, register, call via FFI."""
    prelude = (ROOT / "cuda_mode" / "prelude.py").read_text()
    wrapper = (ROOT / "cuda_mode" / "ffi_wrapper.cc").read_text()
    return prelude.replace('"__AGENT_CUDA__"', repr(cuda_source)).replace('"__FFI_WRAPPER__"', repr(wrapper))


def _gpu_devices() -> list[str]:
    return sorted(str(p) for p in Path("/dev").glob("nvidia*"))


SEED_BITS = 128  # inputs an agent cannot recover by searching the seed space (31 bits could be)


def _child_seed(rng: np.random.Generator) -> int:
    """A full-entropy seed for one call's inputs, drawn from the score's generator."""
    return int.from_bytes(rng.bytes(SEED_BITS // 8), "little")


def time_kernel(source: str, seed: int, *, check: bool = True, time_shape: dict = TIME_SHAPE) -> tuple[dict | None, dict]:
    """-> (failure verdict or None, {"seconds": median, "times": [...]}) for one kernel source."""
    rng = np.random.default_rng(seed)
    shapes = CHECK_SHAPES + [_random_unlisted_shape(rng)] if check else []
    gpu = bool(_gpu_devices())
    cuda = is_cuda(source)
    program = cuda_program(source) if cuda else source
    # CUDA mode runs nvcc in the jail (a subprocess): the tripwire, which names subprocesses, is off there.
    largest = max([time_shape, *shapes], key=lambda shape: shape["bs"] * shape["seqlen"] ** 2 * shape["dim"])
    limits = dataclasses.replace(LIMITS, message_bytes=4 * largest["bs"] * largest["seqlen"] ** 2 * largest["dim"])
    with SandboxSession(program, limits=limits, env={} if gpu else JAIL_ENV, devices=_gpu_devices(),
                        tripwire=not cuda) as session:
        if session.status != "ok":
            result = session.result()
            return _fail(_kernel_failure(result), _detail(result)), {}
        for shape in shapes:
            verdict = _checked_call(session, shape, _child_seed(rng))[0]
            if verdict is not None:
                return verdict, {}
        _, _ = _checked_call(session, time_shape, _child_seed(rng))  # warm-up (compilation), untimed
        times = []
        for _ in range(REPEATS):
            verdict, seconds = _checked_call(session, time_shape, _child_seed(rng))
            if verdict is not None:
                return verdict, {}
            times.append(seconds)
    if not session.layers.get("contained"):  # nothing of the agent's may run while the reference is timed
        return _fail("cheat", "a process of the kernel's jail could not be shown gone after its session"), {}
    return None, {"seconds": float(np.median(times)), "times": times, "layers": session.layers}


def _checked_call(session: SandboxSession, shape: dict, seed: int):
    """One call on fresh inputs; -> (failure verdict or None, the parent-measured seconds)."""
    x, mask, weights = generate_inputs(**shape, seed=seed)
    reply = session.call("custom_kernel", arrays=_arrays(x, mask, weights))
    if not reply.ok:
        return _fail(failure_kind(reply), _detail(reply)), 0.0
    got = reply.arrays.get("return")
    expected = np.asarray(trimul_reference(x, mask, weights))
    if got is None or got.shape != expected.shape or not np.isfinite(got).all() or not np.allclose(
            np.asarray(got, np.float32), expected, rtol=2e-2, atol=2e-2):
        return _fail("wrong_result", f"shape {shape} differs from the reference"), reply.seconds
    return None, reply.seconds


def _kernel_failure(result) -> str:
    head = (result.error.strip().splitlines() or [""])[0]  # "agent_code.CompileError: ..." names the class
    if "NeedsGPU" in head:
        return "needs_gpu"
    if "CompileError" in head:
        return "compile_error"
    return failure_kind(result)


def _detail(result) -> str:
    return f"{result.status}: {result.error}\n{result.stderr[-1500:]}"


REFERENCE_SOURCE = (ROOT / "reference_kernel.py").read_text()


@lru_cache(maxsize=16)
def reference_seconds(seed: int, time_shape: tuple = tuple(sorted(TIME_SHAPE.items()))) -> float:
    """The jnp reference timed the same way, in its own session (no agent process left)."""
    verdict, timing = time_kernel(REFERENCE_SOURCE, seed, check=False, time_shape=dict(time_shape))
    if verdict is not None:
        raise RuntimeError(f"the reference kernel failed in the sandbox: {verdict}")
    return timing["seconds"]


def score(item: dict, answer, text: str, seed: int | None = None) -> dict:
    if not answer:
        return _fail("parse_error", "no ```python code block with custom_kernel in the reply")
    seed = secrets.randbits(SEED_BITS) if seed is None else seed
    time_shape = {**TIME_SHAPE, **item.get("time_shape", {})}
    verdict, timing = time_kernel(answer, seed, time_shape=time_shape)
    if verdict is not None:
        return verdict
    seconds = timing["seconds"]
    floor = flops(time_shape["bs"], time_shape["seqlen"], time_shape["dim"], time_shape["hiddendim"]) / CPU_PEAK_FLOPS
    if not math.isfinite(seconds) or seconds < floor:
        return _fail("cheat", f"measured {seconds:.2e}s is below the physical floor {floor:.2e}s")
    baseline = reference_seconds(seed, tuple(sorted(time_shape.items())))
    speedup = baseline / seconds
    return {"reward": speed_reward(speedup), "failure": None,
            "metrics": {"seconds": seconds, "reference_seconds": baseline, "speedup": speedup,
                        "times": timing["times"], "sandbox_layers": timing["layers"]}}
