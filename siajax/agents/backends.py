"""LLM backends the agents talk to: the local JAX policy, or any OpenAI-compatible server.

Both answer ``complete(conversations, sampling, key) -> list[list[Completion]]``
(one list of ``samples_per_prompt`` completions per conversation). The local
backend also returns the raw :class:`~siajax.sampling.GenerationResult`, which
the weight lever trains on.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from siajax.harness import SamplingParams
from siajax.sampling import generate, label_automaton


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    finish_reason: str = "stop"


class LocalPolicyBackend:
    """Samples from a siajax Transformer (with whatever LoRA it carries) via the jitted sampler
    (SPMD over ``mesh`` when given)."""

    def __init__(self, model, tokenizer, mesh=None):
        self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
        self._automata = {}

    def automaton(self, parser):
        """The token automaton of a constrained parser (built once per label set and format)."""
        key = (parser.labels, parser.answer_prefix, parser.label_separator, parser.answer_suffix)
        if key not in self._automata:
            encode = lambda text: self.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
            self._automata[key] = label_automaton(
                encode, parser.labels, prefix=parser.answer_prefix, separator=parser.label_separator or None,
                terminator=parser.answer_suffix, stop_token_id=self.tokenizer.eos_token_id)
        return self._automata[key]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])

    def sample(self, conversations: list[list[dict]], sampling: SamplingParams, key: jax.Array, parser=None):
        """-> (completions per conversation, GenerationResult with rows grouped by conversation).
        A ``parser`` with ``constrained=True`` limits decoding to its label language."""
        prompts = [self.prompt_ids(c) for c in conversations for _ in range(sampling.samples_per_prompt)]
        result = generate(
            self.model, prompts, key=key, max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
            stop_token_ids=[self.tokenizer.eos_token_id], pad_token_id=self.tokenizer.pad_token_id,
            constraint=self.automaton(parser) if parser is not None and parser.constrained else None,
            mesh=self.mesh,
        )
        tokens, logprobs, lengths = (np.asarray(a) for a in (result.tokens, result.logprobs, result.lengths))
        flat = []
        for row in range(len(prompts)):
            n = int(lengths[row])
            ids = [int(t) for t in tokens[row, :n]]
            stopped = bool(ids) and ids[-1] == self.tokenizer.eos_token_id
            flat.append(Completion(self.tokenizer.decode(ids, skip_special_tokens=True), tuple(ids),
                                   tuple(float(x) for x in logprobs[row, :n]), "stop" if stopped else "length"))
        k = sampling.samples_per_prompt
        return [flat[i * k:(i + 1) * k] for i in range(len(conversations))], result

    def complete(self, conversations, sampling: SamplingParams, key: jax.Array) -> list[list[Completion]]:
        return self.sample(conversations, sampling, key)[0]


class OpenAIBackend:
    """Any OpenAI-compatible chat endpoint (vLLM, OpenRouter, OpenAI, ``siajax serve``)."""

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 120.0):
        from openai import OpenAI

        self.model = model
        self.client = OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env, "not-needed"), timeout=timeout)

    def complete(self, conversations, sampling: SamplingParams, key: jax.Array | None = None):
        seed = int(jax.random.randint(key, (), 0, 2**31 - 1)) if key is not None else None
        out = []
        for messages in conversations:
            response = self.client.chat.completions.create(
                model=self.model, messages=messages, temperature=sampling.temperature, top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens, n=sampling.samples_per_prompt, seed=seed, logprobs=True,
            )
            out.append([
                Completion(choice.message.content or "", (),
                           tuple(t.logprob for t in (choice.logprobs.content or [])) if choice.logprobs else (),
                           choice.finish_reason or "stop")
                for choice in response.choices
            ])
        return out
