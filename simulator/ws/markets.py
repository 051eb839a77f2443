"""The one public REST route each exchange's ccxt `load_markets()` needs, spot only.

ccxt.pro clients load markets over REST before their first `watch_*`. A `WsSimulator` serves
the listing route of its own exchange (on the same port) so a test needs no REST simulator;
when one exists for the exchange, point ccxt's REST URLs at it instead. With the options of
`simulator.ws.ccxt_pro.SPOT_OPTIONS`, `load_markets()` makes exactly one request:

- binance: GET /api/v3/exchangeInfo (the REST simulator's own body)
- okx: GET /api/v5/public/instruments?instType=SPOT
- bybit: GET /v5/market/instruments-info?category=spot
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from .. import binance as binance_rest
from ..history import CandleHistory, Market
from .dialects.okx import inst_id


def _okx_row(m: Market) -> dict:
    tick = f"{10.0 ** -m.price_decimals:.{m.price_decimals}f}" if m.price_decimals else "1"
    return {
        "instType": "SPOT", "instId": inst_id(m), "uly": "", "instFamily": "",
        "baseCcy": m.base, "quoteCcy": m.quote, "settleCcy": "", "ctVal": "", "ctMult": "",
        "ctValCcy": "", "optType": "", "stk": "", "listTime": "1548133413000", "expTime": "",
        "lever": "", "tickSz": tick, "lotSz": "0.00000001", "minSz": "0.00001",
        "ctType": "", "alias": "", "state": "live", "ruleType": "normal",
        "maxLmtSz": "9999999999", "maxMktSz": "1000000", "maxLmtAmt": "20000000",
        "maxMktAmt": "1000000", "maxTwapSz": "9999999999", "maxIcebergSz": "9999999999",
        "maxTriggerSz": "9999999999", "maxStopSz": "1000000",
    }


def _bybit_row(m: Market) -> dict:
    return {
        "symbol": m.id, "baseCoin": m.base, "quoteCoin": m.quote, "innovation": "0",
        "status": "Trading", "marginTrading": "none",
        "lotSizeFilter": {"basePrecision": "0.000001", "quotePrecision": "0.00000001",
                          "minOrderQty": "0.000048", "maxOrderQty": "71.73956243",
                          "minOrderAmt": "1", "maxOrderAmt": "2000000"},
        "priceFilter": {"tickSize": m.tick_size.rstrip("0").rstrip(".") or "1"},
    }


def market_routes(exchange: str, history: CandleHistory,
                  now_ms: Callable[[], int]) -> list[web.RouteDef]:
    """aiohttp routes listing `history`'s markets in `exchange`'s REST dialect."""
    if exchange == "binance":
        info = binance_rest.ExchangeInfo(history)

        async def exchange_info(request: web.Request) -> web.Response:
            reply = info.reply(request.query, now_ms())
            return web.Response(status=reply.status, body=reply.body,
                                content_type="application/json")
        return [web.get(binance_rest.PATH_EXCHANGE_INFO, exchange_info)]
    if exchange == "okx":
        async def instruments(request: web.Request) -> web.Response:
            rows = ([_okx_row(m) for m in history.markets]
                    if request.query.get("instType") == "SPOT" else [])
            return web.json_response({"code": "0", "msg": "", "data": rows})
        return [web.get("/api/v5/public/instruments", instruments)]
    if exchange == "bybit":
        async def instruments_info(request: web.Request) -> web.Response:
            rows = ([_bybit_row(m) for m in history.markets]
                    if request.query.get("category") == "spot" else [])
            return web.json_response({
                "retCode": 0, "retMsg": "OK",
                "result": {"category": request.query.get("category", ""), "list": rows,
                           "nextPageCursor": ""},
                "retExtInfo": {}, "time": now_ms()})
        return [web.get("/v5/market/instruments-info", instruments_info)]
    raise ValueError(f"no market listing for {exchange!r}")
