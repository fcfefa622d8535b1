"""Briefly pretrains the bundled tiny model so RL has something to steer.

A random 1.3M-parameter model with 0.02-scale embeddings cannot move much
probability onto any token through LoRA alone (its logits span about ±2.5).
A few minutes of next-token training on the tokenizer's corpus (repo text,
LawBench case facts without their charge labels, ChatML-wrapped line pairs
so it learns to close a turn, and replies to the digits task's train questions)
gives sharp, structured logits. Uses siajax's own jitted train step with a
full-parameter cross-entropy loss.

    python scripts/pretrain_tiny_model.py [--steps 1500] [--dir siajax/assets/tiny-llama]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from safetensors.numpy import save_file

from make_tiny_model import lawbench_train_cases
from siajax.models import from_pretrained, to_hf_tensors
from siajax.sampling import token_logprobs
from siajax.train import init_train_state, make_train_step

ROOT = Path(__file__).resolve().parent.parent


def training_texts() -> list[str]:
    texts = []
    for pattern in ("siajax/**/*.py", "scripts/*.py", "tests/*.py", "*.md"):
        texts += [f.read_text(encoding="utf-8") for f in sorted(ROOT.glob(pattern))]
    shared = ROOT.parent / "shared"
    for doc in ("DESIGN.md", "STYLE.md"):
        if (shared / doc).exists():
            texts.append((shared / doc).read_text(encoding="utf-8"))
    texts += [item["facts"] for item in lawbench_train_cases()]  # train facts only, without their labels
    lines = [line.strip() for text in texts for line in text.splitlines() if len(line.strip()) > 8]
    chats = [
        f"<|im_start|>user\n{a}<|im_end|>\n<|im_start|>assistant\n{b}<|im_end|>\n"
        for a, b in zip(lines[::2], lines[1::2])
    ]
    return texts + chats + digits_train_chats()


DIGITS_REPLIES = ["{n}", "{n}", "There are {n}.", "I count {n} of them.", "The answer is {n}.", "About {n}, I think.",
                  "{n} in total.", "Roughly {n}.", "I am not sure.", "That depends on what you count."]


def digits_train_chats(repeats: int = 8, seed: int = 0) -> list[str]:
    """ChatML replies to the digits task's train questions: mostly a number inside a sentence, some bare
    digits, some none. So the demos have headroom on both levers: a lenient parser or a format
    instruction (harness) and learning the bare reply (weights) each raise the strict digits score."""
    rng = np.random.RandomState(seed)
    questions = [json.loads(line)["question"] for line in
                 (ROOT / "tasks" / "digits" / "data" / "public" / "train.jsonl").read_text().splitlines()]
    return [f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
            f"{reply.format(n=rng.randint(0, 100))}<|im_end|>\n"
            for _ in range(repeats) for question in questions for reply in DIGITS_REPLIES]


def token_stream(tokenizer, texts) -> np.ndarray:
    ids = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + [tokenizer.pad_token_id]
    return np.asarray(ids, np.int32)


def next_token_loss(graphdef):
    def loss_fn(params, frozen, tokens, key):
        model = nnx.merge(graphdef, params)
        logits = model(tokens[:, :-1]).logits
        nll = -jnp.mean(token_logprobs(logits, tokens[:, 1:]))
        return nll, {"nll": nll}
    return loss_fn


def fixed_windows_nll(model, stream: np.ndarray, seq: int, rows: int = 8) -> float:
    """Mean next-token loss on fixed windows of the stream (the same windows for every model)."""
    offsets = np.linspace(0, len(stream) - seq - 2, rows).astype(int)
    tokens = jnp.asarray(np.stack([stream[o : o + seq + 1] for o in offsets]))
    return float(-jnp.mean(token_logprobs(model(tokens[:, :-1]).logits, tokens[:, 1:])))


def digits_chats_nll(model, tokenizer, seq: int = 128) -> float:
    """The model's loss on one pass of the digits chats: recorded in BUILD.json, so a test can check
    that the bundled checkpoint is the model training reached (the corpus changes with the repo)."""
    return fixed_windows_nll(model, token_stream(tokenizer, digits_train_chats(repeats=1)), seq)


def check_reload_matches(trained, directory: Path, stream: np.ndarray, seq: int) -> None:
    """The saved checkpoint, read back, must be the model training reached: a save that scrambles
    the weights (transposed views written in their old byte order) once went unnoticed for months."""
    reloaded, _ = from_pretrained(directory)
    before, after = fixed_windows_nll(trained, stream, seq), fixed_windows_nll(reloaded, stream, seq)
    print(f"next-token loss in memory {before:.4f}, reloaded {after:.4f}")
    if abs(before - after) > 1e-3:
        raise SystemExit(f"saved model does not reload as trained: loss {before:.4f} in memory, {after:.4f} reloaded")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=ROOT / "siajax" / "assets" / "tiny-llama")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, tokenizer = from_pretrained(args.dir)
    stream = token_stream(tokenizer, training_texts())
    print(f"{len(stream):,} training tokens")
    graphdef, params = nnx.split(model)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, max(1, args.steps // 10), args.steps, 3e-4)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    step = make_train_step(next_token_loss(graphdef), optimizer)
    state = init_train_state(params, optimizer, args.seed)
    rng = np.random.RandomState(args.seed)
    start = time.perf_counter()
    for i in range(args.steps):
        offsets = rng.randint(0, len(stream) - args.seq - 1, args.batch)
        batch = jnp.asarray(np.stack([stream[o : o + args.seq + 1] for o in offsets]))
        state, metrics = step(state, None, batch)
        if i % 100 == 0 or i == args.steps - 1:
            print(f"step {i:5d} nll {float(metrics['nll']):.3f} ({time.perf_counter() - start:.0f}s)", flush=True)
    trained = nnx.merge(graphdef, state.params)
    tensors = to_hf_tensors(trained)
    tensors.pop("lm_head.weight", None)  # tied
    save_file(tensors, str(args.dir / "model.safetensors"), metadata={"format": "pt"})
    check_reload_matches(trained, args.dir, stream, args.seq)
    record_path = args.dir / "BUILD.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    record.update(digits_split="train", digits_chats=len(digits_train_chats()), pretrain_steps=args.steps,
                  pretrain_tokens=len(stream), final_nll=round(float(metrics["nll"]), 3),
                  digits_chats_nll=round(digits_chats_nll(trained, tokenizer), 4))
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.dir / 'model.safetensors'}")


if __name__ == "__main__":
    main()
