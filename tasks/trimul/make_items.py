"""Writes the trimul task's items: one problem, timed at a different input shape per item.

The kernel is the same AlphaFold3 outgoing TriMul for every item; what an item
fixes is the shape it is timed at (``time_shape``, the task's leak key), so a
kernel tuned on the train shapes is judged on dev and test shapes it was never
timed at. Correctness is checked on the same shapes for every item (the
verifier's CHECK_SHAPES plus a random unlisted one). Sized for 2 CPU cores.

    python tasks/trimul/make_items.py
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent
QUESTION = ("Write `custom_kernel(x, mask, weights)` for the AlphaFold3 triangle multiplicative update (outgoing) "
            "as fast as you can, in one ```python code block. x: float32 [B, N, N, C]; mask: float32 [B, N, N]; "
            "weights: dict of float32 arrays with PyTorch layouts: norm.weight/bias [C], "
            "left_proj/right_proj/left_gate/right_gate/out_gate.weight [H, C], to_out_norm.weight/bias [H], "
            "to_out.weight [C, H]. Return [B, N, N, C]. It is timed at B={bs}, N={seqlen}, C={dim}, H={hiddendim}"
            "{mask}.")


def shape(seqlen: int, bs: int, dim: int, hiddendim: int, nomask: bool) -> dict:
    return dict(seqlen=seqlen, bs=bs, dim=dim, hiddendim=hiddendim, nomask=nomask, distribution="normal")


SPLITS = {
    "train": [shape(64, 1, 128, 128, True), shape(48, 2, 64, 64, False), shape(80, 1, 64, 128, True),
              shape(32, 2, 128, 64, False)],
    "dev": [shape(56, 1, 128, 64, True), shape(64, 2, 64, 128, False), shape(40, 1, 96, 96, True),
            shape(72, 1, 128, 128, False)],
    "test": [shape(96, 1, 128, 128, True), shape(64, 2, 128, 128, False)],
}


def item(split: str, index: int, time_shape: dict) -> dict:
    mask = ", without a mask (all ones)" if time_shape["nomask"] else ", with a random mask"
    return {"id": f"{split}{index}", "question": QUESTION.format(**time_shape, mask=mask), "time_shape": time_shape}


def main() -> None:
    for split, shapes in SPLITS.items():
        folder = ROOT / "data" / ("private" if split == "test" else "public")
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(item(split, i, s)) + "\n" for i, s in enumerate(shapes)))
        print(split, len(shapes))


if __name__ == "__main__":
    main()
