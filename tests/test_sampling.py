"""The jitted sampler against transformers' generate and against a full forward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from siajax import timing
from siajax.models import iter_checkpoint_tensors, load_weights, read_hf_config
from siajax.sampling import _decode, _prefill, categorical_by_inverse_cdf, generate, left_pad, sample_next_token

torch = pytest.importorskip("torch")  # these tests compare against PyTorch

PROMPTS = [[5, 9, 33, 17, 8], [44, 12], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [100]]


@pytest.fixture(scope="module")
def models(hf_checkpoint):
    torch_model, directory = hf_checkpoint("qwen2", seed=3)
    return torch_model, load_weights(read_hf_config(directory), iter_checkpoint_tensors(directory))


def _hf_greedy(torch_model, prompts, max_new_tokens, eos):
    ids, mask = left_pad(prompts, 0, length=max(map(len, prompts)))
    with torch.no_grad():
        out = torch_model.generate(
            torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
            do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0, eos_token_id=eos,
        )
    return out[:, ids.shape[1]:].numpy()


def test_greedy_matches_transformers_generate(models):
    torch_model, model = models
    reference = _hf_greedy(torch_model, PROMPTS, 24, eos=[])
    ours = generate(model, PROMPTS, key=jax.random.key(0), max_new_tokens=24, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(ours.tokens), reference)
    assert np.asarray(ours.mask).all()


def test_greedy_stops_like_transformers_generate(models):
    torch_model, model = models
    unstopped = _hf_greedy(torch_model, PROMPTS, 24, eos=[])
    stop = int(unstopped[0, 6])
    first_stop = int(np.argmax(unstopped[0] == stop))
    reference = _hf_greedy(torch_model, PROMPTS, 24, eos=[stop])
    ours = generate(model, PROMPTS, key=jax.random.key(0), max_new_tokens=24, temperature=0.0,
                    stop_token_ids=[stop], pad_token_id=0)
    tokens = np.asarray(ours.tokens)
    np.testing.assert_array_equal(tokens[:, : reference.shape[1]], reference)
    assert (tokens[:, reference.shape[1]:] == 0).all()
    assert int(ours.lengths[0]) == first_stop + 1 and int(tokens[0, first_stop]) == stop
    np.testing.assert_array_equal(np.asarray(ours.mask), np.arange(24)[None] < np.asarray(ours.lengths)[:, None])


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_logprobs_equal_a_full_forward_pass(models, temperature):
    _, model = models
    result = generate(model, PROMPTS, key=jax.random.key(5), max_new_tokens=16,
                      temperature=temperature, stop_token_ids=[3], pad_token_id=0)
    sequence = jnp.concatenate([result.prompt_tokens, result.tokens], axis=1)
    mask = jnp.concatenate([result.prompt_mask, result.mask], axis=1)
    logits = np.asarray(model(sequence, attention_mask=mask).logits, np.float64)
    prompt_len = result.prompt_tokens.shape[1]
    predicting = logits[:, prompt_len - 1 : -1] / (temperature or 1.0)
    log_softmax = predicting - np.log(np.exp(predicting - predicting.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - predicting.max(-1, keepdims=True)
    expected = np.take_along_axis(log_softmax, np.asarray(result.tokens)[..., None], -1)[..., 0]
    real = np.asarray(result.mask)
    np.testing.assert_allclose(np.asarray(result.logprobs)[real], expected[real], atol=1e-5)
    assert (np.asarray(result.logprobs)[~real] == 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_layers_unrolled_or_scanned_decode_the_same(models, temperature):
    """``decode_unroll`` only changes how the program runs the layers, not what it draws: the same
    tokens and log-probs, past a KV-span segment boundary (a 16-slot prompt + 140 tokens cross 144)."""
    import dataclasses

    _, model = models
    unrolled = nnx.clone(model)
    unrolled.config = dataclasses.replace(model.config, decode_unroll=True)
    assert not model.config.decode_unroll  # the default scans
    kwargs = dict(key=jax.random.key(3), max_new_tokens=140, temperature=temperature, pad_token_id=0)
    scanned, unrolled = generate(model, PROMPTS, **kwargs), generate(unrolled, PROMPTS, **kwargs)
    np.testing.assert_array_equal(np.asarray(scanned.tokens), np.asarray(unrolled.tokens))
    np.testing.assert_allclose(np.asarray(scanned.logprobs), np.asarray(unrolled.logprobs), atol=1e-5)


def test_a_fixed_key_reproduces_samples_and_another_key_does_not(models):
    _, model = models
    kwargs = dict(max_new_tokens=20, temperature=1.0, top_p=0.95)
    first = generate(model, PROMPTS, key=jax.random.key(11), **kwargs)
    second = generate(model, PROMPTS, key=jax.random.key(11), **kwargs)
    other = generate(model, PROMPTS, key=jax.random.key(12), **kwargs)
    np.testing.assert_array_equal(np.asarray(first.tokens), np.asarray(second.tokens))
    np.testing.assert_array_equal(np.asarray(first.logprobs), np.asarray(second.logprobs))
    assert (np.asarray(first.tokens) != np.asarray(other.tokens)).any()


def _shared_and_per_row(model, rows, kwargs):
    """generate() with what the rows share prefilled once, and with every row prefilled whole: the same
    draws; log-probs within float32 rounding (XLA blocks a 4-row matmul unlike a 16-row one).
    -> (shared, per_row, and each one's timing clock)."""
    with timing.measuring() as shared_clock:
        shared = generate(model, rows, **kwargs)
    with timing.measuring() as row_clock:
        per_row = generate(model, rows, share_prompts=False, **kwargs)
    for name in ("tokens", "mask", "lengths", "prompt_tokens", "prompt_mask"):
        np.testing.assert_array_equal(np.asarray(getattr(shared, name)), np.asarray(getattr(per_row, name)))
    np.testing.assert_allclose(np.asarray(shared.logprobs), np.asarray(per_row.logprobs), atol=2e-5)
    return shared, per_row, shared_clock, row_clock


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_a_prompt_sampled_many_times_is_prefilled_once_and_samples_the_same(models, temperature):
    _, model = models
    grouped = [prompt for prompt in PROMPTS[:3] for _ in range(4)]  # 12 rows (a bucket of 16), 3 distinct (4)
    kwargs = dict(key=jax.random.key(7), max_new_tokens=12, temperature=temperature, stop_token_ids=[3],
                  pad_token_id=0)
    shared, per_row, shared_clock, row_clock = _shared_and_per_row(model, grouped, kwargs)
    prompt_len = shared.prompt_tokens.shape[1]
    assert shared_clock.counts["prefill_tokens"] == 4 * prompt_len
    assert row_clock.counts["prefill_tokens"] == 16 * prompt_len


PREFIXED = [list(range(20, 50)) + tail for tail in ([5, 9, 33], [44], [7, 8, 9, 10, 11, 12], [100, 101])]


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_a_common_prefix_is_prefilled_once_and_samples_the_same(models, temperature):
    """Prompts that start alike (a system prompt, few-shot examples) run that start once, as one row,
    then each its own tokens after it in the same cache: the same draws as prefilling every row whole,
    log-probs within float32 rounding, the rows reported left-padded as before, and a fifth of the
    prefilled tokens; the cache keeps the rows' width. Streaming and retiring rows decode from the same cache."""
    from siajax.sampling import stream

    _, model = models
    rows = [prompt for prompt in PREFIXED for _ in range(2)]  # 8 rows, 4 distinct, 30 tokens in common
    kwargs = dict(key=jax.random.key(5), max_new_tokens=12, temperature=temperature, stop_token_ids=[3],
                  pad_token_id=0)
    shared, per_row, shared_clock, row_clock = _shared_and_per_row(model, rows, kwargs)
    assert shared_clock.counts["prefill_tokens"] == 48 + 4 * 16  # the prefix once, 4 suffixes: 64 slots a row
    assert row_clock.counts["prefill_tokens"] == 8 * 64
    streamed = [[] for _ in rows]
    for chunk in stream(model, rows, chunk_tokens=4, **kwargs):
        for row, ids in zip(streamed, chunk.tokens):
            row.extend(ids)
    assert streamed == [list(np.asarray(shared.tokens)[r, :n]) for r, n in enumerate(np.asarray(shared.lengths))]
    retired = generate(model, rows, retire_finished_rows=4, **kwargs)
    retired_whole = generate(model, rows, retire_finished_rows=4, share_prompts=False, **kwargs)
    np.testing.assert_array_equal(np.asarray(retired.tokens), np.asarray(retired_whole.tokens))


def test_a_shared_prefix_leaves_each_prompt_a_token_and_is_taken_only_when_it_pays():
    from siajax.prompts import shared_prefix

    start = list(range(20, 50))
    tokens, mask = left_pad([start, start + [7, 8]], 0, 64)
    prefix = shared_prefix(tokens, mask)
    assert int(prefix.mask.sum()) == 29  # the shorter prompt keeps its last token: its logits draw the first one
    suffixes = [list(np.asarray(t)[np.asarray(m)]) for t, m in zip(prefix.suffix_tokens, prefix.suffix_mask)]
    assert suffixes == [[49], [49, 7, 8]]
    assert list(np.asarray(prefix.tokens)[np.asarray(prefix.mask)]) == start[:29]
    assert prefix.tokens.shape[1] + prefix.suffix_tokens.shape[1] == 64  # the rows' width: the same decode program
    assert shared_prefix(*left_pad([start[:7] + [1], start[:7] + [2]], 0)) is None  # under 8 tokens in common
    long_tails = [start[:20] + list(range(100, 200)), start[:20] + [1]]
    assert shared_prefix(*left_pad(long_tails, 0)) is None  # 20 + 2 x 108 prefilled > 0.75 x 2 x 128
    assert shared_prefix(*left_pad([start], 0)) is None


@pytest.mark.parametrize("temperature,chunk_tokens", [(1.0, 1), (0.0, 5)])
def test_streaming_yields_the_tokens_generate_draws_as_they_are_decoded(models, temperature, chunk_tokens):
    """stream() runs generate's prefill and decode step in chunks: the same tokens and log-probs for the
    same key, a chunk every ``chunk_tokens`` steps, and each row finished once it stops."""
    from siajax.sampling import stream

    _, model = models
    rows = [PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    kwargs = dict(key=jax.random.key(4), max_new_tokens=11, temperature=temperature, stop_token_ids=[3],
                  pad_token_id=0)
    whole = generate(model, rows, **kwargs)
    chunks = list(stream(model, rows, chunk_tokens=chunk_tokens, **kwargs))
    assert 1 < len(chunks) <= 1 + -(-10 // chunk_tokens)
    assert all(len(ids) <= chunk_tokens for chunk in chunks[1:] for ids in chunk.tokens)
    for row in range(3):
        n = int(whole.lengths[row])
        assert sum((chunk.tokens[row] for chunk in chunks), []) == np.asarray(whole.tokens[row, :n]).tolist()
        np.testing.assert_array_equal(sum((chunk.logprobs[row] for chunk in chunks), []),
                                      np.asarray(whole.logprobs[row, :n]))
        finished_at = next(i for i, chunk in enumerate(chunks) if chunk.finished[row])
        assert sum(len(chunk.tokens[row]) for chunk in chunks[:finished_at + 1]) == n
    early = stream(model, rows, **kwargs)
    next(early)
    early.close()  # a client that leaves: decoding stops, nothing raised


def _stops_that_split_rows(tokens: np.ndarray, long_rows: int, early: int) -> list[int]:
    """Stop ids that end every row but the first ``long_rows`` within ``early`` steps, and that those
    never draw (each row's sequence as drawn without stops)."""
    never = set(tokens[:long_rows].ravel().tolist())

    def stop_for(r, row):  # preferably a few steps in, so rows leave at different steps
        return next(int(t) for t in [*row[1 + r % (early - 1):early], *row[:early]] if int(t) not in never)
    return sorted({stop_for(r, row) for r, row in enumerate(tokens[long_rows:])})


def _one_program_with_row_keys(model, rows, *, key, max_new_tokens, temperature, stop_token_ids=(), pad_token_id=0,
                               constraint=None):
    """What generate draws with per-row keys as one decode program over the whole batch (no row leaves)."""
    import siajax.sampling as sampling

    spec = sampling._decode_spec(max_new_tokens, 0, stop_token_ids, pad_token_id, True, row_keys=True,
                                 constrained=constraint is not None)
    plan = sampling._one_device_batch(rows, pad_token_id, share_prompts=False)
    graphdef, state = nnx.split(model)
    result = sampling._prefill_then_decode(graphdef, state, plan, jnp.int32(len(rows)), key, jnp.float32(temperature),
                                           jnp.float32(1.0), jnp.int32(max_new_tokens), spec, constraint)
    return sampling._take_rows(result, len(rows), max_new_tokens)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_rows_that_finish_leave_the_batch_and_the_rest_draw_the_same(models, temperature, monkeypatch):
    """Decoding 2 tokens at a time, the rows that stopped leave the batch (8 -> 2 here): every
    row's tokens and log-probs equal those of one decode program over the whole call with the same
    per-row keys; greedy, those of the default sampler."""
    import siajax.sampling as sampling

    _, model = models
    rows = [PROMPTS[i % 4][: 1 + i % 3] + [20 + i] for i in range(8)]
    kwargs = dict(key=jax.random.key(11), max_new_tokens=20, temperature=temperature, pad_token_id=0)
    unstopped = np.asarray(generate(model, rows, retire_finished_rows=64, **kwargs).tokens)
    kwargs["stop_token_ids"] = _stops_that_split_rows(unstopped, long_rows=2, early=6)
    batches = []

    def spying(*args, **kw):
        buffers, sizes = retiring(*args, **kw)
        batches.append(sizes)
        return buffers, sizes

    retiring = sampling._retiring_decode
    monkeypatch.setattr(sampling, "_retiring_decode", spying)
    retired = generate(model, rows, retire_finished_rows=2, **kwargs)
    lengths = np.asarray(retired.lengths)
    assert batches[0][0] == 8 and batches[0][-1] == 2, batches
    assert lengths[2:].max() <= 6 and (lengths[:2] == 20).all()  # six rows stopped early, two ran to the limit
    whole = _one_program_with_row_keys(model, rows, **kwargs)
    for name in ("tokens", "mask", "lengths"):
        np.testing.assert_array_equal(np.asarray(getattr(retired, name)), np.asarray(getattr(whole, name)))
    np.testing.assert_allclose(np.asarray(retired.logprobs), np.asarray(whole.logprobs), atol=1e-5)
    if temperature == 0.0:
        default = generate(model, rows, **kwargs)
        np.testing.assert_array_equal(np.asarray(retired.tokens), np.asarray(default.tokens))
        np.testing.assert_allclose(np.asarray(retired.logprobs), np.asarray(default.logprobs), atol=1e-5)


def test_constrained_rows_leave_the_batch_with_their_automaton_state(models):
    """Under a label automaton (labels of 1 to 11 tokens, then the stop), rows that closed their label
    leave the batch; the rest go on in the automaton state they had: the same tokens, log-probs and
    allowed sets as one program over the whole batch."""
    from siajax.harness.constrained import label_automaton

    _, model = models
    labels = ["a", "bcd", "efghijk", "lmnopqrstuv", "w"]
    automaton = label_automaton(lambda text: [3 + ord(c) - ord("a") for c in text], labels, prefix="x",
                                terminator="y", stop_token_id=2)
    rows = [PROMPTS[i % 4] + [30 + i] for i in range(8)]
    kwargs = dict(key=jax.random.key(5), max_new_tokens=16, temperature=1.5, stop_token_ids=[2], pad_token_id=0)
    retired = generate(model, rows, retire_finished_rows=2, constraint=automaton, **kwargs)
    whole = _one_program_with_row_keys(model, rows, constraint=automaton, **kwargs)
    lengths = np.asarray(retired.lengths)
    assert len(set(lengths.tolist())) > 1 and lengths.max() < 16  # labels of several lengths, all closed
    for name in ("tokens", "lengths", "allowed"):
        np.testing.assert_array_equal(np.asarray(getattr(retired, name)), np.asarray(getattr(whole, name)))
    np.testing.assert_allclose(np.asarray(retired.logprobs), np.asarray(whole.logprobs), atol=1e-5)


def test_temperature_and_top_p_changes_do_not_recompile(models):
    _, model = models
    generate(model, PROMPTS, key=jax.random.key(0), max_new_tokens=8, temperature=0.9, top_p=0.9)
    compiled = (_prefill._cache_size(), _decode._cache_size())
    for temperature, top_p in ((0.3, 1.0), (1.5, 0.5), (0.0, 0.8)):
        generate(model, PROMPTS, key=jax.random.key(1), max_new_tokens=8, temperature=temperature, top_p=top_p)
    assert (_prefill._cache_size(), _decode._cache_size()) == compiled


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = jnp.asarray(np.random.RandomState(0).randn(64, 50).astype(np.float32))
    greedy = np.asarray(jnp.argmax(logits, -1))
    keys = jax.random.split(jax.random.key(0), 3)
    top1, _ = sample_next_token(logits, keys[0], jnp.float32(1.0), jnp.float32(1.0), top_k=1)
    nucleus, _ = sample_next_token(logits, keys[1], jnp.float32(1.0), jnp.float32(1e-6), top_k=0)
    np.testing.assert_array_equal(np.asarray(top1), greedy)
    np.testing.assert_array_equal(np.asarray(nucleus), greedy)


def test_top_k_and_top_p_never_sample_outside_their_set():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray(np.tile(probs, (4000, 1)), jnp.float32))
    key = jax.random.key(7)
    top2, _ = sample_next_token(logits, key, jnp.float32(1.0), jnp.float32(1.0), top_k=2)
    nucleus, _ = sample_next_token(logits, key, jnp.float32(1.0), jnp.float32(0.7), top_k=0)
    assert set(np.unique(np.asarray(top2))) == {0, 1}
    assert set(np.unique(np.asarray(nucleus))) == {0, 1}  # 0.5 < 0.7 <= 0.8
    share = np.mean(np.asarray(nucleus) == 0)
    assert abs(share - 0.5 / 0.8) < 0.03


def test_sampling_frequencies_follow_the_tempered_distribution():
    logits = jnp.asarray(np.tile([2.0, 1.0, 0.0], (20000, 1)), jnp.float32)
    tokens, logprobs = sample_next_token(logits, jax.random.key(0), jnp.float32(0.5), jnp.float32(1.0), top_k=0)
    expected = np.exp(np.array([4.0, 2.0, 0.0]))
    expected /= expected.sum()
    observed = np.bincount(np.asarray(tokens), minlength=3) / 20000
    np.testing.assert_allclose(observed, expected, atol=0.01)
    np.testing.assert_allclose(np.asarray(logprobs), np.log(expected)[np.asarray(tokens)], atol=1e-5)


def test_inverse_cdf_draws_follow_a_vocabulary_sized_distribution_and_never_a_masked_token():
    """Against NumPy float64 on SmolLM2's vocabulary: 16 likely tokens spread over the whole vocabulary
    (the last one at the end, where the float32 running sum is largest), a long tail, and every odd id
    masked to -inf. Each likely token's frequency is within 4.5 binomial sigmas; no masked id is drawn."""
    vocab, rows = 49_152, 40_000
    rng = np.random.RandomState(3)
    logits = rng.randn(vocab) - 2.0
    likely = np.concatenate([rng.choice(np.arange(0, vocab - 2, 2), 15, replace=False), [vocab - 2]])
    logits[likely] = 6.0 + rng.rand(16)
    logits[1::2] = -np.inf
    expected = np.exp(logits - logits.max())
    expected /= expected.sum()
    batch = jnp.asarray(np.tile(logits, (rows // 8, 1)), jnp.float32)
    tokens = np.concatenate([np.asarray(categorical_by_inverse_cdf(key, batch))
                             for key in jax.random.split(jax.random.key(0), 8)])
    assert not np.any(tokens % 2)
    counts = np.bincount(tokens, minlength=vocab)
    sigma = np.sqrt(rows * expected[likely] * (1 - expected[likely]))
    assert np.all(np.abs(counts[likely] - rows * expected[likely]) < 4.5 * sigma), (counts[likely], rows * expected[likely])
    tail = 1 - expected[likely].sum()
    assert abs(counts.sum() - counts[likely].sum() - rows * tail) < 4.5 * np.sqrt(rows * tail * (1 - tail))


def test_bad_prompts_are_rejected_clearly(models):
    _, model = models
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], key=jax.random.key(0), max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1, 2]], key=jax.random.key(0), max_new_tokens=0)
