"""Circuit breaker: closed / open / half_open, with an injected clock and random source.

Closed, it counts results and opens (mode "consecutive") after `failure_threshold` consecutive
failures, or (mode "rate", resilience4j's model) when the failure rate over the last `window_size`
calls, once at least `minimum_calls` were made, reaches `failure_rate_threshold`. A call slower
than `slow_call_duration` (when set) counts as a failure in either mode. Open, it admits nothing until
the recovery timeout has passed; then it is half-open and admits `half_open_max_calls` probes.
A probe success closes it; a probe failure reopens it for longer: the open time grows by
`backoff_multiplier` on each consecutive re-opening, with jitter, up to `max_recovery_timeout`,
so a long outage is probed less and less often.

Which outcomes count is the owner's call: it records a failure or a success. An error that
proves the remote answered (a BadSymbol for one market says the exchange is up) is a success.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ..supervisors.clock import Clock, monotonic

BreakerState = Literal["closed", "open", "half_open"]
BreakerMode = Literal["consecutive", "rate"]


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = 5
    recovery_timeout: float = 60.0
    half_open_max_calls: int = 1
    mode: BreakerMode = "consecutive"
    window_size: int = 100
    minimum_calls: int = 10
    failure_rate_threshold: float = 0.5
    slow_call_duration: float | None = None
    backoff_multiplier: float = 2.0
    max_recovery_timeout: float = 600.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {self.failure_threshold}")
        if self.recovery_timeout <= 0:
            raise ValueError(f"recovery_timeout must be > 0, got {self.recovery_timeout}")
        if self.half_open_max_calls < 1:
            raise ValueError(f"half_open_max_calls must be >= 1, got {self.half_open_max_calls}")
        if self.mode not in ("consecutive", "rate"):
            raise ValueError(f"mode must be consecutive or rate, got {self.mode!r}")
        if self.window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {self.window_size}")
        if self.minimum_calls > self.window_size:
            raise ValueError("minimum_calls must be <= window_size")
        if self.minimum_calls < 1:
            raise ValueError(f"minimum_calls must be >= 1, got {self.minimum_calls}")
        if not 0 < self.failure_rate_threshold <= 1:
            raise ValueError(f"failure_rate_threshold must be in (0, 1], got {self.failure_rate_threshold}")
        if self.slow_call_duration is not None and self.slow_call_duration <= 0:
            raise ValueError("slow_call_duration must be > 0 when set")
        if self.backoff_multiplier < 1:
            raise ValueError(f"backoff_multiplier must be >= 1, got {self.backoff_multiplier}")
        if self.max_recovery_timeout < self.recovery_timeout:
            raise ValueError("max_recovery_timeout must be >= recovery_timeout")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")

    def open_time(self, openings: int) -> float:
        """Un-jittered open time of the `openings`-th consecutive opening (0 = the first)."""
        return min(self.recovery_timeout * self.backoff_multiplier**openings, self.max_recovery_timeout)


class CircuitBreaker:
    """See the module docstring. Not thread-safe: one actor owns it."""

    def __init__(
        self,
        config: BreakerConfig | None = None,
        *,
        clock: Clock = monotonic,
        rng: random.Random | None = None,
        listener: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self.config = config or BreakerConfig()
        self._clock = clock
        self._rng = rng or random.Random()
        self._listener = listener
        self._state: BreakerState = "closed"
        self._consecutive = 0
        self._openings = 0  # consecutive openings without closing in between
        self._next_probe_at: float | None = None
        self._probes = 0  # probes admitted in this half-open period
        self._window: deque[bool] = deque()  # failed?, for the last window_size calls
        self.total_failures = 0
        self.total_successes = 0

    # -- state ---------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        if self._state == "open" and self._next_probe_at is not None and self._clock() >= self._next_probe_at:
            self._probes = 0
            self._transition("half_open")
        return self._state

    @property
    def next_probe_at(self) -> float | None:
        return self._next_probe_at if self.state == "open" else None

    def time_until_probe(self) -> float | None:
        at = self.next_probe_at
        return None if at is None else max(0.0, at - self._clock())

    # -- calls ---------------------------------------------------------------------------

    def allow(self) -> bool:
        """May a call go out now? In half-open, admitting reserves one of the probe slots."""
        state = self.state
        if state == "closed":
            return True
        if state == "open":
            return False
        if self._probes < self.config.half_open_max_calls:
            self._probes += 1
            return True
        return False

    def record_success(self, duration: float | None = None) -> None:
        slow = self.config.slow_call_duration
        if duration is not None and slow is not None and duration > slow:
            self.record_failure(duration)
            return
        self.total_successes += 1
        state = self.state
        if state == "half_open":
            self._close()
        elif state == "closed":
            self._consecutive = 0
            self._remember(False)

    def record_failure(self, duration: float | None = None) -> None:
        self.total_failures += 1
        state = self.state
        if state == "half_open":
            self._open()
        elif state == "closed":
            self._consecutive += 1
            self._remember(True)
            if self._should_open():
                self._open()
        # open: a late answer to a call admitted before it opened changes nothing

    # -- operator ------------------------------------------------------------------------

    def reset(self) -> None:
        """Closed, counters cleared: an operator's word that the remote is fine."""
        self._close()

    def snapshot(self) -> dict[str, Any]:
        rate = self._failure_rate()
        return {
            "state": self.state,
            "consecutive_failures": self._consecutive,
            "failure_rate": rate,
            "window_calls": len(self._window),
            "openings": self._openings,
            "next_probe_in": self.time_until_probe(),
            "total_failures": self.total_failures,
            "total_successes": self.total_successes,
        }

    # -- internals -----------------------------------------------------------------------

    def _transition(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        if old != new and self._listener is not None:
            self._listener(old, new)

    def _open(self) -> None:
        cfg = self.config
        base = cfg.open_time(self._openings)
        self._openings += 1
        self._next_probe_at = self._clock() + base * self._rng.uniform(1 - cfg.jitter, 1 + cfg.jitter)
        self._consecutive = 0
        self._window.clear()
        self._transition("open")

    def _close(self) -> None:
        self._consecutive = 0
        self._openings = 0
        self._next_probe_at = None
        self._probes = 0
        self._window.clear()
        self._transition("closed")

    def _remember(self, failed: bool) -> None:
        if self.config.mode == "rate":
            self._window.append(failed)
            if len(self._window) > self.config.window_size:
                self._window.popleft()

    def _failure_rate(self) -> float | None:
        if self.config.mode != "rate" or not self._window:
            return None
        return sum(self._window) / len(self._window)

    def _should_open(self) -> bool:
        cfg = self.config
        if cfg.mode == "consecutive":
            return self._consecutive >= cfg.failure_threshold
        rate = self._failure_rate()
        return len(self._window) >= cfg.minimum_calls and rate is not None and rate >= cfg.failure_rate_threshold
