"""Bybit v5 public kline topics on the spot stream (wss://stream.bybit.com/v5/public/spot).

What ccxt.pro 4.5.90 does: connects to `urls['api']['ws']['public']['spot']`, sends
`{"op":"subscribe","req_id":N,"args":["kline.1.BTCUSDT",...]}` (all new topics of one call in
one request, never chunked) and expects `{"success":true,"ret_msg":"subscribe","conn_id":...,
"req_id":"N","op":"subscribe"}`. Pushes are `{"topic":"kline.1.BTCUSDT","data":[{start, end,
interval, open, close, high, low, volume, turnover, confirm, timestamp}],"ts":...,
"type":"snapshot"}` with `confirm` false/true. Keepalive is JSON: ccxt sends
`{"req_id":N,"op":"ping"}` every 18 s; Bybit cuts connections silent (no ping, no data) for
10 minutes. A refusal carries the request's req_id, so ccxt rejects exactly that watch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

from ...history import Candle, CandleHistory, Market
from .base import Op, Refusal, Request, Resolved, Rules, SessionView, StreamKey, Topic, dumps, plain, utc_align

#: Bybit interval name -> history interval (Bybit has no 1s and no 8h; "M" is not modelled).
_INTERVALS: dict[str, str] = {
    "1": "1m", "3": "3m", "5": "5m", "15": "15m", "30": "30m", "60": "1h", "120": "2h",
    "240": "4h", "360": "6h", "720": "12h", "D": "1d", "W": "1w",
}
_TOPIC = re.compile(r"^kline\.([0-9]+|[DW])\.([A-Z0-9]+)$")
_REFUSAL_MSG = {
    Refusal.BAD_ARG: "Params Error",
    Refusal.UNKNOWN_SYMBOL: "Params Error",
    Refusal.INJECTED: "Params Error",
    Refusal.TOO_MANY_STREAMS: "Params Error",
    Refusal.TOO_MANY_ARGS: "args size >10",
}


class BybitDialect:
    """Bybit v5 spot kline topics; see the module docstring."""

    name = "bybit"
    ws_routes: Sequence[str] = ("/v5/public/spot",)
    atomic_subscribe = True
    rules = Rules(
        update_period_s=1.0,  # "Push frequency: 1-60s"
        server_ping_s=None, pong_timeout_s=None,
        idle_close_s=600.0,  # no ping-pong and no data for 10 minutes: cut off
        max_age_s=None,
        max_streams_per_connection=None,  # no per-connection topic limit documented
        max_args_per_request=10,  # spot: "up to 10 args for each subscription request"
        max_incoming_per_s=None,
        max_connections_per_window=(500, 300.0),  # "do not build over 500 connections in 5 min"
    )

    def parse(self, text: str) -> Request:
        try:
            msg = json.loads(text)
        except ValueError:
            return Request(Op.INVALID, None, (), "error:invalid op")
        if not isinstance(msg, dict):
            return Request(Op.INVALID, None, (), "error:invalid op")
        req_id = msg.get("req_id")
        op = {"subscribe": Op.SUBSCRIBE, "unsubscribe": Op.UNSUBSCRIBE,
              "ping": Op.PING}.get(str(msg.get("op")))
        if op is None:
            return Request(Op.INVALID, req_id, (), "error:invalid op")
        args = msg.get("args") or []
        if op is not Op.PING and (not isinstance(args, list) or not args):
            return Request(Op.INVALID, req_id, (), "Params Error")
        return Request(op, req_id, tuple(args) if isinstance(args, list) else ())

    def initial_topics(self, path: str, query: Mapping[str, str],
                       history: CandleHistory) -> tuple[list[Topic], bool]:
        return [], False

    def resolve(self, arg: object, history: CandleHistory) -> Resolved:
        m = _TOPIC.match(arg) if isinstance(arg, str) else None
        if m is None or m.group(1) not in _INTERVALS:
            return Resolved(arg, None, Refusal.BAD_ARG)
        market = history.market(m.group(2))
        if market is None or market.id != m.group(2):
            return Resolved(arg, None, Refusal.UNKNOWN_SYMBOL)
        return Resolved(arg, Topic(str(arg), StreamKey(market.id, _INTERVALS[m.group(1)]), arg))

    def align(self, topic: Topic) -> tuple[int, int]:
        return utc_align(topic.key.interval)

    def acks(self, req: Request, accepted: Sequence[Topic], refused: Sequence[Resolved],
             view: SessionView) -> list[str]:
        op = "subscribe" if req.op is Op.SUBSCRIBE else "unsubscribe"
        if refused:  # the whole request fails, naming nothing but the reason
            msg = _REFUSAL_MSG[refused[0].refusal or Refusal.BAD_ARG]
            return [self._answer(req, False, msg, op, view)]
        return [self._answer(req, True, op, op, view)]

    def reply(self, req: Request, view: SessionView) -> list[str]:
        if req.op is Op.PING:  # the spot stream's pong shape
            return [self._answer(req, True, "pong", "ping", view)]
        return [self._answer(req, False, req.error, "", view)]

    def push(self, topic: Topic, market: Market, candle: Candle, closed: bool, now_ms: int,
             view: SessionView, flag: bool = True) -> str:
        interval = topic.name.split(".")[1]
        data: dict[str, object] = {
            "start": candle.open_time, "end": candle.close_time, "interval": interval,
            "open": plain(candle.open), "close": plain(candle.close),
            "high": plain(candle.high), "low": plain(candle.low),
            "volume": plain(candle.volume), "turnover": plain(candle.quote_volume),
            "confirm": closed, "timestamp": now_ms,
        }
        if not flag:
            del data["confirm"]
        return dumps({"topic": topic.name, "data": [data], "ts": now_ms, "type": "snapshot"})

    def expiry_notice(self, now_ms: int, view: SessionView) -> list[str]:
        return []

    def over_rate(self, view: SessionView) -> tuple[list[str], int | None]:
        return [], 1008

    @staticmethod
    def _answer(req: Request, success: bool, ret_msg: str, op: str, view: SessionView) -> str:
        body: dict[str, object] = {"success": success, "ret_msg": ret_msg,
                                   "conn_id": view.conn_id}
        if req.req_id is not None:
            body["req_id"] = str(req.req_id)
        body["op"] = op
        return dumps(body)
