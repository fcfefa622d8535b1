"""An OpenAI-compatible ``/v1/chat/completions`` endpoint over a local policy (loopback).

Lets the official ``openai`` client, and any tool built on it, talk to a siajax
policy with its current LoRA and, with ``siajax serve --run RUN``, the run's
current harness (its system prompt first, then the client's; few-shot turns; the
user's message poured into the template; its sampling settings as the defaults).
Honours ``max_tokens``, ``n``, ``temperature``, ``top_p``, ``seed``, ``stop``,
``logprobs``, ``stream`` and ``stream_options.include_usage``.

Tokens are streamed as they are decoded (:func:`siajax.sampling.stream`); a stop
string ends its choice's decoding, and the reply, its log-probs and its usage
end with the token where the stop string begins. Requests are served by threads
and decoded one at a time (the model is not re-entrant). Errors are OpenAI-style
JSON: 400 (bad field, or prompt plus ``max_tokens`` past the model's context),
404 (route or model name), 500 (the policy failed).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jax

from siajax.harness import Harness, SamplingParams, render_messages
from siajax.models.tokenizer import token_bytes

PLAIN_DEFAULTS = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, samples_per_prompt=1, max_new_tokens=256)
DEFAULT_CONTEXT = 4096  # for a checkpoint whose config states none


class RequestError(ValueError):
    """A request the API refuses: ``status`` (400 unless said) and a message naming the field."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


def parse_request(request: dict, max_tokens_limit: int,
                  defaults: SamplingParams = PLAIN_DEFAULTS) -> tuple[list[dict], SamplingParams, dict]:
    """-> (messages, sampling, options) from an OpenAI chat request; fields it leaves out take
    ``defaults`` (a run's harness sampling under ``--run``); RequestError on bad fields."""
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages):
        raise RequestError("'messages' must be a non-empty list of {role, content} objects")

    def number(name, default, kind=float, low=None, high=None):
        value = request.get(name)
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise RequestError(f"'{name}' must be a number")
        if (low is not None and value < low) or (high is not None and value > high):
            raise RequestError(f"'{name}' must be in [{low}, {high}], got {value}")
        return kind(value)

    temperature = number("temperature", defaults.temperature, float, 0.0, 2.0)
    top_p = number("top_p", defaults.top_p, float, 0.0, 1.0)
    if top_p == 0.0:
        raise RequestError("'top_p' must be > 0")
    n = number("n", 1, int, 1, 16)
    tokens_field = "max_completion_tokens" if request.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = number(tokens_field, min(defaults.max_new_tokens, max_tokens_limit), int, 1, max_tokens_limit)
    stop = request.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise RequestError("'stop' must be a string or a list of up to 4 non-empty strings")
    seed = request.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError("'seed' must be an integer")
    stream_options = request.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError("'stream_options' must be an object")
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=defaults.top_k, samples_per_prompt=n,
                              max_new_tokens=max_tokens)
    options = {"stop": stop, "seed": seed, "logprobs": bool(request.get("logprobs")),
               "stream": bool(request.get("stream")), "usage_chunk": bool(stream_options.get("include_usage")),
               "model": request.get("model"), "max_tokens_given": request.get(tokens_field) is not None}
    return messages, sampling, options


def apply_harness(harness: Harness | None, messages: list[dict]) -> list[dict]:
    """The run's harness around a chat: one system message, the harness's system prompt then the
    client's own system messages (a blank line apart), then the harness's few-shot turns, then the
    chat, its last user message poured into the template's slot when the template has exactly one."""
    if harness is None:
        return messages
    conversation = [dict(m) for m in messages if m["role"] != "system"]
    users = [i for i, m in enumerate(conversation) if m["role"] == "user"]
    if users and len(harness.slots) == 1:
        conversation[users[-1]]["content"] = harness.template.format(**{harness.slots[0]: conversation[users[-1]]["content"]})
    prefix = render_messages(dataclasses.replace(harness, template="{turn}"), turn="")[:-1]
    client_system = [m["content"] for m in messages if m["role"] == "system"]
    if client_system:
        system = [m["content"] for m in prefix[:1] if m["role"] == "system"]
        prefix = [{"role": "system", "content": "\n\n".join(system + client_system)}] + \
            [m for m in prefix if m["role"] != "system"]
    return prefix + conversation


