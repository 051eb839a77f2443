"""The dialects on the wire (a plain aiohttp client, no ccxt): Binance's combined streams and
properties, OKX's text ping and Hong Kong days, Bybit's pong; and the fault schedule's
determinism."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from candlekeeper.simulator.history import INTERVALS
from candlekeeper.simulator.ws import StreamFault, StreamFaults
from candlekeeper.simulator.ws.dialects import dialect
from candlekeeper.simulator.ws.dialects.base import Topic
from candlekeeper.simulator.ws.faults import StreamFaultInjector
from candlekeeper.simulator.ws.pacer import KlineCursor
from candlekeeper.simulator.ws.testing import T0, run, stream_sim

MIN = 60_000
HOUR = 3_600_000


async def talk(url: str, frames: list[str], replies: int) -> list[Any]:
    """Send `frames`, collect the next `replies` text frames (JSON-decoded when possible)."""
    out: list[Any] = []
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        for f in frames:
            await ws.send_str(f)
        while len(out) < replies:
            msg = await asyncio.wait_for(ws.receive(), 5)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.ERROR):
                raise AssertionError(f"closed after {out}: {msg}")
            if msg.type is aiohttp.WSMsgType.TEXT:
                try:
                    out.append(json.loads(msg.data))
                except ValueError:
                    out.append(msg.data)
    return out


def test_binance_combined_stream_url_wraps_payloads() -> None:
    with stream_sim("binance") as (sim, _):
        got = run(talk(f"{sim.ws_base}/stream?streams=btcusdt@kline_1m", [], 1))
        assert got[0]["stream"] == "btcusdt@kline_1m"
        k = got[0]["data"]["k"]
        assert (k["s"], k["i"], k["t"], k["x"]) == ("BTCUSDT", "1m", T0, False)


def test_binance_control_requests() -> None:
    frames = [
        json.dumps({"method": "SUBSCRIBE", "params": ["ethusdt@kline_5m"], "id": 1}),
        json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 2}),
        json.dumps({"method": "SET_PROPERTY", "params": ["combined", True], "id": 3}),
        json.dumps({"method": "GET_PROPERTY", "params": ["combined"], "id": 4}),
        json.dumps({"method": "SUBSCRIBE", "params": ["ethusdt@kline_7m"], "id": 5}),
        json.dumps({"method": "NOPE", "id": 6}),
        "not json",
    ]
    with stream_sim("binance") as (sim, _):
        sim.update_rules(max_incoming_per_s=None)  # seven frames at once: over Binance's 5/s
        got = run(talk(f"{sim.ws_base}/ws", frames, 12))
    answers = {g["id"]: g for g in got if isinstance(g, dict) and "id" in g}
    assert answers[1] == {"result": None, "id": 1}
    assert answers[2] == {"result": ["ethusdt@kline_5m"], "id": 2}
    assert answers[3] == {"result": None, "id": 3}
    assert answers[4] == {"result": True, "id": 4}
    assert answers[5] == {"error": {"code": 2, "msg": "Invalid request: invalid stream"}, "id": 5}
    assert answers[6]["error"]["code"] == 2
    assert answers[None]["error"]["code"] == 3
    pushes = [g for g in got if isinstance(g, dict) and "id" not in g]
    assert any("stream" in p for p in pushes)  # after SET_PROPERTY combined=true


def test_binance_unknown_symbol_is_accepted_and_silent() -> None:
    with stream_sim("binance") as (sim, _):
        frames = [json.dumps({"method": "SUBSCRIBE", "params": ["nopeusdt@kline_1m"], "id": 1}),
                  json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 2})]
        got = run(talk(f"{sim.ws_base}/ws/0", frames, 2))
        assert got == [{"result": None, "id": 1}, {"result": ["nopeusdt@kline_1m"], "id": 2}]
        assert sim.stats().updates == 0


def test_okx_text_ping_ack_and_per_argument_errors() -> None:
    frames = ["ping", json.dumps({"op": "subscribe", "args": [
        {"channel": "candle1m", "instId": "BTC-USDT"},
        {"channel": "candle1m", "instId": "NOPE-USDT"}]})]
    with stream_sim("okx") as (sim, _):
        got = run(talk(f"{sim.ws_base}/ws/v5/business", frames, 4))
    assert got[0] == "pong"
    assert got[1] == {"event": "subscribe", "arg": {"channel": "candle1m", "instId": "BTC-USDT"},
                      "connId": "sim0000"}
    assert got[2]["event"] == "error" and got[2]["code"] == "60018"
    row = got[3]["data"][0]
    assert got[3]["arg"]["instId"] == "BTC-USDT" and len(row) == 9 and row[8] == "0"


def test_okx_days_open_at_hong_kong_midnight_unless_utc() -> None:
    okx = dialect("okx")
    with stream_sim("okx") as (sim, _):
        for channel, off in (("candle1D", 16 * HOUR), ("candle1Dutc", 0), ("candle6H", 4 * HOUR)):
            topic = okx.resolve({"channel": channel, "instId": "BTC-USDT"}, sim.history).topic
            assert isinstance(topic, Topic)
            ms, got_off = okx.align(topic)
            assert (ms, got_off) == (INTERVALS[topic.key.interval][0], off)


def test_bybit_pong_ack_and_whole_request_refusal() -> None:
    frames = [json.dumps({"req_id": 7, "op": "ping"}),
              json.dumps({"op": "subscribe", "req_id": 8, "args": ["kline.1.BTCUSDT"]}),
              json.dumps({"op": "subscribe", "req_id": 9,
                          "args": ["kline.1.ETHUSDT", "kline.1.NOPEUSDT"]})]
    with stream_sim("bybit") as (sim, _):
        got = run(talk(f"{sim.ws_base}/v5/public/spot", frames, 4))
        st = sim.stats()
        assert (st.subscribed, st.refused) == (1, 1)  # NOPE refused, ETH not subscribed either
    by_id = {g.get("req_id"): g for g in got if "req_id" in g}
    assert by_id["7"]["ret_msg"] == "pong" and by_id["7"]["success"] is True
    assert by_id["8"] == {"success": True, "ret_msg": "subscribe", "conn_id": "sim0000",
                          "req_id": "8", "op": "subscribe"}
    assert by_id["9"]["success"] is False and by_id["9"]["ret_msg"] == "Params Error"
    push = next(g for g in got if "topic" in g)
    assert push["topic"] == "kline.1.BTCUSDT" and push["data"][0]["confirm"] is False


def test_fault_schedule_is_fixed_by_seed_and_connection() -> None:
    rates = {StreamFault.DUPLICATE: 0.2, StreamFault.MISS: 0.2, StreamFault.MISS_FINAL: 0.5}

    def schedule(inj: StreamFaultInjector, conn: int) -> list[Any]:
        return [inj.draw(conn, closed=i % 5 == 4) for i in range(200)]

    a, b = StreamFaultInjector(StreamFaults(rates, seed=7)), StreamFaultInjector()
    b.configure(StreamFaults(rates, seed=7))
    schedule(b, 1)  # another connection's pushes do not disturb connection 0's schedule
    assert schedule(a, 0) == schedule(b, 0)
    assert schedule(StreamFaultInjector(StreamFaults(rates, seed=8)), 0) != schedule(
        StreamFaultInjector(StreamFaults(rates, seed=7)), 0)
    finals = [k for i, k in enumerate(schedule(a, 2)) if i % 5 == 4]
    updates = [k for i, k in enumerate(schedule(a, 3)) if i % 5 != 4]
    assert StreamFault.MISS not in finals and StreamFault.MISS_FINAL not in updates


def test_fault_rates_are_validated_per_kind_of_push() -> None:
    StreamFaults({StreamFault.MISS: 0.9, StreamFault.MISS_FINAL: 0.9})  # never both at once
    with pytest.raises(ValueError):
        StreamFaults({StreamFault.MISS: 0.6, StreamFault.DUPLICATE: 0.6})
    with pytest.raises(ValueError):
        StreamFaults({StreamFault.STALL: 0.1})


def test_cursor_owes_finals_after_a_jump_and_skips_gaps() -> None:
    with stream_sim("binance") as (sim, _):
        h = sim.history
    cursor = KlineCursor(h, "BTCUSDT", "1m", MIN, 0, T0 + 10_000)
    assert [(d.candle.open_time, d.closed) for d in cursor.due(T0 + 20_000)] == [(T0, False)]
    due = cursor.due(T0 + 3 * MIN + 1)
    assert [(d.candle.open_time, d.closed) for d in due] == [
        (T0, True), (T0 + MIN, True), (T0 + 2 * MIN, True), (T0 + 3 * MIN, False)]
    assert [d.candle.ohlcv() for d in due if d.closed] == h.expected_candles(
        "BTC/USDT", "1m", T0, T0 + 3 * MIN, T0 + 3 * MIN + 1)
