"""Restart intensity and restart backoff: the two clocks a supervisor keeps per child.

Both are plain, clock-injected classes (no threads, no sleeping) so they can be tested
exhaustively; the `Supervisor` actor wraps them.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]


class RestartIntensity:
    """OTP's restart intensity: more than `max_restarts` restarts within `period` seconds
    means the supervisor gives up (terminates its children and escalates to its parent).

    As in OTP, `max_restarts=0` means any restart escalates.
    """

    __slots__ = ("_clock", "_restarts", "max_restarts", "period")

    def __init__(self, max_restarts: int, period: float, *, clock: Clock) -> None:
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
        if period <= 0:
            raise ValueError(f"period must be > 0, got {period}")
        self.max_restarts = max_restarts
        self.period = period
        self._clock = clock
        self._restarts: deque[float] = deque()

    def record(self) -> bool:
        """Record one restart now; False when that exceeds the intensity."""
        now = self._clock()
        self._restarts.append(now)
        horizon = now - self.period
        while self._restarts and self._restarts[0] <= horizon:
            self._restarts.popleft()
        return len(self._restarts) <= self.max_restarts

    @property
    def recent(self) -> int:
        """Restarts still inside the period."""
        horizon = self._clock() - self.period
        return sum(1 for t in self._restarts if t > horizon)


@dataclass(frozen=True)
class BackoffConfig:
    """Akka BackoffSupervisor-style restart delays.

    Departure from Akka: the first restart after a stable run is immediate, as in OTP, so an
    occasional crash costs nothing; only a child that keeps crashing before it has been up for
    `reset_after` seconds is delayed, by `min_delay * 2**(n-1)` capped at `max_delay`, times a
    random factor in [1, 1 + random_factor].
    """

    min_delay: float = 0.1
    max_delay: float = 30.0
    random_factor: float = 0.2
    reset_after: float = 10.0

    def __post_init__(self) -> None:
        if self.min_delay < 0 or self.max_delay < self.min_delay:
            raise ValueError("need 0 <= min_delay <= max_delay")
        if self.random_factor < 0:
            raise ValueError("random_factor must be >= 0")
        if self.reset_after < 0:
            raise ValueError("reset_after must be >= 0")


NO_BACKOFF = BackoffConfig(min_delay=0.0, max_delay=0.0, random_factor=0.0, reset_after=0.0)


class Backoff:
    """Restart delay for one child, from how long its last incarnation lived."""

    __slots__ = ("_quick_failures", "_rng", "config")

    def __init__(self, config: BackoffConfig, *, rng: random.Random) -> None:
        self.config = config
        self._rng = rng
        self._quick_failures = 0

    def next_delay(self, uptime: float) -> float:
        """Delay before restarting a child that died after `uptime` seconds."""
        cfg = self.config
        if uptime >= cfg.reset_after:
            self._quick_failures = 0
        n = self._quick_failures
        self._quick_failures += 1
        if n == 0 or cfg.max_delay == 0:
            return 0.0
        base = min(cfg.max_delay, cfg.min_delay * 2 ** (n - 1))
        return base * (1.0 + self._rng.random() * cfg.random_factor)

    @property
    def quick_failures(self) -> int:
        return self._quick_failures

    def reset(self) -> None:
        self._quick_failures = 0
