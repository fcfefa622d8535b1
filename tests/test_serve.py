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