class ChoiceText:
    """One choice's reply as its tokens arrive: the text (a character split over tokens comes out
    whole), cut where the first stop string begins; what may be sent so far (never half a character,
    nor text that could still turn into a stop string); and the tokens behind it. After a stop string,
    the reply's tokens end with the one where that string begins.

    Decoding is incremental: each token decodes a window from the last few tokens already turned into
    whole characters (so context-dependent decoders, e.g. a leading space, agree with decoding the
    whole reply), which keeps a long stream linear in its length."""

    def __init__(self, tokenizer, stops: list[str], stop_token_ids: tuple[int, ...]):
        self.tokenizer, self.stops, self.stop_token_ids = tokenizer, stops, stop_token_ids
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.starts: list[int] = []  # where each token's text begins in the decoded text
        self.text, self.finish_reason = "", None
        self.sent_chars = self.sent_tokens = 0
        self._committed = ""  # whole characters decoded so far
        self._window = self._read = 0  # ids[_window:_read] give context; ids[_read:] are not yet committed

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _append(self, token_id: int) -> None:
        self.starts.append(len(self._committed))
        self.ids.append(token_id)
        context = self._decode(self.ids[self._window:self._read])
        window = self._decode(self.ids[self._window:])
        tail = window[len(context):] if window.startswith(context) else window
        if tail and not tail.endswith("\ufffd"):  # whole characters: commit them, move the window on
            self._committed, tail = self._committed + tail, ""
            self._window, self._read = self._read, len(self.ids)
        self.text = self._committed + tail

    def add(self, ids: list[int], logprobs: list[float], finished: bool) -> None:
        if self.finish_reason is not None:
            return
        searched_from = max(len(self._committed) - max((len(s) for s in self.stops), default=0), 0)
        for token_id, logprob in zip(ids, logprobs):
            self._append(token_id)
            self.logprobs.append(logprob)
        hits = [at for at in (self.text.find(s, searched_from) for s in self.stops) if at >= 0]
        if hits:
            cut = min(hits)
            kept = bisect.bisect_left(self.starts, cut)  # starts never decrease
            self.text, self.finish_reason = self.text[:cut], "stop"
            del self.ids[kept:], self.logprobs[kept:], self.starts[kept:]
        elif finished:
            self.finish_reason = "stop" if self.ids and self.ids[-1] in self.stop_token_ids else "length"

    def _sendable(self) -> int:
        if self.finish_reason is not None:
            return len(self.text)
        end = len(self.text.rstrip("\ufffd"))  # the rest of a character is still to come
        for held in range(min(max((len(s) for s in self.stops), default=1) - 1, end), 0, -1):
            if any(s.startswith(self.text[end - held:end]) for s in self.stops):
                return end - held
        return end

    def take(self) -> tuple[str, list[dict]]:
        """-> (text not yet sent, the log-prob entries of the tokens behind it)."""
        end = self._sendable()
        last = len(self.ids) if self.finish_reason is not None else bisect.bisect_left(self.starts, end)
        delta, entries = self.text[self.sent_chars:end], self.entries(self.sent_tokens, last)
        self.sent_chars, self.sent_tokens = max(end, self.sent_chars), max(last, self.sent_tokens)
        return delta, entries

    def entries(self, first: int = 0, last: int | None = None) -> list[dict]:
        """OpenAI log-prob entries: each token as text (bytes that are not whole UTF-8 characters are
        written \\xNN) with its own bytes."""
        ids = self.ids[first:last]
        return [{"token": raw.decode("utf-8", "backslashreplace"), "logprob": logprob, "bytes": list(raw),
                 "top_logprobs": []}
                for raw, logprob in zip(token_bytes(self.tokenizer, ids), self.logprobs[first:last])]


