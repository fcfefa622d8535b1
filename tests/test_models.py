"""Logit parity with transformers (PyTorch) on the same random checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import BASE, left_padded_batch
from siajax.models import (
    BUNDLED_TINY_MODEL, config_from_hf, from_pretrained, iter_checkpoint_tensors, load_weights,
    read_hf_config, to_hf_tensors,
)
from siajax.models.hf_import import hf_name_to_path

torch = pytest.importorskip("torch")  # these tests compare against PyTorch

PARITY_CASES = [
    ("llama", {}),
    ("llama", {"num_key_value_heads": 6}),  # MHA
    ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 16}}),
    ("qwen2", {}),
    ("qwen2", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    ("qwen3", {}),
    ("qwen3", {"head_dim": 16, "num_key_value_heads": 3}),  # head_dim != hidden/heads
]


def _load(directory, dtype="float32"):
    return load_weights(read_hf_config(directory, dtype), iter_checkpoint_tensors(directory))


def _torch_logits(model, ids, mask):
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        )
    return out.logits.numpy()


@pytest.mark.parametrize("family,overrides", PARITY_CASES, ids=lambda c: str(c))
def test_logits_match_transformers_without_padding(hf_checkpoint, family, overrides):
    torch_model, directory = hf_checkpoint(family, **overrides)
    model = _load(directory)
    rng = np.random.RandomState(1)
    for length in (1, 7, 13):  # odd lengths on purpose
        ids, mask = left_padded_batch(rng, [length, length], 211)
        ours = np.asarray(model(jnp.asarray(ids)).logits)
        np.testing.assert_allclose(ours, _torch_logits(torch_model, ids, mask), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family,overrides", PARITY_CASES, ids=lambda c: str(c))
def test_logits_match_transformers_with_left_padding(hf_checkpoint, family, overrides):
    torch_model, directory = hf_checkpoint(family, **overrides)
    model = _load(directory)
    ids, mask = left_padded_batch(np.random.RandomState(2), [11, 4, 1, 9], 211)
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    reference = _torch_logits(torch_model, ids, mask)
    real = mask.astype(bool)  # logits at pad positions are meaningless in both
    assert np.abs(ours[real] - reference[real]).max() <= 1e-4


def test_bfloat16_model_tracks_float32(hf_checkpoint):
    _, directory = hf_checkpoint("qwen2")
    ids = jnp.asarray(np.random.RandomState(3).randint(3, 211, (2, 9)))
    full = np.asarray(_load(directory, "float32")(ids).logits)
    half_model = _load(directory, "bfloat16")
    assert half_model.embed.dtype == jnp.bfloat16
    half = np.asarray(half_model(ids).logits)
    assert np.abs(half - full).max() < 0.1 * np.abs(full).max()


def test_export_round_trips_checkpoint_names_and_values(hf_checkpoint):
    torch_model, directory = hf_checkpoint("qwen3")
    exported = to_hf_tensors(_load(directory))
    reference = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    assert set(exported) == set(reference)
    for name, value in reference.items():
        np.testing.assert_array_equal(exported[name], value)


def test_sharded_checkpoint_with_index_loads(hf_checkpoint, tmp_path):
    torch_model, _ = hf_checkpoint("llama")
    torch_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ids, mask = left_padded_batch(np.random.RandomState(4), [5], 211)
    ours = np.asarray(_load(tmp_path)(jnp.asarray(ids)).logits)
    np.testing.assert_allclose(ours, _torch_logits(torch_model, ids, mask), atol=1e-4)


def test_from_pretrained_loads_bundled_model_and_tokenizer():
    model, tokenizer = from_pretrained(BUNDLED_TINY_MODEL)
    ids = tokenizer("罪名: 盗窃 def f(x): return x")["input_ids"]
    assert tokenizer.decode(ids) == "罪名: 盗窃 def f(x): return x"
    logits = model(jnp.asarray([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size)
    assert np.isfinite(np.asarray(logits)).all()


def test_name_map_covers_every_family_tensor_and_rejects_strangers():
    assert hf_name_to_path("model.layers.3.self_attn.q_norm.weight") == (
        (("layers", "attn", "q_norm", "scale"), 3, False)
    )
    assert hf_name_to_path("model.norm.weight") == (("final_norm", "scale"), None, False)
    assert hf_name_to_path("model.layers.0.mlp.down_proj.weight").transpose is True
    assert hf_name_to_path("model.layers.0.block_sparse_moe.gate.weight") is None


def test_layers_are_stacked_and_the_export_round_trips(hf_checkpoint):
    """Every block weight carries a leading layer axis; exporting gives back each layer's HF tensor."""
    torch_model, directory = hf_checkpoint("qwen3", seed=5, num_hidden_layers=3)
    model = _load(directory)
    kernel = model.layers.attn.q_proj.kernel[...]
    assert kernel.shape == (3, BASE["hidden_size"], BASE["num_attention_heads"] * BASE["head_dim"])
    exported = to_hf_tensors(model)
    reference = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    assert set(exported) == set(reference)
    for name, value in exported.items():
        np.testing.assert_array_equal(value, reference[name], err_msg=name)


