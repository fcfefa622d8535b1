"""TriMul in three Pallas kernels: fused prologue, tiled N^3 contraction, fused epilogue.

1. prologue: one pass over rows of x [B*N*N, C]: LayerNorm(C), the five
   projections as one [C, 5H] matmul, mask and sigmoid gates -> left, right,
   out_gate [rows, H].
2. contraction: for each (b, h), out = L @ R^T with L, R [N, N] (i or j by k),
   tiled over (i, j) blocks with a k loop inside the kernel accumulating in
   float32. ``matmul_dtype=jnp.bfloat16`` feeds bf16 operands to the MXU /
   tensor cores. The k loop lives in the body (not the grid) so the same kernel
   lowers through Triton on NVIDIA GPUs and Mosaic on TPU.
3. epilogue: rows of out [B*N*N, H]: LayerNorm(H), times out_gate, then the
   [H, C] output projection.
Between 1-2 and 2-3 XLA transposes [B,N,N,H] <-> [B,H,N,N].

``interpret=True`` runs the kernels on any backend (CPU tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .reference import LAYER_NORM_EPS


def _layer_norm_rows(x, weight, bias):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(var + LAYER_NORM_EPS) * weight + bias


def _prologue_kernel(x_ref, mask_ref, ln_w_ref, ln_b_ref, w_ref, left_ref, right_ref, gate_ref, *, hidden):
    x = x_ref[...].astype(jnp.float32)
    xn = _layer_norm_rows(x, ln_w_ref[...], ln_b_ref[...])
    proj = jnp.dot(xn, w_ref[...], preferred_element_type=jnp.float32)  # [rows, 5H]
    m = mask_ref[...]
    sig = jax.nn.sigmoid
    left_ref[...] = (proj[:, 0:hidden] * m * sig(proj[:, 2 * hidden : 3 * hidden])).astype(left_ref.dtype)
    right_ref[...] = (proj[:, hidden : 2 * hidden] * m * sig(proj[:, 3 * hidden : 4 * hidden])).astype(right_ref.dtype)
    gate_ref[...] = sig(proj[:, 4 * hidden : 5 * hidden])


def _contraction_kernel(l_ref, r_ref, out_ref, *, block_k, n):
    def body(step, acc):
        k = pl.ds(pl.multiple_of(step * block_k, block_k), block_k)
        a, b = l_ref[:, k], r_ref[:, k]
        return acc + jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    acc = jnp.zeros(out_ref.shape, jnp.float32)
    out_ref[...] = jax.lax.fori_loop(0, n // block_k, body, acc)


def _epilogue_kernel(y_ref, gate_ref, ln_w_ref, ln_b_ref, w_ref, out_ref):
    y = _layer_norm_rows(y_ref[...], ln_w_ref[...], ln_b_ref[...]) * gate_ref[...]
    out_ref[...] = jnp.dot(y, w_ref[...], preferred_element_type=jnp.float32)


def _rows_spec(block_rows, width):
    return pl.BlockSpec((block_rows, width), lambda r: (r, 0))


def _whole_spec(shape):
    return pl.BlockSpec(shape, lambda r: (0,) * len(shape))


def _pick_block(n: int, preferred: int) -> int:
    block = min(preferred, n)
    while n % block:
        block //= 2
    return block


# Contraction tiles (block_ij, block_k) by N: small N keeps more (b, h, i, j) programs in flight,
# large N feeds the tensor cores / MXU bigger tiles. TPU wants multiples of 128 lanes.
BLOCKS = {"gpu": ((64, (32, 32)), (256, (64, 32)), (None, (128, 64))),
          "tpu": ((None, (128, 128)),)}


def block_sizes(n: int, platform: str) -> tuple[int, int]:
    """(block_ij, block_k) for an N x N contraction on ``platform`` ("gpu", "tpu"; else the GPU table)."""
    for limit, blocks in BLOCKS.get(platform, BLOCKS["gpu"]):
        if limit is None or n <= limit:
            return blocks
    raise AssertionError("unreachable")


def padded_length(n: int, block: int) -> int:
    return -(-n // block) * block


def trimul_pallas(x, mask, weights, *, matmul_dtype=jnp.float32, block_rows: int = 128, block_ij: int | None = None,
                  block_k: int | None = None, interpret: bool = False):
    """Same contract as :func:`siajax._bundled.kernels.trimul.reference.trimul_reference`.

    Block sizes default to :func:`block_sizes` for the backend; N is zero-padded (mask 0) up to a
    multiple of the contraction tile, so any N lowers on GPUs and TPUs (Triton and Mosaic want
    power-of-two tiles), and the padding is cut off the result.
    """
    platform = "tpu" if jax.default_backend() == "tpu" else "gpu"
    default_ij, default_k = block_sizes(x.shape[1], platform)
    block_ij, block_k = block_ij or default_ij, block_k or default_k
    if interpret:  # interpret mode has no tile constraints: small tiles keep CPU tests fast
        block_ij, block_k = min(block_ij, x.shape[1]), min(block_k, x.shape[1])
    n = x.shape[1]
    size = padded_length(n, max(block_ij, block_k))
    if size != n:
        pad = ((0, 0), (0, size - n), (0, size - n))
        x, mask = jnp.pad(x, pad + ((0, 0),)), jnp.pad(jnp.asarray(mask, jnp.float32), pad)
    out = _trimul_pallas(x, mask, weights, matmul_dtype=matmul_dtype, block_rows=block_rows, block_ij=block_ij,
                         block_k=block_k, interpret=interpret)
    return out[:, :n, :n]


@functools.partial(jax.jit, static_argnames=("matmul_dtype", "block_rows", "block_ij", "block_k", "interpret"))
def _trimul_pallas(x, mask, weights, *, matmul_dtype, block_rows: int, block_ij: int, block_k: int, interpret: bool):
    b, n, _, c = x.shape
    h = weights["left_proj.weight"].shape[0]
    rows = b * n * n
    block_rows = _pick_block(rows, block_rows)
    w_in = jnp.concatenate([weights[f"{name}.weight"] for name in
                            ("left_proj", "right_proj", "left_gate", "right_gate", "out_gate")], axis=0).T  # [C, 5H]
    vec = lambda name: weights[name].reshape(1, -1).astype(jnp.float32)  # noqa: E731

    left, right, gate = pl.pallas_call(
        functools.partial(_prologue_kernel, hidden=h),
        out_shape=(jax.ShapeDtypeStruct((rows, h), matmul_dtype), jax.ShapeDtypeStruct((rows, h), matmul_dtype),
                   jax.ShapeDtypeStruct((rows, h), jnp.float32)),
        grid=(rows // block_rows,),
        in_specs=[_rows_spec(block_rows, c), _rows_spec(block_rows, 1), _whole_spec((1, c)), _whole_spec((1, c)),
                  _whole_spec((c, 5 * h))],
        out_specs=(_rows_spec(block_rows, h), _rows_spec(block_rows, h), _rows_spec(block_rows, h)),
        interpret=interpret, name="trimul_prologue",
    )(x.reshape(rows, c), mask.reshape(rows, 1).astype(jnp.float32), vec("norm.weight"), vec("norm.bias"),
      w_in.astype(jnp.float32))

    # [B, N(i), N(k), H] -> [B*H, N(i), N(k)]: one matmul per (b, h).
    to_bh = lambda t: t.reshape(b, n, n, h).transpose(0, 3, 1, 2).reshape(b * h, n, n)  # noqa: E731
    bij, bk = _pick_block(n, block_ij), _pick_block(n, block_k)
    contracted = pl.pallas_call(
        functools.partial(_contraction_kernel, block_k=bk, n=n),
        out_shape=jax.ShapeDtypeStruct((b * h, n, n), jnp.float32),
        grid=(b * h, n // bij, n // bij),
        in_specs=[pl.BlockSpec((None, bij, n), lambda g, i, j: (g, i, 0)),
                  pl.BlockSpec((None, bij, n), lambda g, i, j: (g, j, 0))],
        out_specs=pl.BlockSpec((None, bij, bij), lambda g, i, j: (g, i, j)),
        interpret=interpret, name="trimul_contraction",
    )(to_bh(left), to_bh(right))
    y = contracted.reshape(b, h, n, n).transpose(0, 2, 3, 1).reshape(rows, h)

    out = pl.pallas_call(
        _epilogue_kernel,
        out_shape=jax.ShapeDtypeStruct((rows, c), jnp.float32),
        grid=(rows // block_rows,),
        in_specs=[_rows_spec(block_rows, h), _rows_spec(block_rows, h), _whole_spec((1, h)), _whole_spec((1, h)),
                  _whole_spec((h, c))],
        out_specs=_rows_spec(block_rows, c),
        interpret=interpret, name="trimul_epilogue",
    )(y, gate, vec("to_out_norm.weight"), vec("to_out_norm.bias"), weights["to_out.weight"].T.astype(jnp.float32))
    return out.reshape(b, n, n, c)
