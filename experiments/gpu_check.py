"""One command that validates siajax on a machine with one NVIDIA GPU (H100/H200), in minutes.

Steps (each timed; a failing step is recorded and the rest still run):
  environment   JAX version and devices, nvcc
  cuda_build    compile kernels/trimul/cuda/trimul.cu (SIMT f32 and bf16 tensor-core handlers)
  trimul_check  every TriMul implementation on every test shape (rtol = atol = 2e-2 vs float32)
  trimul_bench  the 7 benchmark shapes: median time per implementation, geometric mean, and the
                ratio to the H100 physical floor of each shape (kernels/trimul/limits.py)
  model         a Qwen2.5-0.5B-shaped random model in bf16: sampler tokens/s (batch 1, 8, 32),
                GRPO train step (LoRA r=16, batch 8, prompt 128 + response 128), peak memory
  mesh          the sharded sampler on a one-GPU mesh equals the unsharded one (greedy tokens, log-probs)
Writes experiments/out/gpu/gpu_check.json and gpu_check.md (and copies them to $OUT when set).

    bash experiments/gpu_check.sh            # installs what it needs when JAX has no GPU yet
    python experiments/gpu_check.py --dry-run   # the steps it would take, here, without a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

STEPS = ("environment", "cuda_build", "trimul_check", "trimul_bench", "model", "mesh")
OUT = Path("experiments/out/gpu")


def step_environment() -> dict:
    import jax

    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return {"jax": jax.__version__, "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "nvcc": version[-1] if version else None, "python": sys.version.split()[0]}


def step_cuda_build() -> dict:
    from siajax._bundled.kernels.trimul.cuda_ffi import build_library

    start = time.perf_counter()
    library = build_library(force=True)
    return {"library": str(library), "seconds": time.perf_counter() - start}


def _each_implementation(measure) -> dict:
    """``measure(name, fn)`` for every TriMul implementation on this backend; one that raises gets an
    ``error`` row and the others still run (Pallas failing to lower must not hide CUDA's figures)."""
    import jax

    from siajax._bundled.kernels.trimul.bench import implementations

    results = {}
    for name, fn in implementations(jax.default_backend()).items():
        try:
            results[name] = measure(name, fn)
        except Exception as err:
            results[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:400]}"}
        print(f"  {name}: {results[name].get('error', 'ok')}", flush=True)
    return results


def step_trimul_check() -> dict:
    from siajax._bundled.kernels.trimul.bench import SHAPES, check

    shapes = json.loads(SHAPES.read_text())["tests"]

    def measure(name, fn):
        rows = [check(fn, shape, seed=shape.get("seed", 0) + 17) for shape in shapes]
        return {"all_ok": all(r["ok"] for r in rows), "max_abs_err": max(r["max_abs_err"] or 0 for r in rows),
                "failed_shapes": [s for s, r in zip(shapes, rows) if not r["ok"]]}

    return _each_implementation(measure)


def step_trimul_bench(repeats: int = 10) -> dict:
    import jax

    from siajax._bundled.kernels.trimul.bench import SHAPES, device_inputs, time_median
    from siajax._bundled.kernels.trimul.limits import floors

    shapes = json.loads(SHAPES.read_text())["benchmarks"]

    def measure(name, fn):
        per_shape = []
        for shape in shapes:
            inputs = [device_inputs(shape, shape["seed"] + k) for k in range(3)]
            seconds = time_median(jax.jit(fn) if name == "reference_xla" else fn, inputs, repeats)
            floor = floors(shape)["bf16_floor_us"]
            per_shape.append({"shape": shape, "us": seconds * 1e6, "bf16_floor_us": floor,
                              "x_floor": seconds * 1e6 / floor})
        geomean = math.exp(sum(math.log(r["us"]) for r in per_shape) / len(per_shape))
        return {"geomean_us": geomean, "per_shape": per_shape}

    return _each_implementation(measure)


QWEN_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6, tie_word_embeddings=True, qkv_bias=True,
                model_type="qwen2", dtype="bfloat16")


def _qwen_model(seed: int = 0):
    from flax import nnx

    from siajax.models import ModelConfig, RopeConfig, Transformer

    return Transformer(ModelConfig(**QWEN_05B, rope=RopeConfig(theta=1e6)), rngs=nnx.Rngs(seed))


