"""TriMul (AlphaFold3 triangle multiplicative update, outgoing) in plain jnp, float32.

The math of the GPU MODE problem: LayerNorm(C) -> left/right = proj(x) * mask *
sigmoid(gate(x)) (hidden H) -> out[b,i,j,h] = sum_k left[b,i,k,h] right[b,j,k,h]
-> LayerNorm(H) -> * sigmoid(out_gate(x)) -> Linear(H -> C). Linear weights use
the PyTorch layout [out, in] under the problem's names; no linear has a bias.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

WEIGHT_NAMES = ("norm.weight", "norm.bias", "left_proj.weight", "right_proj.weight", "left_gate.weight",
                "right_gate.weight", "out_gate.weight", "to_out_norm.weight", "to_out_norm.bias", "to_out.weight")
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float = LAYER_NORM_EPS) -> jax.Array:
    """LayerNorm over the last axis with the biased variance, as torch computes it."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * weight + bias


@jax.jit
def trimul_reference(x: jax.Array, mask: jax.Array, weights: dict) -> jax.Array:
    """x: [B, N, N, C] float32, mask: [B, N, N] (0/1) -> [B, N, N, C] float32."""
    hi = jax.lax.Precision.HIGHEST
    linear = lambda t, name: jnp.einsum("...c,hc->...h", t, weights[name], precision=hi)  # noqa: E731
    xn = layer_norm(x, weights["norm.weight"], weights["norm.bias"])
    m = mask[..., None].astype(x.dtype)
    left = linear(xn, "left_proj.weight") * m * jax.nn.sigmoid(linear(xn, "left_gate.weight"))
    right = linear(xn, "right_proj.weight") * m * jax.nn.sigmoid(linear(xn, "right_gate.weight"))
    out = jnp.einsum("bikh,bjkh->bijh", left, right, precision=hi)
    out = layer_norm(out, weights["to_out_norm.weight"], weights["to_out_norm.bias"])
    out = out * jax.nn.sigmoid(linear(xn, "out_gate.weight"))
    return jnp.einsum("...h,ch->...c", out, weights["to_out.weight"], precision=hi)


def generate_inputs(seqlen: int, bs: int, dim: int, hiddendim: int, seed: int, nomask: bool,
                    distribution: str = "normal"):
    """Inputs with the problem's distributions (NumPy RNG; GPU MODE's torch CUDA stream differs).

    Returns (x [B,N,N,C] f32, mask [B,N,N] f32, weights dict of f32 arrays).
    """
    rng = np.random.default_rng(seed)
    shape = (bs, seqlen, seqlen, dim)
    if distribution == "cauchy":
        x = 2.0 * rng.standard_cauchy(shape)
    elif distribution == "normal":
        x = rng.standard_normal(shape)
    else:
        raise ValueError(f"distribution must be 'normal' or 'cauchy', got {distribution!r}")
    mask = np.ones(shape[:3]) if nomask else rng.integers(0, 2, shape[:3])
    h, c = hiddendim, dim
    weights = {
        "norm.weight": rng.standard_normal(c), "norm.bias": rng.standard_normal(c),
        **{f"{name}.weight": rng.standard_normal((h, c)) / math.sqrt(h)
           for name in ("left_proj", "right_proj", "left_gate", "right_gate", "out_gate")},
        "to_out_norm.weight": rng.standard_normal(h), "to_out_norm.bias": rng.standard_normal(h),
        "to_out.weight": rng.standard_normal((c, h)) / math.sqrt(c),
    }
    as32 = lambda a: np.ascontiguousarray(a, np.float32)  # noqa: E731
    return as32(x), as32(mask), {k: as32(v) for k, v in weights.items()}


def flops(bs: int, seqlen: int, dim: int, hiddendim: int) -> int:
    """Multiply-add FLOPs: 5 input projections, the N^3 contraction, the output projection."""
    rows = bs * seqlen * seqlen
    return 2 * rows * dim * hiddendim * 6 + 2 * bs * seqlen**3 * hiddendim


def min_bytes(bs: int, seqlen: int, dim: int, hiddendim: int, mask: bool = True) -> int:
    """Compulsory float32 traffic: read x (+ mask) and weights once, write the output once."""
    rows = bs * seqlen * seqlen
    return 4 * (2 * rows * dim + (rows if mask else 0) + 6 * dim * hiddendim + 2 * dim + 2 * hiddendim)
