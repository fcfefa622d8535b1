"""Model configuration: one frozen dataclass for the Llama / Qwen2 / Qwen3 family.

Built from a Hugging Face ``config.json`` dict so the same checkpoint directory
serves PyTorch and siajax.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
REMAT_CHOICES = ("none", "dots", "full")
ATTENTION_CHOICES = ("auto", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings; ``kind`` names the HF ``rope_type``."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and options of a decoder-only transformer.

    ``qkv_bias`` / ``o_bias`` / ``mlp_bias`` follow each family: Qwen2 has q/k/v
    biases only, Llama's ``attention_bias`` covers all four projections, Qwen3
    adds per-head RMSNorm on queries and keys (``qk_norm``).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    model_type: str = "llama"
    dtype: str = "float32"
    remat: str = "none"  # per-block rematerialisation in the backward pass: none | dots | full
    attention: str = "auto"  # auto: cuDNN flash attention on GPU for bf16/fp16, XLA elsewhere
    # Decode with the layers unrolled over per-layer weight copies: the scan copies every layer's
    # weights out of the stack at every step on XLA:CPU, so unrolled decodes 1.26-1.78x faster at
    # batch 32-1 on 2 CPU cores (2026-12-06; 1.0-1.13x another day), for one extra copy of the block
    # weights while sampling and a sampler compile that grows with depth (~8 s at 30 layers against
    # ~2.5 s scanned). False (the default) scans the stacked block: compile flat in depth
    # (experiments/bench_decode_depth.py, RESULTS).
    decode_unroll: bool = False
    # The context the checkpoint was trained for (HF ``max_position_embeddings``); None: not stated.
    # Nothing stops longer sequences (RoPE extrapolates); a server refuses requests past it.
    max_position_embeddings: int | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.remat not in REMAT_CHOICES:
            raise ValueError(f"remat {self.remat!r} unknown; use one of {REMAT_CHOICES}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention {self.attention!r} unknown; use one of {ATTENTION_CHOICES}")
        if self.rope.kind not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope type {self.rope.kind!r} unsupported; use one of {SUPPORTED_ROPE_TYPES}")

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)


def _rope_from_hf(cfg: dict[str, Any]) -> RopeConfig:
    """Reads rope settings from either the v5 ``rope_parameters`` or the older keys."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    return RopeConfig(
        theta=float(theta),
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def config_from_hf(cfg: dict[str, Any], dtype: str = "float32") -> ModelConfig:
    """Maps a Hugging Face config dict to :class:`ModelConfig`; rejects what we can't run."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; siajax runs {SUPPORTED_MODEL_TYPES}"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {cfg.get('hidden_act')!r} unsupported; only 'silu' (SwiGLU)")
    if cfg.get("use_sliding_window"):
        raise ValueError("sliding-window attention is not supported; set use_sliding_window=false")
    num_heads = cfg["num_attention_heads"]
    attention_bias = bool(cfg.get("attention_bias", False))
    return ModelConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=_rope_from_hf(cfg),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        model_type=model_type,
        dtype=dtype,
        max_position_embeddings=int(cfg["max_position_embeddings"]) if cfg.get("max_position_embeddings") else None,
    )


def rope_inverse_frequencies(head_dim: int, rope: RopeConfig) -> np.ndarray:
    """Inverse frequencies [head_dim/2], float64, incl. linear and Llama-3 scaling."""
    inv_freq = 1.0 / rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled)
    return inv_freq
