"""Calling task code that may never return: the call runs on a worker thread and is abandoned at its
deadline, so a hung verifier or task module costs its deadline, not the run.

A thread, not a process: a verifier shares the run's memory (its module state,
JAX) and is the task author's code, trusted but possibly buggy. One long-lived
worker takes the calls in turn (a hand-off, not a thread start, per call:
experiments/bench_verifier_deadline.py); a worker whose call overran is left
behind (a daemon: it never holds the process's exit up) and the next call gets
a new one. Code a policy wrote is another matter: it runs in ``siajax.sandbox``,
whose jail is killed at its limit.
"""

from __future__ import annotations

import queue
import threading


class DeadlineExceeded(TimeoutError):
    """The call was still running at its deadline (and was left behind)."""


class _Worker:
    """A daemon thread running calls from its queue, one at a time."""

    def __init__(self):
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="siajax task code", daemon=True).start()

    def _serve(self):
        while True:
            function, args, outcome, done = self.calls.get()
            try:
                outcome["value"] = function(*args)
            except BaseException as err:  # noqa: BLE001 -- handed to the caller
                outcome["error"] = err
            finally:
                done.set()


_worker: _Worker | None = None
_worker_lock = threading.Lock()


def call_with_deadline(seconds: float, function, *args, name: str = "task code"):
    """``function(*args)``, or DeadlineExceeded after ``seconds``; what it raises is raised here, a
    SystemExit (or any BaseException) as a RuntimeError: task code must not end the run."""
    global _worker
    with _worker_lock:
        worker = _worker = _worker or _Worker()
    outcome: dict = {}
    done = threading.Event()
    worker.calls.put((function, args, outcome, done))
    if not done.wait(seconds):
        with _worker_lock:
            if _worker is worker:
                _worker = None  # stuck on this call: the next one gets a fresh worker
        raise DeadlineExceeded(f"{name} did not finish within {seconds:g} s")
    error = outcome.get("error")
    if isinstance(error, Exception):
        raise error
    if error is not None:
        raise RuntimeError(f"{name} raised {error!r}") from error
    return outcome["value"]
