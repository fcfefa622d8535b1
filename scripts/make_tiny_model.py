"""Builds the bundled offline model: a byte-level BPE tokenizer and a tiny Llama.

Run once; the outputs are committed under siajax/assets/tiny-llama. The model is
a real HF checkpoint (written by transformers), so PyTorch and siajax load the
same files. Corpus: this repo's own sources and docs plus LawBench case texts
(Apache-2.0) when ../shared is present, so the vocabulary covers English, code
and Chinese; byte fallback covers everything else.

    python scripts/make_tiny_model.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_CONFIG = dict(
    vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
    rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-6, initializer_range=0.02,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


def corpus_lines() -> list[str]:
    lines = []
    for pattern in ("siajax/**/*.py", "scripts/*.py", "tests/*.py", "*.md"):
        for file in sorted(ROOT.glob(pattern)):
            lines += file.read_text(encoding="utf-8").splitlines()
    shared = ROOT.parent / "shared"
    for doc in ("DESIGN.md", "STYLE.md"):
        if (shared / doc).exists():
            lines += (shared / doc).read_text(encoding="utf-8").splitlines()
    for item in lawbench_train_cases():
        lines += [item["facts"], *item["labels"]]
    return [line for line in lines if line.strip()]


def lawbench_train_cases() -> list[dict]:
    """The bundled LawBench task's train split only: no dev or test case text may reach the tiny
    model or its tokenizer (the loader has checked that no train case text is a dev/test one)."""
    from siajax.tasks import resolve_task

    return resolve_task("lawbench").train_items()


def held_out_digest(items: list[dict]) -> str:
    """What names a set of LawBench cases: the sha256 of their ids, sorted."""
    import hashlib

    return hashlib.sha256("\n".join(sorted(item["id"] for item in items)).encode()).hexdigest()


def build_record() -> dict:
    """BUILD.json: which LawBench cases the tokenizer and pretraining read (the train split, by the
    digest of its ids; tests/test_models.py checks it against the bundled task)."""
    return {"lawbench_split": "train", "lawbench_ids_sha256": held_out_digest(lawbench_train_cases()),
            "vocab_size": TINY_CONFIG["vocab_size"]}


def build_tokenizer(lines: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE,
    )


def build_model(out: Path, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY_CONFIG))
    model.save_pretrained(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "siajax" / "assets" / "tiny-llama")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = corpus_lines()
    tokenizer = build_tokenizer(lines, TINY_CONFIG["vocab_size"])
    assert tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == [0, 1, 2]
    tokenizer.save_pretrained(args.out)
    (args.out / "BUILD.json").write_text(json.dumps(build_record(), indent=1) + "\n")
    build_model(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
