"""OKX v5 public REST: instruments, candles, history-candles, server time.

What ccxt 4.5.90 calls: `load_markets` -> GET /api/v5/public/instruments?instType=SPOT, FUTURES,
SWAP, and OPTION once per underlying (uly=BTC-USD, ETH-USD); `fetch_ohlcv` -> GET
/api/v5/market/candles, or /market/history-candles when `since` is older than 1439 bars by
ccxt's *own* clock, with `before=since-1`, `after=since+limit*bar`, `limit<=300`.

Window semantics (OKX docs): `after` = rows with ts < after, `before` = rows with ts > before;
rows newest first, and when more qualify the newest `limit` are sent. /market/candles reaches
back only 1440 bars (in-progress one included, `confirm` "0"); /market/history-candles has all
of history but only closed bars. Errors come as {"code": "5xxxx", "msg": ..., "data": []}.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from ..faults import PoisonKind
from ..history import Market
from ..limits import Charge, Limit
from ..reply import Reply, gateway_page, json_reply
from .base import Ctx, Dialect, current_open, int_param, interval_ms, num, poison_rows
from .derivatives import quarterly_expiry, weekly_expiry, yymmdd

PREFIX = "/api/v5"
PATH_TIME = PREFIX + "/public/time"
PATH_INSTRUMENTS = PREFIX + "/public/instruments"
PATH_CANDLES = PREFIX + "/market/candles"
PATH_HISTORY_CANDLES = PREFIX + "/market/history-candles"

#: OKX `bar` -> interval. ccxt appends "utc" to bars >= 6h (UTC-aligned); plain 6H/12H/1D/1W
#: are aligned to Hong Kong time and are not modelled (answered with 51000).
BARS = {"1m": "1m", "3m": "3m", "5m": "5m", "15m": "15m", "30m": "30m", "1H": "1h", "2H": "2h",
        "4H": "4h", "6Hutc": "6h", "12Hutc": "12h", "1Dutc": "1d", "1Wutc": "1w"}
RECENT_REACH = 1440  # /market/candles: "the latest 1,440 data entries"
DEFAULT_LIMIT = 100
_INST_TYPES = {"SPOT": "spot", "FUTURES": "future", "SWAP": "swap", "OPTION": "option"}


def error(status: int, code: str, msg: str) -> Reply:
    return json_reply(status, {"code": code, "data": [], "msg": msg})


def server_time(now_ms: int) -> Reply:
    return json_reply(200, {"code": "0", "data": [{"ts": str(now_ms)}], "msg": ""})


# ------------------------------------------------------------------------ instruments
def _spot(m: Market, listed_ms: int) -> dict:
    tick = num(f"{10.0 ** -m.price_decimals:.8f}")
    return {
        "alias": "", "auctionEndTime": "", "baseCcy": m.base, "category": "1", "ctMult": "",
        "ctType": "", "ctVal": "", "ctValCcy": "", "contTdSwTime": "", "expTime": "",
        "futureSettlement": False, "instFamily": "", "instId": f"{m.base}-{m.quote}",
        "instType": "SPOT", "lever": "10", "listTime": str(listed_ms), "lotSz": "0.00000001",
        "maxIcebergSz": "9999999999.0000000000000000", "maxLmtAmt": "20000000",
        "maxLmtSz": "9999999999", "maxMktAmt": "1000000", "maxMktSz": "1000000",
        "maxStopSz": "1000000", "maxTriggerSz": "9999999999.0000000000000000",
        "maxTwapSz": "9999999999.0000000000000000", "minSz": "0.00001", "optType": "",
        "openType": "call_auction", "quoteCcy": m.quote, "ruleType": "normal", "settleCcy": "",
        "state": "live", "stk": "", "tickSz": tick, "uly": "",
    }


def _contract(inst_id: str, inst_type: str, uly: str, settle: str, ct_type: str, ct_val: str,
              ct_val_ccy: str, exp_ms: int | None, listed_ms: int, **extra: str) -> dict:
    entry = {
        "alias": extra.pop("alias", ""), "baseCcy": "", "category": "1", "ctMult": "1",
        "ctType": ct_type, "ctVal": ct_val, "ctValCcy": ct_val_ccy,
        "expTime": "" if exp_ms is None else str(exp_ms), "instFamily": uly,
        "instId": inst_id, "instType": inst_type, "lever": "100", "listTime": str(listed_ms),
        "lotSz": "1", "maxLmtSz": "100000000", "maxMktSz": "5000", "minSz": "1",
        "optType": "", "quoteCcy": "", "settleCcy": settle, "state": "live", "stk": "",
        "tickSz": "0.1", "uly": uly,
    }
    entry.update(extra)
    return entry


def _derivatives(kind: str, uly: str | None, now_ms: int, listed_ms: int) -> list[dict]:
    if kind == "SWAP":
        return [_contract("BTC-USDT-SWAP", kind, "BTC-USDT", "USDT", "linear", "0.01", "BTC",
                          None, listed_ms),
                _contract("ETH-USDT-SWAP", kind, "ETH-USDT", "USDT", "linear", "0.1", "ETH",
                          None, listed_ms),
                _contract("BTC-USD-SWAP", kind, "BTC-USD", "BTC", "inverse", "100", "USD",
                          None, listed_ms)]
    if kind == "FUTURES":
        week, quarter = weekly_expiry(now_ms), quarterly_expiry(now_ms)
        return [_contract(f"BTC-USD-{yymmdd(week)}", kind, "BTC-USD", "BTC", "inverse", "100",
                          "USD", week, listed_ms, alias="this_week"),
                _contract(f"BTC-USDT-{yymmdd(quarter)}", kind, "BTC-USDT", "USDT", "linear",
                          "0.01", "BTC", quarter, listed_ms, alias="quarter")]
    if kind == "OPTION":
        strikes = {"BTC-USD": ("90000", "100000"), "ETH-USD": ("3000", "3500")}.get(uly or "")
        if strikes is None:
            return []
        base = (uly or "").split("-")[0]
        exp = weekly_expiry(now_ms)
        return [_contract(f"{uly}-{yymmdd(exp)}-{k}-{t}", kind, uly or "", base, "", "0.01",
                          base, exp, listed_ms, optType=t, stk=k)
                for k in strikes for t in ("C", "P")]
    return []


def instruments(params: Mapping[str, str], ctx: Ctx) -> Reply:
    inst_type = params.get("instType", "")
    if not inst_type:
        return error(400, "50014", "Parameter instType can not be empty.")
    if inst_type not in _INST_TYPES:
        return error(400, "51000", "Parameter instType error")
    history = ctx.venue.history
    if inst_type == "SPOT":
        data = [_spot(m, history.start_ms(m.id)) for m in ctx.venue.markets()]
    else:
        if inst_type == "OPTION" and not (params.get("uly") or params.get("instFamily")):
            return error(400, "50015", "Either parameter uly or instFamily is required.")
        data = _derivatives(inst_type, params.get("uly") or params.get("instFamily"),
                            ctx.now_ms, history.history_start_ms)
    inst_id = params.get("instId")
    if inst_id:
        data = [d for d in data if d["instId"] == inst_id]
    return json_reply(200, {"code": "0", "data": data, "msg": ""})


# ----------------------------------------------------------------------------- candles
def candles(params: Mapping[str, str], ctx: Ctx, history_endpoint: bool) -> Reply:
    """GET /market/candles or /market/history-candles."""
    inst_id = params.get("instId", "")
    if not inst_id:
        return error(400, "50014", "Parameter instId can not be empty.")
    interval = BARS.get(params.get("bar") or "1m")
    if interval is None:
        return error(400, "51000", "Parameter bar error")
    parsed: dict[str, int | None] = {}
    for name in ("after", "before", "limit"):
        try:
            parsed[name] = int_param(params, name)
        except ValueError:
            return error(400, "51000", f"Parameter {name} error")
    m = ctx.venue.lookup(inst_id)
    if m is None:
        return unknown_symbol()
    cap = ctx.caps["history-candles" if history_endpoint else "candles"]
    limit = parsed["limit"]
    limit = DEFAULT_LIMIT if limit is None else max(1, min(limit, cap))
    poison = ctx.poison(m)
    if poison in (PoisonKind.BAD_SYMBOL, PoisonKind.BAD_SYMBOL_200):
        r = unknown_symbol()
        r.poisoned = True
        return r
    after, before = parsed["after"], parsed["before"]
    lo = None if before is None else before + 1
    if not history_endpoint:  # only the latest 1440 bars
        reach = current_open(ctx.now_ms, interval) - (RECENT_REACH - 1) * interval_ms(interval)
        lo = reach if lo is None else max(lo, reach)
    hi = None if after is None else after - 1
    rows = []
    if poison is not PoisonKind.EMPTY:
        got = ctx.venue.history.select(m.id, interval, ctx.now_ms, lo=lo, hi=hi, limit=limit,
                                       newest=True, omit_empty=ctx.omit_empty,
                                       closed_only=history_endpoint)
        ms = interval_ms(interval)
        for c in reversed(poison_rows(poison, got)):
            confirm = "1" if c.open_time + ms <= ctx.now_ms else "0"
            quote = num(c.quote_volume)
            rows.append([str(c.open_time), num(c.open), num(c.high), num(c.low), num(c.close),
                         num(c.volume), quote, quote, confirm])
    r = json_reply(200, {"code": "0", "msg": "", "data": rows})
    r.poisoned = poison is not None
    return r


def unknown_symbol(status: int = 200) -> Reply:
    return error(status, "51001", "Instrument ID does not exist")


#: The documented limits: per endpoint and IP, requests per 2 s.
LIMITS: dict[str, Limit] = {
    PATH_CANDLES: Limit("candles", 40, 2_000, sliding=True),
    PATH_HISTORY_CANDLES: Limit("history-candles", 20, 2_000, sliding=True),
    PATH_INSTRUMENTS: Limit("instruments", 20, 2_000, sliding=True),
    PATH_TIME: Limit("time", 10, 2_000, sliding=True),
}


class OkxDialect(Dialect):
    name = "okx"
    ccxt_id = "okx"
    omit_empty = False  # modelled as continuous (flat zero-volume rows), like Binance
    page_caps: ClassVar[dict[str, int]] = {"candles": 300, "history-candles": 300}
    listing_kinds = ("spot", "future", "swap", "option")

    def market_id(self, m: Market) -> str:
        return f"{m.base}-{m.quote}"

    def route(self, path: str, params: Mapping[str, str], ctx: Ctx) -> Reply:
        if path == PATH_CANDLES:
            return candles(params, ctx, history_endpoint=False)
        if path == PATH_HISTORY_CANDLES:
            return candles(params, ctx, history_endpoint=True)
        if path == PATH_INSTRUMENTS:
            return instruments(params, ctx)
        if path == PATH_TIME:
            return server_time(ctx.now_ms)
        return gateway_page(404)

    def limits(self, path: str) -> tuple[Charge, ...]:
        limit = LIMITS.get(path)
        return () if limit is None else ((limit, 1),)

    def listing_kind(self, path: str, params: Mapping[str, str]) -> str | None:
        if path != PATH_INSTRUMENTS:
            return None
        return _INST_TYPES.get(params.get("instType", ""))

    def rate_limited(self, retry_after_s: int, ctx: Ctx) -> Reply:
        return json_reply(429, {"msg": "Too Many Requests", "code": "50011"})

    def server_error(self, status: int, ctx: Ctx) -> Reply:
        if status == 500:
            return error(500, "50026", "System error. Try again later.")
        if status == 503:
            return error(503, "50001", "Service temporarily unavailable. Try again later")
        return gateway_page(status)

    def unknown_symbol(self, ctx: Ctx, status: int | None = None) -> Reply:
        return unknown_symbol(200 if status is None else status)
