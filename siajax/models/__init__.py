"""Policy models: the NNX transformer, LoRA, value head and checkpoint import."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from siajax.models.config import ModelConfig, RopeConfig, config_from_hf
from siajax.models.hf_import import (
    iter_checkpoint_tensors,
    load_weights,
    read_hf_config,
    resolve_checkpoint_dir,
    to_hf_tensors,
)
from siajax.models.lora import LoRAConfig, add_lora, lora_param_count, merge_lora
from siajax.models.tokenizer import DecodingIds, decoding_ids, load_tokenizer
from siajax.models.transformer import KVCache, ModelOutput, Transformer, ValueHead, positions_from_mask

BUNDLED_TINY_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny-llama"


def from_pretrained(path_or_hub_id: str | os.PathLike = BUNDLED_TINY_MODEL, dtype: str = "float32",
                    remat: str = "none"):
    """Loads (model, tokenizer) from an HF-format directory or, when online, a hub id.

    dtype: "float32" or "bfloat16" for the parameters and activations; remat:
    per-block rematerialisation for training ("none", "dots", "full").
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    directory = resolve_checkpoint_dir(path_or_hub_id)
    config = dataclasses.replace(read_hf_config(directory, dtype=dtype), remat=remat)
    model = load_weights(config, iter_checkpoint_tensors(directory))
    return model, load_tokenizer(directory)


__all__ = [
    "BUNDLED_TINY_MODEL", "DecodingIds", "KVCache", "LoRAConfig", "ModelConfig", "ModelOutput", "RopeConfig",
    "Transformer", "ValueHead", "add_lora", "config_from_hf", "decoding_ids", "from_pretrained", "load_tokenizer",
    "load_weights", "lora_param_count", "merge_lora", "positions_from_mask", "to_hf_tensors",
]
