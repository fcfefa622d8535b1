"""What the verifier's deadline costs: score() called directly vs under ``call_with_deadline`` (one
daemon thread per call), side by side in one process, on the bundled tasks' real verifiers.

Each figure is the median over ``--repeats`` rounds of ``--calls`` verdicts on dev items with their
reference answers (what the loop scores after every reply).

    python experiments/bench_verifier_deadline.py [--calls 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root

from siajax.deadline import call_with_deadline  # noqa: E402
from siajax.tasks import resolve_task  # noqa: E402


def per_call_seconds(score, cases, calls: int, repeats: int, deadline: float | None) -> float:
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for index in range(calls):
            item, answer = cases[index % len(cases)]
            if deadline is None:
                score(item, answer, answer)
            else:
                call_with_deadline(deadline, score, item, answer, answer)
        rounds.append((time.perf_counter() - start) / calls)
    return statistics.median(rounds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print("| task | direct µs/call | with deadline µs/call | ratio |\n|---|---:|---:|---:|")
    for name in ("arithmetic_tool", "lawbench", "longcot_chess"):
        task = resolve_task(name)
        demonstrate = getattr(task.verifier, "demonstration", None)
        cases = [(item, str(demonstrate(item)) if demonstrate else str(item.get("answer", "x")))
                 for item in task.dev_items()[:32]]
        direct = per_call_seconds(task.verifier.score, cases, args.calls, args.repeats, None)
        guarded = per_call_seconds(task.verifier.score, cases, args.calls, args.repeats, 300.0)
        print(f"| {name} | {direct * 1e6:.1f} | {guarded * 1e6:.1f} | {guarded / direct:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
