"""Per-symbol faults the simulator's `Faults` cannot express, for the fault tests: one symbol's
candle answers trickle, are replaced by a given body, or carry invalid rows in one stretch of
time, while every other request is served as usual (random faults, outages and all).

A test-side subclass of the Binance simulator, hooked where it decides a request's fate (its
`_serve`) and builds a candle answer (its `_route`)."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from candlekeeper.simulator.faults import FaultKind
from candlekeeper.simulator.reply import HTML_TYPE, JSON_TYPE, Reply
from candlekeeper.simulator.server import BinanceSimulator

KLINES = "/api/v3/klines"

#: Bodies a broken edge or exchange sends with HTTP 200 where candles were expected.
HTML_PAGE = Reply(200, b"<html><head><title>Maintenance</title></head><body>Back soon</body></html>",
                  content_type=HTML_TYPE)
EMPTY_BODY = Reply(200, b"", content_type=JSON_TYPE)
TRUNCATED_JSON = Reply(200, b'[[1700000000000,"1.0","1.1","0.9","1.0","5.0",17000', content_type=JSON_TYPE)
NO_CANDLES = Reply(200, b"[]", content_type=JSON_TYPE)


def _market_id(symbol: str) -> str:
    return symbol.replace("/", "").upper()


class VariantSimulator(BinanceSimulator):
    """`BinanceSimulator` with per-symbol candle faults, switchable at run time (thread-safe)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self._trickling: set[str] = set()
        self._replies: dict[str, Reply] = {}
        self._bad_stretches: dict[str, tuple[int, int]] = {}
        self.trickled = 0  # candle requests answered by trickling

    # -- switches --------------------------------------------------------------------------

    def trickle(self, symbol: str, on: bool = True) -> None:
        """Every candle answer for `symbol` is sent at `Faults.trickle_bytes_per_s`."""
        with self._lock:
            (self._trickling.add if on else self._trickling.discard)(_market_id(symbol))

    def reply_with(self, symbol: str, reply: Reply | None) -> None:
        """Answer `symbol`'s candle requests with `reply` (None: serve them again)."""
        with self._lock:
            if reply is None:
                self._replies.pop(_market_id(symbol), None)
            else:
                self._replies[_market_id(symbol)] = reply

    def corrupt(self, symbol: str, start_ms: int | None, end_ms: int | None = None) -> None:
        """Candles of `symbol` opening in [start_ms, end_ms) come with high < low (None: none)."""
        with self._lock:
            if start_ms is None or end_ms is None:
                self._bad_stretches.pop(_market_id(symbol), None)
            else:
                self._bad_stretches[_market_id(symbol)] = (start_ms, end_ms)

    def delist(self, symbol: str) -> None:
        """Take `symbol` off the market list (its candle requests are refused as unknown), as an
        exchange does when it delists a market; `list_symbol` lists it again."""
        venue = self.venue
        market = self.history.market(symbol)
        assert market is not None, symbol
        with venue._lock:  # the simulator has no delisting of its own
            venue._hidden = venue._hidden | {market.id}
            venue._rebuild()

    # -- the hooks -------------------------------------------------------------------------

    def _serve(self, h: Any) -> None:
        split = urlsplit(h.path)
        if split.path == KLINES:
            params = dict(parse_qsl(split.query, keep_blank_values=True))
            with self._lock:
                trickling = params.get("symbol", "") in self._trickling
            if trickling and self.faults.outage is None:
                self.trickled += 1
                ctx = self._ctx({k.lower(): v for k, v in h.headers.items()})
                self._respond(h, split.path, ctx, params, self._route(split.path, params, ctx), FaultKind.TRICKLE)
                return
        super()._serve(h)

    def _route(self, path: str, params: Mapping[str, str], ctx: Any) -> Reply:
        reply = super()._route(path, params, ctx)
        if path != KLINES:
            return reply
        sym = params.get("symbol", "")
        with self._lock:
            replaced = self._replies.get(sym)
            stretch = self._bad_stretches.get(sym)
        if replaced is not None:
            return Reply(replaced.status, replaced.body, replaced.content_type, dict(replaced.headers), poisoned=True)
        if stretch is not None and reply.status == 200:
            rows = json.loads(reply.body)
            bad = False
            for r in rows:
                if stretch[0] <= r[0] < stretch[1]:
                    r[2], r[3] = r[3], f"{float(r[2]) * 1.01 + 1e-6:.8f}"  # low above high
                    bad = True
            if bad:
                return Reply(200, json.dumps(rows, separators=(",", ":")).encode(), reply.content_type,
                             dict(reply.headers), poisoned=True)
        return reply
