"""Floors of a task with a tool: what a model scores with the default harness, with the task's tool
exposed, and with the harness lever's ``add_tool`` edit (the tool, a sentence on when to use it, and
one worked call).

Each harness is evaluated as the loop's protocol does (fixed items, fixed decoding key, the
harness's votes and retries), on the dev split; the table also reports how the episodes used the
tool (share calling it, share of calls well-formed, share answering with its result).

    python experiments/tool_floors.py --task arithmetic_tool --items 48
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax

from siajax.agents import LocalPolicyBackend
from siajax.agents.evaluation import evaluate
from siajax.agents.harness_edits import candidate_edits
from siajax.agents.rules import EditGrid
from siajax.harness import patch_harness
from siajax.models import from_pretrained
from siajax.models.hf_import import EMBEDDED_DEFAULT
from siajax.tasks import resolve_task


def harness_variants(task) -> dict:
    """default; the offered tools exposed (no instruction, no example); the add_tool edit."""
    default = task.default_harness()
    exposed = dataclasses.replace(default, tools=tuple(task.offered_tools().values()))
    edit = next(c for c in candidate_edits(default, task, EditGrid()) if c.kind == "add_tool")
    return {"default": default, "tool exposed": exposed, "add_tool edit": patch_harness(default, edit.patch)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="arithmetic_tool")
    parser.add_argument("--model", default=EMBEDDED_DEFAULT)
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("experiments/out/tool_floors"))
    args = parser.parse_args(argv)
    task = resolve_task(args.task)
    backend = LocalPolicyBackend(*from_pretrained(args.model))
    items = task.dev_items()[:args.items]
    rows = []
    for name, harness in harness_variants(task).items():
        start = time.perf_counter()
        result = evaluate(task, harness, backend, items, jax.random.fold_in(jax.random.key(args.seed), 7_000_003),
                          split="dev")
        summary = result.summary()
        use = summary.get("tool_use", {})
        rows.append({"harness": name, "version": harness.version, "items": len(items), "score": summary["score"],
                     "failure_rates": summary["failure_rates"], "tool_use": use, "replies": summary["samples"],
                     "seconds": round(time.perf_counter() - start, 1)})
        print(f"{name:20s} score {summary['score']:.3f}  calling {use.get('episodes_calling', 0):.2f}  "
              f"well-formed {use.get('calls_well_formed', 0):.2f}  with result {use.get('answers_with_result', 0):.2f}"
              f"  ({rows[-1]['seconds']} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.task}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
