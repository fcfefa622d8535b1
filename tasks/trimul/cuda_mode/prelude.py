"""Trusted front of an agent's CUDA TriMul, run inside the sandbox (sent as its program text).

It compiles the agent's CUDA source (AGENT_CUDA, filled in by the verifier) together with the
trusted FFI glue (FFI_WRAPPER) using the machine's nvcc, registers the handler with jax.ffi and
defines custom_kernel over it. Without a GPU it stops after compiling (NeedsGPU).
"""

import ctypes
import os
import subprocess

import jax
import jax.numpy as jnp

AGENT_CUDA = "__AGENT_CUDA__"
FFI_WRAPPER = "__FFI_WRAPPER__"


class CompileError(Exception):
    pass


class NeedsGPU(Exception):
    pass


def _build() -> str:
    with open("/tmp/agent_kernel.cu", "w") as handle:
        handle.write(AGENT_CUDA)
    with open("/tmp/ffi_wrapper.cc", "w") as handle:
        handle.write(FFI_WRAPPER)
    nvcc = "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else "nvcc"
    command = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", f"-I{jax.ffi.include_dir()}",
               "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a",
               "-x", "cu", "/tmp/agent_kernel.cu", "-x", "cu", "/tmp/ffi_wrapper.cc", "-o", "/tmp/agent_kernel.so"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise CompileError(done.stderr[-3000:])
    return "/tmp/agent_kernel.so"


LIBRARY = _build()
try:
    HAS_GPU = bool(jax.devices("cuda"))
except RuntimeError:
    HAS_GPU = False
if not HAS_GPU:
    raise NeedsGPU("the CUDA source compiled; this machine has no GPU to check and time it on")
jax.ffi.register_ffi_target("agent_trimul", jax.ffi.pycapsule(ctypes.cdll.LoadLibrary(LIBRARY).AgentTriMul),
                            platform="CUDA")


@jax.jit
def custom_kernel(x, mask, weights):
    names = ("left_proj", "right_proj", "left_gate", "right_gate", "out_gate")
    w_in_t = jnp.concatenate([weights[f"{name}.weight"] for name in names], axis=0).T
    call = jax.ffi.ffi_call("agent_trimul", jax.ShapeDtypeStruct(x.shape, jnp.float32), input_output_aliases={8: 0})
    return call(x, mask, weights["norm.weight"], weights["norm.bias"], w_in_t, weights["to_out_norm.weight"],
                weights["to_out_norm.bias"], weights["to_out.weight"].T, jnp.full(x.shape, jnp.nan, jnp.float32))
