"""What SIA trains leaves siajax: a PEFT adapter and a merged checkpoint that transformers (+ PEFT)
load to the same logits as siajax's policy."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from siajax.export import export_model
from siajax.models import BUNDLED_TINY_MODEL, LoRAConfig, add_lora, from_pretrained

torch = pytest.importorskip("torch")  # these tests compare against PyTorch

IDS = np.array([[5, 17, 230, 41, 9, 1200, 3, 77]])


@pytest.fixture(scope="module")
def trained():
    """The tiny model with adapters on every projection and nonzero B (as after training)."""
    model, _ = from_pretrained(BUNDLED_TINY_MODEL)
    add_lora(model, LoRAConfig(rank=4, alpha=8.0), key=jax.random.key(0))
    for index, (_, variable) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))):
        variable[...] = variable[...] + 0.05 * jax.random.normal(jax.random.key(index), variable.shape)
    return model, np.asarray(model(jnp.asarray(IDS)).logits)


def _torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.float().numpy()


def test_the_merged_checkpoint_loads_in_transformers_with_the_policys_logits(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, ours = trained
    out = export_model(model, str(BUNDLED_TINY_MODEL), tmp_path / "merged", "merged")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    np.testing.assert_allclose(_torch_logits(hf), ours, atol=1e-4, rtol=0)
    assert AutoTokenizer.from_pretrained(out)("How many?")["input_ids"]  # the tokenizer came along
    base = AutoModelForCausalLM.from_pretrained(BUNDLED_TINY_MODEL, dtype=torch.float32)
    assert np.abs(_torch_logits(base) - ours).max() > 1e-2  # the adapters really changed the model


def test_the_peft_adapter_loads_on_the_base_with_the_policys_logits(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, ours = trained
    out = export_model(model, str(BUNDLED_TINY_MODEL), tmp_path / "adapter", "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and len(config["target_modules"]) == 7
    base = AutoModelForCausalLM.from_pretrained(BUNDLED_TINY_MODEL, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, out)
    np.testing.assert_allclose(_torch_logits(adapted), ours, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="format must be one of"):
        export_model(model, str(BUNDLED_TINY_MODEL), tmp_path / "x", "onnx")


def test_siajax_export_writes_a_runs_kept_weights(tmp_path, capsys):
    from siajax.cli import main
    from siajax.config import RunConfig
    from siajax.loop import run

    run(RunConfig(task="digits", model=str(BUNDLED_TINY_MODEL), levers="harness", generations=1, dev_items=4,
                  test_items=4, seed=1), tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--format", "peft"]) == 0
    out = tmp_path / "run" / "export-peft"
    assert str(out) in capsys.readouterr().out
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert main(["export", str(tmp_path / "run"), "--generation", "3"]) != 0  # one line, not a traceback
