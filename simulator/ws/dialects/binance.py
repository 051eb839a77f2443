"""Binance spot market streams (wss://stream.binance.com:9443), kline streams only.

What ccxt.pro 4.5.90 does: connects to `urls['api']['ws']['spot'] + '/' + streamIndex`
(`.../ws/0`: a raw-stream URL whose name is no stream, so nothing is subscribed by the URL),
then sends `{"method":"SUBSCRIBE","params":["btcusdt@kline_1m",...],"id":N}` and expects
`{"result":null,"id":N}`. Pushes on /ws are raw payloads; on /stream they are wrapped as
`{"stream":name,"data":payload}` (ccxt unwraps both). Keepalive is protocol-level: the server
pings every 20 s and drops a client that has not ponged for a minute; ccxt pings every 180 s.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

from ...history import BINANCE_INTERVALS, Candle, CandleHistory, Market
from .base import Op, Refusal, Request, Resolved, Rules, SessionView, StreamKey, Topic, dumps, utc_align

_METHODS = {
    "SUBSCRIBE": Op.SUBSCRIBE, "UNSUBSCRIBE": Op.UNSUBSCRIBE, "LIST_SUBSCRIPTIONS": Op.LIST,
    "SET_PROPERTY": Op.SET_PROPERTY, "GET_PROPERTY": Op.GET_PROPERTY,
}
_STREAM = re.compile(r"^([a-z0-9]+)@kline_([0-9]+[smhdwM])$")
#: Binance kline intervals the simulator can serve (3d and 1M are not modelled by history).
_INTERVALS = BINANCE_INTERVALS

#: Error words. Code 2 "Invalid request: invalid stream" is what Binance sends for a bad
#: stream (ccxt quotes it in handle_ws_error); the too-many-streams reply is undocumented,
#: the simulator reuses code 2 with its own words.
_REFUSAL_MSG = {
    Refusal.BAD_ARG: "Invalid request: invalid stream",
    Refusal.UNKNOWN_SYMBOL: "Invalid request: invalid stream",
    Refusal.INJECTED: "Invalid request: invalid stream",
    Refusal.TOO_MANY_STREAMS: "Invalid request: too many streams (max 1024 per connection)",
    Refusal.TOO_MANY_ARGS: "Invalid request: too many parameters",
}


class BinanceDialect:
    """Binance spot kline streams; see the module docstring."""

    name = "binance"
    ws_routes: Sequence[str] = ("/ws", "/ws/{name}", "/stream")
    atomic_subscribe = True
    rules = Rules(
        update_period_s=2.0,  # "Update Speed: 1000ms for 1s, 2000ms for the other intervals"
        server_ping_s=20.0, pong_timeout_s=60.0,
        idle_close_s=None,
        max_age_s=86_400.0,  # "A single connection ... is only valid for 24 hours"
        max_streams_per_connection=1024,
        max_args_per_request=None,
        max_incoming_per_s=5,  # "limit of 5 incoming messages per second"; over it: close
        max_connections_per_window=(300, 300.0),  # 300 connection attempts per 5 minutes
    )

    def parse(self, text: str) -> Request:
        try:
            msg = json.loads(text)
        except ValueError as e:
            return Request(Op.INVALID, None, (), f"Invalid JSON: {e}")
        if not isinstance(msg, dict):
            return Request(Op.INVALID, None, (), "Invalid request: expected an object")
        req_id = msg.get("id")
        op = _METHODS.get(str(msg.get("method")))
        if op is None:
            return Request(Op.INVALID, req_id, (),
                           f"Invalid request: unknown variant {msg.get('method')!r}, expected one "
                           "of SUBSCRIBE, UNSUBSCRIBE, LIST_SUBSCRIPTIONS, SET_PROPERTY, "
                           "GET_PROPERTY")
        if req_id is not None and (not isinstance(req_id, int) or isinstance(req_id, bool)):
            return Request(Op.INVALID, None, (),
                           "Invalid request: request ID must be an unsigned integer")
        params = msg.get("params", [])
        if not isinstance(params, list):
            return Request(Op.INVALID, req_id, (), "Invalid request: params must be an array")
        return Request(op, req_id, tuple(params))

    def initial_topics(self, path: str, query: Mapping[str, str],
                       history: CandleHistory) -> tuple[list[Topic], bool]:
        if path.startswith("/stream"):
            names = [n for n in query.get("streams", "").split("/") if n]
            return [t for t in (self.resolve(n, history).topic for n in names) if t], True
        name = path[len("/ws/"):] if path.startswith("/ws/") else ""
        topic = self.resolve(name, history).topic if name else None
        return ([topic] if topic else []), False

    def resolve(self, arg: object, history: CandleHistory) -> Resolved:
        m = _STREAM.match(arg) if isinstance(arg, str) else None
        if m is None or m.group(2) not in _INTERVALS:
            return Resolved(arg, None, Refusal.BAD_ARG)
        market = history.market(m.group(1).upper())
        # Binance accepts any well-formed stream and pushes nothing for an unknown symbol;
        # the topic is kept (it counts towards the stream limit) but never resolves a market.
        symbol_id = market.id if market else m.group(1).upper()
        return Resolved(arg, Topic(str(arg), StreamKey(symbol_id, m.group(2)), arg))

    def align(self, topic: Topic) -> tuple[int, int]:
        return utc_align(topic.key.interval)

    def acks(self, req: Request, accepted: Sequence[Topic], refused: Sequence[Resolved],
             view: SessionView) -> list[str]:
        if refused:  # Binance refuses the whole request
            return [self._error(2, _REFUSAL_MSG[refused[0].refusal or Refusal.BAD_ARG],
                                req.req_id)]
        return [dumps({"result": None, "id": req.req_id})]

    def reply(self, req: Request, view: SessionView) -> list[str]:
        if req.op is Op.LIST:
            return [dumps({"result": list(view.topics), "id": req.req_id})]
        if req.op is Op.GET_PROPERTY:
            if list(req.args) == ["combined"]:
                return [dumps({"result": view.combined, "id": req.req_id})]
            return [self._error(0, "Unknown property", req.req_id)]
        if req.op is Op.SET_PROPERTY:
            args = list(req.args)
            if len(args) == 2 and args[0] == "combined" and isinstance(args[1], bool):
                view.combined = args[1]
                return [dumps({"result": None, "id": req.req_id})]
            if args and args[0] != "combined":
                return [self._error(0, "Unknown property", req.req_id)]
            return [self._error(1, "Invalid value type: expected Boolean", req.req_id)]
        code = 3 if req.error.startswith("Invalid JSON") else 2
        return [self._error(code, req.error, req.req_id)]

    def push(self, topic: Topic, market: Market, candle: Candle, closed: bool, now_ms: int,
             view: SessionView, flag: bool = True) -> str:
        first = candle.open_time // 1000 * 7 + 1  # any increasing trade-id stand-in
        kline: dict[str, object]
        payload = {
            "e": "kline", "E": now_ms, "s": market.id,
            "k": (kline := {
                "t": candle.open_time, "T": candle.close_time, "s": market.id,
                "i": topic.key.interval,
                "f": first if candle.trades else -1,
                "L": first + candle.trades - 1 if candle.trades else -1,
                "o": candle.open, "c": candle.close, "h": candle.high, "l": candle.low,
                "v": candle.volume, "n": candle.trades, "x": closed, "q": candle.quote_volume,
                "V": candle.taker_base, "Q": candle.taker_quote, "B": "0",
            }),
        }
        if not flag:
            del kline["x"]
        if view.combined:
            return dumps({"stream": topic.name, "data": payload})
        return dumps(payload)

    def expiry_notice(self, now_ms: int, view: SessionView) -> list[str]:
        return []  # Binance just closes at the 24 h mark

    def over_rate(self, view: SessionView) -> tuple[list[str], int | None]:
        return [], 1008  # policy violation, "Too many requests"

    @staticmethod
    def _error(code: int, msg: str, req_id: object) -> str:
        return dumps({"error": {"code": code, "msg": msg}, "id": req_id})
