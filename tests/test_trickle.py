"""A reply that trickles (issue 16, point 1): one symbol's candle answers arrive at 1 byte/s with
`timeout = "1s"`. ccxt's timeout alone bounds each socket read, never the request, so such a
request would never end. The daemon's `timeout` is a deadline for the whole request: each of
that symbol's requests fails at it (a `timeout` outcome), the series says so in health, and the
exchange's other series keep their pace and end exact. In process, on the shared test clock."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from candlekeeper.app.system import System
from candlekeeper.simulator.faults import Faults
from candlekeeper.simulator.server import ExchangeSimulator
from candlekeeper.supervisors.clock import ShiftedClock
from tests.sim_variants import VariantSimulator
from tests.test_ingest import TF, assert_exact, complete, make_config, stored, wait_until

SYMBOLS = ["BTC/USDT", "ETH/USDT", "SOL/USDT"]
TRICKLING = "SOL/USDT"
HEALTHY = ["BTC/USDT", "ETH/USDT"]


@pytest.fixture
def sim_start(clock: ShiftedClock) -> int:
    return (clock.ms() // TF) * TF - 2 * 3600_000


@pytest.fixture
def sim(sim_start: int, clock: ShiftedClock) -> Iterator[VariantSimulator]:
    s = VariantSimulator(SYMBOLS, history_start_ms=sim_start, now_ms=clock.ms,
                         faults=Faults(trickle_bytes_per_s=1.0)).start()
    s.trickle(TRICKLING)
    yield s
    s.stop()


def timeouts(system: System) -> float:
    return system.metrics.registry.get_sample_value(
        "candlekeeper_requests_total", {"exchange": "binance", "outcome": "timeout"}) or 0.0


@pytest.mark.long
def test_trickling_symbol_times_out_and_the_others_keep_their_pace(tmp_path, sim, sim_start, running, clock,
                                                                   logs) -> None:
    cfg = make_config(tmp_path, sim, sim_start, symbols=SYMBOLS, timeout="1s")
    db = cfg.storage.path
    system = running(cfg)
    # the other series backfill in full while the trickling one's requests hang on the wire
    wait_until(complete(system, db, sim, sim_start, HEALTHY), timeout=60, what="healthy series backfilled")
    for symbol in HEALTHY:
        assert_exact(sim, db, symbol, sim_start)
    # every request of the trickling symbol ends at the deadline, as a timeout; more of them in a
    # row than the breaker's threshold (5), with the other series idle (caught up)
    wait_until(lambda: timeouts(system) >= 6, timeout=30, what="trickling requests timed out")
    assert sim.trickled >= 6
    assert not logs.of("breaker_open"), "one symbol's timeouts opened the exchange's breaker"
    assert stored(db, TRICKLING) == [], "a trickled answer was taken"
    report = system.health()
    row = next(s for s in report["series"] if s["symbol"] == TRICKLING)
    assert row["status"] in ("retrying", "lagging", "quarantined"), row
    assert "RequestTimeout" in (row.get("detail") or ""), row
    assert report["status"] != "ok"
    # the next candle closes (the clock moved to a moment before it: the series' timers follow):
    # the healthy series store it at their usual pace (a poll a second after the close), the
    # exchange's breaker does not open for one symbol's timeouts
    last = {s: stored(db, s)[-1][0] for s in HEALTHY}
    clock.offset += clock.until_boundary(60) - 0.5
    wait_until(lambda: all(stored(db, s)[-1][0] > last[s] for s in HEALTHY), timeout=15,
               what="the next candle stored by the healthy series")
    assert system.health()["exchanges"][0]["breaker"] == "closed"
    for symbol in HEALTHY:
        assert_exact(sim, db, symbol, sim_start)
    assert stored(db, TRICKLING) == []
    statuses = {s["symbol"]: s["status"] for s in system.health()["series"]}
    assert statuses["BTC/USDT"] == statuses["ETH/USDT"] == "ok", statuses
    assert statuses[TRICKLING] != "ok", statuses


def test_trickle_ends_and_the_series_catches_up(tmp_path, sim, sim_start, running) -> None:
    cfg = make_config(tmp_path, sim, sim_start, symbols=SYMBOLS, timeout="1s")
    db = cfg.storage.path
    system = running(cfg)
    wait_until(lambda: timeouts(system) >= 2, timeout=30, what="trickling requests timed out")
    sim.trickle(TRICKLING, on=False)
    system.reset("binance", TRICKLING)
    wait_until(complete(system, db, sim, sim_start, SYMBOLS), timeout=60, what="every series backfilled")
    for symbol in SYMBOLS:
        assert_exact(sim, db, symbol, sim_start)


@pytest.mark.long
def test_a_page_made_before_a_close_and_delivered_after_it_keeps_its_candle_in_progress_open(
        tmp_path, running, clock) -> None:
    """A slow answer across a close: the page was made while the last candle in it was in
    progress, and it arrives after that candle's close. Closed means closed on the exchange's
    clock when the request went out, not when its answer arrived, so the candle's partial values
    are never stored; the series asks again once it has closed and stores the final ones."""
    start = (clock.ms() // TF) * TF - 3600_000
    clock.offset += clock.until_boundary(60) - 1
    close = (clock.ms() // TF + 1) * TF
    with ExchangeSimulator(HEALTHY, history_start_ms=start, now_ms=clock.ms) as sim:
        def hold(path: str, params, status, fault) -> None:
            if "kline" in path and clock.ms() < close:  # the page is made: it arrives 1.5 s after the close
                wait_until(lambda: clock.ms() >= close + 1500, timeout=10, what="the close, and more")

        sim.add_request_hook(hold)
        cfg = make_config(tmp_path, sim, start, symbols=HEALTHY, timeout="10s", page_limit=1000)
        running(cfg)
        db = cfg.storage.path
        wait_until(lambda: all((stored(db, s) or [(0,)])[-1][0] >= close - TF for s in HEALTHY), timeout=20,
                   what="the candle that closed while its page was on the way")
        for symbol in HEALTHY:
            assert_exact(sim, db, symbol, start)
