"""Time, injected: a monotonic clock for delays and a wall clock for candle times.

Nothing in candlekeeper reads `time.time()` or `time.monotonic()` directly where a candle close,
a timestamp, a timer or a state machine is concerned: it reads the clocks of its system's
`Runtime`, so a test can put the wall clock a moment before a minute boundary (and a state
machine test can move a `FakeClock` by hand) instead of waiting for real time to pass.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable

Clock = Callable[[], float]
"""Monotonic seconds: for delays, timeouts and state machines."""

WallClock = Callable[[], float]
"""Seconds since the epoch, UTC: for candle open and close times."""

monotonic: Clock = time.monotonic
wall: WallClock = time.time


def wall_ms(clock: WallClock) -> int:
    """The wall clock in whole milliseconds, the unit of candle times."""
    return int(clock() * 1000)


class FakeClock:
    """A clock that moves only when told to: for tests and simulations."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        if dt < 0:
            raise ValueError(f"time only moves forward, got {dt}")
        self.now += dt


class ShiftedClock:
    """The real wall clock moved by `offset` seconds: tests start a system just before a candle
    closes, and the simulated exchange shares the same clock, so both agree on the time. Moving
    it (`offset += s`) tells its watchers (a runtime's scheduler, whose wall-clock timers then
    fire at the new time: a close a minute away runs in milliseconds)."""

    def __init__(self, offset: float = 0.0) -> None:
        self._offset = offset
        self._watchers: list[weakref.WeakMethod[Callable[[], None]]] = []

    @property
    def offset(self) -> float:
        return self._offset

    @offset.setter
    def offset(self, value: float) -> None:
        self._offset = value
        for ref in list(self._watchers):
            callback = ref()
            if callback is None:
                self._watchers.remove(ref)
            else:
                callback()

    def watch(self, callback: Callable[[], None]) -> None:
        """Call the bound method `callback` after each move (held weakly: a stopped system's
        scheduler is not kept alive by a test's clock)."""
        self._watchers.append(weakref.WeakMethod(callback))

    @classmethod
    def before_boundary(cls, period_s: float, lead_s: float) -> ShiftedClock:
        """A clock that reads `lead_s` seconds before the next multiple of `period_s` now."""
        now = time.time()
        target = (now // period_s + 1) * period_s - lead_s
        if target < now:
            target += period_s
        return cls(target - now)

    def __call__(self) -> float:
        return time.time() + self.offset

    def ms(self) -> int:
        return int(self() * 1000)

    def until_boundary(self, period_s: float) -> float:
        """Seconds from now to the next multiple of `period_s` on this clock."""
        now = self()
        return (now // period_s + 1) * period_s - now
