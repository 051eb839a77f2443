"""Kraken spot public REST: Assets, AssetPairs, OHLC, Time, SystemStatus.

What ccxt 4.5.90 calls: `load_markets` -> GET /0/public/Assets (fetchCurrencies, public) then
/0/public/AssetPairs; `fetch_ohlcv` -> GET /0/public/OHLC?pair=<id>&interval=<minutes>
[&since=<seconds> = since/1000 - one interval]; no limit parameter (ccxt trims client-side).

OHLC semantics (Kraken docs): only the last 720 bars of any interval exist, the last one in
progress and always present; `since` returns the bars *after* it (an older `since` just
returns all 720); rows ascending; `last` is the open (s) of the last committed bar. Bars
without trades are left out. Errors: HTTP 200 {"error": ["<Class>:<message>"]}.

Ids as ccxt expects them: legacy assets carry X/Z prefixes (XXBT, XETH, ZUSD), so BTC/USD is
"XXBTZUSD" and ETH/BTC "XETHXXBT"; pairs with a newer asset use the altname ("XBTUSDT",
"SOLUSD"). The altname is accepted as an alias.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, ClassVar

from ..faults import PoisonKind
from ..history import Candle, Market
from ..limits import Charge, Limit
from ..reply import Reply, gateway_page, json_reply
from .base import Ctx, Dialect, current_open, int_param, interval_ms, poison_rows

PREFIX = "/0/public"
PATH_TIME = PREFIX + "/Time"
PATH_STATUS = PREFIX + "/SystemStatus"
PATH_ASSETS = PREFIX + "/Assets"
PATH_PAIRS = PREFIX + "/AssetPairs"
PATH_OHLC = PREFIX + "/OHLC"

#: minutes -> interval (21600, "15 days", is not modelled)
INTERVALS = {1: "1m", 5: "5m", 15: "15m", 30: "30m", 60: "1h", 240: "4h", 1440: "1d",
             10080: "1w"}
REACH = 720  # bars per interval Kraken keeps, the in-progress one included
_LEGACY = {"BTC": "XXBT", "ETH": "XETH", "XRP": "XXRP", "LTC": "XLTC", "XLM": "XXLM",
           "DOGE": "XXDG", "XMR": "XXMR", "ZEC": "XZEC", "ETC": "XETC", "MLN": "XMLN",
           "REP": "XREP", "USD": "ZUSD", "EUR": "ZEUR", "GBP": "ZGBP", "JPY": "ZJPY",
           "CAD": "ZCAD", "AUD": "ZAUD"}
_ALT = {"BTC": "XBT", "DOGE": "XDG"}


def asset_id(code: str) -> str:
    return _LEGACY.get(code, code)


def alt_code(code: str) -> str:
    return _ALT.get(code, code)


def pair_id(m: Market) -> str:
    if m.base in _LEGACY and m.quote in _LEGACY:
        return asset_id(m.base) + asset_id(m.quote)
    return alt_code(m.base) + alt_code(m.quote)


def altname(m: Market) -> str:
    return alt_code(m.base) + alt_code(m.quote)


def ok(result: object) -> Reply:
    return json_reply(200, {"error": [], "result": result})


def error(message: str, status: int = 200) -> Reply:
    return json_reply(status, {"error": [message]})


def server_time(now_ms: int) -> Reply:
    s = now_ms // 1000
    return ok({"unixtime": s, "rfc1123": time.strftime("%a, %d %b %y %H:%M:%S +0000",
                                                       time.gmtime(s))})


def system_status(now_ms: int) -> Reply:
    return ok({"status": "online",
               "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now_ms // 1000))})


# --------------------------------------------------------------------- assets and pairs
def assets(ctx: Ctx) -> Reply:
    result: dict[str, Any] = {}
    for m in ctx.venue.markets():
        for code in (m.base, m.quote):
            result.setdefault(asset_id(code), {
                "aclass": "currency", "altname": alt_code(code),
                "decimals": 10 if code in ("BTC", "ETH") else 8, "display_decimals": 5,
                "collateral_value": 1.0, "status": "enabled"})
    return ok(result)


def _pair(m: Market) -> dict:
    d = m.price_decimals
    return {
        "altname": altname(m), "wsname": f"{alt_code(m.base)}/{alt_code(m.quote)}",
        "aclass_base": "currency", "base": asset_id(m.base), "aclass_quote": "currency",
        "quote": asset_id(m.quote), "lot": "unit", "cost_decimals": 5, "pair_decimals": d,
        "lot_decimals": 8, "lot_multiplier": 1, "leverage_buy": [], "leverage_sell": [],
        "fees": [[0, 0.4], [10000, 0.35], [50000, 0.24], [100000, 0.22]],
        "fees_maker": [[0, 0.25], [10000, 0.2], [50000, 0.14], [100000, 0.12]],
        "fee_volume_currency": "ZUSD", "margin_call": 80, "margin_stop": 40,
        "ordermin": "0.0001", "costmin": "0.5", "tick_size": f"{10.0 ** -d:.{d}f}",
        "status": "online",
    }


def asset_pairs(params: Mapping[str, str], ctx: Ctx) -> Reply:
    markets = ctx.venue.markets()
    wanted = params.get("pair")
    if wanted:
        picked = []
        for key in wanted.split(","):
            m = ctx.venue.lookup(key)
            if m is None:
                return error("EQuery:Unknown asset pair")
            picked.append(m)
        markets = tuple(picked)
    return ok({pair_id(m): _pair(m) for m in markets})


# ---------------------------------------------------------------------------------- OHLC
def _row(c: Candle, m: Market) -> list:
    d = m.price_decimals

    def px(s: str | None) -> str | None:
        return None if s is None else f"{float(s):.{d}f}"

    vol = None if c.volume is None else float(c.volume)
    vwap = None if c.quote_volume is None or not vol else px(str(float(c.quote_volume) / vol))
    if vwap is None and c.open is not None:
        vwap = px(c.open)
    return [c.open_time // 1000, px(c.open), px(c.high), px(c.low), px(c.close), vwap,
            None if c.volume is None else f"{vol:.8f}", c.trades]


def ohlc(params: Mapping[str, str], ctx: Ctx) -> Reply:
    try:
        minutes = int_param(params, "interval")
        since = int_param(params, "since")
    except ValueError:
        return error("EGeneral:Invalid arguments")
    interval = INTERVALS.get(1 if minutes is None else minutes)
    if interval is None:
        return error("EGeneral:Invalid arguments")
    m = ctx.venue.lookup(params.get("pair", ""))
    if m is None:
        return error("EQuery:Unknown asset pair")
    poison = ctx.poison(m)
    if poison in (PoisonKind.BAD_SYMBOL, PoisonKind.BAD_SYMBOL_200):
        r = error("EQuery:Unknown asset pair")
        r.poisoned = True
        return r
    ms = interval_ms(interval)
    cur = current_open(ctx.now_ms, interval)
    lo = cur - (REACH - 1) * ms
    if since is not None:
        lo = max(lo, since * 1000 + 1)  # bars strictly after `since`
    rows: list = []
    if poison is not PoisonKind.EMPTY:
        got = ctx.venue.history.select(m.id, interval, ctx.now_ms, lo=lo,
                                       limit=ctx.caps["OHLC"], omit_empty=ctx.omit_empty)
        if since is not None and not any(c.open_time == cur for c in got):
            # the in-progress bar is always the last entry, whatever `since` says
            got += ctx.venue.history.select(m.id, interval, ctx.now_ms, lo=cur, limit=1,
                                            omit_empty=ctx.omit_empty)
        rows = [_row(c, m) for c in poison_rows(poison, got)]
    r = ok({pair_id(m): rows, "last": (cur - ms) // 1000})
    r.poisoned = poison is not None
    return r


#: Kraken publishes no hard figure for its public endpoints ("about one call a second", per IP):
#: modelled as at most one request in any second.
PUBLIC = Limit("public", 1, 1_000, sliding=True)


class KrakenDialect(Dialect):
    name = "kraken"
    ccxt_id = "kraken"
    omit_empty = True  # Kraken leaves intervals without trades out
    page_caps: ClassVar[dict[str, int]] = {"OHLC": REACH}
    listing_kinds = ("spot", "currencies")

    def market_id(self, m: Market) -> str:
        return pair_id(m)

    def aliases(self, m: Market) -> tuple[str, ...]:
        return (altname(m),)

    def route(self, path: str, params: Mapping[str, str], ctx: Ctx) -> Reply:
        if path == PATH_OHLC:
            return ohlc(params, ctx)
        if path == PATH_PAIRS:
            return asset_pairs(params, ctx)
        if path == PATH_ASSETS:
            return assets(ctx)
        if path == PATH_TIME:
            return server_time(ctx.now_ms)
        if path == PATH_STATUS:
            return system_status(ctx.now_ms)
        return error("EGeneral:Unknown method", 404)

    def limits(self, path: str) -> tuple[Charge, ...]:
        return ((PUBLIC, 1),)

    def listing_kind(self, path: str, params: Mapping[str, str]) -> str | None:
        return {PATH_PAIRS: "spot", PATH_ASSETS: "currencies"}.get(path)

    def rate_limited(self, retry_after_s: int, ctx: Ctx) -> Reply:
        return error("EAPI:Rate limit exceeded")

    def banned(self, retry_after_s: int, until_ms: int, ctx: Ctx) -> Reply:
        return error("EGeneral:Temporary lockout")

    def server_error(self, status: int, ctx: Ctx) -> Reply:
        if status == 500:
            return error("EGeneral:Internal error", 500)
        if status == 503:
            return error("EService:Unavailable", 503)
        return gateway_page(status)  # Cloudflare's pages for 502/504

    def unknown_symbol(self, ctx: Ctx, status: int | None = None) -> Reply:
        return error("EQuery:Unknown asset pair", 200 if status is None else status)

    def reachable_from(self, venue: Any, symbol: str, interval: str, at_ms: int) -> int:
        reach = current_open(at_ms, interval) - (REACH - 1) * interval_ms(interval)
        return max(reach, venue.history.first_open(interval, symbol))
