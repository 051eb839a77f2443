"""The fencing tokens of the series this node holds leases for (clustering, PostgreSQL only).

Owned by the system rather than by one actor incarnation, like the breakers: the cluster actor
sets a token before it starts a series and drops it when the lease is gone; the storage actor
attaches the tokens to every candle write, so the database refuses a write whose lease has
moved on (`PostgresStore.upsert(rows, fence=...)`). Neither a storage nor a cluster actor
restart forgets them. A write of a series with no token here is refused without asking the
database: this node no longer holds its lease.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from .stores.errors import StoreError

Key = tuple[str, str, str]  # (exchange, symbol, timeframe)


class LeaseNotHeld(StoreError):
    """An operator's write of a series this node does not hold the lease of (clustering)."""


class Fences:
    """{series: fencing token}, thread-safe; plus how many writes were refused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[Key, int] = {}
        self._refused = 0

    def set(self, key: Key, token: int) -> None:
        with self._lock:
            self._tokens[key] = token

    def drop(self, keys: Iterable[Key]) -> None:
        with self._lock:
            for key in keys:
                self._tokens.pop(key, None)

    def drop_stale(self, stale: dict[Key, int]) -> None:
        """Drop each key whose token is still the stale one given (a newer token, set since
        the write was refused, is kept)."""
        with self._lock:
            for key, token in stale.items():
                if self._tokens.get(key) == token:
                    del self._tokens[key]

    def get(self, key: Key) -> int | None:
        with self._lock:
            return self._tokens.get(key)

    def snapshot(self) -> dict[Key, int]:
        with self._lock:
            return dict(self._tokens)

    def __len__(self) -> int:
        with self._lock:
            return len(self._tokens)

    def count_refused(self, n: int = 1) -> None:
        with self._lock:
            self._refused += n

    @property
    def refused(self) -> int:
        """Writes refused since the system started (stale token, or no token at all)."""
        with self._lock:
            return self._refused
