"""Build, register and call the CUDA TriMul kernels through XLA FFI (``jax.ffi``).

``build_library()`` compiles ``cuda/trimul.cu`` with the machine's ``nvcc`` for
sm_80 and sm_90a (no GPU needed to compile). ``trimul_cuda`` registers the
handlers on first use and calls one: ``tensor_cores=True`` (default) runs the
N^3 contraction on bf16 tensor cores with float32 accumulation, False the SIMT
float32 kernel. The output buffer goes in NaN-filled and aliased to the result
(``input_output_aliases``), so output a kernel does not write reads as NaN, not as
a stale earlier result. Without a CUDA device it raises a clear error.
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
TARGETS = {False: ("siajax_trimul", "SiajaxTriMul"), True: ("siajax_trimul_tc", "SiajaxTriMulTensorCore")}


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
    loaded = ctypes.cdll.LoadLibrary(library)
    for target, symbol in TARGETS.values():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(loaded, symbol)), platform="CUDA")


def cuda_available() -> bool:
    try:
        return bool(jax.devices("cuda"))
    except RuntimeError:
        return False


def trimul_cuda(x, mask, weights, *, tensor_cores: bool = True, library: Path | None = None):
    """Same contract as the reference; runs the CUDA kernel on the default GPU."""
    if not cuda_available():
        raise RuntimeError("trimul_cuda needs a CUDA GPU visible to JAX (jax.devices('cuda') is empty); "
                           "use siajax._bundled.kernels.trimul.pallas.trimul_pallas or the reference on this machine")
    _register(str(build_library(library)))
    return _trimul_cuda_call(x, mask, weights, tensor_cores=tensor_cores)


@functools.partial(jax.jit, static_argnames=("tensor_cores",))
def _trimul_cuda_call(x, mask, weights, *, tensor_cores: bool):
    b, n, _, c = x.shape
    h = weights["left_proj.weight"].shape[0]
    w_in_t = jnp.concatenate([weights[f"{name}.weight"] for name in
                              ("left_proj", "right_proj", "left_gate", "right_gate", "out_gate")], axis=0).T
    operand = jnp.bfloat16 if tensor_cores else jnp.float32
    shape = lambda dims, dtype=jnp.float32: jax.ShapeDtypeStruct(dims, dtype)  # noqa: E731
    outputs = (shape(x.shape), shape((b * h, n, n), operand), shape((b * h, n, n), operand), shape((b * n * n, h)),
               shape((b * h, n, n)))
    call = jax.ffi.ffi_call(TARGETS[tensor_cores][0], outputs, input_output_aliases={8: 0})
    poisoned = jnp.full(x.shape, jnp.nan, jnp.float32)
    result = call(x.astype(jnp.float32), mask.astype(jnp.float32), weights["norm.weight"], weights["norm.bias"],
                  jnp.asarray(w_in_t, jnp.float32), weights["to_out_norm.weight"], weights["to_out_norm.bias"],
                  weights["to_out.weight"].T, poisoned)
    return result[0]
