"""The pure parts of the runtime (intensity, backoff) and the timer thread."""

from __future__ import annotations

import random
import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from actors.clock import FakeClock
from supervisors.intensity import Backoff, BackoffConfig, RestartIntensity
from supervisors.scheduler import Scheduler


@settings(max_examples=200, deadline=None)
@given(
    max_restarts=st.integers(0, 5),
    period=st.floats(0.5, 20),
    gaps=st.lists(st.floats(0, 10), min_size=1, max_size=40),
)
def test_intensity_matches_a_sliding_window_count(max_restarts: int, period: float, gaps: list[float]) -> None:
    clock = FakeClock()
    intensity = RestartIntensity(max_restarts, period, clock=clock)
    times: list[float] = []
    for gap in gaps:
        clock.advance(gap)
        times.append(clock())
        ok = intensity.record()
        in_window = [t for t in times if t > clock() - period]
        assert ok == (len(in_window) <= max_restarts)
        if not ok:
            break


@settings(max_examples=200, deadline=None)
@given(
    min_delay=st.floats(0.001, 1),
    factor=st.floats(1, 100),
    random_factor=st.floats(0, 1),
    uptimes=st.lists(st.floats(0, 30), min_size=1, max_size=30),
)
def test_backoff_bounds(min_delay: float, factor: float, random_factor: float, uptimes: list[float]) -> None:
    cfg = BackoffConfig(min_delay=min_delay, max_delay=min_delay * factor, random_factor=random_factor, reset_after=10)
    backoff = Backoff(cfg, rng=random.Random(7))
    quick = 0
    for uptime in uptimes:
        delay = backoff.next_delay(uptime)
        if uptime >= cfg.reset_after:
            quick = 0
        if quick == 0:
            assert delay == 0.0  # the first restart after a stable run is immediate
        else:
            base = min(cfg.max_delay, cfg.min_delay * 2 ** (quick - 1))
            assert base <= delay <= base * (1 + random_factor) + 1e-12
        quick += 1


def test_scheduler_runs_in_time_order_and_cancels() -> None:
    sched = Scheduler()
    sched.start()
    fired: list[str] = []
    done = threading.Event()
    try:
        sched.call_later(0.03, fired.append, "c")
        sched.call_later(0.01, fired.append, "a")
        cancelled = sched.call_later(0.02, fired.append, "x")
        sched.call_later(0.02, fired.append, "b")
        sched.call_later(0.04, done.set)
        cancelled.cancel()
        assert done.wait(5)
        assert fired == ["a", "b", "c"]
        assert sched.pending() == 0
    finally:
        sched.stop()


def test_scheduler_survives_a_failing_callback_and_stop_drops_pending() -> None:
    sched = Scheduler()
    sched.start()
    done = threading.Event()

    def boom() -> None:
        raise RuntimeError("callback bug")

    try:
        sched.call_later(0, boom)
        sched.call_later(0.01, done.set)
        assert done.wait(5)
        sched.call_later(60, done.clear)
        assert sched.pending() == 1
    finally:
        sched.stop()
    assert sched.pending() == 0
    late = sched.call_later(0, done.clear)
    assert late.cancelled and done.is_set()
