"""LoRA adapters: trainable split, frozen base, merge, disable, dropout; value head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from siajax.models import (
    LoRAConfig, ValueHead, add_lora, iter_checkpoint_tensors, load_weights, lora_param_count,
    merge_lora, read_hf_config,
)


def _model_with_random_adapters(directory, config: LoRAConfig):
    model = load_weights(read_hf_config(directory), iter_checkpoint_tensors(directory))
    add_lora(model, config, key=jax.random.key(0))
    # B starts at zero; give it values so the adapter actually changes the output.
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        if path[-1] == "lora_b":
            variable.set_value(0.05 * jax.random.normal(jax.random.key(len(path)), variable.shape))
    return model


@pytest.fixture
def tokens():
    return jnp.asarray(np.random.RandomState(0).randint(3, 211, (2, 9)))


def test_fresh_adapters_leave_outputs_unchanged(hf_checkpoint, tokens):
    _, directory = hf_checkpoint("qwen2")
    base = load_weights(read_hf_config(directory), iter_checkpoint_tensors(directory))
    adapted = add_lora(nnx.clone(base), LoRAConfig(rank=4), key=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(base(tokens).logits), np.asarray(adapted(tokens).logits))


def test_trainable_state_holds_exactly_the_adapters(hf_checkpoint):
    _, directory = hf_checkpoint("llama")
    model = _model_with_random_adapters(directory, LoRAConfig(rank=4, targets=("q_proj", "v_proj")))
    _, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
    paths = [p for p, _ in nnx.to_flat_state(trainable)]
    assert {p[-2] for p in paths} == {"q_proj", "v_proj"}
    assert {p[-1] for p in paths} == {"lora_a", "lora_b"}
    assert not any(p[-1].startswith("lora") for p, _ in nnx.to_flat_state(frozen))
    # 2 layers x 2 projections x (48*4 + 4*out); q out = 6*8, v out = 2*8
    assert lora_param_count(model) == 2 * ((48 * 4 + 4 * 48) + (48 * 4 + 4 * 16))


def test_gradients_reach_only_adapters(hf_checkpoint, tokens):
    _, directory = hf_checkpoint("llama")
    model = _model_with_random_adapters(directory, LoRAConfig(rank=2))
    graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)

    def loss(trainable):
        return jnp.mean(nnx.merge(graphdef, trainable, frozen)(tokens).logits ** 2)

    grads = jax.grad(loss)(trainable)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_merged_adapters_give_identical_logits(hf_checkpoint, tokens, family):
    _, directory = hf_checkpoint(family, tie_word_embeddings=family == "qwen2")
    model = _model_with_random_adapters(directory, LoRAConfig(rank=4, alpha=8.0))
    merged = merge_lora(model)
    assert lora_param_count(merged) == 0 and lora_param_count(model) > 0
    adapted = np.asarray(model(tokens).logits)
    base = np.asarray(model(tokens, lora=False).logits)
    assert np.abs(adapted - base).max() > 1e-2 * np.abs(base).max()  # the adapters matter
    np.testing.assert_allclose(np.asarray(merged(tokens).logits), adapted, atol=1e-5, rtol=0)


def test_lora_disabled_equals_the_base_model(hf_checkpoint, tokens):
    _, directory = hf_checkpoint("qwen3")
    base = load_weights(read_hf_config(directory), iter_checkpoint_tensors(directory))
    model = _model_with_random_adapters(directory, LoRAConfig(rank=4))
    np.testing.assert_array_equal(np.asarray(model(tokens, lora=False).logits), np.asarray(base(tokens).logits))


def test_lora_dropout_only_acts_with_a_key(hf_checkpoint, tokens):
    _, directory = hf_checkpoint("llama")
    model = _model_with_random_adapters(directory, LoRAConfig(rank=4, dropout=0.5))
    plain = np.asarray(model(tokens).logits)
    again = np.asarray(model(tokens).logits)
    dropped = np.asarray(model(tokens, dropout_key=jax.random.key(3)).logits)
    np.testing.assert_array_equal(plain, again)
    assert np.abs(dropped - plain).max() > 1e-3


def test_bad_lora_config_is_rejected():
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        LoRAConfig(targets=("qproj",))
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)


def test_value_head_is_a_linear_map_of_the_hidden_state(hf_checkpoint, tokens):
    _, directory = hf_checkpoint("llama")
    model = load_weights(read_hf_config(directory), iter_checkpoint_tensors(directory))
    head = ValueHead(model.config.hidden_size)
    head.kernel.set_value(jnp.linspace(-1, 1, model.config.hidden_size))
    head.bias.set_value(jnp.float32(0.5))
    hidden = model(tokens).hidden
    values = head(hidden)
    assert values.shape == tokens.shape
    width = model.config.hidden_size  # the 1/E readout keeps an Adam step's effect on V width-free
    expected = np.asarray(hidden, np.float64) @ np.linspace(-1, 1, width) / width + 0.5
    np.testing.assert_allclose(np.asarray(values), expected, atol=1e-5)


def test_the_low_rank_update_has_the_gradients_of_its_formula():
    """The adapter's hand-written backward (one that keeps the big cotangent as it lies) against the
    formula's gradients in NumPy float64: for x [B, T, in], y = s·(x·A)·B and a loss sum(y·G),
    dx = s·G·Bᵀ·Aᵀ, dA = s·xᵀ·G·Bᵀ, dB = s·(x·A)ᵀ·G, summed over every token."""
    from siajax.models.transformer import low_rank_update

    rng = np.random.RandomState(0)
    x, a, b, cotangent = rng.randn(2, 5, 6), rng.randn(6, 3), rng.randn(3, 7), rng.randn(2, 5, 7)
    scale = 2.5
    y, pullback = jax.vjp(lambda x, a, b: low_rank_update(x, a, b, scale),
                          *(jnp.asarray(v, jnp.float32) for v in (x, a, b)))
    grad_x, grad_a, grad_b = pullback(jnp.asarray(cotangent, jnp.float32))
    tokens, grads = x.reshape(-1, 6), cotangent.reshape(-1, 7)
    np.testing.assert_allclose(np.asarray(y), scale * x @ a @ b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad_x), scale * cotangent @ b.T @ a.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad_a), scale * tokens.T @ grads @ b.T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(grad_b), scale * (tokens @ a).T @ grads, rtol=1e-5, atol=1e-4)
