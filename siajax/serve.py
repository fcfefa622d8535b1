"""An OpenAI-compatible ``/v1/chat/completions`` server over the local policy (loopback).

Lets the official ``openai`` client, and any tool built on it, talk to a siajax
policy with its current LoRA. One request samples at a time (the model is not
re-entrant); requests are queued by a lock.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jax

from siajax.harness import SamplingParams


def _chat_response(model_name: str, completions, prompt_tokens: int) -> dict:
    choices = []
    for index, c in enumerate(completions):
        choices.append({
            "index": index, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
            "logprobs": {"content": [{"token": str(t), "logprob": lp, "bytes": None, "top_logprobs": []}
                                     for t, lp in zip(c.token_ids, c.logprobs)]},
        })
    completion_tokens = sum(len(c.token_ids) for c in completions)
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def make_server(backend, *, host: str = "127.0.0.1", port: int = 0, model_name: str = "siajax-policy",
                max_tokens_limit: int = 2048) -> ThreadingHTTPServer:
    """Binds (port 0 picks a free one); call ``serve_forever`` or run it in a thread."""
    lock = threading.Lock()
    counter = {"requests": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet by default
            pass

        def _send(self, status: int, payload: dict):
            body = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str):
            self._send(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}})

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "siajax"}]})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._error(404, f"no route {self.path}")
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                messages = request["messages"]
                if not isinstance(messages, list) or not messages:
                    raise ValueError("'messages' must be a non-empty list")
                sampling = SamplingParams(
                    temperature=float(request.get("temperature", 1.0) if request.get("temperature") is not None else 1.0),
                    top_p=float(request.get("top_p") or 1.0), top_k=0, samples_per_prompt=int(request.get("n") or 1),
                    max_new_tokens=min(int(request.get("max_tokens") or request.get("max_completion_tokens") or 256),
                                       max_tokens_limit))
            except (KeyError, ValueError, TypeError, json.JSONDecodeError) as err:
                return self._error(400, f"bad request: {err}")
            with lock:
                counter["requests"] += 1
                seed = request.get("seed")
                key = jax.random.key(int(seed) if seed is not None else counter["requests"])
                completions = backend.complete([messages], sampling, key)[0]
                prompt_tokens = len(backend.prompt_ids(messages))
            self._send(200, _chat_response(request.get("model", model_name), completions, prompt_tokens))

    return ThreadingHTTPServer((host, port), Handler)


def serve_from_args(args) -> int:
    """``siajax serve``: a run's policy (``--run``) or a checkpoint (``--model``) on loopback."""
    from pathlib import Path

    from siajax.agents import LocalPolicyBackend

    if args.run:
        from siajax.loop import Policy, load_config, read_ledger

        run_dir = Path(args.run)
        policy = Policy(load_config(run_dir))
        policy.restore(run_dir, read_ledger(run_dir))
        backend = policy.backend()
    else:
        from siajax.models import from_pretrained

        backend = LocalPolicyBackend(*from_pretrained(args.model, dtype=args.dtype))
    server = make_server(backend, host=args.host, port=args.port, model_name=args.name)
    print(f"serving {args.name} on http://{server.server_address[0]}:{server.server_address[1]}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0
