"""The stream actor on its own, with the real ccxt.pro client and the loopback stream simulator:
the exchange's streams-per-connection limit, one write per burst of closed candles, series told
afterwards, and a prompt stop. Series and storage are small recording actors here."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pykka
import pytest

from candlekeeper.actors import stream as stream_mod
from candlekeeper.actors.market.closing import ServerClock
from candlekeeper.actors.messages import SeriesKey, StreamedCandles, StreamJoin, StreamState, Write, Written
from candlekeeper.actors.sources.ccxt_stream import pro_client, stream_profile
from candlekeeper.actors.stream import StreamActor, StreamSettings
from candlekeeper.resilience.breaker import CircuitBreaker
from candlekeeper.simulator.server import synthetic_symbols
from candlekeeper.simulator.ws import WsSimulator
from candlekeeper.simulator.ws.testing import T0, Clock
from candlekeeper.supervisors.child import Address, Link, Runtime
from tests.stream_support import wait_until

MIN = 60_000


class Recorder(pykka.ThreadingActor):
    """Keeps every message; answers a `Write` with `Written`, as the storage actor does."""

    use_daemon_thread = True

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.messages: list[Any] = []

    def on_receive(self, message: Any) -> Any:
        with self.lock:
            self.messages.append(message)
        if isinstance(message, Write) and message.reply_to is not None:
            message.reply_to.tell(Written(message.token, "g1"))
        return None

    def of(self, kind: type) -> list[Any]:
        with self.lock:
            return [m for m in self.messages if isinstance(m, kind)]


class Recorded:
    """What a `Recorder` holds, asked from another thread."""

    def __init__(self, ref: pykka.ActorRef[Any]) -> None:
        self.ref = ref

    def of(self, kind: type) -> list[Any]:
        return self.ref.proxy().of(kind).get(timeout=5)


@pytest.fixture
def recorders() -> Iterator[tuple[Recorded, pykka.ActorRef[Any], Recorded, pykka.ActorRef[Any]]]:
    series_ref = Recorder.start()
    storage_ref = Recorder.start()
    yield Recorded(series_ref), series_ref, Recorded(storage_ref), storage_ref
    series_ref.stop()
    storage_ref.stop()


def start_stream(runtime: Runtime, sim: WsSimulator, storage: pykka.ActorRef[Any]) -> pykka.ActorRef[Any]:
    def client(wall: Callable[[], float], symbols: list[str]) -> Any:
        return pro_client("binance", symbols=symbols, timeout=5.0, wall=wall, api_base=sim.http_base,
                          ws_url=sim.ws_base)

    settings = StreamSettings(name="binance", client=client, profile=stream_profile("binance"), timeout=5.0)
    link = Link(child_id="stream", incarnation=1, path="test/binance/stream", runtime=runtime)
    ref, _ = StreamActor.start_linked(link, settings, CircuitBreaker(clock=runtime.clock), ServerClock(),
                                      storage=Address("storage", storage))
    return ref


def up(series: Recorded) -> set[SeriesKey]:
    return {m.key for m in series.of(StreamState) if m.up}


def test_binance_streams_go_at_most_1024_to_a_connection(runtime, recorders) -> None:
    series, series_ref, _, storage_ref = recorders
    symbols = synthetic_symbols(1030)
    with WsSimulator("binance", symbols, update_period_s=0.5) as sim:
        sim.update_rules(max_connections_per_window=None)
        ref = start_stream(runtime, sim, storage_ref)
        try:
            keys = [SeriesKey("binance", s, "1m") for s in symbols]
            for key in keys:
                ref.tell(StreamJoin(key, series_ref))
            wait_until(lambda: up(series) == set(keys), 60, "every stream up")
            assert sorted(len(t) for t in sim.topics()) == [6, 1024]
            assert sim.stats().refused == 0  # the limit was never tried
            status = ref.proxy().status().get(timeout=5)
            assert status["connections"] == 2 and status["streams_up"] == 1030 and status["state"] == "up"
        finally:
            ref.stop(timeout=10)


def test_a_burst_of_closed_candles_is_one_write_then_each_series_is_told(runtime, recorders, monkeypatch) -> None:
    # a burst is what the loop thread parsed within one flush period: 20 ms, which a loaded
    # machine's simulator may take to send 40 finals; the batching is the point, not the period
    monkeypatch.setattr(stream_mod, "FLUSH_S", 0.5)
    series, series_ref, storage, storage_ref = recorders
    symbols = synthetic_symbols(40)
    clock = Clock(T0 + 50_000)
    with WsSimulator("binance", symbols, now_ms=clock, history_start_ms=T0 - 86_400_000,
                     update_period_s=0.05) as sim:
        sim.update_rules(max_connections_per_window=None)
        ref = start_stream(runtime, sim, storage_ref)
        try:
            keys = [SeriesKey("binance", s, "1m") for s in symbols]
            for key in keys:
                ref.tell(StreamJoin(key, series_ref, live=key.symbol != symbols[0]))  # one not caught up
            wait_until(lambda: up(series) == set(keys), 30, "every stream up")
            clock.t = T0 + MIN + 500
            sim.wake()
            wait_until(lambda: len(series.of(StreamedCandles)) == len(keys) - 1, 10, "series told")
            writes = storage.of(Write)
            assert len(writes) == 1 and len(writes[0].rows) == len(keys) - 1  # one write for the burst
            told = {m.key: m for m in series.of(StreamedCandles)}
            assert SeriesKey("binance", symbols[0], "1m") not in told  # not live: not stored by the stream
            for symbol in symbols[1:]:
                m = told[SeriesKey("binance", symbol, "1m")]
                assert m.stored and m.generation == "g1"
                assert list(m.candles) == sim.expected_candles(symbol, "1m", T0, T0 + MIN)
        finally:
            ref.stop(timeout=10)
