"""Writes the rna_denoise task's items: one problem, scored on a different data regime per item.

Every item asks for the same ``denoise(counts)``; what an item fixes is the
simulated data set's regime (``dataset``, the task's leak key: cells, genes,
latent types, sequencing depth, dispersion, dropout), so a denoiser tuned on
the train regimes is judged on dev and test regimes it was never scored on.
Each score draws a fresh seed within the item's regime. Sized for 2 CPU cores.

    python tasks/rna_denoise/make_items.py
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent
QUESTION = ("Write `denoise(counts)` for single-cell RNA-seq: counts is an int64 numpy array [cells, genes] of UMI "
            "counts (the training half of a molecular cross-validation split). Return a non-negative array of the "
            "same shape that predicts the held-out counts better than the raw matrix. numpy, scipy and scikit-learn "
            "are available. Put the code in one ```python block.")


def regime(n_cells: int, n_genes: int, n_types: int, depth: float, dispersion: float, dropout_midpoint: float) -> dict:
    return dict(n_cells=n_cells, n_genes=n_genes, n_types=n_types, depth=depth, dispersion=dispersion,
                dropout_midpoint=dropout_midpoint)


SPLITS = {
    "train": [regime(300, 1000, 5, 1.0, 0.3, 0.0), regime(250, 800, 3, 0.7, 0.2, -0.5),
              regime(350, 1200, 8, 1.5, 0.4, 0.5), regime(200, 900, 4, 0.5, 0.3, 0.0)],
    "dev": [regime(300, 1000, 6, 1.2, 0.25, -0.25), regime(220, 700, 4, 0.8, 0.5, 0.25),
            regime(320, 1100, 7, 0.6, 0.35, -0.5), regime(280, 900, 5, 2.0, 0.2, 0.5)],
    "test": [regime(300, 1000, 5, 0.9, 0.45, 0.0), regime(260, 1200, 6, 1.3, 0.3, -0.25)],
}


def main() -> None:
    for split, regimes in SPLITS.items():
        folder = ROOT / "data" / ("private" if split == "test" else "public")
        lines = [json.dumps({"id": f"{split}{i}", "question": QUESTION, "dataset": r}) for i, r in enumerate(regimes)]
        (folder / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))
        print(split, len(regimes))


if __name__ == "__main__":
    main()
