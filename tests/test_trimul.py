"""TriMul: jnp reference vs an independent PyTorch version, Pallas (interpret), CUDA build."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

from siajax._bundled.kernels.trimul.cuda_ffi import build_library, cuda_available, trimul_cuda
from siajax._bundled.kernels.trimul.pallas import trimul_pallas
from siajax._bundled.kernels.trimul.reference import generate_inputs, trimul_reference
from siajax._bundled.kernels.trimul.bench import SHAPES

torch = pytest.importorskip("torch")  # these tests compare against PyTorch

TOL = dict(rtol=2e-2, atol=2e-2)
TEST_SHAPES = json.loads(SHAPES.read_text())["tests"]


def torch_trimul(x, mask, w):
    """The GPU MODE math written out with torch ops (float32 on CPU, so no TF32)."""
    t = {k: torch.from_numpy(v) for k, v in w.items()}
    x, mask = torch.from_numpy(x), torch.from_numpy(mask)
    xn = torch.nn.functional.layer_norm(x, (x.shape[-1],), t["norm.weight"], t["norm.bias"])
    lin = lambda name: xn @ t[name].T  # noqa: E731
    left = lin("left_proj.weight") * mask[..., None] * torch.sigmoid(lin("left_gate.weight"))
    right = lin("right_proj.weight") * mask[..., None] * torch.sigmoid(lin("right_gate.weight"))
    out = torch.einsum("bikh,bjkh->bijh", left, right)
    out = torch.nn.functional.layer_norm(out, (out.shape[-1],), t["to_out_norm.weight"], t["to_out_norm.bias"])
    return ((out * torch.sigmoid(lin("out_gate.weight"))) @ t["to_out.weight"].T).numpy()


def _check_reference(shape):
    x, mask, w = generate_inputs(**shape)
    np.testing.assert_allclose(np.asarray(trimul_reference(x, mask, w)), torch_trimul(x, mask, w), **TOL)


SMALL = [s for s in TEST_SHAPES if s["seqlen"] <= 64]


@pytest.mark.parametrize("shape", SMALL, ids=lambda s: f"N{s['seqlen']}-C{s['dim']}-{s['distribution']}-"
                                                         f"{'nomask' if s['nomask'] else 'mask'}")
def test_reference_matches_pytorch_on_small_test_shapes(shape):
    _check_reference(shape)


@pytest.mark.slow
def test_reference_matches_pytorch_on_every_test_shape():
    for shape in TEST_SHAPES if os.environ.get("SIAJAX_FULL") == "1" else [s for s in TEST_SHAPES
                                                                           if s["seqlen"] <= 128]:
        _check_reference(shape)


def test_inputs_follow_the_problem_distributions():
    x, mask, w = generate_inputs(64, 2, 128, 128, seed=1, nomask=False, distribution="cauchy")
    assert x.shape == (2, 64, 64, 128) and mask.shape == (2, 64, 64) and set(np.unique(mask)) == {0.0, 1.0}
    assert np.median(np.abs(x)) == pytest.approx(2.0, rel=0.05)  # Cauchy(0, 2): median |x| = gamma
    assert w["left_proj.weight"].shape == (128, 128) and w["to_out.weight"].shape == (128, 128)
    with pytest.raises(ValueError, match="distribution"):
        generate_inputs(8, 1, 8, 8, seed=0, nomask=True, distribution="uniform")


@pytest.mark.parametrize("matmul_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [dict(seqlen=32, bs=1, dim=128, hiddendim=128, nomask=False, distribution="normal"),
                                   dict(seqlen=64, bs=2, dim=64, hiddendim=32, nomask=True, distribution="cauchy")],
                         ids=["N32-mask", "N64-B2-cauchy"])
def test_pallas_kernels_match_reference_in_interpret_mode(shape, matmul_dtype):
    x, mask, w = generate_inputs(**shape, seed=7)
    expected = np.asarray(trimul_reference(x, mask, w))
    got = np.asarray(trimul_pallas(x, mask, w, matmul_dtype=matmul_dtype, interpret=True, block_ij=32, block_k=16))
    np.testing.assert_allclose(got, expected, **TOL)


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CI"),
                    reason="no nvcc here (CI has one and must compile)")
def test_cuda_kernel_compiles_for_sm80_and_sm90a(tmp_path):
    library = build_library(tmp_path / "libsiajax_trimul.so", force=True)
    symbols = subprocess.run(["nm", "-D", str(library)], capture_output=True, text=True).stdout
    assert "SiajaxTriMul" in symbols and "SiajaxTriMulTensorCore" in symbols  # SIMT f32 and bf16 WMMA


@pytest.mark.skipif(cuda_available(), reason="a GPU is present")
def test_cuda_wrapper_says_clearly_that_it_needs_a_gpu():
    x, mask, w = generate_inputs(8, 1, 8, 8, seed=0, nomask=True)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        trimul_cuda(x, mask, w)


def test_pallas_pads_any_n_and_picks_blocks_per_shape():
    from siajax._bundled.kernels.trimul.pallas import block_sizes

    assert block_sizes(32, "gpu") == (32, 32) and block_sizes(1024, "gpu") == (128, 64)
    assert block_sizes(256, "tpu") == (128, 128)  # TPU tiles stay multiples of 128 lanes
    x, mask, w = generate_inputs(24, 1, 32, 16, seed=3, nomask=False)  # N = 24: padded to 32 with mask 0
    got = np.asarray(trimul_pallas(x, mask, w, matmul_dtype=jnp.bfloat16, interpret=True, block_ij=16, block_k=16))
    np.testing.assert_allclose(got, np.asarray(trimul_reference(x, mask, w)), **TOL)


@pytest.mark.parametrize("shape", [dict(seqlen=16, bs=1, dim=384, hiddendim=128, nomask=False, distribution="normal"),
                                   dict(seqlen=16, bs=2, dim=48, hiddendim=24, nomask=True, distribution="cauchy")],
                         ids=["C384-three-chunks-padded", "C48-H24-padded"])
def test_pallas_pads_channels_to_powers_of_two_without_changing_the_result(shape):
    """C and H that are not powers of two are zero-padded; LayerNorm still divides by the true width."""
    x, mask, w = generate_inputs(**shape, seed=11)
    got = np.asarray(trimul_pallas(x, mask, w, interpret=True, block_ij=16, block_k=16))
    np.testing.assert_allclose(got, np.asarray(trimul_reference(x, mask, w)), **TOL)


def _abstract_inputs(bs, seqlen, dim, hiddendim):
    import jax

    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    weights = {f"{name}.weight": f32(hiddendim, dim)
               for name in ("left_proj", "right_proj", "left_gate", "right_gate", "out_gate")}
    weights |= {"norm.weight": f32(dim), "norm.bias": f32(dim), "to_out_norm.weight": f32(hiddendim),
                "to_out_norm.bias": f32(hiddendim), "to_out.weight": f32(dim, hiddendim)}
    return f32(bs, seqlen, seqlen, dim), f32(bs, seqlen, seqlen), weights


LOWERED_SHAPES = sorted({(s["bs"], s["seqlen"], s["dim"], s["hiddendim"]) for s in TEST_SHAPES
                         + json.loads(SHAPES.read_text())["benchmarks"]}, key=lambda s: (s[2], s[1]))


@pytest.mark.parametrize("matmul_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_pallas_lowers_through_triton_for_every_problem_shape(matmul_dtype):
    """Lowered for CUDA without a GPU: Triton refuses any array whose size is not a power of two, which
    the fused [C, 5H] = [128, 640] prologue weight hit on an H200 (C = 384 and N = 768 shapes too)."""
    import functools

    import jax

    for bs, seqlen, dim, hidden in LOWERED_SHAPES:
        kernel = jax.jit(functools.partial(trimul_pallas, matmul_dtype=matmul_dtype, platform="gpu"))
        text = kernel.trace(*_abstract_inputs(bs, seqlen, dim, hidden)).lower(
            lowering_platforms=("cuda",)).as_text()
        assert text.count("xla.gpu.triton") == 3, (bs, seqlen, dim)  # prologue, contraction, epilogue


def test_cuda_calls_lower_to_the_tensor_core_target_with_a_poisoned_aliased_output():
    """Lowered for CUDA without a GPU: the bf16 WMMA handler, bf16 workspaces, and the NaN-filled
    output buffer aliased to the result (an unwritten output cannot return a stale result)."""

    from siajax._bundled.kernels.trimul.cuda_ffi import _trimul_cuda_call

    x, mask, w = generate_inputs(32, 1, 16, 8, seed=0, nomask=True)
    for tensor_cores, target, operand in ((True, "siajax_trimul_tc", "bf16"), (False, "siajax_trimul", "f32")):
        text = _trimul_cuda_call.trace(x, mask, w, tensor_cores=tensor_cores).lower(
            lowering_platforms=("cuda",)).as_text()
        assert f'@{target}' in text or f'"{target}"' in text
        assert "output_tuple_indices = [0], operand_index = 8" in text  # out aliases the 9th operand ...
        assert "dense<0x7FC00000>" in text  # ... which is filled with NaN
        assert f"tensor<8x32x32x{operand}>" in text


def test_the_gpu_check_dry_run_lists_every_step(tmp_path):
    from experiments.gpu_check import STEPS, main

    assert main(["--dry-run", "--out", str(tmp_path)]) == 0
    plan = json.loads((tmp_path / "gpu_check_plan.json").read_text())
    assert plan["steps"] == list(STEPS) and all(plan["plan"][step] for step in STEPS)


def test_modelled_kernel_times_never_beat_the_physical_floor():
    """The expected-time model (README table) is a roofline with derated peaks, so no kernel's
    modelled time may fall below the shape's bf16 floor, and an fp32-only kernel not below the fp32 one."""
    import json

    from siajax._bundled.kernels.trimul.bench import SHAPES
    from siajax._bundled.kernels.trimul.limits import KERNEL_MODELS, expected_us, floors

    for shape in json.loads(SHAPES.read_text())["benchmarks"]:
        floor = floors(shape)
        for kernel, model in KERNEL_MODELS.items():
            total = expected_us(shape, kernel)["total"]
            assert total >= floor["bf16_floor_us"], (kernel, shape)
            if all(model[stage][0] == "fp32" for stage in ("prologue", "contraction", "epilogue")):
                assert total >= floor["fp32_floor_us"], (kernel, shape)


def test_the_gpu_check_keeps_the_other_kernels_rows_when_one_fails(monkeypatch):
    import experiments.gpu_check as gpu_check
    from siajax._bundled.kernels.trimul import bench

    def broken(x, m, w):
        raise ValueError("array of shape (128, 640)\nsecond line")

    monkeypatch.setattr(bench, "implementations", lambda backend: {"pallas_f32": broken, "cuda_f32": max})
    results = gpu_check._each_implementation(lambda name, fn: {"geomean_us": 10.0, "per_shape": [], "ran": fn(1, 2, 3)})
    assert results["pallas_f32"] == {"error": "ValueError: array of shape (128, 640)"}
    assert results["cuda_f32"]["geomean_us"] == 10.0
    shape = {"seqlen": 32, "dim": 128}
    report = {"status": {}, "seconds": {}, "trimul_bench": {
        "pallas_f32": results["pallas_f32"], "cuda_f32": {"geomean_us": 10.0, "per_shape": [
            {"shape": shape, "us": 10.0, "x_floor": 2.0}]}}}
    text = gpu_check.markdown(report)
    assert "| cuda_f32 | 10 | 10 (2.0x floor) |" in text and "trimul_bench pallas_f32 failed: ValueError" in text
