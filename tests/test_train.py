"""TrainState step: checkpoint continuation, micro-batching, non-finite guard, reference policy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from functools import partial

import pytest

from siajax.rl import GRPOConfig, grpo_loss
from siajax.train import (
    init_train_state, make_policy_loss, make_train_step, restore_pytree, save_pytree, score_responses,
    with_full_batch_normaliser,
)
from test_rl_losses import tiny_policy_batch

from siajax.prompts import left_pad

CFG = GRPOConfig(kl_coef=0.05)


def _setup(micro_batches=1, cfg=CFG, optimizer=None):
    parts, params, frozen, batch = tiny_policy_batch(seed=2)
    optimizer = optimizer or optax.adamw(1e-2)
    step = make_train_step(make_policy_loss(parts, grpo_loss, cfg), optimizer, micro_batches=micro_batches,
                           prepare_batch=partial(with_full_batch_normaliser, aggregation=cfg.aggregation))
    return step, init_train_state(params, optimizer, seed=0), frozen, batch


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_restored_state_continues_bitwise_identically(tmp_path):
    step, state, frozen, batch = _setup()
    for _ in range(2):
        state, _ = step(state, frozen, batch)
    save_pytree(tmp_path / "ckpt", state)
    like = jax.tree.map(jnp.zeros_like, state)
    restored = restore_pytree(tmp_path / "ckpt", like)
    for _ in range(3):
        state, _ = step(state, frozen, batch)
        restored, _ = step(restored, frozen, batch)
    for a, b in zip(_leaves(state), _leaves(restored)):
        np.testing.assert_array_equal(a, b)
    assert int(restored.step) == 5


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batched_loss_and_grads_equal_the_full_batch(aggregation):
    """Rows with 6, 3, 1 and 5 response tokens: per-chunk means would weight tokens unequally;
    sums over the full batch's denominators make the micro-batches add up exactly."""
    cfg = GRPOConfig(kl_coef=0.05, aggregation=aggregation)
    sgd = optax.sgd(0.5)  # plain SGD: the update is the gradient itself
    step_full, state_full, frozen, batch = _setup(cfg=cfg, optimizer=sgd)
    step_micro, state_micro, _, _ = _setup(micro_batches=2, cfg=cfg, optimizer=sgd)
    state_full, m_full = step_full(state_full, frozen, batch)
    state_micro, m_micro = step_micro(state_micro, frozen, batch)
    np.testing.assert_allclose(float(m_full["loss"]), float(m_micro["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m_full["grad_norm"]), float(m_micro["grad_norm"]), rtol=1e-5)
    # Every metric too: shares of the loss (pg_loss, kl_ref) were reported 1/M of their value, and
    # per-chunk token means averaged with equal weights.
    # logprob_change is a max: summed over micro-batches it would be about twice the full batch's.
    for name in ("pg_loss", "kl_ref", "clip_fraction", "approx_kl", "ratio_mean", "entropy", "advantage_mean",
                 "logprob_change"):
        np.testing.assert_allclose(float(m_full[name]), float(m_micro[name]), rtol=1e-5, atol=1e-7, err_msg=name)
    for a, b in zip(_leaves(state_full.params), _leaves(state_micro.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_non_finite_loss_skips_the_update_and_keeps_state():
    step, state, frozen, batch = _setup()
    before = _leaves(state.params)
    poisoned = batch._replace(rl=batch.rl._replace(advantages=batch.rl.advantages.at[0, 0].set(jnp.nan)))
    state, metrics = step(state, frozen, poisoned)
    assert int(metrics["skipped"]) == 1 and int(state.step) == 0
    for a, b in zip(before, _leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    state, metrics = step(state, frozen, batch)
    assert int(metrics["skipped"]) == 0 and int(state.step) == 1


def test_reference_logprobs_ignore_the_adapters_and_training_moves_the_policy():
    parts, params, frozen, batch = tiny_policy_batch(seed=3)
    zero_adapters = {"lora": jax.tree.map(jnp.zeros_like, params["lora"])}
    reference = score_responses(parts, params, frozen, batch.tokens, batch.attention_mask, 6, lora=False)
    base = score_responses(parts, zero_adapters, frozen, batch.tokens, batch.attention_mask, 6)
    adapted = score_responses(parts, params, frozen, batch.tokens, batch.attention_mask, 6)
    np.testing.assert_allclose(np.asarray(reference.logprobs), np.asarray(base.logprobs), atol=1e-6)
    assert np.abs(np.asarray(adapted.logprobs - reference.logprobs)).max() > 1e-3


def test_value_head_and_adapters_are_optimised_apart():
    """Each part has its own clip and learning rate: a huge critic gradient must not shrink the
    policy's update (one shared global-norm clip would), and the critic moves at its own rate."""
    from siajax.train.optim import default_optimizer

    params = {"lora": {"a": jnp.zeros(4)}, "value_head": {"w": jnp.zeros(4)}}
    optimizer = default_optimizer(1e-3, critic_learning_rate=0.1)
    sgd_like = {"lora": {"a": jnp.full((4,), 0.1)}, "value_head": {"w": jnp.full((4,), 1e3)}}
    updates, state = optimizer.update(sgd_like, optimizer.init(params), params)
    # Adam's first step is -lr * sign(g) whatever the clip did to |g|: each part at its own rate.
    np.testing.assert_allclose(np.asarray(updates["lora"]["a"]), -1e-3, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(updates["value_head"]["w"]), -0.1, rtol=1e-4)
    # The clip shows in Adam's first moment, (1 - b1) * clipped g: the adapters' gradient (norm 0.2) is
    # untouched, the critic's is scaled to norm 1. One shared clip would scale the adapters' by 1/2000.
    first_moments = {str(path[-2]): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(state)
                     if any("mu" in str(key) for key in path)}
    np.testing.assert_allclose(first_moments["['lora']"], 0.1 * 0.1, rtol=1e-5)
    np.testing.assert_allclose(first_moments["['value_head']"], 0.1 * 0.5, rtol=1e-5)


def test_a_part_without_gradient_stays_exactly_where_it_is():
    """After PPO steps the value head's Adam moments are non-zero; under GRPO it gets no gradient.
    Before, the shared Adam state kept moving it on momentum alone."""
    from siajax.train.optim import default_optimizer

    params = {"lora": {"a": jnp.ones(3)}, "value_head": {"w": jnp.ones(3)}}
    optimizer = default_optimizer(1e-2)
    state = optimizer.init(params)
    for _ in range(3):  # PPO-like steps: both parts have gradients
        updates, state = optimizer.update({"lora": {"a": jnp.ones(3)}, "value_head": {"w": jnp.ones(3)}}, state,
                                          params)
        params = optax.apply_updates(params, updates)
    frozen_w = np.asarray(params["value_head"]["w"])
    updates, _ = optimizer.update({"lora": {"a": jnp.ones(3)}, "value_head": {"w": jnp.zeros(3)}}, state, params)
    np.testing.assert_array_equal(np.asarray(updates["value_head"]["w"]), 0.0)
    assert np.abs(np.asarray(updates["lora"]["a"])).min() > 0
    np.testing.assert_array_equal(np.asarray(optax.apply_updates(params, updates)["value_head"]["w"]), frozen_w)


def test_a_step_without_signal_leaves_adam_state_and_weights_alone():
    """All advantages zero and no KL/entropy term: the gradient is exactly zero. After real Adam steps
    the moments are non-zero, so a zero-gradient step would still move the weights on momentum;
    the step must skip it (no_signal) and keep params, moments and the step count."""
    step, state, frozen, batch = _setup(cfg=GRPOConfig(kl_coef=0.0), optimizer=optax.adam(1e-2))
    for _ in range(2):
        state, metrics = step(state, frozen, batch)
    assert int(metrics["no_signal"]) == 0 and int(state.step) == 2
    before = _leaves(state)
    silent = batch._replace(rl=batch.rl._replace(advantages=jnp.zeros_like(batch.rl.advantages)))
    state, metrics = step(state, frozen, silent)
    assert float(metrics["grad_norm"]) == 0.0
    assert int(metrics["no_signal"]) == 1 and int(metrics["skipped"]) == 0 and int(state.step) == 2
    for a, b in zip(before[:-1], _leaves(state)[:-1]):  # everything but the rng key, which advances
        np.testing.assert_array_equal(a, b)


def _with_responses(prompts, prompt_mask, rng, seed):
    """The tiny policy and a batch of 8 rows: these prompts [8, P], then ragged 6-token responses."""
    parts, params, frozen, flat = tiny_policy_batch(seed=seed, with_value=True)
    responses = rng.randint(1, 37, (8, 6))
    response_mask = np.arange(6)[None] < np.array([6, 3, 1, 5, 6, 2, 4, 6])[:, None]
    tokens = jnp.asarray(np.concatenate([prompts, responses], axis=1), jnp.int32)
    attention = jnp.asarray(np.concatenate([prompt_mask, response_mask], axis=1))
    rl = jax.tree.map(lambda x: jnp.concatenate([x, x]), flat.rl)._replace(mask=jnp.asarray(response_mask))
    return parts, params, frozen, flat._replace(tokens=tokens, attention_mask=attention, rl=rl)


def _grouped_batch(seed=4):
    """8 rows that continue 3 distinct, differently padded prompts (2 + 4 + 2), ragged responses."""
    source = np.array([0, 0, 1, 1, 1, 1, 2, 2])
    rng = np.random.RandomState(seed)
    prompt_mask = np.arange(4)[None] >= np.array([0, 2, 1])[:, None]
    prompts = np.where(prompt_mask, rng.randint(1, 37, (3, 4)), 0)[source]
    return _with_responses(prompts, prompt_mask[source], rng, seed)


def _prefixed_batch(seed: int = 0):
    """8 rows that continue 3 distinct prompts (3 + 3 + 2 rows) opening with the same 30 tokens (a system
    prompt, few-shot examples), tails of 1 to 3 tokens, left-padded to 64; ragged responses."""
    rng = np.random.RandomState(seed)
    start = list(rng.randint(1, 37, 30))
    distinct = [start + list(rng.randint(1, 37, n)) for n in (1, 3, 2)]
    prompts, prompt_mask = left_pad([distinct[i] for i in (0, 0, 0, 1, 1, 1, 2, 2)], 0, 64)
    return _with_responses(prompts, prompt_mask, rng, seed)


def _shared_forward_is_exact(parts, params, frozen, batch, shared):
    """Scoring and the GRPO loss's gradients with ``shared`` prompts equal those of every row whole;
    -> (loss_fn, the prepared batch)."""
    per_row = score_responses(parts, params, frozen, batch.tokens, batch.attention_mask, 6)
    once = score_responses(parts, params, frozen, batch.tokens, batch.attention_mask, 6, shared=shared)
    real = np.asarray(batch.rl.mask)
    for name in ("logprobs", "entropy", "values"):
        np.testing.assert_allclose(np.asarray(getattr(once, name))[real], np.asarray(getattr(per_row, name))[real],
                                   rtol=1e-5, atol=1e-6, err_msg=name)
    loss_fn = make_policy_loss(parts, grpo_loss, CFG)
    prepared = with_full_batch_normaliser(batch, CFG.aggregation)
    grad = jax.grad(lambda p, b: loss_fn(p, frozen, b, None)[0])
    expected = grad(params, prepared)
    got = grad(params, prepared._replace(shared_prompts=shared))
    for a, b in zip(_leaves(got), _leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    assert max(np.abs(a).max() for a in _leaves(expected)) > 1e-4  # a gradient worth comparing
    return loss_fn, prepared


def test_a_shared_prompt_table_gives_the_per_row_log_probs_values_and_gradients():
    from siajax.prompts import distinct_prompts
    from siajax.train import take_rows

    parts, params, frozen, batch = _grouped_batch()
    shared = distinct_prompts(batch.tokens[:, :4], batch.attention_mask[:, :4])
    assert shared.tokens.shape == (4, 4)  # 3 distinct prompts, padded to a power of two
    loss_fn, prepared = _shared_forward_is_exact(parts, params, frozen, batch, shared)

    rows = np.array([6, 1, 3])  # a minibatch keeps the whole table and its rows' sources
    minibatch = take_rows(prepared._replace(shared_prompts=shared), rows)
    np.testing.assert_array_equal(np.asarray(minibatch.shared_prompts.row_source), np.asarray(shared.row_source)[rows])
    assert minibatch.shared_prompts.tokens.shape == (4, 4)
    np.testing.assert_allclose(float(loss_fn(params, frozen, minibatch, None)[0]),
                               float(loss_fn(params, frozen, take_rows(prepared, rows), None)[0]), rtol=1e-5)


def test_a_shared_prefix_gives_the_per_row_log_probs_values_and_gradients():
    """The learner runs the prompts' common 30 tokens once (one row), each distinct prompt's tail after
    it, then the responses: the same log-probs, entropies, values and LoRA gradients as every row whole
    (the prefix's gradient sums over the rows that read its keys and values)."""
    from siajax.prompts import prompt_sharing

    parts, params, frozen, batch = _prefixed_batch()
    shared = prompt_sharing(batch.tokens[:, :64], batch.attention_mask[:, :64])
    assert shared.prefix is not None and int(shared.prefix.mask.sum()) == 30
    assert shared.prefix.tokens.shape[1] == 48 and shared.prefix.suffix_tokens.shape == (4, 16)  # 64 slots a row
    _shared_forward_is_exact(parts, params, frozen, batch, shared)


def test_distinct_prompts_are_shared_only_when_they_are_fewer_rows():
    from siajax.prompts import distinct_prompts

    tokens = np.array([[0, 5, 6], [5, 5, 6], [0, 5, 6], [0, 5, 6]])
    mask = np.array([[0, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1]], bool)  # row 3: same ids, one more real token
    shared = distinct_prompts(tokens, mask)
    assert shared is None  # 3 distinct rows pad to 4: nothing saved
    shared = distinct_prompts(np.repeat(tokens, 2, axis=0), np.repeat(mask, 2, axis=0))
    rebuilt = np.asarray(shared.tokens)[np.asarray(shared.row_source)]
    np.testing.assert_array_equal(rebuilt, np.repeat(tokens, 2, axis=0))
    np.testing.assert_array_equal(np.asarray(shared.mask)[np.asarray(shared.row_source)], np.repeat(mask, 2, axis=0))


@pytest.mark.parametrize("target_kl", [None, 1e-4])
def test_a_scheduled_update_is_its_steps_run_one_by_one(target_kl):
    """The whole epochs x minibatches schedule as one program equals the jitted step called per
    minibatch from Python, in the program's order; each epoch visits every row once; a KL limit
    ends the loop after the step that found the policy past it (that step applied nothing)."""
    from siajax.train import train_step_fn
    from siajax.train.learner import UpdateSchedule, minibatch_orders, scheduled_steps
    from siajax.train.policy import take_rows

    parts, params, frozen, batch = tiny_policy_batch(seed=2)
    optimizer = optax.adam(3e-2)
    schedule = UpdateSchedule(epochs=3, minibatches=2, target_kl=target_kl)
    step = train_step_fn(make_policy_loss(parts, grpo_loss, CFG), optimizer,
                         prepare_batch=partial(with_full_batch_normaliser, aggregation=CFG.aggregation),
                         max_approx_kl=None if target_kl is None else 1.5 * target_kl)
    scheduled, (per_step, steps_run) = jax.jit(scheduled_steps(step, schedule))(
        init_train_state(params, optimizer, seed=0), frozen, batch)

    state, orders = minibatch_orders(init_train_state(params, optimizer, seed=0), 4, schedule)
    for epoch in np.asarray(orders).reshape(3, 4):
        assert sorted(epoch) == [0, 1, 2, 3]
    one_step, reference = jax.jit(step), []
    for rows in orders:
        state, metrics = one_step(state, frozen, take_rows(batch, rows))
        reference.append(metrics)
        if metrics["kl_stop"]:
            break
    assert int(steps_run) == len(reference) and int(scheduled.step) == int(state.step)
    assert (len(reference) < 6) == (target_kl is not None)
    for index, metrics in enumerate(reference):
        for name in ("loss", "grad_norm", "approx_kl", "kl_stop"):
            np.testing.assert_allclose(per_step[name][index], metrics[name], rtol=1e-5, atol=1e-7, err_msg=name)
    for a, b in zip(_leaves(scheduled.params), _leaves(state.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_a_step_past_the_kl_limit_runs_no_backward_pass_and_leaves_the_state():
    """Past the limit the forward pass decides: kl_stop, no gradient computed (grad_norm 0), params and
    optimiser state as they were; within it the guarded step equals the unguarded one."""
    from siajax.train import train_step_fn

    parts, params, frozen, batch = tiny_policy_batch(seed=2)
    optimizer = optax.adam(3e-2)

    def run(max_approx_kl):
        step = train_step_fn(make_policy_loss(parts, grpo_loss, CFG), optimizer, max_approx_kl=max_approx_kl,
                             prepare_batch=partial(with_full_batch_normaliser, aggregation=CFG.aggregation))
        start = init_train_state(params, optimizer, seed=0)
        return start, jax.jit(step)(start, frozen, batch)  # not donated: start stays readable

    start, (stopped, metrics) = run(-1.0)  # approx-KL >= 0: always past
    assert int(metrics["kl_stop"]) == 1 and int(metrics["skipped"]) == 0 and int(metrics["no_signal"]) == 0
    assert float(metrics["grad_norm"]) == 0.0 and np.isfinite(float(metrics["loss"]))
    assert int(stopped.step) == 0
    for a, b in zip(_leaves((stopped.params, stopped.opt_state)), _leaves((start.params, start.opt_state))):
        np.testing.assert_array_equal(a, b)
    _, (guarded, guarded_metrics) = run(1e9)
    _, (free, free_metrics) = run(None)
    assert int(guarded_metrics["kl_stop"]) == 0 and float(guarded_metrics["grad_norm"]) > 0
    np.testing.assert_allclose(float(guarded_metrics["grad_norm"]), float(free_metrics["grad_norm"]), rtol=1e-6)
    for a, b in zip(_leaves(guarded.params), _leaves(free.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
