"""Thread-safe counters of what a stream server did, and a way to wait on them.

Pushes are counted before they are written, so whatever a client has received is counted.

Tests await the ccxt client for data; these counters are for the server's side of a story
("the client reconnected and subscribed again", "a final push was dropped") without sleeping.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .faults import StreamFault


@dataclass(frozen=True)
class WsStats:
    """Counters at one instant."""

    connections: int  # accepted WebSocket upgrades, ever
    open_connections: int
    handshakes_refused: int  # upgrades answered with an HTTP error (limit or injected)
    subscribe_requests: int
    subscribed: int  # topics accepted, ever
    refused: int  # subscription arguments refused, for any reason
    updates: int  # in-progress kline pushes sent
    finals: int  # closed kline pushes sent
    pings_answered: int  # client pings (text/JSON or protocol) the server answered
    server_pings: int  # protocol pings the server sent (Binance)
    pongs_received: int  # protocol pongs the client sent back
    faults: Mapping[StreamFault, int]


class Stats:
    """The mutable side of `WsStats`, with a condition to wait on."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._n: Counter[str] = Counter()
        self._faults: Counter[StreamFault] = Counter()
        self._open = 0

    def add(self, name: str, n: int = 1) -> None:
        with self._cond:
            self._n[name] += n
            self._cond.notify_all()

    def fault(self, kind: StreamFault) -> None:
        with self._cond:
            self._faults[kind] += 1
            self._cond.notify_all()

    def opened(self) -> None:
        with self._cond:
            self._n["connections"] += 1
            self._open += 1
            self._cond.notify_all()

    def closed(self) -> None:
        with self._cond:
            self._open -= 1
            self._cond.notify_all()

    def snapshot(self) -> WsStats:
        with self._cond:
            return self._snapshot()

    def _snapshot(self) -> WsStats:
        n = self._n
        return WsStats(
            connections=n["connections"], open_connections=self._open,
            handshakes_refused=n["handshakes_refused"],
            subscribe_requests=n["subscribe_requests"], subscribed=n["subscribed"],
            refused=n["refused"], updates=n["updates"], finals=n["finals"],
            pings_answered=n["pings_answered"], server_pings=n["server_pings"],
            pongs_received=n["pongs_received"],
            faults=MappingProxyType(dict(self._faults)),
        )

    def wait_for(self, predicate: Callable[[WsStats], bool], timeout: float = 10.0) -> WsStats:
        """Block until `predicate(stats)` holds; AssertionError with the stats on timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self._snapshot()), timeout):
                raise AssertionError(f"timed out waiting on stream stats: {self._snapshot()}")
            return self._snapshot()
