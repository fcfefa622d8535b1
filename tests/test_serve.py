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


def test_a_backend_failure_is_a_500_and_the_server_stays_up():
    class Broken:
        def complete(self, *args):
            raise RuntimeError("device lost")

        def prompt_ids(self, messages):
            return [1]

    server = make_server(Broken(), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="unused",
                           max_retries=0)
    try:
        for _ in range(2):
            with pytest.raises(openai.InternalServerError, match="device lost"):
                client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
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
    framed = apply_harness(harness, [{"role": "system", "content": "ignored"}, {"role": "user", "content": "Count."}])
    assert framed == [{"role": "system", "content": "Digits only."}, {"role": "user", "content": "Q: How many?\nA:"},
                      {"role": "assistant", "content": "3"}, {"role": "user", "content": "Q: Count.\nA:"}]


def test_concurrent_clients_are_all_answered(server_url):
    """8 clients x 4 requests on loopback: every request answered, none lost; latencies reported."""
    import concurrent.futures
    import time

    client = openai.OpenAI(base_url=server_url, api_key="unused", max_retries=0, timeout=120)

    def one(index):
        start = time.perf_counter()
        reply = client.chat.completions.create(model="tiny", max_tokens=8 + index % 3, temperature=0.7, seed=index,
                                               messages=[{"role": "user", "content": f"Request {index}."}])
        return reply.choices[0].message.content, time.perf_counter() - start

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(32)))
    assert len(results) == 32 and all(isinstance(text, str) for text, _ in results)
    latencies = sorted(seconds for _, seconds in results)
    print(f"p50 {latencies[15]:.3f}s p99 {latencies[-1]:.3f}s")


class CountingBackend:
    """The tiny policy, counting the conversations the server passes it."""

    def __init__(self, backend):
        self.backend, self.conversations = backend, []

    def complete(self, conversations, sampling, key=None):
        self.conversations += [c[-1]["content"] for c in conversations]
        return self.backend.complete(conversations, sampling, key)

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
    server = make_server(counting, port=0, model_name="tiny", max_tokens_limit=4096)
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
