"""TriMul benchmark: correctness on fresh inputs, then timings of every implementation.

Runs unchanged on CPU or GPU (H100/H200). For each shape it checks each
implementation against the float32 reference (rtol = atol = 2e-2, the task's
tolerance) on inputs with a fresh seed, then times it: device-synchronised,
warm-up excluded, median over repeats, cycling through several input sets so
caches don't flatter. Reports per-shape medians and the geometric mean (the
GPU MODE score) and writes JSON.

    python -m siajax._bundled.kernels.trimul.bench                      # benchmark shapes, all implementations available
    python -m siajax._bundled.kernels.trimul.bench --max-seqlen 256     # CPU: skip shapes too large for it

On CPU, Pallas runs in interpret mode (a correctness check, far from speed),
so it is checked on a small shape and not timed; CUDA is skipped without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .cuda_ffi import cuda_available, trimul_cuda
from .pallas import trimul_pallas
from .reference import flops, generate_inputs, min_bytes, trimul_reference

SHAPES = Path(__file__).resolve().parent / "shapes.json"
TOLERANCE = 2e-2


def implementations(backend: str) -> dict:
    impls = {"reference_xla": trimul_reference}
    if backend in ("gpu", "tpu"):
        impls["pallas_f32"] = lambda x, m, w: trimul_pallas(x, m, w)
        impls["pallas_bf16"] = lambda x, m, w: trimul_pallas(x, m, w, matmul_dtype=jnp.bfloat16)
    if cuda_available():
        impls["cuda_tensor_core"] = lambda x, m, w: trimul_cuda(x, m, w, tensor_cores=True)
        impls["cuda_f32"] = lambda x, m, w: trimul_cuda(x, m, w, tensor_cores=False)
    return impls


def device_inputs(shape: dict, seed: int):
    x, mask, weights = generate_inputs(**{**shape, "seed": seed})
    return jax.device_put(x), jax.device_put(mask), jax.tree.map(jax.device_put, weights)


def check(fn, shape: dict, seed: int) -> dict:
    x, mask, weights = device_inputs(shape, seed)
    expected = np.asarray(trimul_reference(x, mask, weights))
    got = np.asarray(jax.block_until_ready(fn(x, mask, weights)))
    ok = bool(got.shape == expected.shape and np.isfinite(got).all()
              and np.allclose(got, expected, rtol=TOLERANCE, atol=TOLERANCE))
    return {"ok": ok, "max_abs_err": float(np.max(np.abs(got - expected))) if got.shape == expected.shape else None}


def time_median(fn, input_sets, repeats: int) -> float:
    jax.block_until_ready(fn(*input_sets[0]))  # compile + warm-up
    times = []
    for r in range(repeats):
        args = input_sets[r % len(input_sets)]
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=["benchmarks", "tests"], default="benchmarks")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--input-sets", type=int, default=3)
    parser.add_argument("--max-seqlen", type=int, default=None, help="skip larger shapes (default: none on GPU, 256 on CPU)")
    parser.add_argument("--out", type=Path, default=Path("experiments/out/trimul_bench.json"))
    args = parser.parse_args()

    backend = jax.default_backend()
    max_seqlen = args.max_seqlen or (None if backend != "cpu" else 256)
    shapes = json.loads(SHAPES.read_text())[args.set]
    impls = implementations(backend)
    report = {"backend": backend, "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
              "machine": platform.machine(), "set": args.set, "repeats": args.repeats, "shapes": [], "checks": {}}
    if backend == "cpu":  # Pallas: correctness only, interpret mode, small shape
        small = {"seqlen": 32, "bs": 1, "dim": 128, "hiddendim": 128, "nomask": False, "distribution": "normal"}
        for name, kwargs in (("pallas_f32", {}), ("pallas_bf16", {"matmul_dtype": jnp.bfloat16})):
            fn = lambda x, m, w, kw=kwargs: trimul_pallas(x, m, w, interpret=True, **kw)  # noqa: E731
            report["checks"][name + "_interpret"] = check(fn, small, seed=12345)
            print(f"{name} (interpret, N=32): {report['checks'][name + '_interpret']}")

    print(f"{'shape':<34} " + " ".join(f"{name:>14}" for name in impls))
    for index, shape in enumerate(shapes):
        label = f"B{shape['bs']} N{shape['seqlen']} C{shape['dim']} H{shape['hiddendim']}" + \
                ("" if shape["nomask"] else " mask") + f" {shape['distribution']}"
        if max_seqlen and shape["seqlen"] > max_seqlen:
            print(f"{label:<34} skipped (seqlen > {max_seqlen})")
            continue
        row = {"shape": shape, "label": label, "flops": flops(shape["bs"], shape["seqlen"], shape["dim"],
                                                             shape["hiddendim"]),
               "min_bytes": min_bytes(shape["bs"], shape["seqlen"], shape["dim"], shape["hiddendim"],
                                      not shape["nomask"]), "results": {}}
        fresh_seed = shape["seed"] * 7919 + 1  # not the published seed
        input_sets = [device_inputs(shape, fresh_seed + k) for k in range(args.input_sets)]
        cells = []
        for name, fn in impls.items():
            verdict = check(fn, shape, fresh_seed + 1000)
            seconds = time_median(fn, input_sets, args.repeats) if verdict["ok"] else None
            row["results"][name] = {**verdict, "median_s": seconds}
            cells.append(f"{seconds * 1e6:>12.0f}us" if seconds else f"{'WRONG':>14}")
        report["shapes"].append(row)
        print(f"{label:<34} " + " ".join(cells), flush=True)

    report["geomean_us"] = {}
    for name in impls:
        times = [r["results"][name]["median_s"] for r in report["shapes"]]
        if times and all(times):
            report["geomean_us"][name] = 1e6 * math.exp(sum(math.log(t) for t in times) / len(times))
    base = report["geomean_us"].get("reference_xla")
    timed, total = len(report["shapes"]), len(shapes)
    report["geomean_over"] = f"{timed} of {total} shapes"
    for name, value in report["geomean_us"].items():
        ratio = f"  ({base / value:.2f}x vs reference_xla)" if base else ""
        print(f"geomean {name} over {timed} of {total} shapes: {value:.0f} us{ratio}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
