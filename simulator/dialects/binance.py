"""Binance (spot REST, plus the USD-M/COIN-M exchangeInfo listings ccxt loads by default).

The spot routes live in `simulator.binance` (kept there for older imports); this module adapts
them to the `Dialect` interface and adds what ccxt's default `load_markets` also asks for:
GET /fapi/v1/exchangeInfo ("linear") and /dapi/v1/exchangeInfo ("inverse").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from .. import binance as spot
from ..history import Market
from ..limits import Charge, Limit
from ..reply import Reply, dumps
from .base import Ctx, Dialect
from .derivatives import PERPETUAL_EXPIRY_MS, quarterly_expiry, yymmdd

PATH_FAPI_INFO = "/fapi/v1/exchangeInfo"
PATH_DAPI_INFO = "/dapi/v1/exchangeInfo"
_LISTINGS = {spot.PATH_EXCHANGE_INFO: "spot", PATH_FAPI_INFO: "linear", PATH_DAPI_INFO: "inverse"}
#: the spot API's documented limit: 6000 request weight per clock minute, per IP (the derivative
#: listings live on other hosts, with limits of their own, not modelled)
WEIGHT_1M = Limit("weight", spot.WEIGHT_LIMIT_1M, 60_000)


def _contract(symbol: str, pair: str, base: str, quote: str, margin: str, expiry: int,
              inverse: bool) -> dict:
    entry = {
        "symbol": symbol, "pair": pair,
        "contractType": "PERPETUAL" if expiry == PERPETUAL_EXPIRY_MS else "CURRENT_QUARTER",
        "deliveryDate": expiry, "onboardDate": 1_569_398_400_000,
        "baseAsset": base, "quoteAsset": quote, "marginAsset": margin,
        "pricePrecision": 1, "quantityPrecision": 3, "baseAssetPrecision": 8,
        "quotePrecision": 8, "underlyingType": "COIN", "triggerProtect": "0.0500",
        "filters": [
            {"filterType": "PRICE_FILTER", "minPrice": "556.80", "maxPrice": "4529764",
             "tickSize": "0.10"},
            {"filterType": "LOT_SIZE", "stepSize": "0.001", "maxQty": "1000",
             "minQty": "0.001"},
        ],
        "orderTypes": ["LIMIT", "MARKET", "STOP", "STOP_MARKET"],
        "timeInForce": ["GTC", "IOC", "FOK", "GTX"],
    }
    if inverse:
        entry.update(contractStatus="TRADING", contractSize=100)
    else:
        entry["status"] = "TRADING"
    return entry


def futures_info(now_ms: int, inverse: bool) -> Reply:
    """A few plausible USD-M (linear) or COIN-M (inverse) contracts."""
    q = quarterly_expiry(now_ms)
    ymd = yymmdd(q)
    if inverse:
        symbols = [_contract("BTCUSD_PERP", "BTCUSD", "BTC", "USD", "BTC", PERPETUAL_EXPIRY_MS, True),
                   _contract("ETHUSD_PERP", "ETHUSD", "ETH", "USD", "ETH", PERPETUAL_EXPIRY_MS, True),
                   _contract(f"BTCUSD_{ymd}", "BTCUSD", "BTC", "USD", "BTC", q, True)]
    else:
        symbols = [_contract("BTCUSDT", "BTCUSDT", "BTC", "USDT", "USDT", PERPETUAL_EXPIRY_MS, False),
                   _contract("ETHUSDT", "ETHUSDT", "ETH", "USDT", "USDT", PERPETUAL_EXPIRY_MS, False),
                   _contract(f"BTCUSDT_{ymd}", "BTCUSDT", "BTC", "USDT", "USDT", q, False)]
    return Reply(200, dumps({"timezone": "UTC", "serverTime": now_ms, "rateLimits": spot.RATE_LIMITS,
                             "exchangeFilters": [], "symbols": symbols}))


class BinanceDialect(Dialect):
    name = "binance"
    ccxt_id = "binance"
    omit_empty = False  # Binance klines are continuous: a minute without trades is a flat row
    page_caps: ClassVar[dict[str, int]] = {"klines": spot.KLINES_MAX_LIMIT}
    listing_kinds = ("spot", "linear", "inverse")

    def __init__(self) -> None:
        super().__init__()
        self._info: spot.ExchangeInfo | None = None
        self._info_version = -1

    def market_id(self, m: Market) -> str:
        return m.base + m.quote

    def route(self, path: str, params: Mapping[str, str], ctx: Ctx) -> Reply:
        venue = ctx.venue
        if path == spot.PATH_KLINES:
            m = venue.lookup(params.get("symbol", ""))
            poison = ctx.poison(m) if m is not None else None
            reply = spot.klines(venue.history, params, ctx.now_ms, poison,
                                listed=lambda s: venue.lookup(s) is not None,
                                omit_empty=ctx.omit_empty)
            reply.poisoned = poison is not None
            return reply
        if path == spot.PATH_EXCHANGE_INFO:
            if self._info is None or self._info_version != venue.version:
                self._info_version = venue.version
                self._info = spot.ExchangeInfo(venue.markets())
            return self._info.reply(params, ctx.now_ms)
        if path == spot.PATH_TIME:
            return spot.server_time(ctx.now_ms)
        if path == spot.PATH_PING:
            return spot.ping()
        if path in (PATH_FAPI_INFO, PATH_DAPI_INFO):
            return futures_info(ctx.now_ms, inverse=path == PATH_DAPI_INFO)
        return spot.not_found()

    def listing_kind(self, path: str, params: Mapping[str, str]) -> str | None:
        return _LISTINGS.get(path)

    def limits(self, path: str) -> tuple[Charge, ...]:
        if path in (PATH_FAPI_INFO, PATH_DAPI_INFO):
            return ()
        return ((WEIGHT_1M, spot.WEIGHTS.get(path, 1)),)

    def headers(self, path: str, ctx: Ctx) -> dict[str, str]:
        used = int(self.meters.usage(WEIGHT_1M, ctx.now_ms)[0])
        return {"x-mbx-used-weight": str(used), "x-mbx-used-weight-1m": str(used)}

    def rate_limited(self, retry_after_s: int, ctx: Ctx) -> Reply:
        return spot.too_many_requests(retry_after_s)

    def banned(self, retry_after_s: int, until_ms: int, ctx: Ctx) -> Reply:
        return spot.banned(retry_after_s, until_ms)

    def server_error(self, status: int, ctx: Ctx) -> Reply:
        return spot.server_error(status)

    def unknown_symbol(self, ctx: Ctx, status: int | None = None) -> Reply:
        r = spot.invalid_symbol()
        if status is not None:
            r.status = status
        return r
