"""Hugging Face checkpoint import: config.json + safetensors -> NNX model.

The name map is data: one table of (HF regex, siajax path template, transpose).
PyTorch stores Linear weights as [out, in]; siajax kernels are [in, out].
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from siajax.models.config import ModelConfig, config_from_hf
from siajax.models.transformer import Transformer

# (HF name, siajax state path, transpose). Placeholders match the patterns below.
HF_WEIGHT_MAP: tuple[tuple[str, str, bool], ...] = (
    ("model.embed_tokens.weight", "embed", False),
    ("model.layers.{layer}.self_attn.{proj}.weight", "layers.{layer}.attn.{proj}.kernel", True),
    ("model.layers.{layer}.self_attn.{proj}.bias", "layers.{layer}.attn.{proj}.bias", False),
    ("model.layers.{layer}.self_attn.{norm}.weight", "layers.{layer}.attn.{norm}.scale", False),
    ("model.layers.{layer}.mlp.{proj}.weight", "layers.{layer}.mlp.{proj}.kernel", True),
    ("model.layers.{layer}.mlp.{proj}.bias", "layers.{layer}.mlp.{proj}.bias", False),
    ("model.layers.{layer}.input_layernorm.weight", "layers.{layer}.input_norm.scale", False),
    ("model.layers.{layer}.post_attention_layernorm.weight", "layers.{layer}.post_attn_norm.scale", False),
    ("model.norm.weight", "final_norm.scale", False),
    ("lm_head.weight", "lm_head.kernel", True),
)
_PLACEHOLDERS = {"layer": r"\d+", "proj": r"[a-z]+_proj", "norm": r"[qk]_norm"}
# Buffers some exporters write that carry no parameters.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, sub in _PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{sub})")
    return re.compile(pattern)


def _translate(name: str, source: int) -> tuple[str, bool] | None:
    """Rewrites ``name`` from column ``source`` (0 = HF, 1 = siajax) of the map to the other."""
    for row in HF_WEIGHT_MAP:
        match = _template_regex(row[source]).fullmatch(name)
        if match:
            return row[1 - source].format(**match.groupdict()), row[2]
    return None


def hf_name_to_path(name: str) -> tuple[tuple[str | int, ...], bool] | None:
    """Maps an HF tensor name to (siajax state path, transpose?) or None if unknown."""
    translated = _translate(name, 0)
    if translated is None:
        return None
    dotted, transpose = translated
    return tuple(int(p) if p.isdigit() else p for p in dotted.split(".")), transpose


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / shard for shard in shards]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {directory}")
    return files


def iter_checkpoint_tensors(directory: Path):
    """Yields (name, float32-or-bf16 numpy-compatible array) across all shards."""
    for file in _safetensors_files(directory):
        with safe_open(str(file), framework="flax") as reader:
            for name in reader.keys():
                yield name, reader.get_tensor(name)


def resolve_checkpoint_dir(path_or_hub_id: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub id fetched (weights, config, tokenizer) when online."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; pass the checkpoint directory holding config.json")
    if str(path_or_hub_id).startswith(("/", ".", "~")) or str(path_or_hub_id).count("/") > 1:
        raise FileNotFoundError(f"no checkpoint directory at {path} (and it is not a hub id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:  # pragma: no cover - transformers depends on it
        raise FileNotFoundError(f"{path_or_hub_id} is not a local directory") from err
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
    return Path(snapshot_download(str(path_or_hub_id), allow_patterns=patterns))


def read_hf_config(directory: Path, dtype: str = "float32") -> ModelConfig:
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{directory} has no config.json")
    return config_from_hf(json.loads(config_file.read_text()), dtype=dtype)


def abstract_model(config: ModelConfig) -> Transformer:
    """The model's structure with shape-only leaves (no random init, no memory)."""
    return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))


def load_weights(config: ModelConfig, tensors) -> Transformer:
    """Builds a Transformer from an iterable of (hf_name, array); every parameter must be set."""
    graphdef, state = nnx.split(abstract_model(config))
    flat = dict(nnx.to_flat_state(state))
    loaded: set[tuple] = set()
    for name, tensor in tensors:
        mapped = hf_name_to_path(name)
        if mapped is None:
            if _IGNORED.fullmatch(name):
                continue
            raise KeyError(f"checkpoint tensor {name!r} has no place in a {config.model_type} model")
        path, transpose = mapped
        if path not in flat:
            if path == ("lm_head", "kernel") and config.tie_word_embeddings:
                continue  # some exporters save the tied head too
            raise KeyError(f"checkpoint tensor {name!r} -> {path} does not exist for this config")
        array = jnp.asarray(tensor)
        if transpose:
            array = array.T
        expected = flat[path].shape
        if array.shape != tuple(expected):
            raise ValueError(f"{name}: checkpoint shape {array.shape} != model shape {tuple(expected)}")
        flat[path].set_value(array.astype(config.jnp_dtype))
        loaded.add(path)
    missing = sorted(set(flat) - loaded, key=str)
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} parameters, e.g. {missing[:3]}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def to_hf_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """Inverse of the map: HF-named float32 numpy arrays (for export and parity tests)."""
    out = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if isinstance(variable, nnx.LoRAParam):
            raise ValueError("merge LoRA adapters (siajax.models.merge_lora) before exporting")
        name, transpose = _translate(".".join(str(p) for p in path), 1)
        array = np.asarray(jax.device_get(variable[...]), np.float32)
        out[name] = array.T if transpose else array
    return out
