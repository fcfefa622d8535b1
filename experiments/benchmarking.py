"""Timing and model-shape helpers shared by the benchmark scripts (never used in tests)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

from siajax.models import ModelConfig


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones.

    ``fn`` must block until its work is done (``jax.block_until_ready``).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def smollm2_135m_config(layers: int = 30, **overrides) -> ModelConfig:
    """A random-weight model config with SmolLM2-135M's shape (d=576, 9 / 3 heads, MLP 1,536, vocab
    49,152, tied embeddings) at any depth: the "realistically sized" model of the benchmarks."""
    return ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=layers, num_heads=9,
                       num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, tie_word_embeddings=True, **overrides)
