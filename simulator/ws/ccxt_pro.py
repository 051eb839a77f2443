"""The ccxt.pro side: pointing the real client at a `WsSimulator`, and the closed-flag recipe.

ccxt.pro's parsed OHLCV rows are `[ts, o, h, l, c, v]`: Binance's `k.x`, OKX's `confirm` and
Bybit's `confirm` are dropped. `KlineTap` subclasses the exchange and overrides
`handle_ohlcv`, the method ccxt calls with each raw kline frame: it reads the exchange's own
closed flag from the frame, lets ccxt parse and cache it as usual, then records a copy of the
row ccxt produced, flagged. `drain_closed(symbol, timeframe)` hands the closed ones to the
caller after `watch_ohlcv` returns; the frame is handled before ccxt resolves the watch, so
nothing is missed. Copies matter: ccxt's cache updates rows in place, and a late (out of
order) in-progress frame would overwrite the closed values there.

The taps themselves live with the daemon's stream client (`actors.sources.ccxt_stream`); this
module adds the test-side view of them (`KlineEvent`, `drain_closed`).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import ccxt.pro

from ...actors.sources.ccxt_stream import TAPS
from ...actors.sources.urls import rebase_urls
from .server import WsSimulator

OHLCV = tuple[int, float, float, float, float, float]

#: ccxt options so `load_markets()` asks only for spot markets: one REST request each.
SPOT_OPTIONS: dict[str, dict[str, Any]] = {
    "binance": {"fetchMarkets": {"types": ["spot"]}, "fetchCurrencies": False,
                "fetchMargins": False, "adjustForTimeDifference": False},
    "okx": {"fetchMarkets": {"types": ["spot"]}, "adjustForTimeDifference": False},
    "bybit": {"fetchMarkets": {"types": ["spot"]}, "adjustForTimeDifference": False},
}


def point_at(ex: Any, ws_base: str, rest_base: str | None = None) -> None:
    """Point a ccxt.pro client's public stream URL(s) at `ws_base` ("ws://host:port") and,
    if given, its REST URLs at `rest_base` ("http://host:port").

    Where ccxt 4.5.90 takes the URL from: binance `urls['api']['ws']['spot']` + "/<stream
    index>"; okx `urls['api']['ws']` + "/business" for candles; bybit
    `urls['api']['ws']['public']['spot']`. A client already connected keeps its sockets.
    """
    exchange = ex.id
    ws = ex.urls["api"]["ws"]
    if exchange == "binance":
        ws["spot"] = ws["margin"] = f"{ws_base}/ws"
    elif exchange == "okx":
        ex.urls["api"]["ws"] = f"{ws_base}/ws/v5"
    elif exchange == "bybit":
        ws["public"]["spot"] = f"{ws_base}/v5/public/spot"
    else:
        raise ValueError(f"no stream URL recipe for {exchange!r}")
    if rest_base is not None:
        ws_part = ex.urls["api"]["ws"]
        ex.urls["api"] = rebase_urls(ex.urls["api"], rest_base)
        ex.urls["api"]["ws"] = ws_part


def pro_client(exchange: str, sim: WsSimulator, *, rest_base: str | None = None,
               cls: type | None = None, **config: Any) -> Any:
    """A real ccxt.pro client for `sim`: spot-only market loading, stream URLs on `sim`,
    REST (market listing) on `rest_base` or else on `sim` itself. `cls` overrides the class
    (e.g. `tapped("okx")`); `config` goes to the constructor."""
    klass = cls or getattr(ccxt.pro, exchange)
    options = copy.deepcopy(SPOT_OPTIONS.get(exchange, {}))
    options.update(config.pop("options", {}))
    ex = klass({"enableRateLimit": False, "options": options, **config})
    point_at(ex, sim.ws_base, rest_base or sim.http_base)
    return ex


# ----------------------------------------------------------------------- closed flags
@dataclass(frozen=True)
class KlineEvent:
    """One kline frame as ccxt parsed it, with the exchange's closed flag."""

    symbol: str
    timeframe: str
    ohlcv: OHLCV
    closed: bool


class KlineTap:
    """Test-side mixin over the daemon's tap (`actors.sources.ccxt_stream.KlineTap`, put after
    this one by `tapped`): every frame parsed by ccxt, each one an `on_kline(KlineEvent)`, the
    closed ones kept for `drain_closed`."""

    parse_all = True

    @property
    def kline_sink(self) -> KlineTap:
        return self

    def frame(self, symbol: str, timeframe: str, ts: int, closed: bool | None, event_ms: int | None,
              row: tuple[Any, ...] | None) -> None:
        if row is not None:
            self.on_kline(KlineEvent(symbol, timeframe, tuple(row), closed is True))

    def on_kline(self, event: KlineEvent) -> None:
        """Called for every kline frame; by default keeps the closed ones for `drain_closed`.
        Override to forward events elsewhere (an actor's mailbox, a queue)."""
        if event.closed:
            self._closed_klines()[(event.symbol, event.timeframe)].append(event.ohlcv)

    def drain_closed(self, symbol: str, timeframe: str) -> list[OHLCV]:
        """Closed candles of (symbol, timeframe) seen since the last drain, in arrival order
        (a duplicated final appears twice; deduplicate by timestamp)."""
        return self._closed_klines().pop((symbol, timeframe), [])

    def _closed_klines(self) -> defaultdict[tuple[str, str], list[OHLCV]]:
        store = self.__dict__.get("_tap_closed")
        if store is None:
            store = self.__dict__["_tap_closed"] = defaultdict(list)
        return store


def tapped(exchange: str) -> type:
    """The ccxt.pro class of `exchange` with the daemon's `KlineTap` for it and the test-side
    `KlineTap` above mixed in."""
    return type(f"{exchange}_tapped", (KlineTap, TAPS[exchange], getattr(ccxt.pro, exchange)), {})
