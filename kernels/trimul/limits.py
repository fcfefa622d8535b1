"""Physical-limit sheet for the benchmark shapes on an H100 SXM (prints a Markdown table).

floor = max(FLOPs / peak, compulsory bytes / HBM bandwidth), per shape and as a
geometric mean, for a bf16 tensor-core contraction and for plain fp32 math.

    python -m kernels.trimul.limits
"""

from __future__ import annotations

import json
import math

from kernels.trimul.bench import SHAPES
from kernels.trimul.reference import flops, min_bytes

H100_SXM = {"bf16_dense_flops": 989e12, "fp32_flops": 67e12, "hbm_bytes_per_s": 3.35e12}


def floors(shape: dict, chip: dict = H100_SXM) -> dict:
    f = flops(shape["bs"], shape["seqlen"], shape["dim"], shape["hiddendim"])
    b = min_bytes(shape["bs"], shape["seqlen"], shape["dim"], shape["hiddendim"], not shape["nomask"])
    memory = b / chip["hbm_bytes_per_s"]
    return {"gflop": f / 1e9, "mbytes": b / 1e6, "memory_us": memory * 1e6,
            "bf16_floor_us": max(f / chip["bf16_dense_flops"], memory) * 1e6,
            "fp32_floor_us": max(f / chip["fp32_flops"], memory) * 1e6}


def main():
    rows = [(s, floors(s)) for s in json.loads(SHAPES.read_text())["benchmarks"]]
    print("| B | N | C | H | mask | GFLOP | min MB | HBM floor µs | bf16 floor µs | fp32 floor µs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s, f in rows:
        print(f"| {s['bs']} | {s['seqlen']} | {s['dim']} | {s['hiddendim']} | {'no' if s['nomask'] else 'yes'} | "
              f"{f['gflop']:.1f} | {f['mbytes']:.1f} | {f['memory_us']:.1f} | {f['bf16_floor_us']:.1f} | "
              f"{f['fp32_floor_us']:.1f} |")
    for key in ("bf16_floor_us", "fp32_floor_us"):
        geomean = math.exp(sum(math.log(f[key]) for _, f in rows) / len(rows))
        print(f"\ngeometric mean {key.replace('_us', '')}: {geomean:.1f} µs")


if __name__ == "__main__":
    main()
