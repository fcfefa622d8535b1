"""The sampler memo: a request answered before on the same weights is answered again without decoding,
with the very samples a fresh call draws; anything the draws depend on makes it draw again."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import siajax.agents.backends as backends
from siajax import timing
from siajax.agents import LocalPolicyBackend, evaluate
from siajax.agents.sample_memo import SampleMemo
from siajax.config import RunConfig
from siajax.harness import SamplingParams, patch_harness
from siajax.models import BUNDLED_TINY_MODEL, from_pretrained
from siajax.tasks import resolve_task

SAMPLING = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, samples_per_prompt=1, max_new_tokens=6)
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


@pytest.fixture(scope="module")
def tiny():
    return from_pretrained(BUNDLED_TINY_MODEL)


@pytest.fixture
def sampler_calls(monkeypatch):
    """The rows of every ``generate`` call the backends make."""
    calls = []

    def counted(model, prompts, **kwargs):
        calls.append(len(prompts))
        return generate(model, prompts, **kwargs)

    generate = backends.generate
    monkeypatch.setattr(backends, "generate", counted)
    return calls


def _same(a, b) -> None:
    completions_a, result_a = a
    completions_b, result_b = b
    assert completions_a == completions_b
    for field in ("tokens", "logprobs", "mask", "lengths"):
        np.testing.assert_array_equal(np.asarray(getattr(result_a, field)), np.asarray(getattr(result_b, field)))


def test_a_repeated_request_is_answered_from_the_memo_with_a_fresh_calls_samples(tiny, sampler_calls):
    model, tokenizer = tiny
    memo = SampleMemo()
    first = LocalPolicyBackend(model, tokenizer, memo=memo).sample_ids(PROMPTS, SAMPLING, jax.random.key(3))
    drawn = len(sampler_calls)
    with timing.measuring() as clock:  # another backend on the same weights, as each evaluation makes
        again = LocalPolicyBackend(model, tokenizer, memo=memo).sample_ids(PROMPTS, SAMPLING, jax.random.key(3))
    assert len(sampler_calls) == drawn and clock.counts["reused_samples"] == len(PROMPTS)
    assert clock.counts["generated_tokens"] == 0
    _same(again, first)
    _same(again, LocalPolicyBackend(model, tokenizer).sample_ids(PROMPTS, SAMPLING, jax.random.key(3)))
    assert len(sampler_calls) > drawn  # the memo-less backend decoded


def _with_copied_weights(model):
    """The same model with every array copied: equal values, other arrays."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def test_anything_the_draws_depend_on_makes_it_draw_again(tiny, sampler_calls):
    model, tokenizer = tiny
    memo = SampleMemo(capacity=16)
    backend = LocalPolicyBackend(model, tokenizer, memo=memo)
    backend.sample_ids(PROMPTS, SAMPLING, jax.random.key(3))
    variants = [
        (backend, PROMPTS, SAMPLING, jax.random.key(4)),
        (backend, PROMPTS[:2], SAMPLING, jax.random.key(3)),
        (backend, PROMPTS, dataclasses.replace(SAMPLING, temperature=0.5), jax.random.key(3)),
        (backend, PROMPTS, dataclasses.replace(SAMPLING, max_new_tokens=4), jax.random.key(3)),
        (LocalPolicyBackend(_with_copied_weights(model), tokenizer, memo=memo), PROMPTS, SAMPLING, jax.random.key(3)),
    ]
    for index, (sampler, prompts, sampling, key) in enumerate(variants):
        before = len(sampler_calls)
        sampler.sample_ids(prompts, sampling, key)
        assert len(sampler_calls) > before, f"variant {index} was answered from the memo"
    assert len(memo) == 1 + len(variants)


def test_the_memo_keeps_the_most_recently_used_entries_and_their_weights():
    memo = SampleMemo(capacity=2)
    weights = [[np.zeros(2)], [np.ones(2)], [np.full(2, 2.0)]]
    memo.put(weights[0], "a", 0)
    memo.put(weights[1], "b", 1)
    assert memo.get(weights[0], "a") == 0  # now the most recent
    memo.put(weights[2], "c", 2)  # evicts "b"
    assert memo.get(weights[1], "b") is None and memo.get(weights[0], "a") == 0 and memo.get(weights[2], "c") == 2
    assert memo.get([np.zeros(2)], "a") is None  # equal values in another array: other weights
    with pytest.raises(ValueError, match="capacity"):
        SampleMemo(capacity=0)


def test_a_parser_only_candidate_is_scored_on_the_evaluations_own_samples(tiny, sampler_calls):
    """The loop's case: a harness candidate that changes only the parser asks for the dev samples the
    entering state was scored on; it decodes nothing and scores exactly as a fresh evaluation does."""
    model, tokenizer = tiny
    task = resolve_task("digits")
    harness = task.default_harness()
    lenient = patch_harness(harness, [{"op": "replace", "path": "/parser/pattern", "value": "\\s*(-?\\d+)\\s*"},
                                      {"op": "replace", "path": "/parser/pick", "value": "last"}])
    items, key = task.dev_items()[:6], jax.random.key(7)
    memo = SampleMemo()
    evaluate(task, harness, LocalPolicyBackend(model, tokenizer, memo=memo), items, key, split="dev")
    drawn = len(sampler_calls)
    with timing.measuring() as clock:
        reused = evaluate(task, lenient, LocalPolicyBackend(model, tokenizer, memo=memo), items, key, split="dev")
    fresh = evaluate(task, lenient, LocalPolicyBackend(model, tokenizer), items, key, split="dev")
    assert clock.counts["reused_samples"] == len(items) and len(sampler_calls) > drawn
    assert reused.scores == fresh.scores and reused.records == fresh.records


def test_a_runs_evaluations_share_the_policys_memo_and_rollouts_do_not():
    from siajax.train.trainable import TrainablePolicy

    policy = TrainablePolicy(RunConfig(task="digits", model=str(BUNDLED_TINY_MODEL), seed=1))
    assert policy.backend().memo is policy.backend().memo is policy.sample_memo
    assert policy.backend(policy.model(), reuse_samples=False).memo is None
    first, second = (jax.tree.leaves(nnx.state(policy.backend().model)) for _ in range(2))
    assert [id(x) for x in first] == [id(x) for x in second]  # the same arrays: the memo can answer
