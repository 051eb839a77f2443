"""Thread-safe request accounting and the request-log hook, so tests can see what reached the
exchange (e.g. that only probes got through while a circuit breaker was open)."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .faults import FaultKind

log = logging.getLogger(__name__)

#: hook(path, params, status, fault): status None = no HTTP response (reset, stall),
#: fault None = served normally. Called from server threads before the response is written,
#: so a client that got its answer is guaranteed to be in the log already.
RequestHook = Callable[[str, Mapping[str, str], "int | None", "FaultKind | None"], None]


@dataclass(frozen=True)
class StatsSnapshot:
    """Counters at one instant. Connections refused during an outage never reach the server
    and are not counted."""

    total: int
    by_path: Mapping[str, int]
    by_status: Mapping[int | None, int]
    by_fault: Mapping[FaultKind, int]

    @property
    def http_429(self) -> int:
        """Every 429 sent, random or from the rate limiter."""
        return self.by_status.get(429, 0)

    @property
    def http_418(self) -> int:
        """Every 418 sent, random or from a ban."""
        return self.by_status.get(418, 0)


class Stats:
    """Counts requests and fans them out to hooks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hooks: list[RequestHook] = []
        self._reset_locked()

    def _reset_locked(self) -> None:
        self._total = 0
        self._by_path: Counter[str] = Counter()
        self._by_status: Counter[int | None] = Counter()
        self._by_fault: Counter[FaultKind] = Counter()

    def reset(self) -> None:
        with self._lock:
            self._reset_locked()

    def add_hook(self, hook: RequestHook) -> None:
        with self._lock:
            self._hooks = [*self._hooks, hook]

    def remove_hook(self, hook: RequestHook) -> None:
        with self._lock:
            self._hooks = [h for h in self._hooks if h is not hook]

    def record(self, path: str, params: Mapping[str, str], status: int | None,
               fault: FaultKind | None) -> None:
        """Count one request and call the hooks. A failing hook is logged, not raised: it must
        not turn into a fake exchange fault."""
        with self._lock:
            self._total += 1
            self._by_path[path] += 1
            self._by_status[status] += 1
            if fault is not None:
                self._by_fault[fault] += 1
            hooks = self._hooks
        for hook in hooks:
            try:
                hook(path, params, status, fault)
            except Exception:
                log.exception("request hook %r failed", hook)

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            return StatsSnapshot(
                total=self._total,
                by_path=MappingProxyType(dict(self._by_path)),
                by_status=MappingProxyType(dict(self._by_status)),
                by_fault=MappingProxyType(dict(self._by_fault)),
            )
