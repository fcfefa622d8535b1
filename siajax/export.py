"""What SIA trained, out of siajax: a PEFT LoRA adapter or a merged Hugging Face checkpoint.

Both are written beside the base model's own config and tokenizer files (any base
siajax loads: an HF directory, a hub id, or a GGUF file through its converted
HF-format directory), so transformers, PEFT and vLLM load them as they load any
checkpoint. Adapters are stored as PEFT names them: for the stacked siajax
kernel ``layers.attn.q_proj`` ([L, in, out], adapters A [L, in, r], B [L, r, out])
layer i gives ``base_model.model.model.layers.i.self_attn.q_proj.lora_A.weight``
= A[i].T and ``...lora_B.weight`` = B[i].T, with ``lora_alpha / r`` the scale.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from siajax.models.hf_import import path_to_hf_names, resolve_checkpoint_dir, to_hf_tensors
from siajax.models.lora import merge_lora
from siajax.models.transformer import Linear

EXPORT_FORMATS = ("peft", "merged")
# Files of the base checkpoint that describe it without weights (copied into every export).
BASE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")


def _adapted_linears(model):
    for path, module in nnx.iter_graph(model):
        if isinstance(module, Linear) and module.lora_a is not None:
            yield ".".join(str(p) for p in path), module


def peft_adapter_tensors(model) -> tuple[dict[str, np.ndarray], dict]:
    """-> (PEFT-named float32 adapter tensors, the facts adapter_config.json needs)."""
    tensors, targets, ranks, scales = {}, set(), set(), set()
    for path, linear in _adapted_linears(model):
        template, _ = path_to_hf_names(f"{path}.kernel")
        a = np.asarray(jax.device_get(linear.lora_a[...]), np.float32)
        b = np.asarray(jax.device_get(linear.lora_b[...]), np.float32)
        stacked = "{layer}" in template
        for layer in range(a.shape[0]) if stacked else [None]:
            name = "base_model.model." + (template.format(layer=layer) if stacked else template)
            name = name.removesuffix(".weight")
            tensors[f"{name}.lora_A.weight"] = (a[layer] if stacked else a).T.copy()
            tensors[f"{name}.lora_B.weight"] = (b[layer] if stacked else b).T.copy()
        targets.add(path.rsplit(".", 1)[-1])
        ranks.add(a.shape[-1])
        scales.add(float(linear.lora_scale))
    if not tensors:
        raise ValueError("the model has no LoRA adapters to export")
    if len(ranks) != 1 or len(scales) != 1:
        raise ValueError(f"one rank and scale per adapter set expected, got ranks {ranks}, scales {scales}")
    rank = ranks.pop()
    return tensors, {"r": rank, "lora_alpha": scales.pop() * rank, "target_modules": sorted(targets)}


def _copy_base_files(base_dir: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in BASE_FILES:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out / name)


def write_peft_adapter(model, base: str, out: Path) -> Path:
    """adapter_config.json + adapter_model.safetensors (+ the base's tokenizer files) in ``out``."""
    tensors, facts = peft_adapter_tensors(model)
    base_dir = resolve_checkpoint_dir(base)
    _copy_base_files(base_dir, out)
    (out / "config.json").unlink(missing_ok=True)  # an adapter directory is not a model directory
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_dir),
              "bias": "none", "fan_in_fan_out": False, "lora_dropout": 0.0, "inference_mode": True,
              "init_lora_weights": True, "use_rslora": False, **facts}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def write_merged(model, base: str, out: Path) -> Path:
    """A full float32 HF checkpoint with the adapters folded into the kernels."""
    base_dir = resolve_checkpoint_dir(base)
    _copy_base_files(base_dir, out)
    config = json.loads((base_dir / "config.json").read_text())
    tensors = to_hf_tensors(merge_lora(model))
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32", "dtype": "float32"}, indent=1))
    save_file(tensors, str(out / "model.safetensors"))
    return out


def export_model(model, base: str, out: str | Path, fmt: str = "peft") -> Path:
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    return (write_peft_adapter if fmt == "peft" else write_merged)(model, base, Path(out))


def export_run(run_dir: str | Path, out: str | Path, generation: int | None = None, fmt: str = "peft") -> Path:
    """Exports the weights a run kept after ``generation`` (the last by default)."""
    from siajax.rundir import saved_policy

    config, _, _, policy = saved_policy(run_dir, generation)
    return export_model(policy.model(), config.model, out, fmt)
