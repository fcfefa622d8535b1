"""`siajax serve` speaks OpenAI's chat API: the official client and our OpenAI backend use it."""

from __future__ import annotations

import threading

import jax
import openai
import pytest

from siajax.agents import LocalPolicyBackend, OpenAIBackend
from siajax.harness import SamplingParams
from siajax.models import BUNDLED_TINY_MODEL, from_pretrained
from siajax.serve import make_server


@pytest.fixture(scope="module")
def server_url():
    backend = LocalPolicyBackend(*from_pretrained(BUNDLED_TINY_MODEL))
    server = make_server(backend, port=0, model_name="tiny")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_official_openai_client_gets_completions_with_logprobs(server_url):
    client = openai.OpenAI(base_url=server_url, api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    request = dict(model="tiny", messages=[{"role": "user", "content": "How many cells?"}], n=2, max_tokens=8,
                   temperature=1.0, seed=7, logprobs=True)
    response = client.chat.completions.create(**request)
    assert len(response.choices) == 2
    for choice in response.choices:
        assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
        assert 1 <= len(choice.logprobs.content) <= 8
        assert all(t.logprob <= 0 for t in choice.logprobs.content)
    assert response.usage.completion_tokens == sum(len(c.logprobs.content) for c in response.choices)
    again = client.chat.completions.create(**request)
    assert [c.message.content for c in again.choices] == [c.message.content for c in response.choices]


def test_bad_request_is_a_clear_400(server_url):
    client = openai.OpenAI(base_url=server_url, api_key="unused")
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny", messages=[])


def test_openai_backend_round_trips_through_the_server(server_url):
    backend = OpenAIBackend("tiny", base_url=server_url)
    sampling = SamplingParams(temperature=0.0, top_p=1.0, samples_per_prompt=1, max_new_tokens=6)
    [[remote]] = backend.complete([[{"role": "user", "content": "Count the genes."}]], sampling, jax.random.key(0))
    local = LocalPolicyBackend(*from_pretrained(BUNDLED_TINY_MODEL))
    [[direct]] = local.complete([[{"role": "user", "content": "Count the genes."}]], sampling, jax.random.key(0))
    assert remote.text == direct.text  # greedy: the server adds nothing of its own


def test_stop_strings_cut_the_reply_and_streaming_matches_the_plain_reply(server_url):
    client = openai.OpenAI(base_url=server_url, api_key="unused")
    request = dict(model="tiny", messages=[{"role": "user", "content": "Tell me about cells."}], max_tokens=24,
                   temperature=0.0)
    full = client.chat.completions.create(**request).choices[0].message.content
    assert len(full) > 4
    stop = full[2:4]
    cut = client.chat.completions.create(**request, stop=[stop]).choices[0]
    assert cut.message.content == full[:full.find(stop)] and cut.finish_reason == "stop"
    chunks = list(client.chat.completions.create(**request, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == full and chunks[-1].choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("bad,field", [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                                       ({"n": 0}, "n"), ({"max_tokens": 10**6}, "max_tokens"),
                                       ({"stop": [1, 2]}, "stop"), ({"seed": "x"}, "seed")])
def test_bad_sampling_fields_are_400s_naming_the_field(server_url, bad, field):
    client = openai.OpenAI(base_url=server_url, api_key="unused")
    with pytest.raises(openai.BadRequestError, match=field):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], **bad)


class BrokenBackend:
    """The tiny policy whose decoding fails: before its first token, or after ``tokens_first`` chunks."""

    def __init__(self, backend, tokens_first: int = 0):
        self.backend, self.tokens_first = backend, tokens_first

    def stream(self, prompt_ids, sampling, key, chunk_tokens=1):
        for index, chunk in enumerate(self.backend.stream(prompt_ids, sampling, key, chunk_tokens)):
            if index >= self.tokens_first:
                raise RuntimeError("device lost")
            yield chunk

    def __getattr__(self, name):
        return getattr(self.backend, name)


@pytest.fixture(scope="module")
def tiny_backend():
    return LocalPolicyBackend(*from_pretrained(BUNDLED_TINY_MODEL))


def _serving(backend, **kwargs):
    server = make_server(backend, port=0, model_name="tiny", **kwargs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="unused",
                           max_retries=0, timeout=120)
    return server, client


def test_a_backend_failure_is_a_500_and_the_server_stays_up(tiny_backend):
    server, client = _serving(BrokenBackend(tiny_backend))
    try:
        for _ in range(2):
            with pytest.raises(openai.InternalServerError, match="device lost"):
                client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    finally:
        server.shutdown()


def test_a_failure_mid_stream_ends_the_stream_with_an_error_event(tiny_backend):
    server, client = _serving(BrokenBackend(tiny_backend, tokens_first=3))
    try:
        with pytest.raises(openai.APIError, match="device lost"):
            for _ in client.chat.completions.create(model="tiny", stream=True, max_tokens=32, temperature=0.0,
                                                    messages=[{"role": "user", "content": "Tell me about cells."}]):
                pass
    finally:
        server.shutdown()


def test_a_runs_harness_frames_the_conversation():
    from siajax.harness import patch_harness
    from siajax.serve import apply_harness
    from siajax.tasks import resolve_task

    harness = patch_harness(resolve_task("digits").default_harness(), [
        {"op": "replace", "path": "/system_prompt", "value": "Digits only."},
        {"op": "replace", "path": "/template", "value": "Q: {question}\nA:"},
        {"op": "add", "path": "/few_shot/-", "value": {"input": "Q: How many?\nA:", "output": "3"}}])
    framed = apply_harness(harness, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count."}])
    assert framed == [{"role": "system", "content": "Digits only.\n\nBe brief."},
                      {"role": "user", "content": "Q: How many?\nA:"},
                      {"role": "assistant", "content": "3"}, {"role": "user", "content": "Q: Count.\nA:"}]
    plain = apply_harness(harness, [{"role": "user", "content": "Count."}])
    assert plain[0] == {"role": "system", "content": "Digits only."} and plain[1:] == framed[1:]


def test_with_a_harness_its_sampling_settings_are_the_defaults(tiny_backend):
    """Under --run a request that leaves max_tokens and temperature out gets the harness's (here 3 tokens,
    greedy: two such requests agree whatever their seeds); a request's own fields still win."""
    import dataclasses

    from siajax.harness import SamplingParams
    from siajax.tasks import resolve_task

    harness = dataclasses.replace(resolve_task("digits").default_harness(),
                                  sampling=SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=3))
    server, client = _serving(tiny_backend, harness=harness)
    try:
        ask = dict(model="tiny", messages=[{"role": "user", "content": "How many cells?"}])
        first, second = (client.chat.completions.create(**ask, seed=seed) for seed in (1, 2))
        assert first.usage.completion_tokens <= 3 and first.choices[0].message.content == second.choices[0].message.content
        longer = client.chat.completions.create(**ask, max_tokens=12, temperature=1.0, seed=3)
        assert longer.usage.completion_tokens > 3 or longer.choices[0].finish_reason == "stop"
    finally:
        server.shutdown()


class GatedBackend:
    """Holds decoding after its second chunk until the test has read the first streamed text: a
    server that sent nothing before the whole completion was decoded would never open the gate."""

    def __init__(self, backend):
        self.backend, self.gate, self.held = backend, threading.Event(), None

    def stream(self, prompt_ids, sampling, key, chunk_tokens=1):
        for index, chunk in enumerate(self.backend.stream(prompt_ids, sampling, key, chunk_tokens)):
            if index == 2:
                self.held = not self.gate.wait(timeout=60)
            yield chunk

    def __getattr__(self, name):
        return getattr(self.backend, name)


def test_tokens_are_streamed_as_they_are_decoded(tiny_backend):
    gated = GatedBackend(tiny_backend)
    server, client = _serving(gated)
    try:
        request = dict(model="tiny", messages=[{"role": "user", "content": "Tell me about cells."}], max_tokens=40,
                       temperature=0.0, logprobs=True)
        pieces = []
        for chunk in client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                gated.gate.set()  # the first text is here while decoding still waits
            pieces.append(chunk)
        assert gated.held is False
        plain = client.chat.completions.create(**request)
        text = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
        assert text == plain.choices[0].message.content
        streamed_tokens = [t for c in pieces if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
        assert [t.token for t in streamed_tokens] == [t.token for t in plain.choices[0].logprobs.content]
        assert pieces[-1].usage.completion_tokens == plain.usage.completion_tokens == len(streamed_tokens)
    finally:
        server.shutdown()


def test_stop_strings_trim_logprobs_and_usage_and_end_decoding(server_url):
    client = openai.OpenAI(base_url=server_url, api_key="unused")
    request = dict(model="tiny", messages=[{"role": "user", "content": "Tell me about cells."}], max_tokens=40,
                   temperature=0.0, logprobs=True)
    full = client.chat.completions.create(**request).choices[0]
    text = full.message.content
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.chat.completions.create(**request, stop=stop)
    choice = cut.choices[0]
    assert choice.message.content == text[:text.find(stop)] and choice.finish_reason == "stop"
    assert len(choice.logprobs.content) == cut.usage.completion_tokens < len(full.logprobs.content)
    kept = b"".join(bytes(t.bytes) for t in choice.logprobs.content).decode("utf-8", "replace")
    assert kept.startswith(choice.message.content) and len(kept) < len(choice.message.content) + 16


def test_logprob_tokens_are_text_with_their_bytes(server_url):
    client = openai.OpenAI(base_url=server_url, api_key="unused")
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Héllo, 世界?"}],
                                           max_tokens=24, temperature=1.0, seed=5, logprobs=True).choices[0]
    tokens = reply.logprobs.content
    if reply.finish_reason == "stop":
        tokens = tokens[:-1]  # the stop token: special, not in the reply's text
    assert b"".join(bytes(t.bytes) for t in tokens).decode("utf-8", "replace") == reply.message.content
    assert not any("Ġ" in t.token for t in tokens)  # byte-level BPE's stand-in for a space
    spaced = [t for t in tokens if bytes(t.bytes).startswith(b" ")]
    assert all(t.token.startswith(" ") for t in spaced)


def test_a_prompt_past_the_context_is_a_400_with_the_numbers(server_url):
    client = openai.OpenAI(base_url=server_url, api_key="unused")
    with pytest.raises(openai.BadRequestError, match=r"context is 2048 tokens; the messages take \d+"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "cells " * 20000}])
    with pytest.raises(openai.BadRequestError, match="max_tokens asks for 2000"):
        client.chat.completions.create(model="tiny", max_tokens=2000, messages=[{"role": "user", "content": "a " * 300}])
    fills = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a " * 1000}],
                                           temperature=0.0)  # no max_tokens: what is left of the context
    assert fills.usage.prompt_tokens + fills.usage.completion_tokens <= 2048


