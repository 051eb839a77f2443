"""Server-side request limiting, the way an exchange's gateway would do it."""

from __future__ import annotations

import math
from collections import deque


class SlidingWindowLimiter:
    """Admit at most `limit` requests in any `window_s` sliding window.

    Not thread-safe on its own: the caller (FaultInjector) holds its lock. Only admitted
    requests occupy the window, so a client that backs off recovers after one window.
    """

    def __init__(self, limit: int, window_s: float = 1.0) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self.window_s = window_s
        self._admitted: deque[float] = deque()

    def try_acquire(self, now_s: float) -> float | None:
        """None if admitted, else seconds until a slot frees up."""
        horizon = now_s - self.window_s
        q = self._admitted
        while q and q[0] <= horizon:
            q.popleft()
        if len(q) < self.limit:
            q.append(now_s)
            return None
        return q[0] + self.window_s - now_s


def retry_after_header(wait_s: float) -> int:
    """Retry-After is whole seconds; never advertise 0 for a rejection."""
    return max(1, math.ceil(wait_s))
