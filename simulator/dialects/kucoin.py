"""KuCoin spot public REST (plus the futures contract listing ccxt loads by default).

What ccxt 4.5.90 calls without API keys: `load_markets` -> GET /api/v3/currencies
(fetchCurrencies), /api/v2/symbols, /api/v1/market/allTickers (fees; `fetchTickersFees`) and
the futures host's /api/v1/contracts/active; `fetch_ohlcv` -> GET
/api/v1/market/candles?symbol&type&startAt&endAt with seconds, endAt = since + limit bars
(limit default 1500; without `since`: startAt = ccxt's own now - limit bars).

Candle semantics: bars with startAt <= t < endAt (endAt 0 or absent: now), newest first, at
most 1500 (the newest ones when more qualify); the in-progress bar is included, bars without
trades are left out ("no data is published for intervals where there are no ticks"). Rows are
[time, open, close, high, low, volume, turnover]. Errors: {"code": "400100", "msg": ...};
every response carries gw-ratelimit-* headers (2000 per 30 s public pool).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from ..faults import PoisonKind
from ..history import Market
from ..limits import Charge, Limit
from ..reply import Reply, gateway_page, json_reply
from .base import Ctx, Dialect, int_param, num, poison_rows
from .derivatives import month_code, quarterly_expiry

PATH_TIME = "/api/v1/timestamp"
PATH_STATUS = "/api/v1/status"
PATH_CURRENCIES = "/api/v3/currencies"
PATH_SYMBOLS = "/api/v2/symbols"
PATH_TICKERS = "/api/v1/market/allTickers"
PATH_CANDLES = "/api/v1/market/candles"
PATH_CONTRACTS = "/api/v1/contracts/active"  # on api-futures.kucoin.com

TYPES = {"1min": "1m", "3min": "3m", "5min": "5m", "15min": "15m", "30min": "30m",
         "1hour": "1h", "2hour": "2h", "4hour": "4h", "6hour": "6h", "8hour": "8h",
         "12hour": "12h", "1day": "1d", "1week": "1w"}
PUBLIC_POOL, POOL_WINDOW_MS = 2000, 30_000
#: the documented public resource pool (VIP0): 2000 weight per 30 s, per IP
POOL = Limit("public", PUBLIC_POOL, POOL_WINDOW_MS)
#: request weights in the public pool
_WEIGHTS = {PATH_CANDLES: 3, PATH_SYMBOLS: 4, PATH_TICKERS: 15, PATH_CURRENCIES: 3,
            PATH_TIME: 3, PATH_STATUS: 3, PATH_CONTRACTS: 6}
_LISTINGS = {PATH_SYMBOLS: "spot", PATH_TICKERS: "tickers", PATH_CONTRACTS: "contract",
             PATH_CURRENCIES: "currencies"}


def ok(data: object) -> Reply:
    return json_reply(200, {"code": "200000", "data": data})


def error(status: int, code: str, msg: str) -> Reply:
    return json_reply(status, {"code": code, "msg": msg})


def _codes(ctx: Ctx) -> list[str]:
    out: list[str] = []
    for m in ctx.venue.markets():
        for c in (m.base, m.quote):
            if c not in out:
                out.append(c)
    return out


def currencies(ctx: Ctx) -> Reply:
    return ok([{"currency": c, "name": c, "fullName": c.title(), "precision": 8,
                "confirms": None, "contractAddress": None, "isMarginEnabled": True,
                "isDebitEnabled": True,
                "chains": [{"chainName": c, "chainId": c.lower(), "withdrawalMinSize": "0.001",
                            "depositMinSize": "0.0001", "withdrawFeeRate": "0",
                            "withdrawalMinFee": "0.0005", "isWithdrawEnabled": True,
                            "isDepositEnabled": True, "confirms": 3, "preConfirms": 1,
                            "withdrawPrecision": 8, "maxWithdraw": None, "maxDeposit": None,
                            "needTag": False, "contractAddress": ""}]}
               for c in _codes(ctx)])


def _symbol(m: Market) -> dict:
    tick = num(f"{10.0 ** -m.price_decimals:.8f}")
    return {
        "symbol": f"{m.base}-{m.quote}", "name": f"{m.base}-{m.quote}",
        "baseCurrency": m.base, "quoteCurrency": m.quote, "feeCurrency": m.quote,
        "market": "USDS" if m.quote in ("USDT", "USDC") else m.quote,
        "baseMinSize": "0.00001", "quoteMinSize": "0.1", "baseMaxSize": "10000000000",
        "quoteMaxSize": "99999999", "baseIncrement": "0.00000001", "quoteIncrement": tick,
        "priceIncrement": tick, "priceLimitRate": "0.1", "minFunds": "0.1",
        "isMarginEnabled": True, "enableTrading": True, "feeCategory": 1,
        "makerFeeCoefficient": "1.00", "takerFeeCoefficient": "1.00", "st": False,
        "callauctionIsEnabled": False,
    }


def symbols(ctx: Ctx) -> Reply:
    return ok([_symbol(m) for m in ctx.venue.markets()])


def all_tickers(ctx: Ctx) -> Reply:
    rows = []
    for m in ctx.venue.markets():
        last = num(f"{round(ctx.venue.history.price(m.id, ctx.now_ms), m.price_decimals):.8f}")
        rows.append({"symbol": f"{m.base}-{m.quote}", "symbolName": f"{m.base}-{m.quote}",
                     "buy": last, "sell": last, "changeRate": "0.0084", "changePrice": "0",
                     "high": last, "low": last, "vol": f"{m.base_volume * 1440:.8f}",
                     "volValue": "0", "last": last, "averagePrice": last,
                     "takerFeeRate": "0.001", "makerFeeRate": "0.001",
                     "takerCoefficient": "1", "makerCoefficient": "1"})
    return ok({"time": ctx.now_ms, "ticker": rows})


def contracts(ctx: Ctx) -> Reply:
    q = quarterly_expiry(ctx.now_ms)

    def contract(symbol: str, base: str, settle: str, inverse: bool, expire: int | None) -> dict:
        return {"symbol": symbol, "rootSymbol": settle, "type": "FFWCSX" if expire is None
                else "FFICSX", "firstOpenDate": 1_585_555_200_000, "expireDate": expire,
                "settleDate": expire, "baseCurrency": base, "quoteCurrency": "USD" if inverse
                else "USDT", "settleCurrency": settle, "maxOrderQty": 1000000,
                "maxPrice": 1000000.0, "lotSize": 1, "tickSize": 0.1,
                "indexPriceTickSize": 0.01, "multiplier": -1 if inverse else 0.001,
                "initialMargin": 0.008, "maintainMargin": 0.004, "maxRiskLimit": 100000,
                "minRiskLimit": 100000, "riskStep": 50000, "makerFeeRate": 0.0002,
                "takerFeeRate": 0.0006, "isDeleverage": True, "isQuanto": False,
                "isInverse": inverse, "markMethod": "FairPrice", "status": "Open",
                "nextFundingRateTime": None if expire else 25_481_884, "maxLeverage": 125}

    return ok([contract("XBTUSDTM", "XBT", "USDT", False, None),
               contract("ETHUSDTM", "ETH", "USDT", False, None),
               contract("XBTUSDM", "XBT", "XBT", True, None),
               contract(f"XBTM{month_code(q)}", "XBT", "XBT", True, q)])


# ----------------------------------------------------------------------------- candles
def candles(params: Mapping[str, str], ctx: Ctx) -> Reply:
    symbol = params.get("symbol", "")
    interval = TYPES.get(params.get("type", ""))
    if not symbol or interval is None:
        return error(400, "400100", "Parameter error: symbol and type are required")
    try:
        start, end = int_param(params, "startAt"), int_param(params, "endAt")
    except ValueError:
        return error(400, "400100", "Parameter error: startAt/endAt")
    m = ctx.venue.lookup(symbol)
    if m is None:
        return unknown_symbol()
    poison = ctx.poison(m)
    if poison in (PoisonKind.BAD_SYMBOL, PoisonKind.BAD_SYMBOL_200):
        r = unknown_symbol(200 if poison is PoisonKind.BAD_SYMBOL_200 else 400)
        r.poisoned = True
        return r
    rows = []
    if poison is not PoisonKind.EMPTY:
        lo = None if not start else start * 1000
        hi = None if not end else end * 1000 - 1
        got = ctx.venue.history.select(m.id, interval, ctx.now_ms, lo=lo, hi=hi,
                                       limit=ctx.caps["candles"], newest=True,
                                       omit_empty=ctx.omit_empty)
        rows = [[str(c.open_time // 1000), num(c.open), num(c.close), num(c.high), num(c.low),
                 num(c.volume), num(c.quote_volume)]
                for c in reversed(poison_rows(poison, got))]
    r = ok(rows)
    r.poisoned = poison is not None
    return r


def unknown_symbol(status: int = 400) -> Reply:
    return error(status, "400100", "This pair is not provided at present")


class KucoinDialect(Dialect):
    name = "kucoin"
    ccxt_id = "kucoin"
    omit_empty = True
    page_caps: ClassVar[dict[str, int]] = {"candles": 1500}
    listing_kinds = ("spot", "tickers", "contract", "currencies")

    def market_id(self, m: Market) -> str:
        return f"{m.base}-{m.quote}"

    def route(self, path: str, params: Mapping[str, str], ctx: Ctx) -> Reply:
        if path == PATH_CANDLES:
            return candles(params, ctx)
        if path == PATH_SYMBOLS:
            return symbols(ctx)
        if path == PATH_TICKERS:
            return all_tickers(ctx)
        if path == PATH_CURRENCIES:
            return currencies(ctx)
        if path == PATH_CONTRACTS:
            return contracts(ctx)
        if path == PATH_TIME:
            return json_reply(200, {"code": "200000", "msg": "success", "data": ctx.now_ms})
        if path == PATH_STATUS:
            return ok({"status": "open", "msg": ""})
        return error(404, "404000", "Not Found")

    def listing_kind(self, path: str, params: Mapping[str, str]) -> str | None:
        return _LISTINGS.get(path)

    def limits(self, path: str) -> tuple[Charge, ...]:
        if path == PATH_CONTRACTS:
            return ()  # the futures host has a pool of its own
        return ((POOL, _WEIGHTS.get(path, 1)),)

    def headers(self, path: str, ctx: Ctx) -> dict[str, str]:
        used_f, reset = self.meters.usage(POOL, ctx.now_ms)
        used = int(used_f)
        return {"gw-ratelimit-limit": str(PUBLIC_POOL),
                "gw-ratelimit-remaining": str(max(0, PUBLIC_POOL - used)),
                "gw-ratelimit-reset": str(reset - ctx.now_ms)}

    def rate_limited(self, retry_after_s: int, ctx: Ctx) -> Reply:
        r = error(429, "429000", "Too many requests. System-level rate limit exceeded.")
        r.headers.update({"gw-ratelimit-remaining": "0",
                          "gw-ratelimit-reset": str(retry_after_s * 1000)})
        return r

    def server_error(self, status: int, ctx: Ctx) -> Reply:
        if status == 500:
            return error(500, "500000", "Internal Server Error")
        return gateway_page(status)

    def unknown_symbol(self, ctx: Ctx, status: int | None = None) -> Reply:
        return unknown_symbol(400 if status is None else status)
