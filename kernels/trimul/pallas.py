"""TriMul in three Pallas kernels: fused prologue, tiled N^3 contraction, fused epilogue.

1. prologue: rows of x [B*N*N, C]: LayerNorm(C), the five [C, H] projections
   accumulated over 128-column chunks of C, mask and sigmoid gates -> left,
   right, out_gate [rows, H].
2. contraction: for each (b, h), out = L @ R^T with L, R [N, N] (i or j by k),
   tiled over (i, j) blocks with a k loop inside the kernel accumulating in
   float32. ``matmul_dtype=jnp.bfloat16`` feeds bf16 operands to the MXU /
   tensor cores. The k loop lives in the body (not the grid) so the same kernel
   lowers through Triton on NVIDIA GPUs and Mosaic on TPU.
3. epilogue: rows of out [B*N*N, H]: LayerNorm(H), times out_gate, then the
   [H, C] output projection.
Between 1-2 and 2-3 XLA transposes [B,N,N,H] <-> [B,H,N,N].

Triton accepts only arrays whose every dimension is a power of two, so C and H
are zero-padded to one (C = 384 -> 512) with LayerNorm dividing by the true
width, and N to a multiple of the contraction tile; on GPUs the kernels are
lowered through Triton explicitly (``pltriton.CompilerParams``), whatever JAX's
default Pallas GPU backend is. tests/test_trimul.py lowers every problem shape
for CUDA without a GPU.

``interpret=True`` runs the kernels on any backend (CPU tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .reference import LAYER_NORM_EPS

CHUNK = 128  # columns per tile in the prologue and epilogue matmuls


def _layer_norm_rows(x, weight, bias, *, width):
    """LayerNorm over the first ``width`` columns of rows padded with zeros to a power of two (Triton
    wants power-of-two arrays); padded columns come out 0 because their weight and bias are 0."""
    valid = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1) < width
    mean = jnp.sum(x, axis=-1, keepdims=True) / width
    centred = jnp.where(valid, x - mean, 0.0)
    var = jnp.sum(centred * centred, axis=-1, keepdims=True) / width
    return centred * jax.lax.rsqrt(var + LAYER_NORM_EPS) * weight + bias


def _column_chunks(width: int, chunk: int = CHUNK) -> list:
    """Static column slices of at most ``chunk``: every load and matmul operand stays a small tile, so a
    wide C (768 -> 1024 padded) never asks for a [rows, C] or [C, H] tile in shared memory."""
    return [pl.ds(start, min(chunk, width)) for start in range(0, width, chunk)]


def _prologue_kernel(x_ref, mask_ref, ln_w_ref, ln_b_ref, wl_ref, wr_ref, wlg_ref, wrg_ref, wog_ref, left_ref,
                     right_ref, gate_ref, *, channels):
    """LayerNorm(C) and the five projections, C in chunks: one pass for the mean, one for the variance,
    one accumulating the projections."""
    chunks = _column_chunks(x_ref.shape[1])

    def centred(cols):
        x = x_ref[:, cols].astype(jnp.float32)
        index = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1) + cols.start
        return jnp.where(index < channels, x - mean, 0.0)

    mean = sum(jnp.sum(x_ref[:, cols].astype(jnp.float32), axis=1, keepdims=True) for cols in chunks) / channels
    var = sum(jnp.sum(jnp.square(centred(cols)), axis=1, keepdims=True) for cols in chunks) / channels
    inv_std = jax.lax.rsqrt(var + LAYER_NORM_EPS)
    weight_refs = (wl_ref, wr_ref, wlg_ref, wrg_ref, wog_ref)
    projected = [0.0] * len(weight_refs)
    for cols in chunks:
        xn = centred(cols) * inv_std * ln_w_ref[:, cols] + ln_b_ref[:, cols]
        projected = [acc + jnp.dot(xn, w_ref[cols, :], preferred_element_type=jnp.float32)
                     for acc, w_ref in zip(projected, weight_refs)]
    left, right, left_gate, right_gate, out_gate = projected
    m, sig = mask_ref[...], jax.nn.sigmoid
    left_ref[...] = (left * m * sig(left_gate)).astype(left_ref.dtype)
    right_ref[...] = (right * m * sig(right_gate)).astype(right_ref.dtype)
    gate_ref[...] = sig(out_gate)


def _contraction_kernel(l_ref, r_ref, out_ref, *, block_k, n):
    def body(step, acc):
        k = pl.ds(pl.multiple_of(step * block_k, block_k), block_k)
        a, b = l_ref[:, k], r_ref[:, k]
        return acc + jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    acc = jnp.zeros(out_ref.shape, jnp.float32)
    out_ref[...] = jax.lax.fori_loop(0, n // block_k, body, acc)


def _epilogue_kernel(y_ref, gate_ref, ln_w_ref, ln_b_ref, w_ref, out_ref, *, hidden):
    y = _layer_norm_rows(y_ref[...], ln_w_ref[...], ln_b_ref[...], width=hidden) * gate_ref[...]
    for cols in _column_chunks(out_ref.shape[1]):
        out_ref[:, cols] = jnp.dot(y, w_ref[:, cols], preferred_element_type=jnp.float32)


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
                  block_k: int | None = None, interpret: bool = False, platform: str | None = None):
    """Same contract as :func:`siajax._bundled.kernels.trimul.reference.trimul_reference`.

    Block sizes default to :func:`block_sizes` for the backend; N is zero-padded (mask 0) up to a
    multiple of the contraction tile, so any N lowers on GPUs and TPUs (Triton and Mosaic want
    power-of-two tiles), and the padding is cut off the result. ``platform`` ("gpu" or "tpu") picks
    tiles and lowering; by default the backend's, set it to lower for another (``jax.export``).
    """
    platform = platform or ("tpu" if jax.default_backend() == "tpu" else "gpu")
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
                         block_k=block_k, interpret=interpret, platform=platform)
    return out[:, :n, :n]


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _padded_weights(weights, c: int, h: int, width_c: int, width_h: int) -> dict:
    """The module's weights as the kernels take them: projections transposed to [in, out], vectors as
    [1, width] rows, every dimension zero-padded to a power of two (C -> width_c, H -> width_h)."""
    def matrix(name, rows, cols, padded_rows, padded_cols):
        w = weights[name].T.astype(jnp.float32)
        return jnp.pad(w, ((0, padded_rows - rows), (0, padded_cols - cols)))

    def row(name, width, padded):
        return jnp.pad(weights[name].astype(jnp.float32), (0, padded - width)).reshape(1, padded)

    projections = ("left_proj", "right_proj", "left_gate", "right_gate", "out_gate")
    return {"norm": (row("norm.weight", c, width_c), row("norm.bias", c, width_c)),
            "in": tuple(matrix(f"{name}.weight", c, h, width_c, width_h) for name in projections),
            "out_norm": (row("to_out_norm.weight", h, width_h), row("to_out_norm.bias", h, width_h)),
            "out": matrix("to_out.weight", h, c, width_h, width_c)}


@functools.partial(jax.jit, static_argnames=("matmul_dtype", "block_rows", "block_ij", "block_k", "interpret",
                                             "platform"))
def _trimul_pallas(x, mask, weights, *, matmul_dtype, block_rows: int, block_ij: int, block_k: int, interpret: bool,
                   platform: str = "gpu"):
    b, n, _, c = x.shape
    h = weights["left_proj.weight"].shape[0]
    width_c, width_h = _next_power_of_two(c), _next_power_of_two(h)
    rows = b * n * n
    block_rows = _pick_block(rows, block_rows)
    padded = _padded_weights(weights, c, h, width_c, width_h)
    x_rows = jnp.pad(x.reshape(rows, c), ((0, 0), (0, width_c - c)))
    # Triton on NVIDIA GPUs, whatever JAX's default Pallas GPU backend is (Mosaic GPU in some versions)
    compiler = pltriton.CompilerParams() if platform == "gpu" and not interpret else None

    left, right, gate = pl.pallas_call(
        functools.partial(_prologue_kernel, channels=c),
        out_shape=(jax.ShapeDtypeStruct((rows, width_h), matmul_dtype),
                   jax.ShapeDtypeStruct((rows, width_h), matmul_dtype),
                   jax.ShapeDtypeStruct((rows, width_h), jnp.float32)),
        grid=(rows // block_rows,),
        in_specs=[_rows_spec(block_rows, width_c), _rows_spec(block_rows, 1), _whole_spec((1, width_c)),
                  _whole_spec((1, width_c))] + [_whole_spec((width_c, width_h))] * 5,
        out_specs=(_rows_spec(block_rows, width_h),) * 3,
        interpret=interpret, compiler_params=compiler, name="trimul_prologue",
    )(x_rows, mask.reshape(rows, 1).astype(jnp.float32), *padded["norm"], *padded["in"])

    # [B, N(i), N(k), H] -> [B*H, N(i), N(k)]: one matmul per (b, h); padded hidden channels are all 0.
    to_bh = lambda t: t[:, :h].reshape(b, n, n, h).transpose(0, 3, 1, 2).reshape(b * h, n, n)  # noqa: E731
    bij, bk = _pick_block(n, block_ij), _pick_block(n, block_k)
    contracted = pl.pallas_call(
        functools.partial(_contraction_kernel, block_k=bk, n=n),
        out_shape=jax.ShapeDtypeStruct((b * h, n, n), jnp.float32),
        grid=(b * h, n // bij, n // bij),
        in_specs=[pl.BlockSpec((None, bij, n), lambda g, i, j: (g, i, 0)),
                  pl.BlockSpec((None, bij, n), lambda g, i, j: (g, j, 0))],
        out_specs=pl.BlockSpec((None, bij, bij), lambda g, i, j: (g, i, j)),
        interpret=interpret, compiler_params=compiler, name="trimul_contraction",
    )(to_bh(left), to_bh(right))
    y = contracted.reshape(b, h, n, n).transpose(0, 2, 3, 1).reshape(rows, h)
    y = jnp.pad(y, ((0, 0), (0, width_h - h)))

    out = pl.pallas_call(
        functools.partial(_epilogue_kernel, hidden=h),
        out_shape=jax.ShapeDtypeStruct((rows, width_c), jnp.float32),
        grid=(rows // block_rows,),
        in_specs=[_rows_spec(block_rows, width_h), _rows_spec(block_rows, width_h), _whole_spec((1, width_h)),
                  _whole_spec((1, width_h)), _whole_spec((width_h, width_c))],
        out_specs=_rows_spec(block_rows, width_c),
        interpret=interpret, compiler_params=compiler, name="trimul_epilogue",
    )(y, gate, *padded["out_norm"], padded["out"])
    return out[:, :c].reshape(b, n, n, c)