def test_an_unknown_model_name_is_a_404(server_url):
    client = openai.OpenAI(base_url=server_url, api_key="unused")
    with pytest.raises(openai.NotFoundError, match="'gpt-5' does not exist; this server serves 'tiny'"):
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")


def test_each_request_is_logged_in_one_line(tiny_backend):
    lines = []
    server, client = _serving(tiny_backend, log=lines.append)
    try:
        client.chat.completions.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    finally:
        server.shutdown()
    assert len(lines) == 2
    assert "POST /v1/chat/completions 200 " in lines[0] and "tokens" in lines[0] and "first token" in lines[0]
    assert "POST /v1/chat/completions 404 " in lines[1]


def test_concurrent_clients_are_all_answered(server_url):
    """8 clients x 4 requests on loopback, every other one streamed: every request answered, none lost,
    a streamed reply the same text as the same request unstreamed; latencies and time to first token
    reported."""
    import concurrent.futures
    import time

    client = openai.OpenAI(base_url=server_url, api_key="unused", max_retries=0, timeout=120)

    def one(index):
        start, first = time.perf_counter(), None
        request = dict(model="tiny", max_tokens=8 + index % 3, temperature=0.7, seed=index,
                       messages=[{"role": "user", "content": f"Request {index}."}])
        if index % 2:
            text = ""
            for chunk in client.chat.completions.create(**request, stream=True):
                piece = chunk.choices[0].delta.content if chunk.choices else None
                if piece and first is None:
                    first = time.perf_counter() - start
                text += piece or ""
        else:
            text = client.chat.completions.create(**request).choices[0].message.content
        return index, text, time.perf_counter() - start, first

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(32)))
    assert len(results) == 32 and all(isinstance(text, str) for _, text, _, _ in results)
    for index, text, _, _ in results[1::2][:4]:  # streamed: the same as unstreamed with the same seed
        again = client.chat.completions.create(model="tiny", max_tokens=8 + index % 3, temperature=0.7, seed=index,
                                               messages=[{"role": "user", "content": f"Request {index}."}])
        assert again.choices[0].message.content == text
    latencies = sorted(seconds for _, _, seconds, _ in results)
    firsts = sorted(first for *_, first in results if first is not None)
    print(f"p50 {latencies[15]:.3f}s p99 {latencies[-1]:.3f}s; streamed first token p50 "
          f"{firsts[len(firsts) // 2]:.3f}s" if firsts else "")