def test_exported_tensors_saved_by_safetensors_load_back_as_the_same_model(hf_checkpoint, tmp_path):
    """to_hf_tensors -> safetensors.numpy.save_file -> from_pretrained gives back the model's logits: a
    transposed view saved as is would scramble every projection (the tiny model's pretraining script was
    bitten: its trained weights reloaded at next-token loss ~10 against 3.4 in training)."""
    import shutil

    from safetensors.numpy import save_file

    _, directory = hf_checkpoint("llama", seed=7)
    model = _load(directory)
    for kernel in (model.layers.attn.q_proj.kernel, model.layers.mlp.down_proj.kernel):
        kernel[...] = kernel[...] + 0.05  # moved away from the file it came from
    shutil.copytree(directory, tmp_path / "saved")
    save_file(to_hf_tensors(model), str(tmp_path / "saved" / "model.safetensors"))
    ids = jnp.asarray(np.random.RandomState(3).randint(0, BASE["vocab_size"], (2, 9)))
    np.testing.assert_allclose(np.asarray(_load(tmp_path / "saved")(ids).logits), np.asarray(model(ids).logits),
                               atol=1e-5)


def test_unsupported_or_broken_configs_fail_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        config_from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="sliding-window"):
        config_from_hf({"model_type": "qwen2", "use_sliding_window": True, "num_attention_heads": 2})
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**json.loads(
        (BUNDLED_TINY_MODEL / "config.json").read_text()), "num_hidden_layers": 5}))
    for name in ("model.safetensors",):
        (tmp_path / name).write_bytes((BUNDLED_TINY_MODEL / name).read_bytes())
    with pytest.raises(KeyError, match="lacks"):
        load_weights(read_hf_config(tmp_path), iter_checkpoint_tensors(tmp_path))


def _tiny_model_builder():
    import sys

    scripts = str(Path(__file__).resolve().parent.parent / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    import make_tiny_model

    return make_tiny_model


def test_the_bundled_tiny_model_is_the_model_its_pretraining_reached():
    """BUILD.json names the LawBench cases the tokenizer and pretraining read (the bundled train split)
    and the trained model's loss on the digits chats; the bundled checkpoint must load at that loss
    (a save that scrambled every projection once shipped a model at ~10 nats, not ~3)."""
    from siajax.tasks import resolve_task

    builder = _tiny_model_builder()
    import pretrain_tiny_model

    build = json.loads((Path(BUNDLED_TINY_MODEL) / "BUILD.json").read_text())
    assert build["lawbench_split"] == "train" and build["digits_split"] == "train"
    assert build["lawbench_ids_sha256"] == builder.held_out_digest(resolve_task("lawbench").train_items())
    model, tokenizer = from_pretrained(BUNDLED_TINY_MODEL)
    assert pretrain_tiny_model.digits_chats_nll(model, tokenizer) == pytest.approx(build["digits_chats_nll"], abs=1e-3)
    assert build["digits_chats_nll"] < 4.0 and build["final_nll"] < 4.0  # trained (random init: ln 4096 = 8.3)


def test_the_tiny_model_corpus_holds_no_lawbench_dev_or_test_case():
    from siajax.tasks import resolve_task

    lines = _tiny_model_builder().corpus_lines()
    text, whole_lines = "\n".join(lines), set(lines)
    task = resolve_task("lawbench")
    # a short boilerplate fact (test-147: "经二审审理查明的事实、证据与一审相同。") may open a train case's
    # longer text; it must not be a line of its own, and no held-out fact of 40+ characters may occur
    leaked = [item["id"] for item in task.dev_items() + task.items("test")
              if item["facts"] in whole_lines or (len(item["facts"]) >= 40 and item["facts"] in text)]
    assert not leaked, f"{len(leaked)} held-out LawBench cases in the tiny model's corpus, e.g. {leaked[:3]}"
