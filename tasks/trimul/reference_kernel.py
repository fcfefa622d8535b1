"""The jnp reference written as an agent would submit it: the timing baseline (speed-up 1)."""

import jax
import jax.numpy as jnp


def _ln(t, w, b):
    mean = t.mean(-1, keepdims=True)
    var = ((t - mean) ** 2).mean(-1, keepdims=True)
    return (t - mean) / jnp.sqrt(var + 1e-5) * w + b


@jax.jit
def custom_kernel(x, mask, weights):
    xn = _ln(x, weights["norm.weight"], weights["norm.bias"])
    lin = lambda name: xn @ weights[name].T  # noqa: E731
    m = mask[..., None]
    left = lin("left_proj.weight") * m * jax.nn.sigmoid(lin("left_gate.weight"))
    right = lin("right_proj.weight") * m * jax.nn.sigmoid(lin("right_gate.weight"))
    out = jnp.einsum("bikh,bjkh->bijh", left, right)
    out = _ln(out, weights["to_out_norm.weight"], weights["to_out_norm.bias"]) * jax.nn.sigmoid(lin("out_gate.weight"))
    return out @ weights["to_out.weight"].T
