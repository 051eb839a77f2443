"""Health that follows outcomes, not only signals: a series whose newest stored candle is older
than its timeframe + poll interval + margin allows is `lagging`, whatever the cause (a 418 ban
while the breaker stays closed, a store that cannot write); a backfill that stores nothing newer
for a while is lagging too; storage failing shows on every series. The health actor is tested
on a fake wall clock, then the real system against the loopback exchange."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from candlekeeper.actors.health import LAG_MARGIN_S, STALL_PAGES, HealthActor, HealthSettings, HealthState, Pace
from candlekeeper.actors.messages import SeriesKey, SeriesStatus, StorageStatus
from candlekeeper.actors.metrics import Metrics
from candlekeeper.actors.stores.sqlite import Store
from candlekeeper.app import config as config_mod
from candlekeeper.app.settings import health_settings
from candlekeeper.app.system import System
from candlekeeper.app.tree import REPORTS
from candlekeeper.simulator.faults import FaultKind, Faults
from candlekeeper.simulator.server import BinanceSimulator
from candlekeeper.supervisors.child import Address, Crash, Runtime
from candlekeeper.supervisors.clock import FakeClock, ShiftedClock
from candlekeeper.supervisors.supervisor import ChildSpec, start_root
from tests.conftest import EventRecorder
from tests.faults_fs import Immutable
from tests.test_alerts import LogWatch
from tests.test_ingest import TF, assert_exact, complete, make_config, stored, wait_until

T0 = 1_700_000_080.0  # a wall time: 40 s into a minute
PACE = Pace(poll_interval=2.0, margin=8.0, page_s=2.0)  # lag bound for 1m: 60 + 2 + 8 = 70 s; stall 10 s
BTC = SeriesKey("binance", "BTC/USDT", "1m")
ETH = SeriesKey("binance", "ETH/USDT", "1m")


def path(key: SeriesKey) -> str:
    return f"root/binance/series/{key.symbol}@{key.timeframe}"


def last_closed_ts(now: float) -> int:
    """Open time of the newest closed 1m candle at `now`."""
    return int(now // 60) * 60_000 - TF


class Health:
    """A HealthActor under a root, on a wall clock the test moves by hand."""

    def __init__(self, tick: float = 0.05) -> None:
        self.wall = FakeClock(T0)
        self.runtime = Runtime(wall=self.wall)
        self.runtime.start()
        self.settings = HealthSettings(pace={"binance": PACE}, tick=tick)
        spec = ChildSpec("health", HealthActor, args=(["binance"], HealthState(), self.settings))
        self.root, _ = start_root(self.runtime, [spec])
        self.ref = self.root.proxy().child_ref("health").get()

    def tell(self, *messages: Any) -> None:
        for m in messages:
            self.ref.tell(m)

    def report(self) -> dict[str, Any]:
        return self.ref.proxy().health().get(timeout=5)

    def series(self, key: SeriesKey) -> dict[str, Any]:
        return next(s for s in self.report()["series"] if s["symbol"] == key.symbol)

    def stop(self) -> None:
        self.root.stop()
        self.runtime.stop()


@pytest.fixture
def health() -> Iterator[Health]:
    h = Health()
    yield h
    h.stop()


def status(key: SeriesKey, st: str, last_ts: int | None, failures: int = 0, detail: str | None = None) -> SeriesStatus:
    return SeriesStatus(path(key), key, st, last_ts, failures, detail)


# -- the rules -------------------------------------------------------------------------------


def test_pace_from_the_config() -> None:
    pace = Pace.of(poll_interval=10.0, rate_limit=10.0, series=40, timeout=10.0)
    assert pace.margin == LAG_MARGIN_S + 4.0 + 10.0  # 5 s + poll spread (40 / 10 s) + one timeout
    assert pace.lag_bound(60.0) == 60.0 + 10.0 + 19.0
    assert pace.page_s == 4.0 + 10.0 and pace.stall_bound == STALL_PAGES * 14.0
    many = Pace.of(poll_interval=10.0, rate_limit=10.0, series=10_000, timeout=10.0)
    assert many.margin == LAG_MARGIN_S + 10.0 + 10.0  # the spread is at most poll_interval
    cfg = config_mod.from_dict({"exchanges": {"binance": {"symbols": ["BTC/USDT", "ETH/USDT"], "rate_limit": 4,
                                                          "timeout": "3s", "poll_interval": "5s"}},
                                "ingest": {"timeframes": ["1m", "5m"]}})
    assert health_settings(cfg).pace_of("binance") == Pace.of(poll_interval=5.0, rate_limit=4.0, series=4, timeout=3.0)


def test_a_series_that_says_ok_but_stores_nothing_newer_is_lagging(health: Health) -> None:
    last = last_closed_ts(T0)  # stored the newest closed candle: caught up, 40 s of lag
    health.tell(status(BTC, "ok", last), status(ETH, "ok", last))
    report = health.report()
    assert report["status"] == "ok" and report["reasons"] == []
    assert [s["lag_seconds"] for s in report["series"]] == [40.0, 40.0]
    health.wall.advance(29)  # lag 69 s: the next candle is late, not yet beyond the bound
    assert health.series(BTC)["status"] == "ok"
    health.wall.advance(2)  # 71 s > 60 + 2 + 8
    report = health.report()
    assert [s["status"] for s in report["series"]] == ["lagging", "lagging"]
    assert report["status"] == "degraded"
    assert report["reasons"] == ["2 series lagging: binance:BTC/USDT@1m (71 s behind, nothing newer for 31 s),"
                                 " binance:ETH/USDT@1m (71 s behind, nothing newer for 31 s)"]
    health.tell(status(BTC, "ok", last + TF))  # the late candle arrives
    assert health.series(BTC)["status"] == "ok" and health.series(BTC)["lag_seconds"] == 11.0
    assert health.series(ETH)["status"] == "lagging"


def test_a_report_between_ticks_tells_the_lag_and_verdict_of_its_instant() -> None:
    """A report judges only the rows whose instant has come (the rest were judged when they
    reported: at 10,000 series re-judging every row made each report twice as slow), yet every
    row's lag is read at the report's instant: no tick runs here between the reports."""
    h = Health(tick=3600)
    try:
        last = last_closed_ts(T0)
        h.tell(status(BTC, "ok", last), status(ETH, "ok", last + TF))  # ETH: one candle newer
        assert [(s["status"], s["lag_seconds"]) for s in h.report()["series"]] == [("ok", 40.0), ("ok", 0.0)]
        h.wall.advance(29.5)
        assert [(s["status"], s["lag_seconds"]) for s in h.report()["series"]] == [("ok", 69.5), ("ok", 9.5)]
        h.wall.advance(1)  # BTC's bound (70 s) passed: its verdict flips in this report
        report = h.report()
        assert [(s["status"], s["lag_seconds"]) for s in report["series"]] == [("lagging", 70.5), ("ok", 10.5)]
        assert report["status"] == "degraded"
        assert report["reasons"] == ["1 series lagging: binance:BTC/USDT@1m (70 s behind, nothing newer for 30 s)"]
    finally:
        h.stop()


def test_retrying_is_judged_by_lag_when_caught_up_and_by_progress_when_backfilling(health: Health) -> None:
    last = last_closed_ts(T0)
    health.tell(status(BTC, "ok", last), status(BTC, "retrying", last, failures=1))
    health.tell(status(ETH, "backfilling", last - 100 * TF), status(ETH, "retrying", last - 100 * TF, failures=1))
    report = health.report()
    assert {s["symbol"]: s["status"] for s in report["series"]} == {"BTC/USDT": "retrying", "ETH/USDT": "retrying"}
    health.wall.advance(11)  # the backfill has stored nothing for 11 s > 5 pages of 2 s
    assert health.series(ETH)["status"] == "lagging" and health.series(BTC)["status"] == "retrying"
    health.wall.advance(25)  # 76 s of lag: the caught-up one too
    assert health.series(BTC)["status"] == "lagging"


def test_a_backfill_lags_only_when_it_stops_progressing(health: Health) -> None:
    old = last_closed_ts(T0) - 1000 * TF  # far behind, as every backfill is
    health.tell(status(BTC, "backfilling", None))
    assert health.series(BTC)["lag_seconds"] is None  # nothing stored yet
    for i in range(5):  # a page every 8 s: under the 10 s stall bound
        health.wall.advance(8)
        health.tell(status(BTC, "backfilling", old + i * 100 * TF))
        assert health.series(BTC)["status"] == "backfilling"
    health.wall.advance(10.5)
    s = health.series(BTC)
    assert s["status"] == "lagging" and s["lag_seconds"] > 3600
    health.tell(status(BTC, "backfilling", old + 600 * TF))
    assert health.series(BTC)["status"] == "backfilling"


def test_paused_and_invalid_never_lag_and_a_resume_starts_the_clock_again(health: Health) -> None:
    old = last_closed_ts(T0) - 100 * TF
    health.tell(status(BTC, "paused", old), status(ETH, "invalid", None))
    health.wall.advance(3600)
    report = health.report()
    assert [s["status"] for s in report["series"]] == ["paused", "invalid"]
    assert report["series"][0]["lag_seconds"] > 3600
    health.tell(status(BTC, "backfilling", old))  # resumed: it has not had time to progress yet
    assert health.series(BTC)["status"] == "backfilling"
    health.wall.advance(11)
    assert health.series(BTC)["status"] == "lagging"


def test_storage_failing_shows_on_every_series_and_takes_the_rollup_down(health: Health) -> None:
    last = last_closed_ts(T0)
    health.tell(status(BTC, "ok", last), status(ETH, "backfilling", last - 10 * TF, 2, "store: StoreUnavailable: x"))
    health.tell(StorageStatus(ok=False, detail="StoreUnavailable: c.db is read-only"))
    report = health.report()
    assert report["status"] == "down"
    assert report["storage"] == {"ok": False, "detail": "StoreUnavailable: c.db is read-only"}
    assert report["reasons"][0] == "storage failing: StoreUnavailable: c.db is read-only"
    assert [s["detail"] for s in report["series"]] == ["storage failing: StoreUnavailable: c.db is read-only"] * 2
    health.tell(StorageStatus(ok=True))
    assert "detail" not in health.series(BTC)


def test_lag_is_judged_on_a_schedule_without_any_report_or_question() -> None:
    watch = LogWatch()
    with structlog.testing.capture_logs(processors=[watch]):
        h = Health(tick=0.02)
        try:
            h.tell(status(BTC, "ok", last_closed_ts(T0)))
            h.report()  # the report is in
            h.wall.advance(40)  # nobody asks and the series says nothing: the tick notices
            [entry] = watch.wait("series_lagging", timeout=5)
            assert entry["series"] == path(BTC) and entry["lag_seconds"] == 80.0
        finally:
            h.stop()


def test_the_tick_notices_a_stalled_backfill_and_never_one_that_keeps_reporting() -> None:
    # each row is judged again at the instant its verdict would change (a heap of instants):
    # a row that reports meanwhile moves its instant, and the old one must not judge it
    watch = LogWatch()
    with structlog.testing.capture_logs(processors=[watch]):
        h = Health(tick=0.02)
        try:
            old = last_closed_ts(T0) - 1000 * TF
            h.tell(status(BTC, "backfilling", old), status(ETH, "backfilling", old))
            h.report()
            for i in range(1, 4):  # ETH stores a page every 8 s (bound 10 s); BTC stores nothing
                h.wall.advance(8)
                h.tell(status(ETH, "backfilling", old + i * 100 * TF))
                h.report()
            [entry] = watch.wait("series_lagging", timeout=5)
            assert entry["series"] == path(BTC)
            assert {s["symbol"]: s["status"] for s in h.report()["series"]} == {
                "BTC/USDT": "lagging", "ETH/USDT": "backfilling"}
        finally:
            h.stop()


def test_many_series_lagging_at_once_are_one_log_line() -> None:
    watch = LogWatch()
    with structlog.testing.capture_logs(processors=[watch]):
        h = Health(tick=0.02)
        try:
            keys = [SeriesKey("binance", f"S{i:02d}/USDT", "1m") for i in range(12)]
            h.tell(*(status(k, "ok", last_closed_ts(T0)) for k in keys))
            h.report()
            h.wall.advance(40)  # all twelve cross the bound in the same tick
            [entry] = watch.wait("series_lagging", timeout=5)
            assert entry["count"] == 12 and len(entry["series"]) == 10
        finally:
            h.stop()


def test_a_report_told_while_health_restarts_reaches_the_next_incarnation() -> None:
    """Health's address keeps reports between incarnations (`candlekeeper.app.tree.REPORTS`): a
    series says `ok` once, after its backfill, and nothing more until a candle closes; lost in a
    health restart, health would show it backfilling for up to a minute."""
    runtime = Runtime(wall=FakeClock(T0), allow_crash_injection=True)
    runtime.start()
    recorder = EventRecorder()
    runtime.events.subscribe(recorder)
    address = Address("health", keep=REPORTS)
    spec = ChildSpec("health", HealthActor, args=(["binance"], HealthState(), HealthSettings(pace={"binance": PACE})),
                     address=address)
    root, _ = start_root(runtime, [spec])
    try:
        last = last_closed_ts(T0)
        address.tell(status(BTC, "backfilling", last - 30 * TF))
        address.tell(Crash())
        address.tell(status(BTC, "ok", last))  # behind the crash in its inbox, or told between incarnations
        recorder.wait_for(lambda evs: "restarted" in [e.kind for e in evs])
        row = address.proxy().health().get(timeout=5)["series"][0]
        assert (row["status"], row["last_ts"]) == ("ok", last)
    finally:
        root.stop()
        runtime.stop()


def test_metrics_know_lagging(health: Health) -> None:
    health.tell(status(BTC, "ok", last_closed_ts(T0)), status(ETH, "ok", last_closed_ts(T0)))
    health.wall.advance(100)
    metrics = Metrics(health=health.report, wall=health.wall)
    assert metrics.registry.get_sample_value("candlekeeper_series", {"exchange": "binance", "status": "lagging"}) == 2
    assert metrics.registry.get_sample_value("candlekeeper_series", {"exchange": "binance", "status": "ok"}) == 0
    assert metrics.registry.get_sample_value(
        "candlekeeper_series_lag_seconds", {"exchange": "binance", "symbol": "BTC/USDT", "timeframe": "1m"}) == 140.0


# -- the running system ------------------------------------------------------------------------


SYMBOLS = ["BTC/USDT", "ETH/USDT"]


@pytest.fixture
def sim_start(clock: ShiftedClock) -> int:
    return (clock.ms() // TF) * TF - 3 * 3600_000


@pytest.fixture
def sim(sim_start: int, clock: ShiftedClock) -> Iterator[BinanceSimulator]:
    s = BinanceSimulator(SYMBOLS, history_start_ms=sim_start, now_ms=clock.ms).start()
    yield s
    s.stop()


@pytest.fixture
def running(clock: ShiftedClock) -> Iterator[Callable[[config_mod.Config], System]]:
    systems: list[System] = []

    def start(cfg: config_mod.Config) -> System:
        system = System(cfg, runtime=Runtime(wall=clock)).start()
        systems.append(system)
        return system

    yield start
    for system in systems:
        system.stop()


def by_symbol(system: System) -> dict[str, dict[str, Any]]:
    return {s["symbol"]: s for s in system.health()["series"]}


def test_a_418_ban_shows_lagging_within_the_bound_while_the_breaker_stays_closed(
    tmp_path: Path, sim: BinanceSimulator, sim_start: int, running: Callable[[config_mod.Config], System],
    clock: ShiftedClock,
) -> None:
    cfg = make_config(tmp_path, sim, sim_start, breaker_threshold=2)
    db = cfg.storage.path
    system = running(cfg)
    wait_until(complete(system, db, sim, sim_start, SYMBOLS), what="backfill")
    wait_until(lambda: all(s["status"] == "ok" for s in by_symbol(system).values()), what="caught up")
    bound = health_settings(cfg).pace_of("binance").lag_bound(60.0)
    # Binance bans the IP: every klines request is answered 418 with Retry-After
    sim.set_faults(Faults(rates={FaultKind.HTTP_418: 1.0}, paths=frozenset({"/api/v3/klines"}), retry_after_s=1))
    newest_close = (stored(db, "BTC/USDT")[-1][0] + TF) / 1000
    clock.offset += newest_close + bound - 4 - clock()  # 4 s before the bound: the next candle is late
    system.reset("binance")  # the series poll now (and are refused) instead of at their timers
    early = by_symbol(system)
    assert early["BTC/USDT"]["status"] != "lagging" and early["BTC/USDT"]["lag_seconds"] < bound
    wait_until(lambda: all(s["status"] == "lagging" for s in by_symbol(system).values()), timeout=15,
               what="lagging once the bound is passed")
    health = system.health()
    assert health["exchanges"][0]["breaker"] == "closed"  # a ban is no outage: the breaker stays closed
    assert health["status"] == "degraded"
    assert all(s["lag_seconds"] >= bound - 0.1 for s in health["series"])  # shown to 0.1 s
    [reason] = [r for r in health["reasons"] if "lagging" in r]
    assert reason.startswith("2 series lagging: binance:BTC/USDT@1m (") and " s behind" in reason
    assert sim.stats().by_fault.get(FaultKind.HTTP_418, 0) > 0
    sim.set_faults(Faults())  # the ban is lifted: the series catch up and are ok again
    wait_until(lambda: all(s["status"] == "ok" for s in by_symbol(system).values()), timeout=30, what="caught up")
    assert system.health()["status"] == "ok"
    for symbol in SYMBOLS:
        assert_exact(sim, db, symbol, sim_start)


def test_an_operators_reset_of_a_caught_up_series_in_a_ban_keeps_it_judged_by_its_lag(
    tmp_path: Path, sim: BinanceSimulator, sim_start: int, running: Callable[[config_mod.Config], System],
    clock: ShiftedClock,
) -> None:
    """`ctl reset` of a caught-up series whose polls a ban refuses: it is still live, judged by
    its lag (lagging past the lag bound), not by a backfill's stall bound (five pages' time),
    which would call it lagging most of a minute early."""
    cfg = make_config(tmp_path, sim, sim_start, breaker_threshold=2)
    db = cfg.storage.path
    system = running(cfg)
    wait_until(complete(system, db, sim, sim_start, SYMBOLS), what="backfill")
    wait_until(lambda: all(s["status"] == "ok" for s in by_symbol(system).values()), what="caught up")
    pace = health_settings(cfg).pace_of("binance")
    sim.set_faults(Faults(rates={FaultKind.HTTP_418: 1.0}, paths=frozenset({"/api/v3/klines"}), retry_after_s=1))
    newest_close = (stored(db, "BTC/USDT")[-1][0] + TF) / 1000
    clock.offset += newest_close + pace.lag_bound(60.0) - 20 - clock()  # 20 s within the bound
    assert pace.stall_bound < pace.lag_bound(60.0) - 20  # stalled far longer than a backfill may
    system.reset("binance")  # poll now: refused
    wait_until(lambda: all(s["status"] == "retrying" for s in by_symbol(system).values()), timeout=10,
               what="the polls refused")
    system.reset("binance")  # the operator again, the ban still on
    assert all(s["status"] != "lagging" for s in by_symbol(system).values()), by_symbol(system)
    refused = sim.stats().by_fault.get(FaultKind.HTTP_418, 0)
    wait_until(lambda: sim.stats().by_fault.get(FaultKind.HTTP_418, 0) >= refused + 2, timeout=10,
               what="refused again")
    rows = by_symbol(system)  # retrying, or ok between a refusal and the next try: never lagging yet
    assert all(s["status"] != "lagging" and s["lag_seconds"] < pace.lag_bound(60.0) for s in rows.values()), rows


@pytest.mark.long
def test_a_read_only_database_at_start_shows_storage_failing_and_lagging_series(
    tmp_path: Path, sim: BinanceSimulator, sim_start: int, running: Callable[[config_mod.Config], System],
    quick_storage: None,
) -> None:
    # a 1 s request timeout: a page's time, and so the stall bound of 5 pages, is half the default's
    cfg = make_config(tmp_path, sim, sim_start, timeout="1s")
    db = cfg.storage.path
    with Store(db) as store:  # an earlier run stored the first hour
        for symbol in SYMBOLS:
            store.upsert([("binance", symbol, "1m", *c) for c in sim.expected_candles(symbol, "1m", sim_start,
                                                                                      sim_start + 3600_000)])
    frozen = Immutable(db)
    try:
        system = running(cfg)
        wait_until(lambda: not system.health()["storage"]["ok"], timeout=10, what="storage failing")
        wait_until(lambda: all(s["status"] == "lagging" for s in by_symbol(system).values()), timeout=30,
                   what="series lagging")
        health = system.health()
        assert health["status"] == "down"
        assert "read-only" in health["storage"]["detail"]
        for s in health["series"]:
            assert s["detail"].startswith("storage failing: ") and "read-only" in s["detail"], s
            assert s["lag_seconds"] > 3600
        assert any(r.startswith("2 series lagging: ") for r in health["reasons"]), health["reasons"]
        assert len(stored(db, "BTC/USDT")) == 60
    finally:
        frozen.release()
    wait_until(lambda: system.health()["storage"]["ok"], timeout=20, what="storage recovered by itself")
    wait_until(complete(system, db, sim, sim_start, SYMBOLS), timeout=30, what="the rest stored")
    wait_until(lambda: system.health()["status"] == "ok", timeout=30, what="health ok")
    for symbol in SYMBOLS:
        assert_exact(sim, db, symbol, sim_start)
    assert system.health()["restarts_by_kind"].get("storage", 0) == 0

