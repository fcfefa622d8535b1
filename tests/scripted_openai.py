"""An OpenAI-compatible /v1/chat/completions on loopback whose replies a test scripts: the LLM agents'
tests talk HTTP to it as they would to a real endpoint, and read back every conversation it was sent."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FEEDBACK_MARKER = "You improve an AI agent"  # the Feedback-Agent's prompt (siajax.agents.feedback)
META_MARKER = "Write the harness for this task"  # the Meta-Agent's (siajax.agents.meta)


def is_feedback(messages: list[dict]) -> bool:
    return FEEDBACK_MARKER in messages[0]["content"]


def is_meta(messages: list[dict]) -> bool:
    return META_MARKER in messages[0]["content"]


def scripted_feedback(replies: list[str]) -> Callable[[list[dict]], str]:
    """Feedback-Agent requests get ``replies`` in order (then "no."); every other request gets "no."
    (a Meta-Agent answered so falls back to the task's default harness)."""
    remaining = list(replies)
    return lambda messages: remaining.pop(0) if is_feedback(messages) and remaining else "no."


class ScriptedOpenAI:
    """Serves ``reply(messages) -> text`` until :meth:`close`; ``conversations`` holds each request's
    messages in arrival order."""

    def __init__(self, reply: Callable[[list[dict]], str]):
        self.conversations: list[list[dict]] = []
        lock, outer = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:  # one request at a time: the scripted order is the arrival order
                    outer.conversations.append(request["messages"])
                    text = reply(request["messages"])
                body = json.dumps({"id": "x", "object": "chat.completion", "created": int(time.time()),
                                   "model": request["model"], "choices": [{
                                       "index": 0, "finish_reason": "stop", "logprobs": None,
                                       "message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
