"""Where a generation's time goes: exclusive wall-clock phases, JAX compile time moved out of them.

A :class:`PhaseClock` charges every instant between its start and its
:meth:`~PhaseClock.summary` to exactly one phase: the innermost open one
(``with phase("decode"):``), else ``other``. Compile time that JAX reports
(tracing, lowering, backend compile, persistent-cache reads) while a phase is
open is moved to ``compile``, so the phases add up to the wall time with
nothing counted twice. Stages (``with stage("evaluation"):``) are a second,
inclusive view: how long the generation spent on evaluation, rollouts or
training, whatever the machine was doing inside them.

Code deep in the sampler or the learner calls the module-level :func:`phase`,
:func:`stage` and :func:`count`; they are no-ops unless a clock is active in
the calling thread's context (:func:`measuring`), so library use stays free.
A phase that times device work must wait for it (``jax.block_until_ready``)
before it closes: JAX dispatches asynchronously.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import threading
import time
from collections import defaultdict

from jax import monitoring

PHASES = ("compile", "prefill", "decode", "verify", "score", "train_step", "checkpoint", "agents", "other")
STAGES = ("evaluation", "rollouts", "training")
COUNTS = ("compiles", "cache_hits", "prefill_tokens", "generated_tokens", "train_tokens",
          "reused_samples")  # rows a sampler memo answered (siajax.agents.sample_memo): not decoded again
# JAX's compile pipeline, as jax.monitoring reports it (jax/_src/dispatch.py, compiler.py).
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
BACKEND_COMPILE_EVENT = COMPILE_EVENTS[-1]
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


@dataclasses.dataclass
class _Spans:
    """A union of time intervals, so nested compile events (an inner jit traced inside an outer
    one) count once: ``add`` returns the seconds an interval adds to the union."""

    merged: list[tuple[float, float]] = dataclasses.field(default_factory=list)

    def add(self, start: float, end: float) -> float:
        before = sum(b - a for a, b in self.merged)
        spans = sorted([*self.merged, (start, end)])
        merged = [spans[0]]
        for a, b in spans[1:]:
            if a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self.merged = merged
        return sum(b - a for a, b in merged) - before


class PhaseClock:
    """Exclusive seconds per phase, inclusive seconds per stage, counters (tokens, compiles)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.stages: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self._open: list[str] = []
        self._started = self._mark = time.perf_counter()
        self._compile_spans = _Spans()
        self._thread = threading.get_ident()

    def _charge(self, now: float) -> None:
        self.seconds[self._open[-1] if self._open else "other"] += now - self._mark
        self._mark = now

    @contextlib.contextmanager
    def phase(self, name: str):
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; one of {PHASES}")
        self._charge(time.perf_counter())
        self._open.append(name)
        try:
            yield
        finally:
            self._charge(time.perf_counter())
            self._open.pop()

    @contextlib.contextmanager
    def stage(self, name: str):
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; one of {STAGES}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] += time.perf_counter() - start

    def compiled(self, event: str, start: float, end: float) -> None:
        """A compile step JAX just finished in this thread: its new seconds move to ``compile``."""
        if threading.get_ident() != self._thread:
            return
        added = self._compile_spans.add(start, end)
        self.seconds[self._open[-1] if self._open else "other"] -= added
        self.seconds["compile"] += added
        if event == BACKEND_COMPILE_EVENT:
            self.counts["compiles"] += 1

    def summary(self) -> dict:
        """The ledger's ``time`` field: seconds per phase and stage (rounded), counts and rates."""
        self._charge(time.perf_counter())
        wall = self._mark - self._started
        seconds = {name: round(max(self.seconds[name], 0.0), 3) for name in PHASES}
        rates = {"generated_tokens_per_s": _rate(self.counts["generated_tokens"], self.seconds["decode"]),
                 "train_tokens_per_s": _rate(self.counts["train_tokens"], self.seconds["train_step"])}
        return {"wall": round(wall, 3), "phases": seconds,
                "stages": {name: round(self.stages[name], 3) for name in STAGES},
                "counts": {name: int(self.counts[name]) for name in COUNTS}, **rates}


def _rate(amount: int, seconds: float) -> float | None:
    return round(amount / seconds, 1) if seconds > 0 and amount else None


_ACTIVE: contextvars.ContextVar[PhaseClock | None] = contextvars.ContextVar("siajax_phase_clock", default=None)


def _on_span(event: str, start: float, end: float, **_) -> None:
    clock = _ACTIVE.get()
    if clock is not None and event in COMPILE_EVENTS:
        clock.compiled(event, start, end)


def _on_event(event: str, **_) -> None:
    clock = _ACTIVE.get()
    if clock is not None and event == CACHE_HIT_EVENT:
        clock.counts["cache_hits"] += 1


monitoring.register_event_time_span_listener(_on_span)
monitoring.register_event_listener(_on_event)


@contextlib.contextmanager
def measuring():
    """A fresh clock, active in this context until the block ends; yields it."""
    clock = PhaseClock()
    token = _ACTIVE.set(clock)
    try:
        yield clock
    finally:
        _ACTIVE.reset(token)


def phase(name: str):
    """``with phase("decode"):`` on the active clock (a no-op without one)."""
    clock = _ACTIVE.get()
    return contextlib.nullcontext() if clock is None else clock.phase(name)


def stage(name: str):
    """``with stage("evaluation"):`` on the active clock (a no-op without one)."""
    clock = _ACTIVE.get()
    return contextlib.nullcontext() if clock is None else clock.stage(name)


def count(name: str, amount: int) -> None:
    """Adds to a counter of the active clock (one of ``COUNTS``: tokens, compiles)."""
    if name not in COUNTS:
        raise ValueError(f"unknown count {name!r}; one of {COUNTS}")
    clock = _ACTIVE.get()
    if clock is not None:
        clock.counts[name] += int(amount)
