"""Decoder-only transformer (Llama / Qwen2 / Qwen3) in Flax NNX.

One file, read top to bottom: linear layer with an optional LoRA adapter,
RMSNorm, rotary embedding, grouped-query attention with a preallocated KV
cache, SwiGLU MLP, the block, the model. Shapes use B batch, T query length,
S key length (cache slots), H heads, K kv heads, G = H/K, D head dim.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from siajax.models.config import ModelConfig, rope_inverse_frequencies
from siajax.parallel.mesh import constrain_batch, gather_fsdp_for_lookup

_MASKED = jnp.finfo(jnp.float32).min


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


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] float32
    hidden: jax.Array  # [B, T, E] final-normed hidden state (value-head input)
    cache: KVCache | None


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


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
            y = y + (x_in @ self.lora_a[...].astype(x.dtype)) @ self.lora_b[...].astype(x.dtype) * self.lora_scale
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


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        e, d, dt = config.hidden_size, config.head_dim, config.jnp_dtype
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
        """q: [B, T, H, D]; k, v: [B, S, K, D]; mask: [B, T, S] bool -> [B, T, E]."""
        b, t = q.shape[:2]
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(b, t, self.num_kv_heads, groups, self.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = jnp.where(mask[:, None, None, :, :], scores * self.head_dim**-0.5, _MASKED)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(out, lora=lora, dropout_key=key)


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
        """kv: None (keys are this chunk) or (keys, values, layer, write_index) of the stacked cache."""
        keys = list(jax.random.split(key, 7)) if key is not None else [None] * 7
        q, k, v = self.attn.project(self.input_norm(x), positions, inv_freq, lora=lora, keys=keys[:3])
        if kv is not None:
            cache_k, cache_v, layer, write_index = kv
            # Write only this chunk into the stacked cache so XLA updates it in place.
            cache_k = jax.lax.dynamic_update_slice(cache_k, k[None], (layer, 0, write_index, 0, 0))
            cache_v = jax.lax.dynamic_update_slice(cache_v, v[None], (layer, 0, write_index, 0, 0))
            k, v = cache_k[layer], cache_v[layer]
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


class Transformer(nnx.Module):
    """The policy trunk plus LM head. ``__call__`` is pure given its inputs."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        dt = config.jnp_dtype
        self.embed = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (config.vocab_size, config.hidden_size), dt))
        self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dt)
        if config.tie_word_embeddings:
            self.lm_head = nnx.data(None)
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=dt, rngs=rngs)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        lora: bool = True,
        dropout_key: jax.Array | None = None,
    ) -> ModelOutput:
        """Runs tokens [B, T] through the model.

        attention_mask [B, T] marks real tokens (0 = padding). Without a cache the
        keys are these T tokens; with one, they are written at ``cache.index`` and
        attention spans every valid slot up to each query. ``lora=False`` gives the
        frozen base (reference) policy without a second copy of the weights.
        """
        b, t = tokens.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        attention_mask = attention_mask.astype(bool)
        if positions is None:
            positions = positions_from_mask(attention_mask)
        inv_freq = jnp.asarray(rope_inverse_frequencies(self.config.head_dim, self.config.rope), jnp.float32)

        if cache is None:
            write_index = jnp.zeros((), jnp.int32)
            key_valid = attention_mask
        else:
            write_index = cache.index
            key_valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, write_index))
        mask = causal_mask(write_index + jnp.arange(t), key_valid)

        x = constrain_batch(gather_fsdp_for_lookup(self.embed[...])[tokens])
        layer_keys = jax.random.split(dropout_key, len(self.layers)) if dropout_key is not None else None
        cache_kv = None if cache is None else (cache.keys, cache.values)
        for i, layer in enumerate(self.layers):
            kv = None if cache_kv is None else (*cache_kv, i, write_index)
            x, cache_kv = layer(
                x, positions, mask, inv_freq, kv,
                lora=lora, key=None if layer_keys is None else layer_keys[i],
            )
            x = constrain_batch(x)
        hidden = self.final_norm(x)
        if self.lm_head is None:
            logits = hidden @ self.embed[...].T
        else:
            logits = self.lm_head(hidden, lora=lora)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(cache_kv[0], cache_kv[1], key_valid, write_index + t)
        return ModelOutput(logits.astype(jnp.float32), hidden, new_cache)


class ValueHead(nnx.Module):
    """Scalar state value V(h) = h·w + b on the trunk's final hidden state (PPO critic)."""

    def __init__(self, hidden_size: int, *, rngs: nnx.Rngs):
        self.kernel = nnx.Param(jnp.zeros((hidden_size,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((), jnp.float32))

    def __call__(self, hidden: jax.Array) -> jax.Array:
        return hidden.astype(jnp.float32) @ self.kernel[...] + self.bias[...]
