"""Binance public spot REST dialect: routes, JSON shapes, error bodies and request weights.

Pure functions from (history, params, now) to a `Reply`; no sockets here. Shapes follow
https://developers.binance.com/docs/binance-spot-api-docs/rest-api and what ccxt's
`binance.fetch_markets` / `fetch_ohlcv` parse.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping

from .faults import PoisonKind
from .history import BINANCE_INTERVALS, CandleHistory, Market
from .reply import JSON_TYPE, Reply, dumps, gateway_page

__all__ = ["JSON_TYPE", "Reply", "dumps"]  # re-exported: older code imports them from here

PATH_PING = "/api/v3/ping"
PATH_TIME = "/api/v3/time"
PATH_EXCHANGE_INFO = "/api/v3/exchangeInfo"
PATH_KLINES = "/api/v3/klines"

#: Request weights Binance charges (x-mbx-used-weight-1m).
WEIGHTS = {PATH_PING: 1, PATH_TIME: 1, PATH_EXCHANGE_INFO: 20, PATH_KLINES: 2}
WEIGHT_LIMIT_1M = 6000
KLINES_DEFAULT_LIMIT = 500
KLINES_MAX_LIMIT = 1000

RATE_LIMITS = [
    {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1,
     "limit": WEIGHT_LIMIT_1M},
    {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
    {"rateLimitType": "ORDERS", "interval": "DAY", "intervalNum": 1, "limit": 200000},
    {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 61000},
]


def error(status: int, code: int, msg: str) -> Reply:
    """Binance's error envelope: {"code": <negative int>, "msg": "..."}."""
    return Reply(status, dumps({"code": code, "msg": msg}))


def invalid_symbol() -> Reply:
    return error(400, -1121, "Invalid symbol.")


def too_many_requests(retry_after_s: int, limit: int = WEIGHT_LIMIT_1M) -> Reply:
    r = error(429, -1003, f"Too many requests; current limit of IP(127.0.0.1) is {limit} requests"
              " per minute. Please use the websocket for live updates to avoid polling the API.")
    r.headers["Retry-After"] = str(retry_after_s)
    return r


def banned(retry_after_s: int, until_ms: int) -> Reply:
    r = error(418, -1003, f"Way too many requests; IP(127.0.0.1) banned until {until_ms}. Please"
              " use the websocket for live updates to avoid bans.")
    r.headers["Retry-After"] = str(retry_after_s)
    return r


def server_error(status: int) -> Reply:
    """5xx as Binance's edge produces them: JSON from the API for 500/503, HTML from the
    gateway for 502/504 (so both body styles are exercised)."""
    if status == 500:
        return error(500, -1000, "An unknown error occurred while processing the request.")
    if status == 503:
        # -1001 rather than -1008: ccxt maps -1008 only for api.binance.com URLs (see README)
        return error(503, -1001, "Internal error; unable to process your request. Please try again.")
    return gateway_page(status)


def not_found() -> Reply:
    return Reply(404, b"", content_type="text/html")


# ------------------------------------------------------------------------------ routes
def _symbol_entry(m: Market) -> dict:
    tick = m.tick_size
    return {
        "symbol": m.id, "status": "TRADING",
        "baseAsset": m.base, "baseAssetPrecision": 8,
        "quoteAsset": m.quote, "quotePrecision": 8, "quoteAssetPrecision": 8,
        "baseCommissionPrecision": 8, "quoteCommissionPrecision": 8,
        "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS", "STOP_LOSS_LIMIT",
                       "TAKE_PROFIT", "TAKE_PROFIT_LIMIT"],
        "icebergAllowed": True, "ocoAllowed": True, "otoAllowed": True,
        "quoteOrderQtyMarketAllowed": True, "allowTrailingStop": True,
        "cancelReplaceAllowed": True, "amendAllowed": True,
        "isSpotTradingAllowed": True, "isMarginTradingAllowed": False,
        "filters": [
            {"filterType": "PRICE_FILTER", "minPrice": tick, "maxPrice": "1000000.00000000",
             "tickSize": tick},
            {"filterType": "LOT_SIZE", "minQty": "0.00001000", "maxQty": "9000000.00000000",
             "stepSize": "0.00001000"},
            {"filterType": "ICEBERG_PARTS", "limit": 10},
            {"filterType": "MARKET_LOT_SIZE", "minQty": "0.00000000",
             "maxQty": "100000.00000000", "stepSize": "0.00000000"},
            {"filterType": "TRAILING_DELTA", "minTrailingAboveDelta": 10,
             "maxTrailingAboveDelta": 2000, "minTrailingBelowDelta": 10,
             "maxTrailingBelowDelta": 2000},
            {"filterType": "PERCENT_PRICE_BY_SIDE", "bidMultiplierUp": "5",
             "bidMultiplierDown": "0.2", "askMultiplierUp": "5", "askMultiplierDown": "0.2",
             "avgPriceMins": 5},
            {"filterType": "NOTIONAL", "minNotional": "5.00000000", "applyMinToMarket": True,
             "maxNotional": "9000000.00000000", "applyMaxToMarket": False, "avgPriceMins": 5},
            {"filterType": "MAX_NUM_ORDERS", "maxNumOrders": 200},
            {"filterType": "MAX_NUM_ALGO_ORDERS", "maxNumAlgoOrders": 5},
        ],
        "permissions": [], "permissionSets": [["SPOT"]],
        "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
        "allowedSelfTradePreventionModes": ["EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH"],
    }