@dataclasses.dataclass
class Exchange:
    """One request being answered: what the log line reports."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float | None = None
    started: float = dataclasses.field(default_factory=time.perf_counter)


class _ChatHandler(BaseHTTPRequestHandler):
    """One HTTP exchange; what it serves (backend, harness, limits) is on its :class:`ChatServer`."""

    protocol_version = "HTTP/1.1"
    server: ChatServer

    def log_message(self, *args):  # one line per request of our own (ChatServer.log)
        pass

    def _send(self, status: int, payload: dict):
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.status = status

    def _error(self, status: int, message: str, kind: str = "invalid_request_error"):
        self._send(status, {"error": {"message": message, "type": kind, "param": None, "code": status}})

    def _begin(self) -> Exchange:
        self.request_id, self.created, self.status = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), None
        return Exchange()

    def do_GET(self):
        exchange = self._begin()
        path = self.path.rstrip("/")
        card = {"id": self.server.model_name, "object": "model", "owned_by": "siajax"}
        if path == "/v1/models":
            self._send(200, {"object": "list", "data": [card]})
        elif path == f"/v1/models/{self.server.model_name}":
            self._send(200, card)
        elif path.startswith("/v1/models/"):
            self._error(404, f"the model '{path[len('/v1/models/'):]}' does not exist; this server serves "
                             f"'{self.server.model_name}'", "not_found_error")
        else:
            self._error(404, f"no route {self.path}", "not_found_error")
        self.server.log(self, exchange)

    def do_POST(self):
        exchange = self._begin()
        try:
            self._post(exchange)
        finally:
            self.server.log(self, exchange)

    def _post(self, exchange: Exchange):
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._error(404, f"no route {self.path}", "not_found_error")
        try:
            size = int(self.headers.get("Content-Length", 0))
            request = json.loads(self.rfile.read(size) or b"{}")
            if not isinstance(request, dict):
                raise RequestError("the body must be a JSON object")
            messages, sampling, options = parse_request(request, self.server.max_tokens_limit, self.server.defaults)
            prompt_ids, sampling = self.server.prepare(messages, sampling, options)
        except RequestError as err:
            return self._error(err.status, str(err) if err.status != 400 else f"bad request: {err}", err.kind)
        except ValueError as err:
            return self._error(400, f"bad request: {err}")
        exchange.prompt_tokens = len(prompt_ids)
        choices = [ChoiceText(self.server.tokenizer, options["stop"], self.server.stop_token_ids)
                   for _ in range(sampling.samples_per_prompt)]
        # Streamed: a chunk per token. Not: a chunk per 16, where stop strings are checked (reading tokens
        # as they come costs ~1.2x a whole decode of one row, experiments/bench_serve_stream.py).
        chunks = self.server.decode(prompt_ids, sampling, options["seed"], choices, exchange,
                                    chunk_tokens=1 if options["stream"] else 16)
        try:
            try:
                first = next(chunks, None)
            except Exception as err:  # the policy failed before a token: a 500 the client can read
                return self._error(500, f"the policy failed to answer: {type(err).__name__}: {err}", "server_error")
            if options["stream"]:
                self._stream(first, chunks, choices, exchange, options)
            else:
                for _ in chunks:
                    pass
                self._send(200, self._completion(choices, exchange, options))
        finally:
            chunks.close()

    def _base(self, kind: str) -> dict:
        return {"id": self.request_id, "object": kind, "created": self.created, "model": self.server.model_name}

    def _usage(self, exchange: Exchange) -> dict:
        return {"prompt_tokens": exchange.prompt_tokens, "completion_tokens": exchange.completion_tokens,
                "total_tokens": exchange.prompt_tokens + exchange.completion_tokens}

    def _completion(self, choices: list[ChoiceText], exchange: Exchange, options: dict) -> dict:
        exchange.completion_tokens = sum(len(c.ids) for c in choices)
        return {**self._base("chat.completion"), "usage": self._usage(exchange), "choices": [
            {"index": index, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
             "logprobs": {"content": c.entries()} if options["logprobs"] else None}
            for index, c in enumerate(choices)]}

    def _event(self, payload: dict):
        self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
        self.wfile.flush()

    def _stream(self, first, chunks, choices: list[ChoiceText], exchange: Exchange, options: dict):
        """Server-sent events: a role delta per choice, then what each decoded chunk adds to each choice,
        then each choice's finish (and the usage, when asked), then ``[DONE]``."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.status, self.close_connection = 200, True
        base = self._base("chat.completion.chunk")

        def delta(index, content, entries, finish=None):
            return {"index": index, "delta": content, "finish_reason": finish,
                    "logprobs": {"content": entries} if options["logprobs"] and entries else None}

        try:
            for index in range(len(choices)):
                self._event({**base, "choices": [delta(index, {"role": "assistant", "content": ""}, [])]})
            chunk = first
            while chunk is not None:
                for index, choice in enumerate(choices):
                    text, entries = choice.take()
                    if text or entries:
                        self._event({**base, "choices": [delta(index, {"content": text}, entries)]})
                chunk = next(chunks, None)
            for index, choice in enumerate(choices):
                self._event({**base, "choices": [delta(index, {}, [], choice.finish_reason)]})
            exchange.completion_tokens = sum(len(c.ids) for c in choices)
            if options["usage_chunk"]:
                self._event({**base, "choices": [], "usage": self._usage(exchange)})
        except (BrokenPipeError, ConnectionResetError):  # the client left: stop decoding
            return
        except Exception as err:  # the policy failed mid-stream: say so in the stream, then end it
            self._event({"error": {"message": f"the policy failed to answer: {type(err).__name__}: {err}",
                                   "type": "server_error", "param": None, "code": 500}})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


