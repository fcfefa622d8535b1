"""Tokenizers and the decoding ids a checkpoint implies: which tokens stop a reply, which pads.

Chat models end a turn with a token the tokenizer may not call EOS (Llama-3
``<|eot_id|>``, Qwen ``<|im_end|>``); their ``generation_config.json`` lists
every id that should stop generation. Tokenizers without a pad token (Llama-3)
pad with their EOS id.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple


class DecodingIds(NamedTuple):
    stop_token_ids: tuple[int, ...]
    pad_token_id: int


GENERIC_FAST_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")  # one class, two names (transformers 5)


def load_tokenizer(directory: str | os.PathLike):
    """The checkpoint directory's tokenizer, as ``transformers.AutoTokenizer`` picks it.

    A directory that names the generic fast tokenizer (what siajax writes for a GGUF file, and the
    bundled tiny model) loads through that class directly: ``AutoTokenizer`` would pick the same
    class, but importing it imports PyTorch when installed (~1.6 s of every run's start-up).
    """
    config = Path(directory) / "tokenizer_config.json"
    if config.is_file() and json.loads(config.read_text()).get("tokenizer_class") in GENERIC_FAST_TOKENIZERS:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(directory))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def decoding_ids(tokenizer, directory: str | os.PathLike | None = None) -> DecodingIds:
    """Stop ids = generation_config.json's ``eos_token_id`` (int or list) plus the tokenizer's EOS;
    pad = the tokenizer's pad, else the config's, else the first stop id."""
    directory = Path(directory or getattr(tokenizer, "name_or_path", "") or ".")
    config = {}
    if (directory / "generation_config.json").is_file():
        config = json.loads((directory / "generation_config.json").read_text(encoding="utf-8"))
    stops = list(dict.fromkeys(_as_ids(config.get("eos_token_id")) + _as_ids(tokenizer.eos_token_id)))
    if not stops:
        raise ValueError(f"no EOS token: neither the tokenizer nor {directory}/generation_config.json names one, "
                         "so generation could never stop; set eos_token_id in generation_config.json")
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = (_as_ids(config.get("pad_token_id")) or stops)[0]
    return DecodingIds(tuple(stops), int(pad))


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins (GPT-2's scheme) -> the byte each stands for: printable
    Latin-1 bytes stand for themselves, the other 68 bytes for code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


_BYTE_LEVEL = _byte_level_alphabet()


def token_bytes(tokenizer, ids: list[int]) -> list[bytes]:
    """Each token's own bytes: a byte-level BPE piece mapped back through its alphabet (a piece may
    hold part of a UTF-8 character), a special token's text, else the token decoded alone."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = "ByteLevel" in repr(getattr(backend, "decoder", None))  # SentencePiece's "<0xE4>" is not
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    out = []
    for token_id, piece in zip(ids, pieces):
        if byte_level and token_id not in special and piece and all(ch in _BYTE_LEVEL for ch in piece):
            out.append(bytes(_BYTE_LEVEL[ch] for ch in piece))
        else:
            out.append(tokenizer.decode([token_id]).encode("utf-8"))
    return out
