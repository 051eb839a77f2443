"""OKX v5 public candle channels on the business endpoint (wss://ws.okx.com:8443/ws/v5/business).

What ccxt.pro 4.5.90 does: every `candle*` channel goes to `urls['api']['ws'] + '/business'`;
it sends `{"op":"subscribe","args":[{"channel":"candle1m","instId":"BTC-USDT"}, ...]}` (no id)
and ignores the `{"event":"subscribe","arg":{...},"connId":...}` acks. Pushes are
`{"arg":{...},"data":[[ts,o,h,l,c,vol,volCcy,volCcyQuote,confirm]]}` with `confirm` "0"
(in progress) or "1" (closed). Keepalive is text: ccxt sends "ping" every 18 s, OKX answers
"pong" and drops connections that get nothing pushed for 30 s. An error event carries no id
for a subscribe, so ccxt rejects every pending watch on that connection.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from ...history import INTERVALS, Candle, CandleHistory, Market
from .base import Op, Refusal, Request, Resolved, Rules, SessionView, StreamKey, Topic, dumps, plain

#: OKX bar name -> history interval. 6H and longer open at Hong Kong midnight (UTC+8) unless
#: the "utc" variant is used; ccxt's timeframes map uses the HK ones ("1d" -> "1D").
_BARS: dict[str, str] = {
    "1s": "1s", "1m": "1m", "3m": "3m", "5m": "5m", "15m": "15m", "30m": "30m",
    "1H": "1h", "2H": "2h", "4H": "4h", "6H": "6h", "12H": "12h", "1D": "1d", "1W": "1w",
    "6Hutc": "6h", "12Hutc": "12h", "1Dutc": "1d", "1Wutc": "1w",
}
_HK_ALIGNED = frozenset({"6H", "12H", "1D", "1W"})
_HK_OFFSET_MS = 8 * 3_600_000

_ERRORS: dict[Refusal, tuple[str, str]] = {
    Refusal.BAD_ARG: ("60018", "Wrong URL or channel:{channel},instId:{instId} doesn't exist. "
                               "Please use the correct URL, channel and parameters referring "
                               "to API document."),
    Refusal.UNKNOWN_SYMBOL: ("60018", "Wrong URL or channel:{channel},instId:{instId} doesn't "
                                      "exist. Please use the correct URL, channel and "
                                      "parameters referring to API document."),
    Refusal.INJECTED: ("60018", "Wrong URL or channel:{channel},instId:{instId} doesn't exist. "
                                "Please use the correct URL, channel and parameters referring "
                                "to API document."),
    Refusal.TOO_MANY_STREAMS: ("60020", "Subscription amount exceeds the limit"),
    Refusal.TOO_MANY_ARGS: ("60013", "Invalid args"),
}


def inst_id(market: Market) -> str:
    """OKX spot instrument id: "BTC-USDT"."""
    return f"{market.base}-{market.quote}"


class OkxDialect:
    """OKX v5 candle channels; see the module docstring."""

    name = "okx"
    ws_routes: Sequence[str] = ("/ws/v5/business", "/ws/v5/public")
    atomic_subscribe = False
    rules = Rules(
        update_period_s=0.5,  # candle channels push at most every 500 ms
        server_ping_s=None, pong_timeout_s=None,
        idle_close_s=30.0,  # "connection will break ... if data has not been pushed for 30 s"
        max_age_s=None,
        max_streams_per_connection=None,  # none documented for public channels
        max_args_per_request=None,  # bounded by size (64 KB of args), not count
        max_incoming_per_s=None,  # 480 subscribe ops per hour per connection: not modelled
        max_connections_per_window=(3, 1.0),  # 3 connection requests per second per IP
    )

    def parse(self, text: str) -> Request:
        if text == "ping":
            return Request(Op.PING)
        try:
            msg = json.loads(text)
        except ValueError:
            return Request(Op.INVALID, None, (), text)
        if not isinstance(msg, dict):
            return Request(Op.INVALID, None, (), text)
        op = {"subscribe": Op.SUBSCRIBE, "unsubscribe": Op.UNSUBSCRIBE}.get(str(msg.get("op")))
        args = msg.get("args")
        if op is None or not isinstance(args, list) or not args:
            return Request(Op.INVALID, msg.get("id"), (), text)
        return Request(op, msg.get("id"), tuple(args))

    def initial_topics(self, path: str, query: Mapping[str, str],
                       history: CandleHistory) -> tuple[list[Topic], bool]:
        return [], False

    def resolve(self, arg: object, history: CandleHistory) -> Resolved:
        if not isinstance(arg, dict):
            return Resolved(arg, None, Refusal.BAD_ARG)
        channel, iid = arg.get("channel"), arg.get("instId")
        bar = channel[len("candle"):] if isinstance(channel, str) and channel.startswith(
            "candle") else None
        if bar not in _BARS or not isinstance(iid, str):
            return Resolved(arg, None, Refusal.BAD_ARG)
        market = history.market(iid.replace("-", ""))
        if market is None or inst_id(market) != iid:
            return Resolved(arg, None, Refusal.UNKNOWN_SYMBOL)
        echo = {"channel": channel, "instId": iid}
        return Resolved(arg, Topic(f"{channel}:{iid}", StreamKey(market.id, _BARS[bar]), echo))

    def align(self, topic: Topic) -> tuple[int, int]:
        """(ms, offset) of the topic's candles: HK-midnight aligned for 6H/12H/1D/1W."""
        ms, off = INTERVALS[topic.key.interval]
        bar = str(topic.arg["channel"])[len("candle"):]  # type: ignore[index]
        if bar in _HK_ALIGNED:
            off = (off - _HK_OFFSET_MS) % ms
        return ms, off

    def acks(self, req: Request, accepted: Sequence[Topic], refused: Sequence[Resolved],
             view: SessionView) -> list[str]:
        out: list[str] = []
        event = "subscribe" if req.op is Op.SUBSCRIBE else "unsubscribe"
        for t in accepted:
            out.append(self._with_id(req, {"event": event, "arg": t.arg, "connId": view.conn_id}))
        for r in refused:
            code, msg = _ERRORS[r.refusal or Refusal.BAD_ARG]
            arg = r.arg if isinstance(r.arg, dict) else {}
            text = msg.format(channel=arg.get("channel"), instId=arg.get("instId"))
            out.append(self._with_id(req, {"event": "error", "code": code, "msg": text,
                                           "connId": view.conn_id}))
        return out

    def reply(self, req: Request, view: SessionView) -> list[str]:
        if req.op is Op.PING:
            return ["pong"]
        return [self._with_id(req, {"event": "error", "code": "60012",
                                    "msg": f"Illegal request: {req.error}",
                                    "connId": view.conn_id})]

    def push(self, topic: Topic, market: Market, candle: Candle, closed: bool, now_ms: int,
             view: SessionView, flag: bool = True) -> str:
        row = [str(candle.open_time), plain(candle.open), plain(candle.high), plain(candle.low),
               plain(candle.close), plain(candle.volume), plain(candle.quote_volume),
               plain(candle.quote_volume)]
        if flag:
            row.append("1" if closed else "0")
        return dumps({"arg": topic.arg, "data": [row]})

    def expiry_notice(self, now_ms: int, view: SessionView) -> list[str]:
        # sent before OKX closes connections for a service upgrade; ccxt maps 64008 to
        # NetworkError and rejects every pending watch while the socket is still open
        return [dumps({"event": "notice", "code": "64008",
                       "msg": "The connection will soon be closed for a service upgrade. "
                              "Please reconnect.", "connId": view.conn_id})]

    def over_rate(self, view: SessionView) -> tuple[list[str], int | None]:
        return [dumps({"event": "error", "code": "60014", "msg": "Requests too frequent.",
                       "connId": view.conn_id})], None

    @staticmethod
    def _with_id(req: Request, body: dict) -> str:
        if req.req_id is not None:
            body = {"id": req.req_id, **body}
        return dumps(body)
