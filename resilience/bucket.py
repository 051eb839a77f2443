"""Token buckets: rate limits that answer "how long until I may", so callers schedule, not spin."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from candlekeeper.supervisors.clock import Clock, monotonic

EPSILON = 1e-9


class TokenBucket:
    """`rate` tokens per second up to `burst`, starting full. `priority_reserve` tokens are kept
    for priority requests (control, probes): normal ones may only take tokens while
    `tokens - cost >= priority_reserve`, so critical requests pass even when normal traffic
    saturates the bucket. Over any window of t seconds it grants at most rate * t + burst."""

    def __init__(
        self, rate: float = 100.0, burst: float | None = None, *, clock: Clock = monotonic, priority_reserve: float = 0.0
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        burst = max(1.0, rate) if burst is None else burst
        if burst <= 0:
            raise ValueError(f"burst must be > 0, got {burst}")
        if not 0 <= priority_reserve < burst:
            raise ValueError("priority_reserve must be in [0, burst)")
        self.rate = rate
        self.burst = burst
        self.priority_reserve = priority_reserve
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

    def _floor(self, priority: bool) -> float:
        return 0.0 if priority else self.priority_reserve

    def time_until(self, cost: float = 1.0, *, priority: bool = False) -> float:
        """Seconds until `cost` could be granted (0 if now); no side effects on the grant."""
        floor = self._floor(priority)
        if cost <= 0:
            raise ValueError(f"cost must be > 0, got {cost}")
        if cost > self.burst - floor + EPSILON:
            raise ValueError(f"cost {cost} can never be granted (burst {self.burst}, reserve {floor})")
        self._refill()
        now = self._clock()
        missing = cost + floor - self._tokens
        wait = max(0.0, self._blocked_until - now)
        if missing > EPSILON:
            wait += missing / self.rate
        return wait

    def try_acquire(self, cost: float = 1.0, *, priority: bool = False) -> float:
        """0.0 and the tokens taken, or the wait in seconds and nothing taken."""
        wait = self.time_until(cost, priority=priority)
        if wait > 0:
            return wait
        self._tokens -= cost
        return 0.0

    def penalize(self, seconds: float) -> None:
        """The server said stop (429/418 with Retry-After): empty, and grant nothing for `seconds`."""
        self._refill()
        self._tokens = 0.0
        self._blocked_until = max(self._blocked_until, self._clock() + max(0.0, seconds))


class RateLimiter:
    """Several buckets for one exchange where endpoints have separate limits (e.g. Binance's
    request weight per minute and raw requests); an acquire is atomic across them."""

    def __init__(self, buckets: Mapping[str, TokenBucket]) -> None:
        if not buckets:
            raise ValueError("a rate limiter needs at least one bucket")
        self.buckets = dict(buckets)

    def time_until(self, costs: Mapping[str, float], *, priority: bool = False) -> float:
        return max(self.buckets[name].time_until(cost, priority=priority) for name, cost in costs.items())

    def try_acquire(self, costs: Mapping[str, float], *, priority: bool = False) -> float:
        wait = self.time_until(costs, priority=priority)
        if wait > 0:
            return wait
        for name, cost in costs.items():
            granted = self.buckets[name].try_acquire(cost, priority=priority)
            assert granted == 0.0
        return 0.0

    def penalize(self, seconds: float) -> None:
        for bucket in self.buckets.values():
            bucket.penalize(seconds)

    def snapshot(self) -> dict[str, Any]:
        return {name: {"tokens": b.tokens, "rate": b.rate, "burst": b.burst} for name, b in self.buckets.items()}
