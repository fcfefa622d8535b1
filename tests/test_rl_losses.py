"""Losses against float64 NumPy references, gradient checks on a tiny model, PG limit."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from siajax.models import LoRAConfig, ModelConfig, Transformer, ValueHead, add_lora
from siajax.rl import (
    EntropicConfig, GRPOConfig, PolicyOutputs, PPOConfig, RLBatch, clipped_policy_loss, entropic_loss,
    explained_variance, grpo_loss, ppo_gae_loss,
)
from siajax.rl.losses import AGGREGATIONS, SurrogateCoefficients
from siajax.train import TrainBatch, make_policy_loss, score_responses, split_policy, with_full_batch_normaliser

B, T = 6, 9


def np_aggregate(x, mask, mode):
    if mode == "token-mean":
        return (x * mask).sum() / mask.sum()
    if mode == "seq-mean-token-mean":
        return np.mean((x * mask).sum(1) / mask.sum(1))
    return (x * mask).sum() / mask.size


def np_kl(logp, ref, estimator):
    r = logp - ref
    return {"k1": r, "k2": 0.5 * r**2, "k3": np.exp(-r) - 1 + r}[estimator]


def np_policy_loss(logp, old, adv, mask, cfg):
    ratio = np.exp(logp - old)
    pg = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high))
    loss = np_aggregate(pg, mask, cfg.aggregation)
    return loss


def random_case(seed=0):
    rng = np.random.RandomState(seed)
    lengths = rng.randint(1, T + 1, B)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float64)
    old = -rng.rand(B, T) * 3
    logp = old + rng.randn(B, T) * 0.3
    return dict(mask=mask, old=old, logp=logp, ref=old + rng.randn(B, T) * 0.2, adv=rng.randn(B, T),
                entropy=rng.rand(B, T), values=rng.randn(B, T), old_values=rng.randn(B, T),
                returns=rng.randn(B, T))


def as_inputs(c):
    f = lambda k: jnp.asarray(c[k], jnp.float32)  # noqa: E731
    policy = PolicyOutputs(f("logp"), f("entropy"), f("values"))
    batch = RLBatch(jnp.asarray(c["mask"] > 0), f("old"), f("adv"), f("ref"), f("returns"), f("old_values"))
    return policy, batch


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_grpo_loss_matches_numpy(aggregation, estimator):
    c = random_case(1)
    cfg = GRPOConfig(clip_low=0.2, clip_high=0.28, kl_coef=0.05, kl_estimator=estimator,
                     entropy_coef=0.01, aggregation=aggregation)
    loss, metrics = jax.jit(grpo_loss, static_argnums=2)(*as_inputs(c), cfg)
    expected = (np_policy_loss(c["logp"], c["old"], c["adv"], c["mask"], cfg)
                + 0.05 * np_aggregate(np_kl(c["logp"], c["ref"], estimator), c["mask"], aggregation)
                - 0.01 * np_aggregate(c["entropy"], c["mask"], aggregation))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-6)
    assert 0.0 <= float(metrics["clip_fraction"]) <= 1.0


def test_ppo_loss_matches_numpy():
    c = random_case(2)
    cfg = PPOConfig(value_clip=0.3, value_coef=0.7, entropy_coef=0.02)
    loss, metrics = jax.jit(ppo_gae_loss, static_argnums=2)(*as_inputs(c), cfg)
    bound = 0.3 * c["returns"][c["mask"] > 0].std()  # relative to the returns' scale
    clipped_v = c["old_values"] + np.clip(c["values"] - c["old_values"], -bound, bound)
    value = 0.5 * np_aggregate(np.maximum((c["values"] - c["returns"]) ** 2, (clipped_v - c["returns"]) ** 2),
                               c["mask"], "token-mean")
    expected = (np_policy_loss(c["logp"], c["old"], c["adv"], c["mask"], cfg) + 0.7 * value
                - 0.02 * np_aggregate(c["entropy"], c["mask"], "token-mean"))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    m = c["mask"] > 0
    residual = (c["returns"] - c["values"])[m]
    explained = explained_variance(jnp.asarray(c["values"]), jnp.asarray(c["returns"]), jnp.asarray(m))
    np.testing.assert_allclose(float(explained), 1 - residual.var() / c["returns"][m].var(), rtol=1e-4)
    ratio = np.exp(c["logp"] - c["old"])
    np.testing.assert_allclose(float(metrics["approx_kl"]), ((ratio - 1) - np.log(ratio))[m].mean(), rtol=1e-5)
    unclipped, _ = jax.jit(ppo_gae_loss, static_argnums=2)(*as_inputs(c), dataclasses.replace(cfg, value_clip=None))
    value_free = 0.5 * np_aggregate((c["values"] - c["returns"]) ** 2, c["mask"], "token-mean")
    np.testing.assert_allclose(float(unclipped) - float(loss), 0.7 * (value_free - value), rtol=1e-4)


def test_value_clip_scales_with_the_returns():
    """Multiplying returns and values by 100 multiplies the value loss by 100^2: the clip is relative."""
    c = random_case(6)
    cfg = PPOConfig(value_clip=0.2, value_coef=1.0, clip_low=1e9, clip_high=1e9)
    scaled = {**c, **{k: c[k] * 100 for k in ("values", "old_values", "returns")}}
    small = ppo_gae_loss(*as_inputs(c), cfg)[1]["value_loss"]
    large = ppo_gae_loss(*as_inputs(scaled), cfg)[1]["value_loss"]
    np.testing.assert_allclose(float(large), 1e4 * float(small), rtol=1e-4)


def test_entropic_loss_is_the_surrogate_on_its_advantages():
    c = random_case(3)
    cfg = EntropicConfig(clip_low=0.1, clip_high=0.3)
    loss, _ = entropic_loss(*as_inputs(c), cfg)
    np.testing.assert_allclose(float(loss), np_policy_loss(c["logp"], c["old"], c["adv"], c["mask"], cfg), rtol=1e-5)


def test_ppo_with_huge_clip_is_vanilla_policy_gradient():
    c = random_case(4)
    policy, batch = as_inputs(c)
    cfg = PPOConfig(clip_low=1e9, clip_high=1e9, value_coef=0.0)
    grad_ppo = jax.grad(lambda lp: ppo_gae_loss(policy._replace(logprobs=lp), batch, cfg)[0])(batch.old_logprobs)
    mask = batch.mask.astype(jnp.float32)
    vanilla = lambda lp: -jnp.sum(lp * batch.advantages * mask) / jnp.sum(mask)  # noqa: E731
    np.testing.assert_allclose(np.asarray(grad_ppo), np.asarray(jax.grad(vanilla)(batch.old_logprobs)), atol=1e-6)


def test_missing_inputs_are_named():
    policy, batch = as_inputs(random_case(5))
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(policy, batch._replace(ref_logprobs=None), GRPOConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="values"):
        ppo_gae_loss(policy._replace(values=None), batch, PPOConfig())
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(policy, batch, GRPOConfig(aggregation="mean"))


TINY = ModelConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=4)


def tiny_policy_batch(seed=0, with_value=False):
    model = Transformer(TINY, rngs=nnx.Rngs(seed))
    add_lora(model, LoRAConfig(rank=2), key=jax.random.key(seed))
    for index, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))):
        var.set_value(0.1 * jax.random.normal(jax.random.fold_in(jax.random.key(seed), index), var.shape))
    value_head = ValueHead(TINY.hidden_size) if with_value else None
    if value_head is not None:
        value_head.kernel.set_value(0.1 * jnp.ones(TINY.hidden_size))
    parts, params, frozen = split_policy(model, value_head)
    rng = np.random.RandomState(seed)
    tokens = jnp.asarray(rng.randint(1, 37, (4, 10)), jnp.int32)
    response_mask = jnp.asarray(np.arange(6)[None] < np.array([6, 3, 1, 5])[:, None])
    attention = jnp.concatenate([jnp.asarray(np.arange(4)[None] >= np.array([0, 2, 1, 3])[:, None]),
                                 response_mask], axis=1)
    rl = RLBatch(response_mask, jnp.asarray(-rng.rand(4, 6) * 4, jnp.float32), jnp.asarray(rng.randn(4, 6), jnp.float32),
                 jnp.asarray(-rng.rand(4, 6) * 4, jnp.float32), jnp.asarray(rng.randn(4, 6), jnp.float32),
                 jnp.asarray(rng.randn(4, 6), jnp.float32))
    # Old log-probs near the current ones keep ratios inside the clip range (no kinks).
    current = score_responses(parts, params, frozen, tokens, attention, 6).logprobs
    rl = rl._replace(old_logprobs=current + 0.05 * jnp.asarray(rng.randn(4, 6), jnp.float32))
    return parts, params, frozen, TrainBatch(tokens, attention, rl)


@pytest.mark.parametrize("name", ["ppo", "grpo", "entropic"])
def test_loss_gradients_match_finite_differences_on_a_tiny_model(name):
    objective, cfg = {
        # The value loss reads stop-gradient hidden states: its path into LoRA is cut on purpose,
        # so finite differences over LoRA see the policy terms only (value_coef 0 here).
        "ppo": (ppo_gae_loss, PPOConfig(entropy_coef=0.01, kl_coef=0.05, value_coef=0.0)),
        "grpo": (grpo_loss, GRPOConfig(kl_coef=0.05, entropy_coef=0.01)),
        "entropic": (entropic_loss, EntropicConfig()),
    }[name]
    parts, params, frozen, batch = tiny_policy_batch(with_value=name == "ppo")
    loss_fn = make_policy_loss(parts, objective, cfg)
    scalar = lambda p: loss_fn(p, frozen, batch, None)[0]  # noqa: E731
    grads = jax.grad(scalar)(params)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    # Along the gradient itself the derivative is |g| (large next to float32 noise);
    # two random unit directions check the rest with an absolute tolerance.
    directions = [grads] + [jax.tree.unflatten(treedef, [jax.random.normal(jax.random.fold_in(k, i), x.shape)
                                                         for k, x in zip(keys, leaves)]) for i in range(2)]
    for index, direction in enumerate(directions):
        norm = jnp.sqrt(sum(jnp.sum(d**2) for d in jax.tree.leaves(direction)))
        direction = jax.tree.map(lambda d: d / norm, direction)
        def central_difference(h, direction=direction):
            shifted = lambda s: jax.tree.map(lambda p, d: p + s * h * d, params, direction)  # noqa: E731
            return (scalar(shifted(1.0)) - scalar(shifted(-1.0))) / (2 * h)

        # The loss curves hard along the gradient: a tiny step there (|g| dwarfs float32 noise);
        # elsewhere Richardson extrapolation of wider steps cancels the h^2 term.
        if index == 0:
            numeric = central_difference(1e-4)
        else:
            numeric = (4 * central_difference(1e-3) - central_difference(2e-3)) / 3
        analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
        np.testing.assert_allclose(float(analytic), float(numeric), rtol=2e-2 if index == 0 else 0.0, atol=3e-4)


def test_value_loss_trains_the_value_head_and_never_the_lora_trunk():
    parts, params, frozen, batch = tiny_policy_batch(with_value=True)
    value_only = PPOConfig(clip_low=1e9, clip_high=1e9, value_coef=1.0)
    loss_fn = make_policy_loss(parts, lambda p, b, c: (ppo_gae_loss(p, b, c)[1]["value_loss"], {}), value_only)
    grads = jax.grad(lambda p: loss_fn(p, frozen, batch, None)[0])(params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["lora"]))
    assert float(jnp.abs(grads["value_head"]["kernel"][...]).max()) > 0


def test_custom_loss_plugs_into_the_train_step():
    """A user-written loss (plain REINFORCE) is just a function with the same signature."""
    import optax

    from siajax.train import init_train_state, make_train_step

    @dataclasses.dataclass(frozen=True)
    class ReinforceConfig:
        scale: float = 1.0

    def reinforce_loss(policy, batch, cfg):
        mask = batch.mask.astype(jnp.float32)
        loss = -cfg.scale * jnp.sum(policy.logprobs * batch.advantages * mask) / jnp.sum(mask)
        return loss, {"reinforce": loss}

    parts, params, frozen, batch = tiny_policy_batch(seed=1)
    optimizer = optax.sgd(0.1)
    step = make_train_step(make_policy_loss(parts, reinforce_loss, ReinforceConfig()), optimizer)
    state = init_train_state(params, optimizer, seed=0)
    losses = []
    for _ in range(5):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["reinforce"]))
    assert int(state.step) == 5 and losses[-1] < losses[0]


def test_kl_penalty_is_capped_per_token_so_one_runaway_token_cannot_swamp_the_batch():
    """A token 20 nats below the reference has k3 = e^20 ~ 5e8; capped at kl_max it adds at most
    kl_max, and its gradient is zero past the cap, while ordinary tokens keep the exact k3."""
    logp = jnp.array([[-1.0, -21.0, -2.0]])
    ref = jnp.array([[-1.2, -1.0, -2.1]])
    mask = jnp.ones((1, 3), bool)
    zeros = jnp.zeros((1, 3))
    capped, uncapped = GRPOConfig(kl_coef=1.0), GRPOConfig(kl_coef=1.0, kl_max=None)

    def kl_of(cfg, lp):
        policy = PolicyOutputs(lp, zeros, None)
        return grpo_loss(policy, RLBatch(mask, lp, zeros, ref, None, None), cfg)[1]["kl_ref"]

    ordinary = np_kl(np.array([-1.0, -2.0]), np.array([-1.2, -2.1]), "k3")
    np.testing.assert_allclose(float(kl_of(capped, logp)), (ordinary.sum() + 10.0) / 3, rtol=1e-5)
    assert float(kl_of(uncapped, logp)) > 1e8
    grad = jax.grad(lambda lp: kl_of(capped, lp))(logp)
    assert np.all(np.isfinite(np.asarray(grad))) and float(grad[0, 1]) == 0.0
    with pytest.raises(ValueError, match="kl_max"):
        GRPOConfig(kl_max=0.0)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("cfg", [GRPOConfig(kl_coef=0.05, entropy_coef=0.01, clip_high=0.28, kl_max=None),
                                 EntropicConfig(clip_low=0.1)], ids=["grpo", "entropic"])
def test_coefficients_as_data_give_the_configs_loss_and_gradient(cfg, aggregation):
    """The config's numbers read from the batch (traced, per row) give the loss, gradient and metrics
    of the config's constants; without a KL term the old log-probs stand in as the reference, at
    weight 0. Clip bounds per row are taken from each row."""
    cfg = dataclasses.replace(cfg, aggregation=aggregation)
    parts, params, frozen, batch = tiny_policy_batch(seed=3)
    loss_fn = make_policy_loss(parts, clipped_policy_loss, cfg)
    prepare = partial(with_full_batch_normaliser, aggregation=cfg.aggregation)

    def value_and_grad(batch):
        return jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, prepare(batch), None)

    constant = batch._replace(rl=batch.rl._replace(ref_logprobs=batch.rl.ref_logprobs if cfg.kl_coef else None))
    rows = batch.tokens.shape[0]
    as_data = batch._replace(rl=batch.rl._replace(ref_logprobs=batch.rl.ref_logprobs if cfg.kl_coef
                                                  else batch.rl.old_logprobs,
                                                  coefficients=SurrogateCoefficients.of(cfg, rows)))
    (loss, metrics), grads = jax.jit(value_and_grad)(constant)
    (loss_data, metrics_data), grads_data = jax.jit(value_and_grad)(as_data)
    np.testing.assert_allclose(float(loss_data), float(loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_data), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert ("kl_ref" in metrics) == bool(cfg.kl_coef) and "kl_ref" in metrics_data
    for name, value in metrics.items():
        np.testing.assert_allclose(float(metrics_data[name]), float(value), rtol=1e-6, err_msg=name)
    # Another clip on some rows changes the loss: each row reads its own bounds.
    tight = as_data.rl.coefficients._replace(clip_low=jnp.asarray([cfg.clip_low, 0.0, 0.0, cfg.clip_low]))
    (loss_tight, _), _ = value_and_grad(as_data._replace(rl=as_data.rl._replace(coefficients=tight)))
    assert float(loss_tight) != float(loss_data)
