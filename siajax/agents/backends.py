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
from flax import nnx

from siajax import timing
from siajax.agents.sample_memo import SampleMemo, key_bytes
from siajax.harness import SamplingParams
from siajax.harness.constrained import label_automaton
from siajax.models.tokenizer import DecodingIds, decoding_ids
from siajax.prompts import bucket_length, row_bucket
from siajax.sampling import concatenate_results, generate, stream


_PROBE = "\u2063probe\u2063"  # an assistant text no template rewrites, to find where a turn ends


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    finish_reason: str = "stop"


def _label_language(parser) -> tuple:
    """What a constrained parser's token automaton is built from: its labels and answer format."""
    return tuple(parser.labels), parser.answer_prefix, parser.label_separator, parser.answer_suffix


class LocalPolicyBackend:
    """Samples from a siajax Transformer (with whatever LoRA it carries) via the jitted sampler
    (SPMD over ``mesh`` when given). With a mesh over several processes, every process asks for
    every row and gets every row back (the SIA loop's driver runs alike on each). With a ``memo``
    (:class:`~siajax.agents.sample_memo.SampleMemo`) a request it has answered on these weights is
    answered again from it, without decoding."""

    def __init__(self, model, tokenizer, mesh=None, decoding: DecodingIds | None = None,
                 retire_finished_rows: int = 0, memo: SampleMemo | None = None):
        self.model, self.tokenizer, self.mesh, self.memo = model, tokenizer, mesh, memo
        self.retire_finished_rows = retire_finished_rows  # see siajax.sampling.generate
        self.decoding = decoding_ids(tokenizer) if decoding is None else decoding
        self._automata, self._turn_tail = {}, None

    def automaton(self, parser):
        """The token automaton of a constrained parser (built once per label set and format)."""
        key = _label_language(parser)
        if key not in self._automata:
            encode = lambda text: self.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
            self._automata[key] = label_automaton(
                encode, parser.labels, prefix=parser.answer_prefix, separator=parser.label_separator or None,
                terminator=parser.answer_suffix, stop_token_id=self.decoding.stop_token_ids[0])
        return self._automata[key]

    def prompt_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The chat template's ids for ``messages`` (and ``tools``, rendered the template's own way)."""
        if tools and "tools" not in (self.tokenizer.chat_template or ""):
            raise ValueError("this model's chat template renders no tools: use the harness's tool_call.style "
                             "'siajax' (a tool section in the system prompt)")
        return list(self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)["input_ids"])

    def sample(self, conversations: list[list[dict]], sampling: SamplingParams, key: jax.Array, parser=None):
        """-> (completions per conversation, GenerationResult with rows grouped by conversation).
        A ``parser`` with ``constrained=True`` limits decoding to its label language."""
        prompts = [self.prompt_ids(c) for c in conversations for _ in range(sampling.samples_per_prompt)]
        flat, result = self.sample_ids(prompts, sampling, key, parser)
        k = sampling.samples_per_prompt
        return [flat[i * k:(i + 1) * k] for i in range(len(conversations))], result

    def sample_ids(self, prompts: list[list[int]], sampling: SamplingParams, key: jax.Array, parser=None):
        """One completion per token-id prompt -> (completions, GenerationResult in the prompts' order).

        Rows are sorted by prompt length and sampled in calls whose padded size fits
        ``max_call_tokens`` and whose prefill attention fits ``max_call_scores``
        (long prompts in small calls, short ones in large), then put back in order.
        """
        parser = parser if parser is not None and parser.constrained else None
        if self.memo is None:
            return self._draw(prompts, sampling, key, parser)
        weights = jax.tree.leaves(nnx.state(self.model))
        request = self._request(prompts, sampling, key, parser)
        reused = self.memo.get(weights, request)
        if reused is not None:
            timing.count("reused_samples", len(prompts))
            return list(reused[0]), reused[1]
        completions, result = self._draw(prompts, sampling, key, parser)
        self.memo.put(weights, request, (tuple(completions), result))
        return completions, result

    def _request(self, prompts, sampling: SamplingParams, key: jax.Array, parser) -> tuple:
        """Everything but the weights that a :meth:`sample_ids` call's draws depend on."""
        language = None if parser is None else _label_language(parser)
        return (tuple(map(tuple, prompts)), sampling.max_new_tokens, sampling.temperature, sampling.top_k,
                sampling.top_p, key_bytes(key), language, self.decoding, self.mesh, self.retire_finished_rows,
                self.max_call_tokens, self.max_call_scores, self.max_call_rows)

    def _draw(self, prompts: list[list[int]], sampling: SamplingParams, key: jax.Array, parser):
        """:meth:`sample_ids` without the memo (``parser``: a constrained one, or None)."""
        constraint = None if parser is None else self.automaton(parser)
        parts, order = [], sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for index, rows in enumerate(self._calls([len(prompts[i]) for i in order], sampling.max_new_tokens)):
            chunk = [prompts[order[i]] for i in rows]
            parts.append(generate(
                self.model, chunk, key=jax.random.fold_in(key, index), max_new_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                stop_token_ids=self.decoding.stop_token_ids, pad_token_id=self.decoding.pad_token_id,
                constraint=constraint, mesh=self.mesh, every_row=True,
                retire_finished_rows=self.retire_finished_rows))
        result = concatenate_results(parts, self.decoding.pad_token_id, np.argsort(order))
        tokens, logprobs, lengths = (np.asarray(a) for a in (result.tokens, result.logprobs, result.lengths))
        completions = []
        for row in range(len(prompts)):
            n = int(lengths[row])
            ids = [int(t) for t in tokens[row, :n]]
            stopped = bool(ids) and ids[-1] in self.decoding.stop_token_ids
            completions.append(Completion(self.tokenizer.decode(ids, skip_special_tokens=True), tuple(ids),
                                          tuple(float(x) for x in logprobs[row, :n]), "stop" if stopped else "length"))
        return completions, result

    def continuation_ids(self, message: dict, stopped: bool) -> list[int]:
        """The tokens between a model turn and the next one when the environment says ``message``:
        the chat template's end of the assistant turn (less the stop token the model wrote, when
        ``stopped``), the message in its role, and the next assistant header.

        Read off the template as the difference of two renderings of a probe conversation, so an
        episode's sequence is the model's own ids plus these, never a re-rendering of its text.
        """
        if self._turn_tail is None:
            probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _PROBE}]
            closed = self.tokenizer.apply_chat_template(probe, tokenize=False)
            self._turn_tail = (probe, closed, closed[closed.rindex(_PROBE) + len(_PROBE):])
        probe, closed, tail = self._turn_tail
        extended = self.tokenizer.apply_chat_template(probe + [message], tokenize=False, add_generation_prompt=True)
        if not extended.startswith(closed):
            raise ValueError("the chat template re-renders earlier turns when a message is added; multi-turn "
                             "episodes need a template that only appends")
        stop_text = self.tokenizer.decode(list(self.decoding.stop_token_ids[:1]))
        if stopped and tail.startswith(stop_text):
            tail = tail[len(stop_text):]
        return list(self.tokenizer.encode(tail + extended[len(closed):], add_special_tokens=False))

    def complete(self, conversations, sampling: SamplingParams, key: jax.Array) -> list[list[Completion]]:
        return self.sample(conversations, sampling, key)[0]

    def stream(self, prompt_ids: list[int], sampling: SamplingParams, key: jax.Array, chunk_tokens: int = 1):
        """``samples_per_prompt`` completions of one prompt, yielded as they are decoded, ``chunk_tokens``
        steps at a time (:class:`~siajax.sampling.StreamedTokens`); the tokens :func:`generate` draws."""
        return stream(self.model, [prompt_ids] * sampling.samples_per_prompt, key=key,
                      max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
                      top_p=sampling.top_p, stop_token_ids=self.decoding.stop_token_ids,
                      pad_token_id=self.decoding.pad_token_id, chunk_tokens=chunk_tokens)

    @property
    def context_length(self) -> int | None:
        """The checkpoint's stated context (prompt plus completion), or None."""
        return self.model.config.max_position_embeddings

    max_call_tokens: int = 1 << 15  # rows x padded length per sampler call
    max_call_scores: int = 1 << 29  # rows x heads x prompt x cache entries of the prefill attention
    max_call_rows: int = 256

    def _calls(self, sorted_lengths: list[int], new_tokens: int) -> list[list[int]]:
        """Consecutive row ranges (over length-sorted prompts) that fit one sampler call each."""
        heads, calls, start = self.model.config.num_heads, [], 0
        while start < len(sorted_lengths):
            end = start + 1
            while end < len(sorted_lengths):
                rows, padded = row_bucket(end + 1 - start), bucket_length(sorted_lengths[end])
                if (rows > self.max_call_rows or rows * (padded + new_tokens) > self.max_call_tokens
                        or rows * heads * padded * (padded + new_tokens) > self.max_call_scores):
                    break
                end += 1
            calls.append(list(range(start, end)))
            start = end
        return calls


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