class CountingBackend:
    """The tiny policy, counting the conversations the server passes it."""

    def __init__(self, backend):
        self.backend, self.conversations = backend, []

    def prompt_ids(self, messages, tools=None):
        self.conversations.append(messages[-1]["content"])
        return self.backend.prompt_ids(messages, tools)

    def __getattr__(self, name):
        return getattr(self.backend, name)


def test_meta_and_feedback_agents_reach_a_real_server_and_fall_back_when_its_replies_are_poor(tmp_path):
    """The loop's Meta- and Feedback-Agent pointed at `siajax serve` (the tiny model, loopback HTTP):
    its replies are not valid harnesses or decisions, so each agent asks for a repair over HTTP,
    then falls back to the task default / heuristic, and says so in the run directory."""
    from siajax.harness import HarnessStore
    from siajax.config import RunConfig
    from siajax.loop import run

    counting = CountingBackend(LocalPolicyBackend(*from_pretrained(BUNDLED_TINY_MODEL)))
    # The Feedback-Agent's prompt (~2,200 tokens) is past the tiny model's stated 2,048.
    server = make_server(counting, port=0, model_name="tiny", max_tokens_limit=4096, context_length=8192)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        ledger = run(RunConfig(task="digits", model=str(BUNDLED_TINY_MODEL), levers="both", generations=1, items_per_generation=2,
                               updates_per_generation=1, seed=1, meta="llm", meta_model="tiny", meta_base_url=url,
                               feedback="llm", feedback_model="tiny", feedback_base_url=url), tmp_path / "run")
    finally:
        server.shutdown()
    prompts = counting.conversations
    assert sum("Write the harness for this task" in p for p in prompts) == 1  # the Meta-Agent's request
    # One repair each, over HTTP: the Meta-Agent's and the Feedback-Agent's (one correction loop, siajax.agents.llm)
    assert sum(p.startswith("That reply is invalid") for p in prompts) == 2
    store = HarnessStore(tmp_path / "run" / "harness")
    first = store.history(ledger[0]["harness_version"])[0]
    assert first["reason"].startswith("task default harness (LLM proposals invalid")
    assert ledger[0]["decision"]["source"] == "fallback" and "LLM reply invalid" in ledger[0]["decision"]["rationale"]


