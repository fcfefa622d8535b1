"""Decoder-only transformer (Llama / Qwen2 / Qwen3) in Flax NNX.

One file, read top to bottom: linear layer with an optional LoRA adapter,
RMSNorm, rotary embedding, grouped-query attention over a preallocated KV
cache, SwiGLU MLP, the block, the model. The model's blocks are ONE stacked
:class:`Block` whose every weight carries a leading layer axis [L, ...], run
with ``lax.scan``: a 30-layer model compiles one layer's program, not thirty.
Shapes use B batch, T query length, S key length (cache slots), H heads,
K kv heads, G = H/K, D head dim, E model width, V vocabulary.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from siajax.models.config import ModelConfig, rope_inverse_frequencies
from siajax.parallel.mesh import constrain_batch, gather_fsdp_for_lookup

# Per-block rematerialisation: what the backward pass may keep instead of recomputing.
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each block's input
}
HEAD_MODES = ("all", "last", "none")


class KVCache(NamedTuple):
    """Preallocated keys/values for all layers plus which slots hold real tokens.

    keys, values: [L, B, S, K, D]; valid: [B, S] bool; index: [] int32, the next
    slot to write (all rows advance together; left padding keeps them aligned).
    """

    keys: jax.Array
    values: jax.Array
    valid: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, slots: int) -> KVCache:
        shape = (config.num_layers, batch, slots, config.num_kv_heads, config.head_dim)
        return cls(
            keys=jnp.zeros(shape, config.jnp_dtype),
            values=jnp.zeros(shape, config.jnp_dtype),
            valid=jnp.zeros((batch, slots), bool),
            index=jnp.zeros((), jnp.int32),
        )

    def take_rows(self, rows: jax.Array) -> KVCache:
        """The cache of batch rows ``rows`` [B'] (a prompt's keys and values copied to each row that
        continues it)."""
        return KVCache(self.keys[:, rows], self.values[:, rows], self.valid[rows], self.index)


class ModelOutput(NamedTuple):
    logits: jax.Array | None  # [B, T, V] (head="all"), [B, 1, V] (head="last") float32, or None (head="none")
    hidden: jax.Array  # [B, T, E] final-normed hidden state (LM-head and value-head input)
    cache: KVCache | None


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def low_rank_update(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """LoRA's term scale·(x·A)·B, x [..., in], A [in, r], B [r, out].

    Its own backward: JAX's transpose of this product transposes the [tokens, out] cotangent in
    memory before the rank-r products, which on XLA:CPU made the adapter's backward slower than
    the frozen x·W beside it (51 vs 4.5 ms for 3,072 tokens at SmolLM2's MLP width). Here every
    product keeps the big operands as they lie and flattens the token axes first.
    """
    return ((x @ a) * scale) @ b


def _low_rank_forward(x, a, b, scale):
    down = (x @ a) * scale
    return down @ b, (x, a, b, down)


def _low_rank_backward(scale, residuals, grad):
    x, a, b, down = residuals
    tokens_in, tokens_down = x.reshape(-1, x.shape[-1]), down.reshape(-1, down.shape[-1])
    grad = grad.reshape(-1, grad.shape[-1])
    grad_down = (grad @ b.T) * scale  # [N, r]
    grad_a = jnp.dot(tokens_in.T, grad_down, preferred_element_type=jnp.float32)
    grad_b = jnp.dot(tokens_down.T, grad, preferred_element_type=jnp.float32)
    grad_x = (grad_down @ a.T).reshape(x.shape)
    return grad_x.astype(x.dtype), grad_a.astype(a.dtype), grad_b.astype(b.dtype)


low_rank_update.defvjp(_low_rank_forward, _low_rank_backward)


class Linear(nnx.Module):
    """y = x·W (+ b), plus an optional low-rank adapter (alpha/r)·dropout(x)·A·B.

    The adapter lives in ``nnx.LoRAParam`` variables, so ``nnx.split(model,
    nnx.LoRAParam, ...)`` separates trainable adapters from frozen base weights.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else nnx.data(None)
        self.lora_a = nnx.data(None)
        self.lora_b = nnx.data(None)
        self.lora_scale = 0.0
        self.lora_dropout = 0.0

    def __call__(self, x: jax.Array, *, lora: bool = True, dropout_key: jax.Array | None = None) -> jax.Array:
        y = x @ self.kernel[...]
        if self.bias is not None:
            y = y + self.bias[...]
        if lora and self.lora_a is not None:
            x_in = _dropout(x, self.lora_dropout, dropout_key)
            y = y + low_rank_update(x_in, self.lora_a[...].astype(x.dtype), self.lora_b[...].astype(x.dtype),
                                    float(self.lora_scale))
        return y


class RMSNorm(nnx.Module):
    """x / rms(x) · w, computed in float32 and cast back (as HF does)."""

    def __init__(self, dim: int, *, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * normed.astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding, half-split (rotate_half) layout. x: [B, T, N, D], positions: [B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def _attention_implementation(config: ModelConfig, dtype) -> str:
    """cuDNN flash attention on GPUs for 16-bit activations; XLA's fused softmax elsewhere."""
    if config.attention != "auto":
        return config.attention
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        e, d, dt = config.hidden_size, config.head_dim, config.jnp_dtype
        self.config = config
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, d
        self.q_proj = Linear(e, config.num_heads * d, use_bias=config.qkv_bias, dtype=dt, rngs=rngs)
        self.k_proj = Linear(e, config.num_kv_heads * d, use_bias=config.qkv_bias, dtype=dt, rngs=rngs)
        self.v_proj = Linear(e, config.num_kv_heads * d, use_bias=config.qkv_bias, dtype=dt, rngs=rngs)
        self.o_proj = Linear(config.num_heads * d, e, use_bias=config.o_bias, dtype=dt, rngs=rngs)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, eps=config.rms_norm_eps, dtype=dt)
            self.k_norm = RMSNorm(d, eps=config.rms_norm_eps, dtype=dt)
        else:
            self.q_norm = self.k_norm = nnx.data(None)

    def project(self, x, positions, inv_freq, *, lora, keys):
        """Queries [B, T, H, D] and this chunk's rotated keys/values [B, T, K, D]."""
        b, t, _ = x.shape
        q = self.q_proj(x, lora=lora, dropout_key=keys[0]).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x, lora=lora, dropout_key=keys[1]).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, lora=lora, dropout_key=keys[2]).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def attend(self, q, k, v, mask, *, lora, key):
        """q: [B, T, H, D]; k, v: [B, S, K, D]; mask: [B, T, S] bool -> [B, T, E].

        ``jax.nn.dot_product_attention`` handles the groups (H = G·K) without
        repeating keys; softmax runs in float32 whatever the activations' dtype.
        """
        b, t = q.shape[:2]
        implementation = _attention_implementation(self.config, q.dtype)
        try:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=implementation)
        except (ValueError, NotImplementedError, RuntimeError):
            if self.config.attention == "cudnn":
                raise
            # cuDNN refuses some shapes at trace time; XLA runs them all.
            out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim), lora=lora, dropout_key=key)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        e, f, dt = config.hidden_size, config.intermediate_size, config.jnp_dtype
        self.gate_proj = Linear(e, f, use_bias=config.mlp_bias, dtype=dt, rngs=rngs)
        self.up_proj = Linear(e, f, use_bias=config.mlp_bias, dtype=dt, rngs=rngs)
        self.down_proj = Linear(f, e, use_bias=config.mlp_bias, dtype=dt, rngs=rngs)

    def __call__(self, x, *, lora, keys):
        gate = jax.nn.silu(self.gate_proj(x, lora=lora, dropout_key=keys[0]))
        up = self.up_proj(x, lora=lora, dropout_key=keys[1])
        return self.down_proj(gate * up, lora=lora, dropout_key=keys[2])


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dt = config.jnp_dtype
        self.input_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dt)
        self.attn = Attention(config, rngs=rngs)
        self.post_attn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dt)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, positions, mask, inv_freq, kv, *, lora, key):
        """kv: None (keys are this chunk), or (cache keys, cache values, layer, write index, span):
        this chunk is written into the stacked cache, and attention reads the first ``span`` slots."""
        keys = list(jax.random.split(key, 7)) if key is not None else [None] * 7
        q, k, v = self.attn.project(self.input_norm(x), positions, inv_freq, lora=lora, keys=keys[:3])
        if kv is not None:
            cache_k, cache_v, layer, write_index, span = kv
            # Write only this chunk into the stacked cache so XLA updates it in place.
            cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), (layer, 0, write_index, 0, 0))
            cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), (layer, 0, write_index, 0, 0))
            window = (1, *cache_k.shape[1:2], span, *cache_k.shape[3:])
            k = jax.lax.dynamic_slice(cache_k, (layer, 0, 0, 0, 0), window)[0]
            v = jax.lax.dynamic_slice(cache_v, (layer, 0, 0, 0, 0), window)[0]
            kv = (cache_k, cache_v)
        x = x + self.attn.attend(q, k, v, mask, lora=lora, key=keys[3])
        x = x + self.mlp(self.post_attn_norm(x), lora=lora, keys=keys[4:])
        return x, kv


