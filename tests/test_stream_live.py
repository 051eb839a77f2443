"""Live candles over WebSocket end to end: the real system, the real ccxt.pro client, the loopback
stream simulator of each dialect sharing candles and clock with the REST simulator, and SQLite.

The closed rule without a flag, fallback to REST and the return to the stream, refused
subscriptions, the audit and a stream crash: after each, the store holds every closed candle
exactly once, with the exchange's values (stream faults: tests/test_stream_faults.py; how time
is moved: tests/stream_support.py)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

import pytest

from candlekeeper.simulator.ws import StreamFault, StreamFaults
from tests.stream_support import (
    GRACE_S,
    TF,
    fast_stream,  # noqa: F401 - a fixture
    klines,
    live_exchange,
    series,
    sources,
    stream_row,
    wait_until,
)

EXCHANGES = ("binance", "okx", "bybit")


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_caught_up_series_take_closed_candles_from_the_stream_and_stop_polling(
        exchange, clock, tmp_path, fast_stream) -> None:
    with live_exchange(exchange, clock, tmp_path) as live:
        system = live.start()
        live.wait_complete()
        wait_until(lambda: set(sources(system).values()) == {"stream"}, what="series on the stream")
        assert stream_row(system)["state"] == "up"
        before = klines(live.rest)
        for _ in range(3):
            live.next_candle(system)
        live.assert_exact()
        assert klines(live.rest) == before, "a streamed series polled REST"
        assert set(sources(system).values()) == {"stream"}
        assert system.health()["status"] == "ok"
        text = _scrape(system)
        assert f'candlekeeper_stream_messages_total{{exchange="{exchange}"}}' in text
        assert f'candlekeeper_close_to_store_seconds_count{{exchange="{exchange}",source="stream"}} 6.0' in text
        assert f'candlekeeper_series_source{{exchange="{exchange}",source="stream"}} 2.0' in text


def _scrape(system) -> str:
    from prometheus_client import generate_latest

    return generate_latest(system.metrics.registry).decode()


@pytest.mark.long
def test_fallback_to_rest_while_the_stream_is_down_and_return(clock, tmp_path, fast_stream) -> None:
    with live_exchange("binance", clock, tmp_path) as live:
        system = live.start()
        live.wait_complete()
        wait_until(lambda: set(sources(system).values()) == {"stream"}, what="series on the stream")
        before = klines(live.rest)
        # the next candle closes 3 s from now (time moved, not waited for): the series fall back
        # to REST before it, on the moved clock
        ts = live.to_close(system, lead=3.0)
        live.ws.update_faults(handshake_status=503)
        live.ws.drop_connections()
        wait_until(lambda: set(sources(system).values()) == {"rest"}, what="series back on REST")
        assert stream_row(system)["state"] == "down"
        assert any("live stream down" in r for r in system.health()["reasons"])
        # the candle closing while the stream is down comes over REST, polled after the close
        wait_until(lambda: all((live.last(s) or 0) >= ts for s in live.symbols), 20, "candle over REST")
        assert klines(live.rest) >= before + 2
        live.ws.update_faults(handshake_status=None)
        wait_until(lambda: set(sources(system).values()) == {"stream"}, 20, "series back on the stream")
        before = klines(live.rest)
        live.next_candle(system)
        assert klines(live.rest) == before
        live.assert_exact()
        assert 'reason="down"' in _scrape(system)


@pytest.mark.long
def test_a_silent_series_falls_back_to_rest_and_returns_to_the_stream(clock, tmp_path, fast_stream) -> None:
    """Every final missed: the stream is up but says nothing closed; each series polls REST
    `stream_grace` after the close, then takes the stream's candles again once they come."""
    with live_exchange("binance", clock, tmp_path) as live:
        system = live.start()
        live.wait_complete()
        wait_until(lambda: set(sources(system).values()) == {"stream"}, what="series on the stream")
        live.ws.set_faults(StreamFaults({StreamFault.MISS_FINAL: 1.0}))
        ts = live.to_close(system, lead=1.0)  # the series' timers follow the clock to the close
        wait_until(lambda: all((live.last(s) or 0) >= ts for s in live.symbols), 20, "candle over REST")
        assert set(sources(system).values()) == {"rest"}
        assert 'reason="silent"' in _scrape(system)
        live.ws.set_faults(StreamFaults())
        live.next_candle(system)
        wait_until(lambda: set(sources(system).values()) == {"stream"}, what="back on the stream")
        live.assert_exact()


