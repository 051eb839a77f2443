"""The rate limits each exchange documents, counted per server (every client on it shares them).

A dialect lists, per request path, the limits the request counts against and what it costs
there (`Dialect.limits`): Binance's 6000 request weight per clock minute, Bybit's 600 requests
per 5 s per IP, KuCoin's public pool of 2000 weight per 30 s, OKX's per-endpoint 40 or 20
requests per 2 s, Coinbase's 10 public requests per second... `Meters` counts them. The counts
feed the headers a dialect sends (X-MBX-USED-WEIGHT-1M, X-Bapi-Limit-Status, gw-ratelimit-*),
and with `Faults(documented_limits=True)` the server also enforces them: a request that does
not fit gets the dialect's own rate-limit answer and is not counted.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    """At most `limit` units per `window_ms`: on fixed windows of the exchange's clock (Binance's
    minute, Bybit's and KuCoin's windows, whose reset times they announce) or, `sliding`, in any
    window of that length (how an exchange that announces nothing is modelled)."""

    key: str
    limit: float
    window_ms: int
    sliding: bool = False

    def describe(self) -> str:
        per = f"{self.window_ms / 1000:g} s"
        return f"{self.limit:g} per {per}{' (sliding)' if self.sliding else ''}"


#: (limit, units this request costs there)
Charge = tuple[Limit, float]


class Meters:
    """Thread-safe usage of every limit of one server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fixed: dict[str, tuple[int, float]] = {}  # key -> (window start, used)
        self._sliding: dict[str, deque[tuple[int, float]]] = {}  # key -> (at, cost), oldest first

    def usage(self, limit: Limit, now_ms: int) -> tuple[float, int]:
        """(units used, when the oldest of them stops counting: the window's end for fixed ones)."""
        with self._lock:
            return self._usage(limit, now_ms)

    def charge(self, charges: Sequence[Charge], now_ms: int) -> None:
        """Count a request, whether it fits or not (the meters only watch)."""
        with self._lock:
            for limit, cost in charges:
                self._add(limit, cost, now_ms)

    def try_charge(self, charges: Sequence[Charge], now_ms: int) -> float | None:
        """Count a request if it fits every limit and return None; else count nothing and return
        the seconds until it would fit."""
        with self._lock:
            wait_ms = 0
            for limit, cost in charges:
                used, until = self._usage(limit, now_ms)
                if used + cost > limit.limit + 1e-9:
                    wait_ms = max(wait_ms, self._free_at(limit, cost, now_ms, until) - now_ms)
            if wait_ms > 0:
                return wait_ms / 1000
            for limit, cost in charges:
                self._add(limit, cost, now_ms)
            return None

    # -- internals (lock held) ------------------------------------------------------------

    def _usage(self, limit: Limit, now_ms: int) -> tuple[float, int]:
        if limit.sliding:
            q = self._window(limit, now_ms)
            return sum(c for _, c in q), (q[0][0] + limit.window_ms if q else now_ms)
        start = now_ms - now_ms % limit.window_ms
        w, used = self._fixed.get(limit.key, (start, 0.0))
        return (used if w == start else 0.0), start + limit.window_ms

    def _window(self, limit: Limit, now_ms: int) -> deque[tuple[int, float]]:
        q = self._sliding.setdefault(limit.key, deque())
        while q and q[0][0] <= now_ms - limit.window_ms:
            q.popleft()
        return q

    def _free_at(self, limit: Limit, cost: float, now_ms: int, until: int) -> int:
        if not limit.sliding:
            return until
        q = self._sliding[limit.key]
        excess = sum(c for _, c in q) + cost - limit.limit
        for at, c in q:  # the oldest entries must leave the window first
            excess -= c
            if excess <= 1e-9:
                return at + limit.window_ms
        return now_ms + limit.window_ms

    def _add(self, limit: Limit, cost: float, now_ms: int) -> None:
        if limit.sliding:
            self._window(limit, now_ms).append((now_ms, cost))
            return
        start = now_ms - now_ms % limit.window_ms
        w, used = self._fixed.get(limit.key, (start, 0.0))
        self._fixed[limit.key] = (start, (used if w == start else 0.0) + cost)