def causal_mask(query_slots: jax.Array, key_valid: jax.Array) -> jax.Array:
    """[B, T, S] mask: key slot s is visible to the query at slot q when s <= q and s is real."""
    key_slots = jnp.arange(key_valid.shape[-1])
    return (key_slots[None, None, :] <= query_slots[None, :, None]) & key_valid[:, None, :]


def positions_from_mask(mask: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """Position ids for left-padded rows: count of real tokens before each slot (pads get 0)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0) + offset


def stacked_blocks(config: ModelConfig, rngs: nnx.Rngs) -> Block:
    """One Block whose every variable has a leading [L] axis, each layer initialised apart."""

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=config.num_layers)
    def create(layer_rngs: nnx.Rngs) -> Block:
        return Block(config, rngs=layer_rngs)

    return create(rngs)


class Transformer(nnx.Module):
    """The policy trunk plus LM head. ``__call__`` is pure given its inputs."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        dt = config.jnp_dtype
        self.embed = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (config.vocab_size, config.hidden_size), dt))
        self.layers = stacked_blocks(config, rngs)
        self.final_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dt)
        if config.tie_word_embeddings:
            self.lm_head = nnx.data(None)
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=dt, rngs=rngs)

    def head_weight(self) -> jax.Array:
        """The LM head as an [E, V] matrix (the embedding's transpose when tied)."""
        return self.embed[...].T if self.lm_head is None else self.lm_head.kernel[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., E] -> float32 logits [..., V], accumulated in float32 whatever the dtype."""
        return jnp.einsum("...e,ev->...v", hidden, self.head_weight(), preferred_element_type=jnp.float32)

    def unstacked_layers(self) -> list:
        """Each layer's variables as its own arrays (one copy of the block weights).

        A decode loop that scans the stacked weights slices (copies) every layer's
        weights at every step on CPU; the sampler unstacks once per call instead
        and runs the layers unrolled (see ``ModelConfig.decode_unroll``).
        """
        _, stacked = nnx.split(self.layers)
        return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(self.config.num_layers)]

    def _run_blocks(self, x, positions, mask, inv_freq, cache, write_index, span, *, lora, dropout_key,
                    unstacked=None):
        """Scans the stacked block over the layer axis (or, given ``unstacked`` per-layer
        variables, runs them in a Python loop); the cache rides in the carry and is updated
        in place one layer slice at a time."""
        graphdef, stacked = nnx.split(self.layers)
        layers = self.config.num_layers
        keys = jax.random.split(dropout_key, layers) if dropout_key is not None else None
        if unstacked is not None:
            cache_kv = None if cache is None else (cache.keys, cache.values)
            for index, params in enumerate(unstacked):
                kv = None if cache_kv is None else (*cache_kv, index, write_index, span)
                x, cache_kv = nnx.merge(graphdef, params)(x, positions, mask, inv_freq, kv, lora=lora,
                                                          key=None if keys is None else keys[index])
                x = constrain_batch(x)
            return x, cache_kv

        def body(carry, per_layer):
            x, cache_kv = carry
            params, index, key = per_layer
            block = nnx.merge(graphdef, params)
            kv = None if cache_kv is None else (*cache_kv, index, write_index, span)
            x, cache_kv = block(x, positions, mask, inv_freq, kv, lora=lora, key=key)
            return (constrain_batch(x), cache_kv), None

        policy = REMAT_POLICIES[self.config.remat]
        if self.config.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        cache_kv = None if cache is None else (cache.keys, cache.values)
        (x, cache_kv), _ = jax.lax.scan(body, (x, cache_kv), (stacked, jnp.arange(layers), keys))
        return x, cache_kv

    def __call__(
        self,
        tokens: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        kv_span: int | None = None,
        lora: bool = True,
        dropout_key: jax.Array | None = None,
        head: str = "all",
        unstacked_layers: list | None = None,
    ) -> ModelOutput:
        """Runs tokens [B, T] through the model.

        attention_mask [B, T] marks real tokens (0 = padding). Without a cache the
        keys are these T tokens; with one, they are written at ``cache.index`` and
        attention spans the valid slots among the first ``kv_span`` (static;
        default: the whole cache) up to each query. ``head`` picks where the LM
        head runs: every position ("all"), the last one ("last", prefill and
        decode) or nowhere ("none": training reads ``hidden`` and applies the
        head in vocabulary chunks). ``lora=False`` gives the frozen base
        (reference) policy without a second copy of the weights.
        ``unstacked_layers`` (from :meth:`unstacked_layers`) runs the layers
        unrolled over per-layer arrays instead of scanning the stack.
        """
        if head not in HEAD_MODES:
            raise ValueError(f"head must be one of {HEAD_MODES}, got {head!r}")
        b, t = tokens.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        attention_mask = attention_mask.astype(bool)
        if positions is None:
            positions = positions_from_mask(attention_mask)
        inv_freq = jnp.asarray(rope_inverse_frequencies(self.config.head_dim, self.config.rope), jnp.float32)

        if cache is None:
            write_index, span = jnp.zeros((), jnp.int32), None
            key_valid = attention_mask
        else:
            write_index = cache.index
            span = cache.valid.shape[1] if kv_span is None else kv_span
            key_valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, write_index))
        visible = key_valid if span is None else key_valid[:, :span]
        mask = causal_mask(write_index + jnp.arange(t), visible)

        x = constrain_batch(gather_fsdp_for_lookup(self.embed[...])[tokens])
        x, cache_kv = self._run_blocks(x, positions, mask, inv_freq, cache, write_index, span, lora=lora,
                                       dropout_key=dropout_key, unstacked=unstacked_layers)
        hidden = self.final_norm(x)
        logits = {"all": lambda: self.logits(hidden), "last": lambda: self.logits(hidden[:, -1:]),
                  "none": lambda: None}[head]()
        new_cache = None
        if cache is not None:
            new_cache = KVCache(cache_kv[0], cache_kv[1], key_valid, write_index + t)
        return ModelOutput(logits, hidden, new_cache)


class ValueHead(nnx.Module):
    """Scalar state value V(h) = (h·w) / E + b on the trunk's final hidden state (PPO critic).

    The 1/E readout (muP's) makes an Adam step move V by O(lr) at any width E;
    with h·w an Adam step of lr on every w_i moves V by about lr·E.
    """

    def __init__(self, hidden_size: int):  # zero-initialised: V = 0 until the critic learns
        self.kernel = nnx.Param(jnp.zeros((hidden_size,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((), jnp.float32))

    def __call__(self, hidden: jax.Array) -> jax.Array:
        return hidden.astype(jnp.float32) @ self.kernel[...] / self.kernel.shape[0] + self.bias[...]
