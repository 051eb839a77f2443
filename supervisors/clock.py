"""Time, injected: a monotonic clock for delays and a wall clock for candle times.

Nothing in candlekeeper reads `time.time()` or `time.monotonic()` directly where a candle close,
a timestamp, a timer or a state machine is concerned: it reads the clocks of its system's
`Runtime`, so a test can put the wall clock a moment before a minute boundary (and a state
machine test can move a `FakeClock` by hand) instead of waiting for real time to pass.
"""

from __future__ import annotations

import time
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
    closes, and the simulated exchange shares the same clock, so both agree on the time."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

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
