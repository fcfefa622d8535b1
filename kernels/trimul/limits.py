"""Physical-limit sheet for the benchmark shapes on an H100 SXM (prints a Markdown table).

floor = max(FLOPs / peak, compulsory bytes / HBM bandwidth), per shape and as a
geometric mean, for a bf16 tensor-core contraction and for plain fp32 math.

``expected_us`` goes one step further for siajax's own kernels: each of the three
stages (prologue, contraction, epilogue) costs max(its FLOPs / (efficiency x the peak
of the unit it runs on), its bytes, intermediates included / (efficiency x HBM)), with
the units and efficiencies in ``KERNEL_MODELS``. The efficiencies are assumptions
(typical of a simple kernel of that kind), written down so a GPU run can refute them.

    python -m siajax._bundled.kernels.trimul.limits
"""

from __future__ import annotations

import json
import math

from .bench import SHAPES
from .reference import flops, min_bytes

H100_SXM = {"bf16_dense_flops": 989e12, "fp32_flops": 67e12, "hbm_bytes_per_s": 3.35e12}


def floors(shape: dict, chip: dict = H100_SXM) -> dict:
    f = flops(shape["bs"], shape["seqlen"], shape["dim"], shape["hiddendim"])
    b = min_bytes(shape["bs"], shape["seqlen"], shape["dim"], shape["hiddendim"], not shape["nomask"])
    memory = b / chip["hbm_bytes_per_s"]
    return {"gflop": f / 1e9, "mbytes": b / 1e6, "memory_us": memory * 1e6,
            "bf16_floor_us": max(f / chip["bf16_dense_flops"], memory) * 1e6,
            "fp32_floor_us": max(f / chip["fp32_flops"], memory) * 1e6}


# Per kernel: the unit each stage's math runs on, the fraction of its peak it is assumed to reach,
# the bytes per element of the left/right intermediates, and the fraction of HBM bandwidth.
KERNEL_MODELS = {
    # XLA reference at HIGHEST precision: cuBLAS fp32 GEMMs (no TF32), unfused elementwise passes.
    "xla_reference": {"prologue": ("fp32", 0.7), "contraction": ("fp32", 0.7), "epilogue": ("fp32", 0.7),
                      "operand_bytes": 4, "hbm": 0.7, "extra_passes": 4},
    # CUDA, SIMT fp32 throughout (64x64 tiles, 4x4 per thread).
    "cuda_f32": {"prologue": ("fp32", 0.35), "contraction": ("fp32", 0.5), "epilogue": ("fp32", 0.35),
                 "operand_bytes": 4, "hbm": 0.7, "extra_passes": 0},
    # CUDA, WMMA bf16 contraction; prologue/epilogue projections still SIMT fp32: they bound big shapes.
    "cuda_tensor_core": {"prologue": ("fp32", 0.35), "contraction": ("bf16", 0.3), "epilogue": ("fp32", 0.35),
                         "operand_bytes": 2, "hbm": 0.7, "extra_passes": 0},
    # Pallas (Triton) with bf16 operands: every matmul (projections too) on tensor cores.
    "pallas_bf16": {"prologue": ("bf16", 0.35), "contraction": ("bf16", 0.4), "epilogue": ("bf16", 0.35),
                    "operand_bytes": 2, "hbm": 0.7, "extra_passes": 0},
}
PEAK_KEYS = {"fp32": "fp32_flops", "bf16": "bf16_dense_flops"}


def stage_costs(shape: dict, model: dict) -> dict:
    """-> (FLOPs, bytes) of each stage for one kernel's data flow."""
    b, n, c, h = shape["bs"], shape["seqlen"], shape["dim"], shape["hiddendim"]
    rows, o = b * n * n, model["operand_bytes"]
    mask = 0 if shape["nomask"] else 4 * rows
    return {
        "prologue": (2 * rows * c * 5 * h, 4 * rows * c + mask + 2 * o * rows * h + 4 * rows * h),
        "contraction": (2 * b * n**3 * h, 2 * o * rows * h + 4 * rows * h),
        "epilogue": (2 * rows * h * c, 8 * rows * h + 4 * rows * c),
    }


def expected_us(shape: dict, kernel: str, chip: dict = H100_SXM) -> dict:
    """Modelled time of ``kernel`` on ``shape``: per stage and in total, in microseconds."""
    model = KERNEL_MODELS[kernel]
    out = {}
    for stage, (flop, nbytes) in stage_costs(shape, model).items():
        unit, efficiency = model[stage]
        nbytes *= 1 + model["extra_passes"] / 3
        compute = flop / (efficiency * chip[PEAK_KEYS[unit]])
        out[stage] = 1e6 * max(compute, nbytes / (model["hbm"] * chip["hbm_bytes_per_s"]))
    out["total"] = sum(out.values())
    return out


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main():
    rows = [(s, floors(s)) for s in json.loads(SHAPES.read_text())["benchmarks"]]
    print("| B | N | C | H | mask | GFLOP | min MB | HBM floor µs | bf16 floor µs | fp32 floor µs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s, f in rows:
        print(f"| {s['bs']} | {s['seqlen']} | {s['dim']} | {s['hiddendim']} | {'no' if s['nomask'] else 'yes'} | "
              f"{f['gflop']:.1f} | {f['mbytes']:.1f} | {f['memory_us']:.1f} | {f['bf16_floor_us']:.1f} | "
              f"{f['fp32_floor_us']:.1f} |")
    for key in ("bf16_floor_us", "fp32_floor_us"):
        print(f"\ngeometric mean {key.replace('_us', '')}: {geomean(f[key] for _, f in rows):.1f} µs")
    kernels = list(KERNEL_MODELS)
    print("\nModelled time per kernel (µs; `KERNEL_MODELS` assumptions, not measurements):\n")
    print("| B | N | C | mask | " + " | ".join(kernels) + " |")
    print("|---|---|---|---|" + "---|" * len(kernels))
    for s, _ in rows:
        cells = " | ".join(f"{expected_us(s, k)['total']:.0f}" for k in kernels)
        print(f"| {s['bs']} | {s['seqlen']} | {s['dim']} | {'no' if s['nomask'] else 'yes'} | {cells} |")
    cells = " | ".join(f"{geomean(expected_us(s, k)['total'] for s, _ in rows):.0f}" for k in kernels)
    print(f"| geomean | | | | {cells} |")


if __name__ == "__main__":
    main()
