"""Build, register and call the CUDA TriMul kernel through XLA FFI (``jax.ffi``).

``build_library()`` compiles ``cuda/trimul.cu`` with the machine's ``nvcc`` for
sm_80 and sm_90a (no GPU needed to compile). ``trimul_cuda`` registers the
handler on first use and calls it; without a CUDA device it raises a clear error.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp

SOURCE = Path(__file__).resolve().parent / "cuda" / "trimul.cu"
DEFAULT_ARCHS = ("sm_80", "sm_90a")
TARGET_NAME = "siajax_trimul"


def default_library_path() -> Path:
    return Path(os.environ.get("SIAJAX_KERNEL_BUILD", SOURCE.parent / "build")) / "libsiajax_trimul.so"


def nvcc_command(output: Path, archs=DEFAULT_ARCHS) -> list[str]:
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    gencode = []
    for arch in archs:
        number = arch.removeprefix("sm_")
        gencode += ["-gencode", f"arch=compute_{number},code=sm_{number}"]
    return [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", f"-I{jax.ffi.include_dir()}",
            *gencode, str(SOURCE), "-o", str(output)]


def build_library(output: Path | None = None, archs=DEFAULT_ARCHS, force: bool = False) -> Path:
    """Compiles the kernel to a shared library (cached unless the source is newer)."""
    output = Path(output or default_library_path())
    if output.exists() and not force and output.stat().st_mtime >= SOURCE.stat().st_mtime:
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    command = nvcc_command(output, archs)
    if not Path(command[0]).exists():
        raise FileNotFoundError("nvcc not found: install the CUDA toolkit or put nvcc on PATH")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"nvcc failed ({' '.join(command)}):\n{result.stderr[-4000:]}")
    return output


@functools.cache
def _register(library: str) -> None:
    handler = ctypes.cdll.LoadLibrary(library).SiajaxTriMul
    jax.ffi.register_ffi_target(TARGET_NAME, jax.ffi.pycapsule(handler), platform="CUDA")


def cuda_available() -> bool:
    try:
        return bool(jax.devices("cuda"))
    except RuntimeError:
        return False


def trimul_cuda(x, mask, weights, *, library: Path | None = None):
    """Same contract as the reference; runs the CUDA kernel on the default GPU."""
    if not cuda_available():
        raise RuntimeError("trimul_cuda needs a CUDA GPU visible to JAX (jax.devices('cuda') is empty); "
                           "use kernels.trimul.pallas.trimul_pallas or the reference on this machine")
    _register(str(build_library(library)))
    return _trimul_cuda_call(x, mask, weights)


@jax.jit
def _trimul_cuda_call(x, mask, weights):
    b, n, _, c = x.shape
    h = weights["left_proj.weight"].shape[0]
    w_in_t = jnp.concatenate([weights[f"{name}.weight"] for name in
                              ("left_proj", "right_proj", "left_gate", "right_gate", "out_gate")], axis=0).T
    f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    outputs = (f32(x.shape), f32((b * h, n, n)), f32((b * h, n, n)), f32((b * n * n, h)), f32((b * h, n, n)))
    call = jax.ffi.ffi_call(TARGET_NAME, outputs)
    result = call(x.astype(jnp.float32), mask.astype(jnp.float32), weights["norm.weight"], weights["norm.bias"],
                  jnp.asarray(w_in_t, jnp.float32), weights["to_out_norm.weight"], weights["to_out_norm.bias"],
                  weights["to_out.weight"].T)
    return result[0]