class ExchangeInfo:
    """Caches the serialised symbol list once, so exchangeInfo with 1000 symbols costs a
    string join per request, not a re-encode."""

    def __init__(self, markets: CandleHistory | Iterable[Market]) -> None:
        if isinstance(markets, CandleHistory):
            markets = markets.markets
        self._entries = {m.id: dumps(_symbol_entry(m)) for m in markets}
        self._all = b"[" + b",".join(self._entries.values()) + b"]"
        self._head = b'{"timezone":"UTC","serverTime":'
        self._mid = (b',"rateLimits":' + dumps(RATE_LIMITS) + b',"exchangeFilters":[],"symbols":')

    def reply(self, params: Mapping[str, str], now_ms: int) -> Reply:
        symbols = self._all
        wanted: list[str] | None = None
        if "symbol" in params:
            wanted = [params["symbol"]]
        elif "symbols" in params:
            try:
                wanted = json.loads(params["symbols"])
            except ValueError:
                return error(400, -1100, "Illegal characters found in parameter 'symbols'.")
        if wanted is not None:
            if not all(isinstance(s, str) and s in self._entries for s in wanted):
                return invalid_symbol()
            symbols = b"[" + b",".join(self._entries[s] for s in wanted) + b"]"
        return Reply(200, self._head + str(now_ms).encode() + self._mid + symbols + b"}")


def _int_param(params: Mapping[str, str], name: str) -> int | Reply | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        return error(400, -1100, f"Illegal characters found in parameter '{name}'; legal range"
                     " is '^[0-9]{1,20}$'.")


def klines(history: CandleHistory, params: Mapping[str, str], now_ms: int,
           poison: PoisonKind | None = None, listed: Callable[[str], bool] | None = None,
           omit_empty: bool = False) -> Reply:
    """GET /api/v3/klines: validation order and errors as Binance does it. `listed` says
    whether a known symbol is listed right now (default: all known symbols are)."""
    sym = params.get("symbol")
    if not sym:
        return error(400, -1102, "Mandatory parameter 'symbol' was not sent, was empty/null,"
                     " or malformed.")
    interval = params.get("interval")
    if not interval:
        return error(400, -1102, "Mandatory parameter 'interval' was not sent, was empty/null,"
                     " or malformed.")
    parsed = {}
    for name in ("startTime", "endTime", "limit"):
        v = _int_param(params, name)
        if isinstance(v, Reply):
            return v
        parsed[name] = v
    if (history.market(sym) is None or sym != sym.upper() or "/" in sym
            or (listed is not None and not listed(sym))):
        return invalid_symbol()
    if interval not in BINANCE_INTERVALS:
        return error(400, -1120, "Invalid interval.")
    limit = parsed["limit"]
    limit = KLINES_DEFAULT_LIMIT if limit is None else max(1, min(limit, KLINES_MAX_LIMIT))
    start, end = parsed["startTime"], parsed["endTime"]
    if start is not None and end is not None and start > end:
        return error(400, -1023, "Start time is greater than end time.")
    if poison is PoisonKind.BAD_SYMBOL:
        return invalid_symbol()
    if poison is PoisonKind.BAD_SYMBOL_200:  # a listed symbol, a 200, and an error body
        return Reply(200, invalid_symbol().body)
    if poison is PoisonKind.EMPTY:
        return Reply(200, b"[]")
    candles = history.klines(sym, interval, now_ms, start_ms=start, end_ms=end, limit=limit,
                             omit_empty=omit_empty)
    rows = [c.row() for c in candles]
    if poison is PoisonKind.INVERTED:
        for r in rows:
            r[2], r[3] = r[3], r[2]
            if r[2] == r[3]:  # flat candle: force high < low anyway
                r[3] = f"{float(r[3]) * 1.01 + 1e-6:.8f}"
    elif poison is PoisonKind.NULLS:
        for r in rows:
            r[1:6] = [None] * 5
    return Reply(200, dumps(rows))


def ping() -> Reply:
    return Reply(200, b"{}")


def server_time(now_ms: int) -> Reply:
    return Reply(200, b'{"serverTime":' + str(now_ms).encode() + b"}")
