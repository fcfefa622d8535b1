"""Classical denoisers scored by molecular cross-validation on simulated counts (several seeds).

    python experiments/rna_denoise/baselines.py [--seeds 0 1 2] [--depth 1.0]
Prints a Markdown table (mean over seeds; normalised MSE: 0 = no denoising, 1 = best method) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tasks" / "rna_denoise"))
import mcv  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--depth", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path("experiments/out/rna_denoise_baselines.json"))
    args = parser.parse_args()
    per_seed = []
    for seed in args.seeds:
        counts, _ = mcv.simulate_counts(seed=seed, depth=args.depth)
        per_seed.append(mcv.baseline_table(counts, seed + 1000))
    names = list(per_seed[0])
    rows = []
    for name in names:
        m = np.mean([t[name]["mse"] for t in per_seed])
        p = np.mean([t[name]["poisson"] for t in per_seed])
        norm = np.mean([mcv.normalised(t[name]["mse"], t["no_denoising"]["mse"],
                                       min(v["mse"] for v in t.values())) for t in per_seed])
        rows.append({"method": name, "mse": m, "poisson": p, "normalised_mse": norm})
    rows.sort(key=lambda r: r["mse"])
    print("| method | mse (lower better) | poisson (lower better) | normalised mse |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['mse']:.4f} | {r['poisson']:.4f} | {r['normalised_mse']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seeds": args.seeds, "depth": args.depth, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