def _siajax(*args, timeout=120):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "siajax", *args], capture_output=True, text=True, timeout=timeout)


def test_serve_checks_its_port_before_loading_and_refuses_model_with_run():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # A model path that does not exist: the port is refused first, so loading never starts.
        busy = _siajax("serve", "--port", str(port), "--model", "/nonexistent/model")
    assert busy.returncode == 2 and busy.stderr.strip().splitlines() == [
        f"siajax serve: error: cannot listen on 127.0.0.1:{port}: Address already in use; pick another --port "
        "(0 picks a free one)"]
    both = _siajax("serve", "--run", "somewhere", "--model", "other")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr.strip().splitlines()[-1]
    described = _siajax("serve", "--help")
    assert "streamed as tokens are decoded" in described.stdout and "--context" in described.stdout


def test_the_real_binary_streams_to_the_official_client():
    """`siajax serve` as users start it (port 0): the first line names the URL, a streamed request is
    answered chunk by chunk, and the request log line goes to stderr."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "siajax", "serve", "--model", str(BUNDLED_TINY_MODEL),
                                "--port", "0", "--name", "tiny"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        banner = process.stdout.readline()
        assert banner.startswith("serving tiny on http://127.0.0.1:"), banner
        client = openai.OpenAI(base_url=banner.split(" on ")[1].strip(), api_key="unused", max_retries=0,
                               timeout=120)
        chunks = list(client.chat.completions.create(model="tiny", stream=True, max_tokens=12, temperature=0.0,
                                                     messages=[{"role": "user", "content": "Tell me about cells."}]))
        contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(contents) >= 2 and chunks[-1].choices[0].finish_reason in ("stop", "length")
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=60)
    assert "POST /v1/chat/completions 200" in stderr


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_incremental_text_is_the_whole_replys_decode(model):
    """Decoded a token at a time through a moving window, the reply (and what was streamed of it) equals
    decoding all its tokens at once, split multi-byte characters and leading spaces included."""
    import numpy as np

    from siajax.models import load_tokenizer
    from siajax.models.hf_import import EMBEDDED_DEFAULT, resolve_checkpoint_dir
    from siajax.serve import ChoiceText

    tokenizer = load_tokenizer(resolve_checkpoint_dir(BUNDLED_TINY_MODEL if model == "tiny" else EMBEDDED_DEFAULT))
    pieces = tokenizer("Le café coûte 3 €; 日本語 🙂 naïve  spaces\n\ttabs", add_special_tokens=False)["input_ids"]
    rng = np.random.default_rng(0)
    for trial in range(20):
        ids = [int(i) for i in rng.choice(pieces, size=40)] if trial else pieces
        text = ChoiceText(tokenizer, stops=[], stop_token_ids=())
        streamed = ""
        for start in range(0, len(ids), 3):
            text.add(ids[start:start + 3], [0.0] * len(ids[start:start + 3]), finished=start + 3 >= len(ids))
            streamed += text.take()[0]
        assert text.text == tokenizer.decode(ids, skip_special_tokens=True) == streamed
