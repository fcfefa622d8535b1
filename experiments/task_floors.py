"""Honest floors: what a model scores on each bundled task under the task's default harness.

For every task (and model) the default harness is evaluated, exactly as the loop's evaluation
protocol does it (fixed items, fixed decoding key, voting and retries as the harness says), on
the first ``--items`` items of the test split (dev where a task has no labelled test here).
Writes a markdown table and JSON under ``--out``.

    python experiments/task_floors.py --models smollm2-135m-instruct siajax/assets/tiny-llama
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax

from siajax.agents import LocalPolicyBackend
from siajax.agents.evaluation import evaluate
from siajax.models import BUNDLED_TINY_MODEL, from_pretrained
from siajax.models.hf_import import EMBEDDED_DEFAULT
from siajax.tasks import TaskError, resolve_task

# Items per task: long-reply tasks get fewer (each item costs max_new_tokens of decoding on CPU).
DEFAULT_ITEMS = {"arithmetic": 96, "digits": 32, "lawbench": 32, "longcot_chess": 8, "gpqa": 32}


def floor(task_name: str, backend: LocalPolicyBackend, model_name: str, items: int, seed: int = 0) -> dict:
    task = resolve_task(task_name)
    split = "test"
    try:
        chosen = task.items("test")[:items]
    except TaskError:
        split, chosen = "dev", task.dev_items()[:items]
    harness = task.default_harness()
    start = time.perf_counter()
    result = evaluate(task, harness, backend, chosen, jax.random.fold_in(jax.random.key(seed), 7_000_002), split=split)
    summary = result.summary()
    return {"task": task_name, "model": Path(model_name).name, "split": split, "items": len(chosen),
            "harness": harness.version, "score": summary["score"], "pass_at_1": summary["pass_at_1"],
            "failure_rates": summary["failure_rates"], "seconds": round(time.perf_counter() - start, 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_ITEMS))
    parser.add_argument("--models", nargs="+", default=[EMBEDDED_DEFAULT, str(BUNDLED_TINY_MODEL)])
    parser.add_argument("--items", type=int, default=None, help="items per task (default: DEFAULT_ITEMS)")
    parser.add_argument("--out", type=Path, default=Path("experiments/out/task_floors"))
    args = parser.parse_args(argv)
    rows = []
    for model in args.models:
        backend = LocalPolicyBackend(*from_pretrained(model))
        for task in args.tasks:
            try:
                row = floor(task, backend, model, args.items or DEFAULT_ITEMS.get(task, 32))
            except Exception as err:  # a task without data here (gpqa) is reported, not fatal
                row = {"task": task, "model": Path(model).name, "error": str(err).splitlines()[0][:160]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "floors.json").write_text(json.dumps(rows, indent=1))
    lines = ["| task | model | split, items | default harness | score | pass@1 | main failure | s |",
             "|---|---|---|---|---:|---:|---|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['task']} | {r['model']} | | | | | not run: {r['error']} | |")
            continue
        failures = r["failure_rates"]
        worst = max(failures, key=failures.get) if failures else ""
        main_failure = f"{worst} {failures[worst]:.0%}" if worst else ""
        lines.append(f"| {r['task']} | {r['model']} | {r['split']}, {r['items']} | {r['harness']} | {r['score']:.3f} | "
                     f"{r['pass_at_1']:.3f} | {main_failure} | {r['seconds']} |")
    (args.out / "floors.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
