"""The phase clock: exclusive phases that add up to the wall time, compile time moved out of them."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import pytest
from jax import monitoring

from siajax import timing


def test_nested_compile_spans_count_once():
    spans = timing._Spans()
    assert spans.add(2.0, 3.0) == pytest.approx(1.0)
    assert spans.add(2.5, 2.8) == pytest.approx(0.0)  # inside the first: an inner jit traced in an outer one
    assert spans.add(1.0, 2.5) == pytest.approx(1.0)  # overlaps: only [1, 2) is new
    assert spans.add(5.0, 6.0) == pytest.approx(1.0)
    assert spans.add(0.0, 10.0) == pytest.approx(7.0)
    assert spans.merged == [(0.0, 10.0)]


def test_phases_are_exclusive_and_add_up_to_the_wall_time():
    with timing.measuring() as clock:
        started = time.perf_counter()
        with timing.stage("training"):
            with timing.phase("score"):
                time.sleep(0.05)
                with timing.phase("train_step"):  # pauses "score"
                    time.sleep(0.1)
                time.sleep(0.05)
        time.sleep(0.02)
        summary = clock.summary()
        wall = time.perf_counter() - started
    phases = summary["phases"]
    assert phases["train_step"] == pytest.approx(0.1, abs=0.03)
    assert phases["score"] == pytest.approx(0.1, abs=0.03)
    assert phases["other"] >= 0.02
    assert sum(phases.values()) == pytest.approx(summary["wall"], abs=5e-3)  # rounding of 9 parts
    assert summary["wall"] == pytest.approx(wall, abs=0.01)
    assert summary["stages"]["training"] == pytest.approx(phases["score"] + phases["train_step"], abs=0.01)


def test_compile_time_moves_out_of_the_phase_it_happened_in():
    """JAX's own compile spans, collected here by a listener of the test's, are what the clock moved to
    ``compile``; the phase keeps exactly the rest of its duration."""
    seen = []

    def listener(event, start, end, **_):
        if event in timing.COMPILE_EVENTS:
            seen.append((start, end))

    monitoring.register_event_time_span_listener(listener)
    try:
        with timing.measuring() as clock:
            with timing.phase("decode"):
                entered = time.perf_counter()
                fresh = jax.jit(lambda x: jnp.tanh(x) * 3.0 + 1.0)  # a new function: traced and compiled here
                jax.block_until_ready(fresh(jnp.ones((7, 5))))
                duration = time.perf_counter() - entered
            summary = clock.summary()
    finally:
        monitoring.unregister_event_time_span_listener(listener)
    union = timing._Spans()
    compiled = sum(union.add(*span) for span in seen)
    assert compiled > 0 and summary["counts"]["compiles"] >= 1
    assert summary["phases"]["compile"] == pytest.approx(compiled, abs=2e-3)
    assert summary["phases"]["decode"] == pytest.approx(duration - compiled, abs=2e-3)


def test_without_a_clock_the_hooks_do_nothing_and_names_are_checked():
    with timing.phase("decode"), timing.stage("rollouts"):
        timing.count("generated_tokens", 3)
    with timing.measuring() as clock:
        with pytest.raises(ValueError, match="unknown phase"):
            with timing.phase("decoding"):
                pass
        timing.count("generated_tokens", 3)
    assert clock.summary()["counts"]["generated_tokens"] == 3