class ChatServer(ThreadingHTTPServer):
    """The OpenAI-compatible endpoint of one backend (a :class:`~siajax.agents.LocalPolicyBackend`
    or anything with its ``stream``, ``prompt_ids``, ``tokenizer``, ``decoding`` and
    ``context_length``): requests decode one at a time (one lock), each seeded by its ``seed`` or
    its arrival number. The socket is bound at construction, before a backend is needed."""

    daemon_threads = True

    def __init__(self, address, backend=None, model_name: str = "siajax-policy", harness: Harness | None = None,
                 max_tokens_limit: int = 2048, log=None, context_length: int | None = None):
        super().__init__(address, _ChatHandler)
        self.model_name, self.max_tokens_limit, self.log_line = model_name, max_tokens_limit, log
        self.context_length = context_length
        self.lock, self.requests = threading.Lock(), 0
        self.backend, self.harness = None, None
        if backend is not None:
            self.attach(backend, harness)

    def attach(self, backend, harness: Harness | None = None) -> None:
        """The policy (and harness) to serve: the server answers once this is set."""
        self.backend, self.harness = backend, harness
        self.defaults = PLAIN_DEFAULTS if harness is None else dataclasses.replace(
            harness.sampling, samples_per_prompt=1)

    @property
    def tokenizer(self):
        return self.backend.tokenizer

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return tuple(self.backend.decoding.stop_token_ids)

    def prepare(self, messages, sampling: SamplingParams, options: dict) -> tuple[list[int], SamplingParams]:
        """-> (the prompt's ids, the sampling to use): RequestError for another model's name or a prompt
        plus completion past the context. Without ``max_tokens`` the completion fills what is left."""
        if options["model"] not in (None, self.model_name):
            raise RequestError(f"the model '{options['model']}' does not exist; this server serves "
                               f"'{self.model_name}'", 404, "not_found_error")
        prompt_ids = self.backend.prompt_ids(apply_harness(self.harness, messages))
        context = self.context_length or self.backend.context_length or DEFAULT_CONTEXT
        room = context - len(prompt_ids)
        if not options["max_tokens_given"] and 1 <= room < sampling.max_new_tokens:
            sampling = dataclasses.replace(sampling, max_new_tokens=room)
        if len(prompt_ids) + sampling.max_new_tokens > context:
            raise RequestError(
                f"this model's context is {context} tokens; the messages take {len(prompt_ids)} and max_tokens "
                f"asks for {sampling.max_new_tokens} ({len(prompt_ids) + sampling.max_new_tokens} in all): shorten "
                "the messages or lower max_tokens")
        return prompt_ids, sampling

    def decode(self, prompt_ids, sampling: SamplingParams, seed, choices: list[ChoiceText],
               exchange: Exchange, chunk_tokens: int = 1) -> Iterator:
        """Feeds each decoded chunk to the choices and yields it after; stops decoding once every
        choice has finished (a stop token, its length, or a stop string)."""
        with self.lock:
            self.requests += 1
            key = jax.random.key(seed if seed is not None else self.requests)
            tokens = self.backend.stream(prompt_ids, sampling, key, chunk_tokens)
            try:
                for chunk in tokens:
                    for choice, ids, logprobs, finished in zip(choices, *chunk):
                        choice.add(ids, logprobs, finished)
                    if exchange.first_token_s is None and any(chunk.tokens):
                        exchange.first_token_s = time.perf_counter() - exchange.started
                    yield chunk
                    if all(c.finish_reason is not None for c in choices):
                        return
            finally:
                tokens.close()

    def log(self, handler: _ChatHandler, exchange: Exchange) -> None:
        if self.log_line is None:
            return
        seconds = time.perf_counter() - exchange.started
        first = f", first token {exchange.first_token_s:.2f} s" if exchange.first_token_s is not None else ""
        tokens = f" {exchange.prompt_tokens}+{exchange.completion_tokens} tokens" if exchange.prompt_tokens else ""
        self.log_line(f"{handler.client_address[0]} {handler.command} {handler.path} {handler.status}{tokens} "
                      f"{seconds:.2f} s{first}")


