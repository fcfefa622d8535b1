"""Episodes: what the policy saw and wrote over several turns, rolled out in batches, as training rows.

An episode starts at the harness's rendered prompt. Each turn the policy writes
a reply (a model segment: its token ids, the sampler's log-probs and, when
constrained, the allowed sets); the environment may answer with a tool result
or, after an answer that failed, the harness's retry feedback (an environment
segment: the chat template's tokens for that message and the next assistant
header, :meth:`LocalPolicyBackend.continuation_ids`). The sequence trained on
is the prompt followed by the segments' own ids, never a re-tokenisation of
re-rendered text.

:func:`run_episodes` advances every live episode one turn per sampler call and
runs a round's tool calls together; :func:`episode_batch` lays episodes out as
a :class:`~siajax.sampling.GenerationResult` whose ``policy_mask`` marks the
model's tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from siajax.harness import Harness, render_messages, retry_feedback, template_tools
from siajax.harness.parsing import parse_answer
from siajax.parallel.distributed import share_rows
from siajax.prompts import bucket_length
from siajax.sampling import GenerationResult
from siajax.tools import find_call, run_calls
from siajax.verdicts import score_answer

MODEL = "assistant"


@dataclasses.dataclass
class Segment:
    """A run of tokens from one side: ``role`` "assistant" (the policy's) or the environment's
    ("tool", "user"). ``attempt`` numbers the answer the segment belongs to."""

    role: str
    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    allowed: np.ndarray | None = None  # [n, F] the constraint's allowed ids per token (model segments)
    attempt: int = 1
    finish_reason: str = "stop"

    def record(self) -> dict:
        out = {"role": self.role, "text": self.text, "token_ids": list(self.token_ids), "attempt": self.attempt}
        return {**out, "logprobs": [round(x, 6) for x in self.logprobs]} if self.role == MODEL else out


@dataclasses.dataclass
class Episode:
    item: dict
    sample: int
    messages: list[dict]  # the rendered prompt
    prompt_ids: tuple[int, ...] = ()  # its tokens (local policy only)
    segments: list[Segment] = dataclasses.field(default_factory=list)
    tool_calls: list[dict] = dataclasses.field(default_factory=list)
    verdicts: list[dict] = dataclasses.field(default_factory=list)  # one per answer
    done: bool = False

    @property
    def reply(self) -> Segment:
        return next(s for s in reversed(self.segments) if s.role == MODEL)

    def context_messages(self) -> list[dict]:
        return self.messages + [{"role": s.role, "content": s.text} for s in self.segments]

    def context_ids(self) -> list[int]:
        return [*self.prompt_ids, *(t for s in self.segments for t in s.token_ids)]

    def record(self) -> dict:
        """The trajectory record: the final answer's verdict, the first answer's reward, every segment."""
        model = [s for s in self.segments if s.role == MODEL]
        return {"item": self.item["id"], "sample": self.sample, "attempt": len(self.verdicts),
                "messages": self.messages, "text": self.reply.text, "segments": [s.record() for s in self.segments],
                "turns": len(model), "tool_calls": self.tool_calls, "token_ids": [t for s in model for t in s.token_ids],
                "finish_reason": self.reply.finish_reason, "first_reward": self.verdicts[0]["reward"],
                **self.verdicts[-1]}


def verify(task, harness: Harness, item: dict, text: str) -> dict:
    """Parses one reply and scores the answer; the verdict is checked and fails closed (siajax.verdicts)."""
    answer = parse_answer(harness.parser, text)
    return {"answer": answer, **score_answer(task, item, answer, text)}


def verify_replies(task, harness: Harness, episodes: list[Episode]) -> list[dict]:
    """Each episode's latest reply verified; with several processes, each verifies its own block
    and every process gets every verdict."""
    return share_rows(lambda block: [verify(task, harness, e.item, e.reply.text) for e in block], episodes)


def _sample_turn(backend, live: list[Episode], harness: Harness, key) -> list[Segment]:
    """One reply per live episode, in one sampler call (token ids with the local policy, messages otherwise)."""
    single = dataclasses.replace(harness.sampling, samples_per_prompt=1)
    attempt = [len(e.verdicts) + 1 for e in live]
    if not hasattr(backend, "sample_ids"):
        replies = [group[0] for group in backend.complete([e.context_messages() for e in live], single, key)]
        return [Segment(MODEL, c.text, c.token_ids, c.logprobs, None, a, c.finish_reason)
                for c, a in zip(replies, attempt)]
    replies, result = backend.sample_ids([e.context_ids() for e in live], single, key, parser=harness.parser)
    allowed = None if result.allowed is None else np.asarray(result.allowed)
    return [Segment(MODEL, c.text, c.token_ids, c.logprobs, None if allowed is None else allowed[i, :len(c.token_ids)],
                    a, c.finish_reason) for i, (c, a) in enumerate(zip(replies, attempt))]


def _environment(backend, episode: Episode, message: dict) -> Segment:
    stopped = episode.reply.finish_reason == "stop"
    ids = tuple(backend.continuation_ids(message, stopped)) if hasattr(backend, "continuation_ids") else ()
    return Segment(message["role"], message["content"], ids, attempt=len(episode.verdicts) + 1)


def _answer_tool_calls(task, harness: Harness, backend, live: list[Episode]) -> list[Episode]:
    """Runs this round's tool calls together; -> the episodes that called none (their reply is an answer)."""
    calling, answered = [], []
    for episode in live:
        call = find_call(harness.tool_call, episode.reply.text) if harness.tools else None
        if call is None or len(episode.tool_calls) >= harness.tool_call.max_rounds:
            answered.append(episode)
        else:
            calling.append((episode, call))
    outcomes = share_rows(lambda calls: run_calls(task, harness, calls), [c for _, c in calling if isinstance(c, dict)])
    results = iter(outcomes)
    for episode, call in calling:
        outcome = next(results) if isinstance(call, dict) else call
        episode.tool_calls.append(outcome.record())
        episode.segments.append(_environment(backend, episode, outcome.message()))
    return answered


def _judge_answers(task, harness: Harness, backend, answered: list[Episode]) -> None:
    """Scores each answer; one that failed in a retryable way gets the feedback turn, the rest end."""
    for episode, verdict in zip(answered, verify_replies(task, harness, answered)):
        episode.verdicts.append(verdict)
        if verdict["failure"] in harness.retry.retry_on and len(episode.verdicts) < harness.retry.max_attempts:
            feedback = {"role": "user", "content": retry_feedback(harness, verdict["failure"])}
            episode.segments.append(_environment(backend, episode, feedback))
        else:
            episode.done = True


def start_episodes(harness: Harness, backend, items: list[dict]) -> list[Episode]:
    """``samples_per_prompt`` episodes per item, item-major (a group's episodes are adjacent)."""
    tools, local = template_tools(harness), hasattr(backend, "sample_ids")
    if tools and not local:
        raise ValueError("tool_call.style 'chat_template' needs the local policy (a remote endpoint applies its "
                         "own template); use 'siajax'")
    episodes = []
    for item in items:
        messages = render_messages(harness, **{s: item[s] for s in harness.slots})
        prompt_ids = tuple(backend.prompt_ids(messages, tools)) if local else ()
        episodes += [Episode(item, s, messages, prompt_ids) for s in range(harness.sampling.samples_per_prompt)]
    return episodes


def run_episodes(task, harness: Harness, backend, items: list[dict], key: jax.Array) -> list[Episode]:
    """Every item's episodes to their end: each turn one sampler call over the live episodes, then
    the round's tool calls together, then the answers judged (and retried per the harness)."""
    episodes = start_episodes(harness, backend, items)
    for turn in range(harness.max_turns):
        live = [e for e in episodes if not e.done]
        if not live:
            break
        key, turn_key = jax.random.split(key)
        for episode, reply in zip(live, _sample_turn(backend, live, harness, turn_key)):
            episode.segments.append(reply)
        _judge_answers(task, harness, backend, _answer_tool_calls(task, harness, backend, live))
    unfinished = [e for e in episodes if not e.done]  # a tool call on the last turn: the reply is the answer
    for episode, verdict in zip(unfinished, verify_replies(task, harness, unfinished)):
        episode.verdicts.append(verdict)
        episode.done = True
    return episodes


def _trained(segment: Segment, episode: Episode, harness: Harness) -> bool:
    if segment.role != MODEL:
        return False
    return harness.retry.train == "all" or segment.attempt == len(episode.verdicts)


def episode_batch(episodes: list[Episode], harness: Harness, pad_token_id: int) -> GenerationResult:
    """Episodes as training rows: the prompt left-padded, then the segments' tokens (model and
    environment) from the left of a response region ``max_new_tokens`` wide (a power of two when
    an episode is longer: similar updates share a program); ``mask`` marks them all,
    ``policy_mask`` the model's (only the final answer's under ``retry.train == "final_attempt"``)."""
    rows = len(episodes)
    longest = max(len(e.context_ids()) - len(e.prompt_ids) for e in episodes)
    width = harness.sampling.max_new_tokens  # a single reply's width, as the sampler returns it
    width = width if longest <= width else bucket_length(longest)
    prompt_width = bucket_length(max(len(e.prompt_ids) for e in episodes))
    prompts, prompt_mask = np.full((rows, prompt_width), pad_token_id, np.int32), np.zeros((rows, prompt_width), bool)
    tokens, logprobs = np.full((rows, width), pad_token_id, np.int32), np.zeros((rows, width), np.float32)
    mask, policy = np.zeros((rows, width), bool), np.zeros((rows, width), bool)
    constrained = next((s.allowed for e in episodes for s in e.segments if s.allowed is not None), None)
    allowed = None if constrained is None else np.full((rows, width, constrained.shape[1]), -1, np.int32)
    for row, episode in enumerate(episodes):
        prompts[row, prompt_width - len(episode.prompt_ids):] = episode.prompt_ids
        prompt_mask[row, prompt_width - len(episode.prompt_ids):] = True
        start = 0
        for segment in episode.segments:
            span = slice(start, start + len(segment.token_ids))
            tokens[row, span], mask[row, span] = segment.token_ids, True
            if _trained(segment, episode, harness):
                logprobs[row, span], policy[row, span] = segment.logprobs, True
                if allowed is not None and segment.allowed is not None:
                    allowed[row, span, :segment.allowed.shape[1]] = segment.allowed
            start = span.stop
    sampling = harness.sampling
    return GenerationResult(jnp.asarray(tokens), jnp.asarray(logprobs), jnp.asarray(mask),
                            jnp.asarray(mask.sum(axis=1, dtype=np.int32)), jnp.asarray(prompts),
                            jnp.asarray(prompt_mask), jnp.float32(sampling.temperature), jnp.float32(sampling.top_p),
                            jnp.int32(sampling.top_k), None if allowed is None else jnp.asarray(allowed),
                            jnp.asarray(policy))
