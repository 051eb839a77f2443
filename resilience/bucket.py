"""Token bucket: a rate limit that answers "how long until I may", so callers schedule, not spin."""

from __future__ import annotations

from ..supervisors.clock import Clock, monotonic

EPSILON = 1e-9


class TokenBucket:
    """`rate` tokens per second up to `burst`, starting full; a request takes `cost` tokens.
    Over any window of t seconds it grants at most rate * t + burst. `penalize` empties it and
    grants nothing for a while: the server said stop (429/418 with Retry-After)."""

    def __init__(self, rate: float = 100.0, burst: float | None = None, *, clock: Clock = monotonic) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        burst = max(1.0, rate) if burst is None else burst
        if burst <= 0:
            raise ValueError(f"burst must be > 0, got {burst}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._updated = clock()
        self._blocked_until = self._updated

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    def _refill(self) -> None:
        now = self._clock()
        start = max(self._updated, self._blocked_until)
        if now > start:
            self._tokens = min(self.burst, self._tokens + (now - start) * self.rate)
        self._updated = max(self._updated, now)

    def time_until(self, cost: float = 1.0) -> float:
        """Seconds until `cost` could be granted (0 if now); no side effects on the grant."""
        if cost <= 0:
            raise ValueError(f"cost must be > 0, got {cost}")
        if cost > self.burst + EPSILON:
            raise ValueError(f"cost {cost} can never be granted (burst {self.burst})")
        self._refill()
        now = self._clock()
        missing = cost - self._tokens
        wait = max(0.0, self._blocked_until - now)
        if missing > EPSILON:
            wait += missing / self.rate
        return wait

    def try_acquire(self, cost: float = 1.0) -> float:
        """0.0 and the tokens taken, or the wait in seconds and nothing taken."""
        wait = self.time_until(cost)
        if wait > 0:
            return wait
        self._tokens -= cost
        return 0.0

    def penalize(self, seconds: float) -> None:
        """The server said stop (429/418 with Retry-After): empty, and grant nothing for `seconds`."""
        self._refill()
        self._tokens = 0.0
        self._blocked_until = max(self._blocked_until, self._clock() + max(0.0, seconds))

    @property
    def blocked_for(self) -> float:
        """Seconds left of the server's last stop (0 when none)."""
        return max(0.0, self._blocked_until - self._clock())