def _peak_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def step_model() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from siajax.models import LoRAConfig, add_lora
    from siajax.rl import GRPOConfig, RLBatch, grpo_loss
    from siajax.sampling import generate
    from siajax.train import TrainBatch, init_train_state, make_policy_loss, make_train_step, split_policy

    model = _qwen_model()
    out = {"sampler": []}
    for batch in (1, 8, 32):
        prompts = [list(range(100, 100 + 120 + i)) for i in range(batch)]
        call = lambda: jax.block_until_ready(generate(model, prompts, key=jax.random.key(0), max_new_tokens=128,  # noqa: E731
                                                      temperature=0.0).tokens)
        start = time.perf_counter()
        call()
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        call()
        seconds = time.perf_counter() - start
        out["sampler"].append({"batch": batch, "tokens_per_s": batch * 128 / seconds, "compile_s": compile_s})
    add_lora(model, LoRAConfig(rank=16, alpha=32), key=jax.random.key(0))
    parts, params, frozen = split_policy(model)
    optimizer = optax.adam(1e-5)
    step = make_train_step(make_policy_loss(parts, grpo_loss, GRPOConfig()), optimizer)
    state = init_train_state(params, optimizer, 0)
    rng = np.random.RandomState(0)
    tokens = jnp.asarray(rng.randint(3, 151936, (8, 256)), jnp.int32)
    mask = jnp.ones((8, 128), bool)
    rl = RLBatch(mask, jnp.asarray(-rng.rand(8, 128), jnp.float32), jnp.asarray(rng.randn(8, 128), jnp.float32),
                 jnp.asarray(-rng.rand(8, 128), jnp.float32))
    batch = TrainBatch(tokens, jnp.ones((8, 256), bool), rl)
    start = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    out["train_step_compile_s"] = time.perf_counter() - start
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics["loss"])
    times = []
    for _ in range(5):
        start = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    out["train_step_s"] = float(np.median(times))
    out["train_tokens_per_s"] = 8 * 256 / out["train_step_s"]
    out["peak_device_bytes"] = _peak_bytes()
    return out


def step_mesh() -> dict:
    import jax
    import numpy as np

    from siajax.parallel import MeshConfig, make_mesh
    from siajax.sampling import generate

    model = _qwen_model(1)
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    prompts = [list(range(7, 7 + 30 + i)) for i in range(4)]
    plain = generate(model, prompts, key=jax.random.key(3), max_new_tokens=32, temperature=0.0)
    sharded = generate(model, prompts, key=jax.random.key(3), max_new_tokens=32, temperature=0.0, mesh=mesh)
    return {"greedy_tokens_equal": bool(np.array_equal(np.asarray(plain.tokens), np.asarray(sharded.tokens))),
            "logprob_max_abs_diff": float(np.max(np.abs(np.asarray(plain.logprobs) - np.asarray(sharded.logprobs))))}


def markdown(report: dict) -> str:
    lines = ["# siajax GPU check", "", f"devices: {report.get('environment', {}).get('devices')}", ""]
    for step in STEPS:
        status = report["status"].get(step, "not run")
        lines.append(f"- {step}: {status} ({report['seconds'].get(step, 0):.1f} s)")
    bench = report.get("trimul_bench") or {}
    timed = {name: row for name, row in bench.items() if isinstance(row, dict) and "per_shape" in row}
    if timed:
        first = next(iter(timed.values()))["per_shape"]
        lines += ["", "| implementation | geomean µs | " + " | ".join(
            f"N{r['shape']['seqlen']}-C{r['shape']['dim']}" for r in first) + " |", "|---|---:|" + "---:|" * len(first)]
        for name, row in timed.items():
            cells = " | ".join(f"{r['us']:.0f} ({r['x_floor']:.1f}x floor)" for r in row["per_shape"])
            lines.append(f"| {name} | {row['geomean_us']:.0f} | {cells} |")
    for step in ("trimul_check", "trimul_bench"):
        for name, row in (report.get(step) or {}).items():
            if isinstance(row, dict) and "error" in row:
                lines.append(f"- {step} {name} failed: {row['error']}")
    model = report.get("model") or {}
    if isinstance(model, dict) and model:
        lines += ["", "Qwen2.5-0.5B-shaped, bf16: " + ", ".join(
            f"sampler batch {r['batch']}: {r['tokens_per_s']:.0f} tok/s" for r in model["sampler"])
            + f"; GRPO step (8 x 256 tokens) {model['train_step_s'] * 1e3:.0f} ms, compile "
              f"{model['train_step_compile_s']:.1f} s, peak {model['peak_device_bytes'] / 2**30 if model['peak_device_bytes'] else 0:.1f} GiB"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the steps and write the plan, run nothing")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    functions = {name: globals()[f"step_{name}"] for name in STEPS}
    if args.dry_run:
        plan = {name: (functions[name].__doc__ or _describe(name)) for name in args.steps}
        for name in args.steps:
            print(f"would run {name}: {plan[name]}")
        (args.out / "gpu_check_plan.json").write_text(json.dumps({"steps": args.steps, "plan": plan}, indent=1))
        return 0
    report = {"status": {}, "seconds": {}}
    for name in args.steps:
        start = time.perf_counter()
        try:
            report[name] = functions[name]()
            report["status"][name] = "ok"
        except Exception as err:  # record and go on: one broken step must not hide the others
            report[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=6)}
            report["status"][name] = "failed"
        report["seconds"][name] = time.perf_counter() - start
        print(f"{name}: {report['status'][name]} ({report['seconds'][name]:.1f} s)", flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    if os.environ.get("OUT"):
        for name in ("gpu_check.json", "gpu_check.md"):
            shutil.copy(args.out / name, Path(os.environ["OUT"]) / name)
    return 0 if all(s == "ok" for s in report["status"].values()) else 1


def _describe(name: str) -> str:
    return next(line.split(None, 1)[1] for line in __doc__.splitlines() if line.strip().startswith(name))


if __name__ == "__main__":
    sys.exit(main())