def _next_close_without_rest(clock, tmp_path, arm: Callable[[int], None], why: str) -> None:
    """Series on the stream, then the clock moved to a moment before a close (the series' timers
    follow it): `arm` is given the candle in progress, then every series must store it with no
    REST request."""
    with live_exchange("binance", clock, tmp_path) as live:
        system = live.start()
        live.wait_complete()
        wait_until(lambda: set(sources(system).values()) == {"stream"}, what="series on the stream")
        before = klines(live.rest)
        ts = live.to_close(system, lead=1.5)  # the candle in progress
        arm(ts)
        wait_until(lambda: all(s["last_ts"] == ts for s in series(system).values()), 20, "every series told")
        assert klines(live.rest) == before, why
        assert set(sources(system).values()) == {"stream"}
        live.assert_exact()


@pytest.mark.long
def test_a_slow_word_from_the_stream_never_sends_its_series_to_rest(clock, tmp_path, fast_stream,
                                                                     monkeypatch) -> None:
    """The stream stored a candle but its word to a series is slower than `stream_grace` (at
    10,000 series the paced word takes seconds): the series reads the stream's ledger when its
    fallback timer fires and waits once more, instead of asking REST for what is stored."""
    from candlekeeper.actors import stream as stream_mod
    from candlekeeper.app import settings as settings_mod

    built = settings_mod.stream_settings
    monkeypatch.setattr(settings_mod, "stream_settings",
                        lambda *a, **k: dataclasses.replace(built(*a, **k), notify_per_s=1.0))
    def slow_words(_ts: int) -> None:  # from now on one word each 1.25 x the grace: the second hears late
        monkeypatch.setattr(stream_mod, "NOTIFY_TICK_S", 1.25 * GRACE_S)

    _next_close_without_rest(clock, tmp_path, slow_words, "a series asked REST for a candle the stream had stored")


@pytest.mark.long
def test_a_stream_behind_on_its_frames_is_waited_for_not_sent_to_rest(clock, tmp_path, fast_stream,
                                                                      monkeypatch) -> None:
    """Under load the stream parses a close's burst of frames seconds after they came (measured
    at 10,000 series): the finals and the next candle's first frames reach the stream late, all
    of them. While the stream has not shown a candle after the close for any series, it is
    behind, not silent: its series wait (up to 3 x `stream_grace`) instead of asking REST, whose
    answers would only add to the load that makes the stream late."""
    from candlekeeper.actors import stream as stream_mod
    from candlekeeper.app import settings as settings_mod

    grace = 2.0
    monkeypatch.setattr(settings_mod, "STREAM_GRACE_S", grace)
    hold: dict[str, int | None] = {"after": None}
    parse = stream_mod._Dispatch.frame

    def late(self, fid, symbol, timeframe, ts, closed, *rest) -> None:
        after = hold["after"]
        if after is not None and (ts > after or closed):  # the close's finals, the next candle's frames
            self.loop.call_later(1.5 * grace, parse, self, fid, symbol, timeframe, ts, closed, *rest)
            return
        parse(self, fid, symbol, timeframe, ts, closed, *rest)

    monkeypatch.setattr(stream_mod._Dispatch, "frame", late)
    _next_close_without_rest(clock, tmp_path, lambda ts: hold.update(after=ts),
                             "a series asked REST while its stream was behind")


@pytest.mark.long
def test_a_stream_actor_busy_at_the_close_never_sends_its_series_to_rest(clock, tmp_path, fast_stream,
                                                                         monkeypatch) -> None:
    """At 10,000 series the stream actor takes a close's batches of frames seconds after its
    loop thread parsed them (its mailbox is busy at every close), while the series' timers fire
    on time and find the stream already showing the next candle. The candle is in hand from the
    moment it was parsed closed: the series waits for the word instead of asking REST."""
    from candlekeeper.actors import stream as stream_mod
    from candlekeeper.app import settings as settings_mod

    grace = 2.0
    monkeypatch.setattr(settings_mod, "STREAM_GRACE_S", grace)
    busy: dict[str, int | None] = {"after": None}
    handle = stream_mod.StreamActor._on_frames

    def slow(self, msg) -> None:
        after = busy["after"]
        if after is not None and any(c[0] >= after for _, c in msg.closed):
            time.sleep(1.5 * grace)  # sleep-ok: the busy mailbox this test is about
        handle(self, msg)

    monkeypatch.setattr(stream_mod.StreamActor, "_on_frames", slow)
    _next_close_without_rest(clock, tmp_path, lambda ts: busy.update(after=ts),
                             "a series asked REST for a candle its stream had parsed closed")


