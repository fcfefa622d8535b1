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


def load_tokenizer(directory: str | os.PathLike):
    """The checkpoint directory's tokenizer through ``transformers.AutoTokenizer``."""
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
