"""Bybit v5 public REST: instruments-info, kline, server time.

What ccxt 4.5.90 calls: `load_markets` -> GET /v5/market/instruments-info?category=spot, then
category=linear and inverse (each twice: limit=1000, and status=PreLaunch), then
category=option once per `options['fetchMarkets']['options']` base coin (BTC, ETH, SOL, XRP,
MNT, DOGE); `fetch_ohlcv` -> GET /v5/market/kline?category=spot&symbol&interval&start&limit
(`start` aligned up to the bar; `limit` default 200, max 1000).

Kline semantics (Bybit docs + ccxt#26736): rows newest first; with `start` the page begins at
the bar containing `start` (oldest `limit` bars of the window), without it the newest `limit`
bars up to `end`/now, the in-progress bar included. Errors and rate limits come back as HTTP
200 with a non-zero `retCode`; every response carries X-Bapi-Limit* headers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from ..faults import PoisonKind
from ..history import Market, align_down
from ..limits import Charge, Limit
from ..reply import Reply, gateway_page, json_reply
from .base import Ctx, Dialect, int_param, num, poison_rows
from .derivatives import ddmmmyy, month_code, quarterly_expiry, weekly_expiry

PATH_TIME = "/v5/market/time"
PATH_INSTRUMENTS = "/v5/market/instruments-info"
PATH_KLINE = "/v5/market/kline"

#: Bybit interval -> interval ("M", monthly, is not modelled).
INTERVALS = {"1": "1m", "3": "3m", "5": "5m", "15": "15m", "30": "30m", "60": "1h", "120": "2h",
             "240": "4h", "360": "6h", "720": "12h", "D": "1d", "W": "1w"}
DEFAULT_LIMIT = 200
#: The documented IP limit (600 requests per 5 s, all of api.bybit.com), which the X-Bapi-Limit*
#: headers describe here (Bybit's own headers describe per-UID limits of private endpoints).
IP_LIMIT, IP_WINDOW_MS = 600, 5_000
IP = Limit("ip", IP_LIMIT, IP_WINDOW_MS)
_CATEGORIES = ("spot", "linear", "inverse", "option")


def envelope(ret_code: int, ret_msg: str, result: object, now_ms: int) -> dict:
    return {"retCode": ret_code, "retMsg": ret_msg, "result": result, "retExtInfo": {},
            "time": now_ms}


def error(ret_code: int, ret_msg: str, now_ms: int, status: int = 200) -> Reply:
    return json_reply(status, envelope(ret_code, ret_msg, {}, now_ms))


def server_time(now_ms: int) -> Reply:
    return json_reply(200, envelope(0, "OK", {"timeSecond": str(now_ms // 1000),
                                              "timeNano": str(now_ms * 1_000_000)}, now_ms))


# ------------------------------------------------------------------------ instruments
def _spot(m: Market) -> dict:
    return {
        "symbol": m.base + m.quote, "baseCoin": m.base, "quoteCoin": m.quote,
        "innovation": "0", "status": "Trading", "marginTrading": "utaOnly", "stTag": "0",
        "lotSizeFilter": {"basePrecision": "0.000001", "quotePrecision": "0.00000001",
                          "minOrderQty": "0.000048", "maxOrderQty": "71.73956243",
                          "minOrderAmt": "1", "maxOrderAmt": "2000000"},
        "priceFilter": {"tickSize": num(f"{10.0 ** -m.price_decimals:.8f}")},
        "riskParameters": {"priceLimitRatioX": "0.01", "priceLimitRatioY": "0.02"},
    }


def _contract(symbol: str, contract_type: str, base: str, quote: str, settle: str,
              delivery_ms: int, launch_ms: int) -> dict:
    return {
        "symbol": symbol, "contractType": contract_type, "status": "Trading",
        "baseCoin": base, "quoteCoin": quote, "launchTime": str(launch_ms),
        "deliveryTime": str(delivery_ms), "deliveryFeeRate": "", "priceScale": "2",
        "leverageFilter": {"minLeverage": "1", "maxLeverage": "100.00", "leverageStep": "0.01"},
        "priceFilter": {"minPrice": "0.10", "maxPrice": "1999999.80", "tickSize": "0.10"},
        "lotSizeFilter": {"maxOrderQty": "1190.000", "minOrderQty": "0.001", "qtyStep": "0.001",
                          "postOnlyMaxOrderQty": "1190.000", "maxMktOrderQty": "500.000",
                          "minNotionalValue": "5"},
        "unifiedMarginTrade": True, "fundingInterval": 480, "settleCoin": settle,
        "copyTrading": "both", "upperFundingRate": "0.00375", "lowerFundingRate": "-0.00375",
        "isPreListing": False, "preListingInfo": None,
    }


def _option(symbol: str, base: str, kind: str, delivery_ms: int, launch_ms: int) -> dict:
    return {
        "symbol": symbol, "status": "Trading", "baseCoin": base, "quoteCoin": "USD",
        "settleCoin": "USDC", "optionsType": kind, "launchTime": str(launch_ms),
        "deliveryTime": str(delivery_ms), "deliveryFeeRate": "0.00015",
        "priceFilter": {"minPrice": "5", "maxPrice": "10000000", "tickSize": "5"},
        "lotSizeFilter": {"maxOrderQty": "500", "minOrderQty": "0.01", "qtyStep": "0.01"},
    }


def _derivatives(category: str, params: Mapping[str, str], now_ms: int, launch: int) -> list:
    if params.get("status") == "PreLaunch":
        return []
    if category == "linear":
        q = quarterly_expiry(now_ms)
        return [_contract("BTCUSDT", "LinearPerpetual", "BTC", "USDT", "USDT", 0, launch),
                _contract("ETHUSDT", "LinearPerpetual", "ETH", "USDT", "USDT", 0, launch),
                _contract(f"BTC-{ddmmmyy(q)}", "LinearFutures", "BTC", "USDC", "USDC", q,
                          launch)]
    if category == "inverse":
        q = quarterly_expiry(now_ms)
        return [_contract("BTCUSD", "InversePerpetual", "BTC", "USD", "BTC", 0, launch),
                _contract("ETHUSD", "InversePerpetual", "ETH", "USD", "ETH", 0, launch),
                _contract(f"BTCUSD{month_code(q)}", "InverseFutures", "BTC", "USD", "BTC", q,
                          launch)]
    strikes = {"BTC": ("90000", "100000"), "ETH": ("3000", "3500")}.get(params.get("baseCoin", ""))
    if strikes is None:
        return []
    base = params["baseCoin"]
    exp = weekly_expiry(now_ms)
    return [_option(f"{base}-{ddmmmyy(exp)}-{k}-{t}", base, "Call" if t == "C" else "Put",
                    exp, launch) for k in strikes for t in ("C", "P")]


def instruments(params: Mapping[str, str], ctx: Ctx) -> Reply:
    category = params.get("category", "")
    if category not in _CATEGORIES:
        return error(10001, "params error: Category is invalid", ctx.now_ms)
    if category == "spot":
        rows = [_spot(m) for m in ctx.venue.markets()]
    else:
        rows = _derivatives(category, params, ctx.now_ms, ctx.venue.history.history_start_ms)
    symbol = params.get("symbol")
    if symbol:
        rows = [r for r in rows if r["symbol"] == symbol]
    result = {"category": category, "list": rows, "nextPageCursor": ""}
    return json_reply(200, envelope(0, "OK", result, ctx.now_ms))


# ------------------------------------------------------------------------------ kline
def kline(params: Mapping[str, str], ctx: Ctx) -> Reply:
    now = ctx.now_ms
    category = params.get("category") or "linear"  # Bybit's documented default
    symbol = params.get("symbol", "")
    if not symbol:
        return error(10001, "params error: symbol is required", now)
    interval = INTERVALS.get(params.get("interval", ""))
    if interval is None:
        return error(10001, "Invalid period!", now)
    parsed: dict[str, int | None] = {}
    for name in ("start", "end", "limit"):
        try:
            parsed[name] = int_param(params, name)
        except ValueError:
            return error(10001, f"params error: {name} invalid", now)
    m = ctx.venue.lookup(symbol) if category == "spot" else None  # derivatives: no candles
    if m is None:
        return unknown_symbol(now)
    limit = parsed["limit"]
    limit = DEFAULT_LIMIT if limit is None else max(1, min(limit, ctx.caps["kline"]))
    poison = ctx.poison(m)
    if poison in (PoisonKind.BAD_SYMBOL, PoisonKind.BAD_SYMBOL_200):
        r = unknown_symbol(now)
        r.poisoned = True
        return r
    start, end = parsed["start"], parsed["end"]
    rows = []
    if poison is not PoisonKind.EMPTY:
        lo = None if start is None else align_down(start, interval)
        got = ctx.venue.history.select(m.id, interval, now, lo=lo, hi=end, limit=limit,
                                       newest=start is None, omit_empty=ctx.omit_empty)
        rows = [[str(c.open_time), num(c.open), num(c.high), num(c.low), num(c.close),
                 num(c.volume), num(c.quote_volume)]
                for c in reversed(poison_rows(poison, got))]
    result = {"symbol": symbol, "category": category, "list": rows}
    r = json_reply(200, envelope(0, "OK", result, now))
    r.poisoned = poison is not None
    return r


def unknown_symbol(now_ms: int, status: int = 200) -> Reply:
    return error(10001, "Not supported symbols", now_ms, status)


class BybitDialect(Dialect):
    name = "bybit"
    ccxt_id = "bybit"
    omit_empty = False  # modelled as continuous (flat zero-volume rows)
    page_caps: ClassVar[dict[str, int]] = {"kline": 1000}
    listing_kinds = _CATEGORIES

    def market_id(self, m: Market) -> str:
        return m.base + m.quote

    def route(self, path: str, params: Mapping[str, str], ctx: Ctx) -> Reply:
        if path == PATH_KLINE:
            return kline(params, ctx)
        if path == PATH_INSTRUMENTS:
            return instruments(params, ctx)
        if path == PATH_TIME:
            return server_time(ctx.now_ms)
        return gateway_page(404)

    def listing_kind(self, path: str, params: Mapping[str, str]) -> str | None:
        if path != PATH_INSTRUMENTS:
            return None
        category = params.get("category", "")
        return category if category in _CATEGORIES else None

    def limits(self, path: str) -> tuple[Charge, ...]:
        return ((IP, 1),)

    def headers(self, path: str, ctx: Ctx) -> dict[str, str]:
        used_f, reset = self.meters.usage(IP, ctx.now_ms)
        used = int(used_f)
        return {"X-Bapi-Limit": str(IP_LIMIT), "X-Bapi-Limit-Status": str(max(0, IP_LIMIT - used)),
                "X-Bapi-Limit-Reset-Timestamp": str(reset), "Timenow": str(ctx.now_ms)}

    def rate_limited(self, retry_after_s: int, ctx: Ctx) -> Reply:
        r = error(10006, "Too many visits!", ctx.now_ms)
        r.headers.update({"X-Bapi-Limit-Status": "0",
                          "X-Bapi-Limit-Reset-Timestamp": str(ctx.now_ms + retry_after_s * 1000)})
        return r

    def banned(self, retry_after_s: int, until_ms: int, ctx: Ctx) -> Reply:
        """Bybit's IP ban: HTTP 403 "access too frequent" (no JSON)."""
        return Reply(403, b"access too frequent", content_type="text/plain")

    def server_error(self, status: int, ctx: Ctx) -> Reply:
        if status == 500:
            return error(10016, "Internal system error.", ctx.now_ms, status=500)
        return gateway_page(status)  # CloudFront's pages for 502/503/504

    def unknown_symbol(self, ctx: Ctx, status: int | None = None) -> Reply:
        return unknown_symbol(ctx.now_ms, 200 if status is None else status)
