"""The rate governor: our own pacing, corrected by what the exchange says of its budget.

Requests are paced by a token bucket at `rate` units a second (a request costs its endpoint's
units). Exchanges that report their own count (Binance's used weight per minute, Bybit's and
KuCoin's remaining requests and reset time) also see other clients on the same address: when the
exchange says its budget is nearly spent, the governor holds every request until the exchange's
window resets, so a second client never pushes this one into 429s. A 429/418 with Retry-After holds
everything for that long (`penalize`).
"""

from __future__ import annotations

from ..supervisors.clock import Clock, monotonic
from .bucket import TokenBucket

PACING = 0.97  # the fraction of the allowed rate used: timer and network jitter never exceed it


class RateGovernor:
    """Admission by budget; plain class, injected clock, no threads."""

    def __init__(self, rate: float, *, clock: Clock = monotonic, burst: float = 1.0, reserve: float = 0.05) -> None:
        """`rate`: units per second the exchange allows; `burst`: the largest single request's
        cost; `reserve`: the share of the exchange's reported budget left untouched."""
        self.rate = rate
        self.reserve = reserve
        self._clock = clock
        self._bucket = TokenBucket(rate * PACING, burst=max(1.0, burst), clock=clock)
        self._held_until = 0.0

    def time_until(self, cost: float) -> float:
        """Seconds until a request of `cost` units may go (0: now)."""
        cost = min(cost, self._bucket.burst)
        return max(self._bucket.time_until(cost), self._held_until - self._clock())

    def take(self, cost: float) -> None:
        """Charge a request that goes now (after `time_until` said 0)."""
        self._bucket.try_acquire(min(cost, self._bucket.burst))

    def penalize(self, seconds: float) -> None:
        """The exchange said stop (429, 418, a ban) for `seconds`."""
        self._bucket.penalize(seconds)
        self._held_until = max(self._held_until, self._clock() + seconds)

    def report(self, *, remaining: float | None, limit: float | None, reset_in: float | None) -> bool:
        """What the exchange said of its own count: `remaining` units of `limit` until its window
        resets in `reset_in` seconds. Holds requests until then when less than the reserve is left.
        True when it holds."""
        if remaining is None or reset_in is None or reset_in <= 0:
            return False
        floor = self.reserve * limit if limit else 1.0
        if remaining > floor:
            return False
        self._held_until = max(self._held_until, self._clock() + reset_in)
        return True

    @property
    def held_for(self) -> float:
        """Seconds left of a hold (by the exchange's word or a penalty)."""
        return max(0.0, self._held_until - self._clock(), self._bucket.blocked_for)
