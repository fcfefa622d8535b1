"""The weight lever trains the distribution that sampled: temperature, constraints, no truncation.

The sampler records log-probs of the distribution each token was drawn from; the
training forward (old, reference and new log-probs) must recompute exactly those
before any update, at the sampling temperature and under the same allowed sets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from siajax.harness.constrained import label_automaton
from siajax.models import BUNDLED_TINY_MODEL, LoRAConfig, add_lora, decoding_ids, from_pretrained
from siajax.models.token_stats import token_stats
from siajax.sampling import generate
from siajax.rl import recipe_config
from siajax.train.learner import UpdateSchedule
from siajax.train.rollouts import make_learner

LABELS = ["盗窃", "诈骗", "故意伤害", "受贿", "单位受贿"]


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = from_pretrained(BUNDLED_TINY_MODEL)
    return model, tokenizer


def _prompts(tokenizer, n=4):
    texts = ["Name the charge.", "What is 2 + 2?", "Say something.", "List three numbers."][:n]
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)["input_ids"]
            for t in texts]


def _learner(tiny, recipe="grpo", **kwargs):
    model = nnx.clone(tiny[0])  # adapters are added to a copy
    learner, state, frozen = make_learner(model, recipe, lora=LoRAConfig(rank=4), **kwargs)
    # Nonzero adapters, so the current policy differs from the reference.
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape), state.params)
    return learner, state.replace(params=params), frozen


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_training_forward_reproduces_the_sampler_logprobs(tiny, temperature):
    _, tokenizer = tiny
    learner, state, frozen = _learner(tiny, "ppo_gae")  # a recipe that scores the old policy's forward
    ids = decoding_ids(tokenizer)
    samples = generate(learner.policy(state, frozen), [p for p in _prompts(tokenizer) for _ in range(4)],
                       key=jax.random.key(0), max_new_tokens=20, temperature=temperature,
                       stop_token_ids=ids.stop_token_ids, pad_token_id=ids.pad_token_id)
    rewards = np.random.RandomState(0).rand(16)
    _, metrics = learner.make_batch(state, frozen, samples, rewards, group_size=4)
    # Recomputing at T=1 instead of T=0.7 misses by up to ~2 nats per token here.
    assert float(metrics["logprob_mismatch"]) <= 1e-4


def test_constrained_samples_are_trained_under_the_same_allowed_sets(tiny):
    _, tokenizer = tiny
    learner, state, frozen = _learner(tiny, "ppo_gae")
    ids = decoding_ids(tokenizer)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    automaton = label_automaton(encode, LABELS, prefix="[罪名]", separator=";", terminator="<eoa>",
                                stop_token_id=ids.stop_token_ids[0])
    samples = generate(learner.policy(state, frozen), [p for p in _prompts(tokenizer) for _ in range(4)],
                       key=jax.random.key(1), max_new_tokens=24, temperature=0.7, constraint=automaton,
                       stop_token_ids=ids.stop_token_ids, pad_token_id=ids.pad_token_id)
    assert samples.allowed is not None and samples.allowed.shape[:2] == samples.tokens.shape
    batch, metrics = learner.make_batch(state, frozen, samples, np.ones(16), group_size=4)
    assert float(metrics["logprob_mismatch"]) <= 1e-4
    # Under the constraint, forced tokens (one allowed choice) have log-prob 0.
    forced = np.asarray((samples.allowed >= 0).sum(-1) == 1) & np.asarray(samples.mask)
    assert forced.any()
    np.testing.assert_allclose(np.asarray(batch.rl.old_logprobs)[forced], 0.0, atol=1e-5)


def test_rollouts_cut_by_top_p_or_top_k_are_refused(tiny):
    _, tokenizer = tiny
    learner, state, frozen = _learner(tiny)
    prompts = [p for p in _prompts(tokenizer, 2) for _ in range(4)]
    for cut in ({"top_p": 0.9}, {"top_k": 20}):
        samples = generate(learner.policy(state, frozen), prompts, key=jax.random.key(2), max_new_tokens=8,
                           temperature=0.7, pad_token_id=0, **cut)
        with pytest.raises(ValueError, match="top_p=1 and top_k=0"):
            learner.make_batch(state, frozen, samples, np.ones(8), group_size=4)
    greedy = generate(learner.policy(state, frozen), prompts, key=jax.random.key(2), max_new_tokens=8,
                      temperature=0.0, pad_token_id=0)
    with pytest.raises(ValueError, match="temperature > 0"):
        learner.make_batch(state, frozen, greedy, np.ones(8), group_size=4)


def test_ppo_update_takes_several_steps_and_the_clip_engages(tiny):
    _, tokenizer = tiny
    samples_of = lambda learner, state, frozen: generate(  # noqa: E731
        learner.policy(state, frozen), [p for p in _prompts(tokenizer) for _ in range(4)], key=jax.random.key(3),
        max_new_tokens=16, temperature=1.0, pad_token_id=0)
    rewards = np.random.RandomState(3).rand(16)
    learner, state, frozen = _learner(tiny, "ppo_gae", learning_rate=1e-2,
                                      schedule=UpdateSchedule(epochs=2, minibatches=2, target_kl=None))
    before = int(state.step)
    new_state, metrics = learner.update(state, frozen, samples_of(learner, state, frozen), rewards, group_size=4)
    assert metrics["optimizer_steps"] == 4 and int(new_state.step) == before + 4
    assert metrics["clip_fraction_last"] > 0 and metrics["approx_kl"] > 0
    # With a KL target the update stops once a step's approx-KL passes 1.5 x target.
    learner, state, frozen = _learner(tiny, "ppo_gae", learning_rate=1e-2,
                                      schedule=UpdateSchedule(epochs=2, minibatches=2, target_kl=1e-6))
    _, metrics = learner.update(state, frozen, samples_of(learner, state, frozen), rewards, group_size=4)
    assert metrics["optimizer_steps"] < 4
    assert metrics["kl_stop"] == 1 and metrics["grad_norm"] > 0  # the norm of the steps that ran a backward pass


def _reference_stats(hidden, head, targets, temperature, allowed=None):
    logits = np.einsum("bte,ev->btv", hidden.astype(np.float64), head.astype(np.float64)) / temperature
    if allowed is not None:
        keep = np.zeros(logits.shape, bool)
        for b, t, f in zip(*np.nonzero(allowed >= 0)):
            keep[b, t, allowed[b, t, f]] = True
        logits = np.where(keep, logits, -np.inf)
    log_p = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    chosen = np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    p = np.exp(log_p)
    entropy = -np.sum(p * np.where(p > 0, log_p, 0.0), -1)  # masked tokens: p = 0, log p = -inf, no term
    return chosen, entropy


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_chunked_token_stats_match_a_float64_full_vocabulary_reference(chunk):
    rng = np.random.RandomState(0)
    hidden, head = rng.randn(3, 5, 16).astype(np.float32), rng.randn(16, 50).astype(np.float32)
    targets = rng.randint(0, 50, (3, 5))
    for temperature in (1.0, 0.7):
        stats = token_stats(jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(targets), temperature, chunk=chunk)
        chosen, entropy = _reference_stats(hidden, head, targets, temperature)
        np.testing.assert_allclose(np.asarray(stats.logprobs), chosen, atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(stats.entropy), entropy, atol=2e-5, rtol=1e-5)
    allowed = np.full((3, 5, 4), -1)
    allowed[..., 0] = targets
    allowed[..., 1] = (targets + 3) % 50
    allowed[0, 0, 2] = (targets[0, 0] + 11) % 50
    stats = token_stats(jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(targets), 0.7,
                        allowed=jnp.asarray(allowed), chunk=chunk)
    chosen, entropy = _reference_stats(hidden, head, targets, 0.7, allowed)
    np.testing.assert_allclose(np.asarray(stats.logprobs), chosen, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(stats.entropy), entropy, atol=2e-5, rtol=1e-5)
    grads = jax.grad(lambda h: token_stats(h, jnp.asarray(head), jnp.asarray(targets), 0.7,
                                           allowed=jnp.asarray(allowed), chunk=chunk).logprobs.sum())(
        jnp.asarray(hidden))
    assert np.isfinite(np.asarray(grads)).all()
    # The gradient through the rematerialised chunks equals the full-vocabulary log-softmax's.
    def full_vocabulary(h):
        log_p = jax.nn.log_softmax(jnp.einsum("bte,ev->btv", h, jnp.asarray(head)) / 0.7, axis=-1)
        return jnp.take_along_axis(log_p, jnp.asarray(targets)[..., None], -1).sum()
    def chunked(h):
        return token_stats(h, jnp.asarray(head), jnp.asarray(targets), 0.7, chunk=chunk).logprobs.sum()
    np.testing.assert_allclose(np.asarray(jax.grad(chunked)(jnp.asarray(hidden))),
                               np.asarray(jax.grad(full_vocabulary)(jnp.asarray(hidden))), atol=2e-5, rtol=1e-4)


def test_lora_a_is_initialised_with_fan_in_scaling_per_layer(tiny):
    model = nnx.clone(tiny[0])
    add_lora(model, LoRAConfig(rank=8, alpha=16), key=jax.random.key(0))
    a = np.asarray(model.layers.mlp.down_proj.lora_a[...])  # [L, d_in, r]
    d_in = a.shape[1]
    assert a.shape[0] == model.config.num_layers
    np.testing.assert_allclose(a.std(), 1 / np.sqrt(3 * d_in), rtol=0.05)  # U(-1/sqrt(d_in), 1/sqrt(d_in))
    assert np.abs(a).max() <= 1 / np.sqrt(d_in)
    assert not np.allclose(a[0], a[1])


@pytest.mark.parametrize("recipe,reward", [("grpo", 0.1), ("entropic", 0.0)])
def test_groups_with_equal_rewards_leave_the_weights_alone(tiny, recipe, reward):
    """Every group's rewards equal and no KL term: there is no signal, so no optimizer step may move
    the weights. Before: the float error of the group mean (GRPO, eight rewards of 0.1) or of the
    leave-one-out logsumexp (entropic, eight zeros) was a noise gradient, and Adam, blind to scale,
    took full steps along it."""
    _, tokenizer = tiny
    learner, state, frozen = _learner(tiny, recipe, cfg=recipe_config(recipe, kl_coef=0.0))
    samples = generate(learner.policy(state, frozen), [p for p in _prompts(tokenizer, 2) for _ in range(8)],
                       key=jax.random.key(4), max_new_tokens=12, temperature=1.0, pad_token_id=0)
    before = [np.array(x) for x in jax.tree.leaves(state.params)]
    step = int(state.step)
    new_state, metrics = learner.update(state, frozen, samples, np.full(16, reward), group_size=8)
    assert metrics["optimizer_steps"] >= 1 and metrics["no_signal"] == metrics["optimizer_steps"]
    assert int(new_state.step) == step
    for a, b in zip(before, jax.tree.leaves(new_state.params)):
        np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.parametrize("recipe", ["grpo", "ppo_gae"])
def test_constrained_rows_that_stopped_early_still_train(tiny, recipe):
    """Past a constrained row's stop every allowed slot is -1. Before: log-prob +inf there, the ratio
    and loss NaN, and every step skipped (GRPO 2 of 2, PPO-GAE 8 of 8): the lever applied nothing."""
    _, tokenizer = tiny
    learner, state, frozen = _learner(tiny, recipe)
    ids = decoding_ids(tokenizer)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    automaton = label_automaton(encode, LABELS, prefix="[罪名]", separator=";", terminator="<eoa>",
                                stop_token_id=ids.stop_token_ids[0])
    samples = generate(learner.policy(state, frozen), [p for p in _prompts(tokenizer, 2) for _ in range(4)],
                       key=jax.random.key(5), max_new_tokens=48, temperature=1.0, constraint=automaton,
                       stop_token_ids=ids.stop_token_ids, pad_token_id=ids.pad_token_id)
    lengths = np.asarray(samples.mask).sum(1)
    assert lengths.max() < samples.tokens.shape[1] and lengths.min() < lengths.max()  # all stopped, ragged
    rewards = np.asarray([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    step = int(state.step)
    new_state, metrics = learner.update(state, frozen, samples, rewards, group_size=4)
    assert metrics["skipped"] == 0 and np.isfinite(metrics["loss"]) and metrics["applied_steps"] >= 1
    assert int(new_state.step) == step + metrics["applied_steps"]


def test_the_critic_learns_a_return_the_prompt_predicts(tiny):
    """One prompt always earns 1, the other 0: the value head, on its own partition and learning rate,
    must come to explain a good part of the returns' variance. Before (the LoRA rate, 1e-3 here, and
    Adam state shared with the adapters) explained variance stayed below 0.01 over the same 64 steps."""
    _, tokenizer = tiny
    learner, state, frozen = make_learner(nnx.clone(tiny[0]), "ppo_gae", lora=LoRAConfig(rank=4),
                                          learning_rate=1e-3, critic_learning_rate=0.1,
                                          schedule=UpdateSchedule(epochs=2, minibatches=2, target_kl=None))
    prompts = [p for p in _prompts(tokenizer, 2) for _ in range(4)]
    explained = []
    for update in range(16):
        samples = generate(learner.policy(state, frozen), prompts, key=jax.random.key(update), max_new_tokens=12,
                           temperature=1.0, pad_token_id=0)
        state, metrics = learner.update(state, frozen, samples, np.repeat([1.0, 0.0], 4), group_size=4)
        explained.append(metrics["explained_variance"])
    assert explained[0] < 0.1 and np.mean(explained[-6:]) > 0.15, explained


@pytest.mark.parametrize("recipe,kl", [("entropic", "kl_coef"), ("ppo_gae", "reward_kl_coef")])
def test_the_reference_policy_is_scored_only_when_a_kl_term_reads_it(tiny, monkeypatch, recipe, kl):
    """With every KL-to-reference coefficient at 0 the learner skips the frozen base's forward pass,
    and the update is the one it makes when it does score the reference (then unread)."""
    import dataclasses

    import siajax.train.learner as learner_module
    from siajax.rl import get_recipe
    from siajax.rl.recipes import RECIPES

    _, tokenizer = tiny
    ids = decoding_ids(tokenizer)
    passes = []
    scoring = learner_module.score_responses
    monkeypatch.setattr(learner_module, "score_responses",
                        lambda *a, **k: passes.append(k.get("lora", True)) or scoring(*a, **k))
    schedule = UpdateSchedule(epochs=1, minibatches=1)
    cfg = recipe_config(recipe, **{"kl_coef": 0.0, kl: 0.0})
    assert not get_recipe(recipe).uses_reference(cfg) and get_recipe(recipe).uses_reference(
        recipe_config(recipe, **{kl: 0.1}))
    updated = {}
    for scores_reference in (False, True):
        monkeypatch.setitem(RECIPES, recipe, dataclasses.replace(RECIPES[recipe],
                                                                 uses_reference=lambda cfg, on=scores_reference: on))
        learner, state, frozen = _learner(tiny, recipe, cfg=cfg, schedule=schedule)
        samples = generate(learner.policy(state, frozen), [p for p in _prompts(tokenizer) for _ in range(4)],
                           key=jax.random.key(2), max_new_tokens=12, temperature=1.0,
                           stop_token_ids=ids.stop_token_ids, pad_token_id=ids.pad_token_id)
        passes.clear()
        new_state, _ = learner.update(state, frozen, samples, np.arange(16) % 3 == 0, group_size=4)
        old_pass = [True] if get_recipe(recipe).reads_old_forward else []  # the old policy (lora), then the base
        assert passes == old_pass + ([False] if scores_reference else [])
        updated[scores_reference] = new_state.params
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), updated[False], updated[True])


@pytest.mark.parametrize("recipe", ["grpo", "entropic"])
def test_recipes_that_read_only_logprobs_train_against_the_sampler_logprobs(tiny, monkeypatch, recipe):
    """GRPO and entropic advantages read rewards only: the update takes the sampler's log-probs as the
    old ones (no forward pass of the old policy), and reports as ``logprob_mismatch`` its first step's
    distance from them, which is the scoring forward's distance over that step's minibatch."""
    import siajax.train.learner as learner_module
    from siajax.train.learner import minibatch_orders
    from siajax.train.policy import score_responses

    _, tokenizer = tiny
    ids = decoding_ids(tokenizer)
    passes = []
    monkeypatch.setattr(learner_module, "score_responses",
                        lambda *a, **k: passes.append(k.get("lora", True)) or score_responses(*a, **k))
    learner, state, frozen = _learner(tiny, recipe, cfg=recipe_config(recipe, kl_coef=0.0))
    samples = generate(learner.policy(state, frozen), [p for p in _prompts(tokenizer) for _ in range(4)],
                       key=jax.random.key(3), max_new_tokens=16, temperature=0.7,
                       stop_token_ids=ids.stop_token_ids, pad_token_id=ids.pad_token_id)
    rewards = (np.arange(16) % 3 == 0).astype(np.float32)
    batch, _ = learner.make_batch(state, frozen, samples, rewards, group_size=4)
    trained = np.asarray(samples.trained_mask)
    np.testing.assert_array_equal(np.asarray(batch.rl.old_logprobs), np.where(trained, samples.logprobs, 0.0))
    assert passes == []

    tokens = jnp.concatenate([samples.prompt_tokens, samples.tokens], axis=1)
    attention = jnp.concatenate([samples.prompt_mask, samples.mask], axis=1)
    scored = score_responses(learner.parts, state.params, frozen, tokens, attention, samples.tokens.shape[1],
                             jnp.full((16,), 0.7, jnp.float32)).logprobs
    first_rows = np.asarray(minibatch_orders(state, 16, learner.schedule)[1][0])
    gap = np.where(trained, np.abs(np.asarray(scored) - np.asarray(samples.logprobs)), 0.0)
    _, metrics = learner.update(state, frozen, samples, rewards, group_size=4)
    assert metrics["logprob_mismatch"] <= 1e-4
    np.testing.assert_allclose(metrics["logprob_mismatch"], gap[first_rows].max(), atol=2e-6)


def test_grpo_and_entropic_updates_are_one_program(tiny):
    """The clipped-surrogate recipes carry their numbers as data, so their scheduled updates lower to
    one program (a loop that switches recipe compiles it once); an entropic update reports no KL to
    the reference it does not read, GRPO's does."""
    _, tokenizer = tiny
    rewards = np.asarray([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0], np.float32)
    programs, metrics = {}, {}
    for recipe in ("entropic", "grpo"):
        learner, state, frozen = _learner(tiny, recipe)
        samples = generate(learner.policy(state, frozen), [p for p in _prompts(tokenizer, 2) for _ in range(4)],
                           key=jax.random.key(0), max_new_tokens=6, temperature=0.8)
        batch, _ = learner.make_batch(state, frozen, samples, rewards, 4)
        programs[recipe] = learner.run_schedule.lower(state, frozen, batch).as_text(debug_info=False)
        metrics[recipe] = learner.update(state, frozen, samples, rewards, 4)[1]
    assert programs["entropic"] == programs["grpo"]
    assert "kl_ref" not in metrics["entropic"] and metrics["grpo"]["kl_ref"] > 0
