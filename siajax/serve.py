"""An OpenAI-compatible ``/v1/chat/completions`` endpoint over a local policy (loopback).

Lets the official ``openai`` client, and any tool built on it, talk to a siajax
policy with its current LoRA and, with ``siajax serve --run RUN``, the run's
current harness (system prompt, few-shot turns, the user's message poured into
the template). Honours ``max_tokens``, ``n``, ``temperature``, ``top_p``, ``seed``,
``stop``, ``logprobs`` and ``stream`` (server-sent events); answers errors as
OpenAI-style JSON with the right status. Requests are served concurrently by
threads and sample one at a time (the model is not re-entrant); sampling shapes
are bucketed, so new request sizes rarely compile a new program.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jax

from siajax.harness import Harness, SamplingParams, render_messages


class RequestError(ValueError):
    """A request the API refuses: status 400 and a message naming the field."""


def parse_request(request: dict, max_tokens_limit: int) -> tuple[list[dict], SamplingParams, dict]:
    """-> (messages, sampling, options) from an OpenAI chat request; RequestError on bad fields."""
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

    temperature = number("temperature", 1.0, float, 0.0, 2.0)
    top_p = number("top_p", 1.0, float, 0.0, 1.0)
    if top_p == 0.0:
        raise RequestError("'top_p' must be > 0")
    n = number("n", 1, int, 1, 16)
    max_tokens = number("max_completion_tokens", None, int, 1, max_tokens_limit) if request.get(
        "max_completion_tokens") is not None else number("max_tokens", 256, int, 1, max_tokens_limit)
    stop = request.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise RequestError("'stop' must be a string or a list of up to 4 non-empty strings")
    seed = request.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError("'seed' must be an integer")
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=0, samples_per_prompt=n,
                              max_new_tokens=max_tokens)
    options = {"stop": stop, "seed": seed, "logprobs": bool(request.get("logprobs")),
               "stream": bool(request.get("stream")), "model": request.get("model")}
    return messages, sampling, options


def apply_harness(harness: Harness | None, messages: list[dict]) -> list[dict]:
    """The run's harness around a chat: its system prompt and few-shot turns first (the request's own
    system messages give way), and the last user message poured into the template's slot when the
    template has exactly one."""
    if harness is None:
        return messages
    conversation = [dict(m) for m in messages if m["role"] != "system"]
    users = [i for i, m in enumerate(conversation) if m["role"] == "user"]
    if users and len(harness.slots) == 1:
        conversation[users[-1]]["content"] = harness.template.format(**{harness.slots[0]: conversation[users[-1]]["content"]})
    prefix = render_messages(dataclasses.replace(harness, template="{turn}"), turn="")[:-1]
    return prefix + conversation


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stops if s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def _choice_logprobs(backend, completion) -> dict:
    tokens = backend.tokenizer.convert_ids_to_tokens(list(completion.token_ids)) if completion.token_ids else []
    return {"content": [{"token": str(t), "logprob": lp, "bytes": list(str(t).encode()), "top_logprobs": []}
                        for t, lp in zip(tokens, completion.logprobs)]}


def _completion_payload(backend, model_name: str, completions, prompt_tokens: int, options: dict) -> dict:
    choices, generated = [], 0
    for index, c in enumerate(completions):
        text, stopped = cut_at_stop(c.text, options["stop"])
        generated += len(c.token_ids)
        choices.append({"index": index, "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop" if stopped else c.finish_reason,
                        "logprobs": _choice_logprobs(backend, c) if options["logprobs"] else None})
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": options["model"] or model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                      "total_tokens": prompt_tokens + generated}}


def _stream_events(payload: dict):
    """The completion as chat.completion.chunk events: a role delta, content deltas, a finish."""
    base = {"id": payload["id"], "object": "chat.completion.chunk", "created": payload["created"],
            "model": payload["model"]}
    for choice in payload["choices"]:
        index = choice["index"]
        yield {**base, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]}
        text = choice["message"]["content"]
        for start in range(0, len(text), 16):
            yield {**base, "choices": [{"index": index, "delta": {"content": text[start:start + 16]},
                                        "finish_reason": None}]}
        yield {**base, "choices": [{"index": index, "delta": {}, "finish_reason": choice["finish_reason"]}]}


class _ChatHandler(BaseHTTPRequestHandler):
    """One HTTP exchange; what it serves (backend, harness, limits) is on its :class:`_ChatServer`."""

    protocol_version = "HTTP/1.1"
    server: _ChatServer

    def log_message(self, *args):  # quiet by default
        pass

    def _send(self, status: int, payload: dict):
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error"):
        self._send(status, {"error": {"message": message, "type": kind, "param": None, "code": status}})

    def _stream(self, payload: dict):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        for event in _stream_events(payload):
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                         "owned_by": "siajax"}]})
        else:
            self._error(404, f"no route {self.path}", "not_found_error")

    def do_POST(self):
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._error(404, f"no route {self.path}", "not_found_error")
        try:
            size = int(self.headers.get("Content-Length", 0))
            request = json.loads(self.rfile.read(size) or b"{}")
            if not isinstance(request, dict):
                raise RequestError("the body must be a JSON object")
            messages, sampling, options = parse_request(request, self.server.max_tokens_limit)
        except (RequestError, ValueError) as err:
            return self._error(400, f"bad request: {err}")
        try:
            payload = self.server.complete(messages, sampling, options)
        except Exception as err:  # the backend failed: a 500 the client can read, and the server stays up
            return self._error(500, f"the policy failed to answer: {type(err).__name__}: {err}", "server_error")
        if options["stream"]:
            return self._stream(payload)
        self._send(200, payload)


class _ChatServer(ThreadingHTTPServer):
    """The OpenAI-compatible endpoint of one backend: requests are answered one at a time (one lock),
    each seeded by its ``seed`` or by its arrival number."""

    daemon_threads = True

    def __init__(self, address, backend, model_name: str, harness: Harness | None, max_tokens_limit: int):
        super().__init__(address, _ChatHandler)
        self.backend, self.model_name, self.harness = backend, model_name, harness
        self.max_tokens_limit = max_tokens_limit
        self.lock, self.requests = threading.Lock(), 0

    def complete(self, messages, sampling, options) -> dict:
        conversation = apply_harness(self.harness, messages)
        with self.lock:
            self.requests += 1
            seed = options["seed"] if options["seed"] is not None else self.requests
            completions = self.backend.complete([conversation], sampling, jax.random.key(seed))[0]
            prompt_tokens = len(self.backend.prompt_ids(conversation))
        return _completion_payload(self.backend, self.model_name, completions, prompt_tokens, options)


def make_server(backend, *, host: str = "127.0.0.1", port: int = 0, model_name: str = "siajax-policy",
                harness: Harness | None = None, max_tokens_limit: int = 2048) -> ThreadingHTTPServer:
    """Binds (port 0 picks a free one); call ``serve_forever`` or run it in a thread."""
    return _ChatServer((host, port), backend, model_name, harness, max_tokens_limit)


def serve_from_args(args) -> int:
    """``siajax serve``: a run's policy and harness (``--run``) or a checkpoint (``--model``) on loopback."""
    from pathlib import Path

    from siajax.agents import LocalPolicyBackend

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
    server = make_server(backend, host=args.host, port=args.port, model_name=args.name, harness=harness)
    print(f"serving {args.name} on http://{server.server_address[0]}:{server.server_address[1]}/v1"
          + (f" with harness {harness.version}" if harness else ""), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0
