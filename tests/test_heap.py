"""The heap keeper: when it settles the heap (collect everything once, freeze what lives), and
that it leaves the collector as it found it."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from candlekeeper.supervisors.heap import Collector, HeapKeeper, next_quiet

T = 1_700_000_000.0  # 200 s past a multiple of 300 s


@given(now=st.floats(min_value=0, max_value=4e9, allow_nan=False), every=st.sampled_from([60.0, 300.0, 3600.0]),
       phase=st.floats(min_value=0, max_value=59.0))
def test_the_next_quiet_instant_is_the_first_one_after_now(now: float, every: float, phase: float) -> None:
    at = next_quiet(now, every, phase)
    assert now < at <= now + every + 1e-6
    assert abs((at - phase) % every) < 1e-3 or abs((at - phase) % every - every) < 1e-3


def test_half_a_minute_past_the_boundary() -> None:
    assert next_quiet(120.0, 60.0, 30.0) == 150.0
    assert next_quiet(150.0, 60.0, 30.0) == 210.0  # at the instant itself: the next one
    assert next_quiet(179.9, 300.0, 30.0) == 330.0


class Calls:
    def __init__(self) -> None:
        self.log: list[str] = []

    def collector(self) -> Collector:
        return Collector(collect=lambda: self.log.append("collect"), freeze=lambda: self.log.append("freeze"),
                         unfreeze=lambda: self.log.append("unfreeze"))


class Timers:
    """A scheduler that only records (the keeper's timer is fired by hand)."""

    def __init__(self) -> None:
        self.pending: list[tuple[float, Any]] = []

    def call_later(self, delay: float, fn: Any, *args: Any) -> Any:
        timer = _Timer(fn)
        self.pending.append((delay, timer))
        return timer


class _Timer:
    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def fire(self) -> None:
        if not self.cancelled:
            self.fn()


def test_settles_at_start_then_each_quiet_minute_and_the_whole_heap_each_hour() -> None:
    calls, timers, wall = Calls(), Timers(), [T]
    keeper = HeapKeeper(timers, lambda: wall[0], collector=calls.collector()).start()  # type: ignore[arg-type]
    # what is not frozen (in a fresh process: the whole heap, start-up's garbage too); what a
    # pre-fork parent froze stays shared until the first whole settle
    assert calls.log == ["collect", "freeze"]

    def fire() -> None:
        delay, timer = timers.pending[-1]
        assert (wall[0] + delay) % 60 == pytest.approx(30.0)  # half a minute past a boundary
        wall[0] += delay
        timer.fire()

    fire()  # each minute: what is new since, collected and frozen (the frozen heap is not scanned)
    assert calls.log[2:] == ["collect", "freeze"]
    for _ in range(59):
        fire()
    assert "unfreeze" not in calls.log
    fire()  # an hour after the last whole one: everything back, collected, frozen again
    assert calls.log[-3:] == ["unfreeze", "collect", "freeze"] and keeper.settled == 62
    keeper.stop()
    assert calls.log[-1] == "unfreeze" and timers.pending[-1][1].cancelled
    timers.pending[-1][1].fn()  # a timer already on its way when stopped: nothing more
    assert calls.log.count("collect") == 62


def test_a_phase_outside_the_period_is_refused() -> None:
    with pytest.raises(ValueError, match="phase_s"):
        HeapKeeper(Timers(), lambda: T, every_s=60.0, phase_s=60.0)  # type: ignore[arg-type]