def make_server(backend=None, *, host: str = "127.0.0.1", port: int = 0, model_name: str = "siajax-policy",
                harness: Harness | None = None, max_tokens_limit: int = 2048, log=None,
                context_length: int | None = None) -> ChatServer:
    """Binds (port 0 picks a free one); call ``serve_forever`` or run it in a thread. ``log``: called
    with one line per request (``siajax serve`` prints them to stderr). ``context_length``: the most
    prompt plus completion tokens a request may ask for (default: the checkpoint's stated context)."""
    return ChatServer((host, port), backend, model_name, harness, max_tokens_limit, log, context_length)


def serve_from_args(args) -> int:
    """``siajax serve``: binds the port first (one line when it is taken), then loads a run's policy
    and harness (``--run``) or a checkpoint (``--model``) and serves on loopback."""
    from pathlib import Path

    from siajax.agents import LocalPolicyBackend

    try:
        server = make_server(host=args.host, port=args.port, model_name=args.name, context_length=args.context,
                             log=None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True)))
    except OSError as err:
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}; pick another --port "
                         "(0 picks a free one)") from err
    harness = None
    if args.run:
        from siajax.harness import HarnessStore
        from siajax.rundir import saved_policy

        run_dir = Path(args.run)
        backend = saved_policy(run_dir)[3].backend()
        harness = HarnessStore(run_dir / "harness").get()
    else:
        from siajax.models import from_pretrained

        backend = LocalPolicyBackend(*from_pretrained(args.model, dtype=args.dtype))
    server.attach(backend, harness)
    print(f"serving {args.name} on http://{server.server_address[0]}:{server.server_address[1]}/v1"
          + (f" with harness {harness.version}" if harness else ""), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
