"""Coinbase Advanced Trade public market endpoints (plus the v2 data API ccxt loads currencies
from).

What ccxt 4.5.90 calls without API keys: `load_markets` -> GET /v2/currencies,
/v2/currencies/crypto, /v2/exchange-rates (fetchCurrencies), then
/api/v3/brokerage/market/products and ...?product_type=FUTURE (the latter inside a
try/except in the sync client: its failure is swallowed); `fetch_ohlcv` -> GET
/api/v3/brokerage/market/products/{id}/candles?granularity&start&end with start/end in
*seconds*, end = start + min(limit, 300) bars (without `since`: start = ccxt's own now - that).

Candle semantics: bars with start <= t < end, newest first, at most 350 per request (a wider
range is a 400); the in-progress bar is included, bars without trades are left out. Errors
are gRPC-gateway style {"error": "INVALID_ARGUMENT", "error_details": ..., "message": ...};
the edge answers 429 with an HTML page.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping
from typing import ClassVar

from ..catalogue import usd_level
from ..faults import PoisonKind
from ..history import Market
from ..limits import Charge, Limit
from ..reply import Reply, gateway_page, json_reply
from .base import Ctx, Dialect, int_param, num, poison_rows
from .derivatives import PERPETUAL_EXPIRY_MS, quarterly_expiry

PATH_V2_TIME = "/v2/time"
PATH_V3_TIME = "/api/v3/brokerage/time"
PATH_FIAT = "/v2/currencies"
PATH_CRYPTO = "/v2/currencies/crypto"
PATH_RATES = "/v2/exchange-rates"
PATH_PRODUCTS = "/api/v3/brokerage/market/products"
_CANDLES_SUFFIX = "/candles"

GRANULARITIES = {"ONE_MINUTE": "1m", "FIVE_MINUTE": "5m", "FIFTEEN_MINUTE": "15m",
                 "THIRTY_MINUTE": "30m", "ONE_HOUR": "1h", "TWO_HOUR": "2h", "SIX_HOUR": "6h",
                 "ONE_DAY": "1d"}
_FIAT = {"USD": "US Dollar", "EUR": "Euro", "GBP": "British Pound"}
_NAMES = {"BTC": "Bitcoin", "ETH": "Ethereum", "SOL": "Solana", "USDT": "Tether",
          "USDC": "USD Coin", "DOGE": "Dogecoin", "XRP": "XRP"}


def error(status: int, code: str, message: str) -> Reply:
    return json_reply(status, {"error": code, "error_details": message, "message": message})


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms // 1000))


def v2_time(now_ms: int) -> Reply:
    return json_reply(200, {"data": {"iso": _iso(now_ms), "epoch": now_ms // 1000}})


def v3_time(now_ms: int) -> Reply:
    return json_reply(200, {"iso": _iso(now_ms), "epochSeconds": str(now_ms // 1000),
                            "epochMillis": str(now_ms)})


# -------------------------------------------------------------------------- currencies
def _codes(ctx: Ctx) -> list[str]:
    out: list[str] = []
    for m in ctx.venue.markets():
        for c in (m.base, m.quote):
            if c not in out:
                out.append(c)
    return out


def fiat_currencies(ctx: Ctx) -> Reply:
    data = [{"id": c, "name": name, "min_size": "0.01"} for c, name in _FIAT.items()]
    return json_reply(200, {"data": data})


def crypto_currencies(ctx: Ctx) -> Reply:
    data = [{"asset_id": f"{zlib.crc32(c.encode()):08x}-0000-4000-8000-{i:012x}", "code": c,
             "name": _NAMES.get(c, c.title()), "color": "#0052FF", "sort_index": 100 + i,
             "exponent": 8, "type": "crypto", "address_regex": "^.+$"}
            for i, c in enumerate(_codes(ctx)) if c not in _FIAT]
    return json_reply(200, {"data": data})


def exchange_rates(ctx: Ctx) -> Reply:
    rates = {c: f"{1.0 / lvl:.10g}" for c in _codes(ctx) if (lvl := usd_level(c))}
    return json_reply(200, {"data": {"currency": "USD", "rates": rates}})


# ---------------------------------------------------------------------------- products
def _spot(m: Market, ctx: Ctx) -> dict:
    tick = num(f"{10.0 ** -m.price_decimals:.8f}")
    price = num(f"{round(ctx.venue.history.price(m.id, ctx.now_ms), m.price_decimals):.8f}")
    pid = f"{m.base}-{m.quote}"
    return {
        "product_id": pid, "price": price, "price_percentage_change_24h": "0.84",
        "volume_24h": f"{m.base_volume * 1440:.8f}", "volume_percentage_change_24h": "-3.1",
        "base_increment": "0.00000001", "quote_increment": tick, "quote_min_size": "1",
        "quote_max_size": "150000000", "base_min_size": "0.00000001",
        "base_max_size": "3400", "base_name": _NAMES.get(m.base, m.base),
        "quote_name": _FIAT.get(m.quote, _NAMES.get(m.quote, m.quote)), "watched": False,
        "is_disabled": False, "new": False, "status": "online", "cancel_only": False,
        "limit_only": False, "post_only": False, "trading_disabled": False,
        "auction_mode": False, "product_type": "SPOT", "quote_currency_id": m.quote,
        "base_currency_id": m.base, "fcm_trading_session_details": None,
        "mid_market_price": "", "alias": "", "alias_to": [], "base_display_symbol": m.base,
        "quote_display_symbol": m.quote, "view_only": False, "price_increment": tick,
        "display_name": pid, "product_venue": "CBE",
    }


def _future(pid: str, root: str, expiry_ms: int, expiry_type: str) -> dict:
    return {
        "product_id": pid, "price": "", "base_increment": "1", "quote_increment": "5",
        "quote_min_size": "0", "quote_max_size": "100000000", "base_min_size": "1",
        "base_max_size": "100000000", "base_name": "", "quote_name": "US Dollar",
        "is_disabled": False, "status": "", "trading_disabled": False,
        "product_type": "FUTURE", "quote_currency_id": "USD", "base_currency_id": "",
        "price_increment": "5", "display_name": pid, "product_venue": "FCM",
        "future_product_details": {
            "venue": "cde", "contract_code": pid.split("-", maxsplit=1)[0],
            "contract_expiry": _iso(expiry_ms), "contract_size": "0.01",
            "contract_root_unit": root, "contract_expiry_type": expiry_type,
            "contract_display_name": pid, "risk_managed_by": "MANAGED_BY_FCM",
        },
    }


def products(params: Mapping[str, str], ctx: Ctx) -> Reply:
    kind = params.get("product_type", "SPOT")
    if kind == "SPOT":
        rows = [_spot(m, ctx) for m in ctx.venue.markets()]
    elif kind == "FUTURE":
        q = quarterly_expiry(ctx.now_ms)
        stamp = time.strftime("%d%b%y", time.gmtime(q // 1000)).upper()
        rows = [_future(f"BIT-{stamp}-CDE", "BTC", q, "EXPIRING"),
                _future(f"ET-{stamp}-CDE", "ETH", q, "EXPIRING"),
                _future("BIP-20DEC30-CDE", "BTC", PERPETUAL_EXPIRY_MS, "PERPETUAL")]
    else:
        return error(400, "INVALID_ARGUMENT", f"invalid product_type {kind}")
    return json_reply(200, {"products": rows, "num_products": len(rows)})


# ----------------------------------------------------------------------------- candles
def candles(product_id: str, params: Mapping[str, str], ctx: Ctx) -> Reply:
    interval = GRANULARITIES.get(params.get("granularity", ""))
    if interval is None:
        return error(400, "INVALID_ARGUMENT", "granularity is invalid")
    try:
        start, end, limit = (int_param(params, k) for k in ("start", "end", "limit"))
    except ValueError:
        return error(400, "INVALID_ARGUMENT", "start, end and limit must be integers")
    if start is None or end is None:
        return error(400, "INVALID_ARGUMENT", "start and end are required")
    m = ctx.venue.lookup(product_id)
    if m is None:
        return unknown_symbol()
    cap = ctx.caps["candles"]
    gran_s = {"1m": 60, "5m": 300, "15m": 900, "30m": 1800, "1h": 3600, "2h": 7200,
              "6h": 21600, "1d": 86400}[interval]
    if end < start:
        return error(400, "INVALID_ARGUMENT", "start must be before end")
    if (end - start) / gran_s > cap:
        return error(400, "INVALID_ARGUMENT",
                     f"number of candles requested should be less than {cap}")
    limit = cap if limit is None else max(1, min(limit, cap))
    poison = ctx.poison(m)
    if poison in (PoisonKind.BAD_SYMBOL, PoisonKind.BAD_SYMBOL_200):
        r = unknown_symbol(200 if poison is PoisonKind.BAD_SYMBOL_200 else None)
        r.poisoned = True
        return r
    rows = []
    if poison is not PoisonKind.EMPTY:
        got = ctx.venue.history.select(m.id, interval, ctx.now_ms, lo=start * 1000,
                                       hi=end * 1000 - 1, limit=limit, newest=True,
                                       omit_empty=ctx.omit_empty)
        rows = [{"start": str(c.open_time // 1000), "low": num(c.low), "high": num(c.high),
                 "open": num(c.open), "close": num(c.close), "volume": num(c.volume)}
                for c in reversed(poison_rows(poison, got))]
    r = json_reply(200, {"candles": rows})
    r.poisoned = poison is not None
    return r


def unknown_symbol(status: int | None = None) -> Reply:
    return error(404 if status is None else status, "NOT_FOUND", "product not found")


#: The documented limits, per IP: Advanced Trade's public endpoints 10 requests a second; the
#: v2 (Coinbase App) ones 10,000 an hour.
PUBLIC_V3 = Limit("v3-public", 10, 1_000, sliding=True)
PUBLIC_V2 = Limit("v2", 10_000, 3_600_000, sliding=True)


class CoinbaseDialect(Dialect):
    name = "coinbase"
    ccxt_id = "coinbase"
    omit_empty = True  # Coinbase returns no bucket for an interval without trades
    page_caps: ClassVar[dict[str, int]] = {"candles": 350}
    listing_kinds = ("spot", "future", "currencies")

    def market_id(self, m: Market) -> str:
        return f"{m.base}-{m.quote}"

    def route(self, path: str, params: Mapping[str, str], ctx: Ctx) -> Reply:
        if path.startswith(PATH_PRODUCTS + "/") and path.endswith(_CANDLES_SUFFIX):
            product_id = path[len(PATH_PRODUCTS) + 1:-len(_CANDLES_SUFFIX)]
            return candles(product_id, params, ctx)
        if path == PATH_PRODUCTS:
            return products(params, ctx)
        if path == PATH_FIAT:
            return fiat_currencies(ctx)
        if path == PATH_CRYPTO:
            return crypto_currencies(ctx)
        if path == PATH_RATES:
            return exchange_rates(ctx)
        if path == PATH_V2_TIME:
            return v2_time(ctx.now_ms)
        if path == PATH_V3_TIME:
            return v3_time(ctx.now_ms)
        return gateway_page(404)

    def limits(self, path: str) -> tuple[Charge, ...]:
        return ((PUBLIC_V2 if path.startswith("/v2/") else PUBLIC_V3, 1),)

    def listing_kind(self, path: str, params: Mapping[str, str]) -> str | None:
        if path == PATH_PRODUCTS:
            return "future" if params.get("product_type") == "FUTURE" else "spot"
        if path in (PATH_FIAT, PATH_CRYPTO, PATH_RATES):
            return "currencies"
        return None

    def rate_limited(self, retry_after_s: int, ctx: Ctx) -> Reply:
        return gateway_page(429)  # the edge's HTML page, not JSON

    def server_error(self, status: int, ctx: Ctx) -> Reply:
        if status == 500:
            return error(500, "INTERNAL", "internal error")
        if status == 503:
            return error(503, "UNAVAILABLE", "service unavailable")
        return gateway_page(status)

    def unknown_symbol(self, ctx: Ctx, status: int | None = None) -> Reply:
        return unknown_symbol(status)