@pytest.mark.long
def test_a_series_busy_when_its_subscription_comes_up_fills_the_candle_before_it_at_once(
        clock, tmp_path, fast_stream, monkeypatch) -> None:
    """At start-up under load a series' last backfill answer can be taken before a close and reach
    it after its stream subscribed: the candle that closed in between is not the stream's to carry
    (it carries the one in progress when it subscribed). The series asks REST for it at once
    rather than wait for the stream's grace, and the page made before the close never passes its
    candle in progress as closed, however late it arrives."""
    from candlekeeper.app import settings as settings_mod

    monkeypatch.setattr(settings_mod, "STREAM_GRACE_S", 60.0)  # waiting for the stream would take a minute
    with live_exchange("binance", clock, tmp_path) as live:
        clock.offset += clock.until_boundary(60) - 2
        close = (clock.ms() // TF + 1) * TF
        held, release = threading.Event(), threading.Event()

        def hold(path: str, params, status, fault) -> None:
            if "kline" in path and not release.is_set():  # the page is made: its answer waits
                held.set()
                release.wait(20)

        live.rest.add_request_hook(hold)
        live.ws.update_faults(handshake_status=503)  # the stream subscribes only after the close
        system = live.start(timeout="20s")
        wait_until(held.is_set, what="a backfill page made before the close")
        wait_until(lambda: clock.ms() >= close, what="the close")
        live.ws.update_faults(handshake_status=None)
        stream = system.blueprint.streams[live.exchange]
        wait_until(lambda: stream.proxy().status().get(timeout=5)["streams_up"] == len(live.symbols),
                   what="both subscriptions up, while the pages are held")
        release.set()
        wait_until(lambda: all((live.last(s) or 0) >= close - TF for s in live.symbols), 20,
                   "the candle that closed before the subscription, over REST")
        live.assert_exact()
        assert 'reason="gap"' in _scrape(system)
        assert 'reason="silent"' not in _scrape(system)


def test_a_series_that_catches_up_just_after_a_close_takes_that_candle_from_its_stream(
        clock, tmp_path, fast_stream) -> None:
    """At start-up a series' backfill can end just after a close whose final its stream parsed
    while the series was still backfilling (not live: the stream writes only for caught-up
    series). The stream keeps that candle and writes it when the series joins: no REST request,
    and no wait for a word that would never come (the ledger says the stream took the candle)."""
    from candlekeeper.actors.messages import SeriesKey

    with live_exchange("binance", clock, tmp_path) as live:
        clock.offset += clock.until_boundary(60) - 2
        close = (clock.ms() // TF + 1) * TF
        held: list[str] = []
        release = threading.Event()

        def hold(path: str, params, status, fault) -> None:
            if "kline" in path and not release.is_set():  # the last backfill page, made before the close
                held.append(path)
                release.wait(20)

        live.rest.add_request_hook(hold)
        system = live.start(timeout="20s")
        wait_until(lambda: len(held) == len(live.symbols), what="each series' last page made before the close")
        ledger = system.blueprint.stream_ledgers[live.exchange]
        keys = [SeriesKey(live.exchange, s, "1m") for s in live.symbols]
        wait_until(lambda: all((ledger.newest(k) or 0) >= close - TF for k in keys), what="the close's finals parsed")
        before = klines(live.rest)
        release.set()
        wait_until(lambda: all((live.last(s) or 0) >= close - TF for s in live.symbols), 20,
                   "the candle that closed while its series backfilled, from the stream")
        assert klines(live.rest) == before, "REST was asked for a candle the stream parsed"
        live.assert_exact()


@pytest.mark.parametrize("exchange", EXCHANGES)
@pytest.mark.long(5)
def test_a_refused_subscription_stays_on_rest_and_the_others_stream(exchange, clock, tmp_path, fast_stream) -> None:
    with live_exchange(exchange, clock, tmp_path) as live:
        live.ws.update_faults(refuse=frozenset({"ETHUSDT"}))
        system = live.start()
        live.wait_complete()
        wait_until(lambda: sources(system).get("BTC/USDT") == "stream", 20, "BTC on the stream")
        wait_until(lambda: stream_row(system).get("refused") == 1, 20, "ETH's subscription refused")
        wait_until(lambda: "stream subscription" in (_snapshot(system, "ETH/USDT").get("stream_detail") or ""),
                   20, "ETH told why")
        assert sources(system)["ETH/USDT"] == "rest"
        assert stream_row(system)["state"] == "up"
        ts = live.to_close(system)  # the candle closing next: ETH's by REST, BTC's by the stream
        wait_until(lambda: all((live.last(s) or 0) >= ts for s in live.symbols), 20, "the candle closing next")
        live.assert_exact()
        assert live.ws.stats().faults.get(StreamFault.REFUSE, 0) >= 1


def _snapshot(system, symbol: str) -> dict:
    sup = system._sup(system.config.exchanges[0].name, "series")
    ref = sup.child_ref(f"{symbol}@1m").get(timeout=5)
    return ref.proxy().snapshot().get(timeout=5)


@pytest.mark.parametrize("exchange", EXCHANGES)
@pytest.mark.long(5)
def test_without_a_closed_flag_candles_close_by_the_next_one_and_the_clock(
        exchange, clock, tmp_path, fast_stream) -> None:
    with live_exchange(exchange, clock, tmp_path) as live:
        live.ws.update_rules(closed_flag=False)
        system = live.start()
        live.wait_complete()
        wait_until(lambda: set(sources(system).values()) == {"stream"}, what="series on the stream")
        before = klines(live.rest)
        for _ in range(2):
            live.next_candle(system)
        live.assert_exact()
        assert klines(live.rest) == before
        if exchange == "okx":
            return  # its frames do not say when they were sent: a missed last push goes to the audit
        # a missed last push: the last message seen was sent before the close, so it is not taken
        live.ws.set_faults(StreamFaults({StreamFault.MISS_FINAL: 1.0}))
        ts = live.to_close(system)
        wait_until(lambda: live.clock.ms() > ts + TF + 500, what="the close")
        live.ws.set_faults(StreamFaults())
        live.next_candle(system)
        live.wait_complete()
        live.assert_exact()
        assert klines(live.rest) > before  # that candle came over REST


def test_the_audit_corrects_a_candle_the_exchange_revised(clock, tmp_path, fast_stream, monkeypatch) -> None:
    from candlekeeper.app import settings

    monkeypatch.setattr(settings, "AUDIT_INTERVAL_S", 2.0)
    with live_exchange("binance", clock, tmp_path) as live:
        system = live.start()
        live.wait_complete()
        wait_until(lambda: set(sources(system).values()) == {"stream"}, what="series on the stream")
        live.ws.update_faults(stale_final_rate=1.0)
        ts = live.next_candle(system)
        assert live.stored("BTC/USDT")[-1] != live.expected("BTC/USDT", ts + TF)[-1]  # the stream's, unrevised
        live.ws.update_faults(stale_final_rate=0.0)
        wait_until(lambda: all(live.stored(s)[-1] == live.expected(s, ts + TF)[-1] for s in live.symbols), 15, "audit")
        live.assert_exact()


def test_a_stream_crash_restarts_its_series_which_join_the_new_one(clock, tmp_path, fast_stream) -> None:
    with live_exchange("binance", clock, tmp_path) as live:
        system = live.start()
        live.wait_complete()
        wait_until(lambda: set(sources(system).values()) == {"stream"}, what="series on the stream")
        system.crash("binance/stream")
        wait_until(lambda: system.health()["restarts_by_kind"].get("stream", 0) == 1, what="stream restarted")
        wait_until(lambda: set(sources(system).values()) == {"stream"}, 20, "series on the new stream")
        live.next_candle(system)
        live.assert_exact()
        # the stream's clients take the exchange actor's market list: one load in all, none of
        # their own at start or after the crash (a load of theirs would pass the exchange's
        # breaker and rate budget: Binance's exchangeInfo weighs 20)
        assert live.rest.stats().by_path.get("/api/v3/exchangeInfo", 0) == 1


def test_the_stream_waits_for_the_exchange_actors_market_list(clock, tmp_path, fast_stream) -> None:
    """The exchange's market list fails to load: the stream asks for none of its own (nothing
    passes the failing exchange's breaker), and connects once the exchange actor has it."""
    from candlekeeper.simulator.faults import FaultKind, Faults

    with live_exchange("binance", clock, tmp_path) as live:
        live.rest.set_faults(Faults(rates={FaultKind.HTTP_503: 1.0}, paths=frozenset({"/api/v3/exchangeInfo"})))
        system = live.start()
        wait_until(lambda: live.rest.stats().by_path.get("/api/v3/exchangeInfo", 0) >= 3, what="failing loads")
        live.rest.set_faults(Faults())
        live.wait_complete()
        wait_until(lambda: set(sources(system).values()) == {"stream"}, 20, "series on the stream")
        loads = live.rest.stats().by_path.get("/api/v3/exchangeInfo", 0)
        live.next_candle(system)
        live.assert_exact()
        assert live.rest.stats().by_path.get("/api/v3/exchangeInfo", 0) == loads
