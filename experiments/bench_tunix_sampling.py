"""Sampler throughput: siajax vs Google's tunix ``Sampler``, same weights, same prompts.

tunix is installed into its own virtual environment (``--venv``, made on first
use with ``pip``: google-tunix and its dependencies, pinned to the jax, jaxlib
and flax siajax runs, so both sides compile with the same XLA). Its sampler
runs there in a subprocess (``tunix_sampling_worker.py``) on the same HF
checkpoint; siajax's runs here. Greedy, no token ends a row, so every row makes
exactly ``--new-tokens`` tokens on both sides; compile and warm-up excluded,
medians of ``--repeats``. Batch sizes run one after the other, tunix then
siajax (on the prompt ids tunix fed), never at the same time. tunix's call also tokenizes its prompt texts
and returns no log-probs; siajax's returns every token's log-prob.

    python experiments/bench_tunix_sampling.py [--model DIR] [--batch-sizes 1 8 32] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: experiments.* imports

import jax
import numpy as np

from experiments.bench_model_core import write_random_smollm2
from experiments.bench_sampling import bench_siajax
from siajax.models import from_pretrained
from siajax.sampling import generate

TUNIX = "google-tunix==0.1.7"
WORKER = Path(__file__).resolve().parent / "tunix_sampling_worker.py"
TEXTS = ("Name the charge for this case:", "def trimul(x, mask):", "Denoise the counts of cell",
         "Write a Pallas kernel that", "A shelf held 9 pencils. How many remain?")


def prompt_texts(batch: int, seed: int = 0) -> list[str]:
    rng = np.random.RandomState(seed)
    return [TEXTS[rng.randint(len(TEXTS))] * (1 + rng.randint(3)) for _ in range(batch)]


def siajax_tokens(model, prompts: list[list[int]], new_tokens: int) -> np.ndarray:
    """The greedy tokens siajax draws (the same call :func:`bench_siajax` times)."""
    return np.asarray(generate(model, prompts, key=jax.random.key(0), max_new_tokens=new_tokens,
                               temperature=0.0).tokens)


def tunix_python(venv: Path) -> Path:
    """The venv's python, made (and tunix installed) on first use; the same jax, jaxlib and flax as here."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import tunix"], capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pins = [f"{name}=={version(name)}" for name in ("jax", "jaxlib", "flax")]
    subprocess.run([python, "-m", "pip", "install", "-q", TUNIX, *pins], check=True)
    return python


def tunix_seconds(python: Path, model_dir: Path, prompts: dict[int, list[str]], new_tokens: int,
                  repeats: int) -> dict:
    request = {"model_dir": str(model_dir), "prompts": {str(b): t for b, t in prompts.items()},
               "new_tokens": new_tokens, "repeats": repeats}
    done = subprocess.run([python, str(WORKER)], input=json.dumps(request), capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the tunix worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=None, help="an HF Llama directory (default: random SmolLM2 shape)")
    parser.add_argument("--venv", type=Path, default=Path("experiments/out/tunix-venv"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("experiments/out/bench_tunix_sampling.json"))
    args = parser.parse_args()

    python = tunix_python(args.venv.resolve())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or write_random_smollm2(Path(tmp) / "smollm2-135m-random")
        model, _ = from_pretrained(model_dir)
        print(f"{'batch':>5} {'siajax tok/s':>13} {'tunix tok/s':>12} {'ratio':>7} {'same tokens':>11}")
        for batch in args.batch_sizes:
            texts = prompt_texts(batch)
            reply = tunix_seconds(python, model_dir.resolve(), {batch: texts}, args.new_tokens, args.repeats)
            prompts = reply["prompt_ids"][str(batch)]  # the ids tunix fed, its BOS included
            tokens = batch * args.new_tokens
            ours = tokens / bench_siajax(model, prompts, args.new_tokens, args.repeats)
            theirs = tokens / reply["seconds"][str(batch)]
            # Same weights, same greedy path: the share of drawn tokens on which both agree (float
            # rounding may split a near-tie, and every later token of that row then differs).
            agree = float(np.mean(siajax_tokens(model, prompts, args.new_tokens)
                                  == np.asarray(reply["tokens"][str(batch)])[:, :args.new_tokens]))
            rows.append({"batch": batch, "siajax_tokens_per_s": ours, "tunix_tokens_per_s": theirs,
                         "ratio": ours / theirs, "same_tokens": agree})
            print(f"{batch:>5} {ours:>13.1f} {theirs:>12.1f} {ours / theirs:>6.2f}x {agree:>11.3f}", flush=True)
    report = {"model": str(args.model or "random SmolLM2-135M shape"), "new_tokens": args.new_tokens,
              "repeats": args.repeats, "tunix": TUNIX, "backend": jax.default_backend(), "jax": jax.__version__,
              "cpu_count": os.cpu_count(), "machine": platform.machine(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
