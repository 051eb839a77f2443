"""Ingestion end to end against PostgreSQL: the real system in process, real ccxt, the loopback
exchange, and a real PostgreSQL server (tests/pg.py). The exactness suite of the SQLite path,
run on `[storage] url`: the backfill is exact, a restart resumes where the store is, and every
store fault the SQLite path survives (the connection dropped, the server restarted, a
read-only server, a full disk, the candles table dropped) loses nothing: health says storage
is failing while it lasts, and the store ends exact.

Faults are switched on mid-backfill, when the simulator receives its n-th klines request
(`trip_at`), so the daemon runs into them on every machine; no test sleeps for a fixed time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

import candlekeeper
from candlekeeper.app.errors import CommandError
from candlekeeper.app.system import System
from candlekeeper.simulator.server import BinanceSimulator
from candlekeeper.supervisors.child import Runtime
from candlekeeper.supervisors.clock import ShiftedClock
from tests import forkserver
from tests.conftest import LEAD_S
from tests.test_fault_matrix import trip_at
from tests.test_ingest import TF, wait_until

if TYPE_CHECKING:
    from tests.pg import PgDatabase

pytest_plugins = ["tests.pg"]

LOOKBACK_MIN = 90
PAGE = 20  # 5 pages a series: faults switched on at the 4th request hit a backfill in progress
SYMBOLS = ["BTC/USDT", "ETH/USDT"]
WAIT = 60.0


@dataclass
class Run:
    sim: BinanceSimulator
    clock: ShiftedClock
    start: int
    url: str
    systems: list[System]

    @property
    def system(self) -> System:
        return self.systems[-1]

    def config(self, **exchange: Any) -> dict[str, Any]:
        ex: dict[str, Any] = {
            "symbols": SYMBOLS, "api_base": self.sim.url, "rate_limit": 100, "timeout": "1s", "page_limit": PAGE,
            "retry_base_delay": "50ms", "retry_max_delay": "300ms", "breaker_recovery": "500ms",
        }
        ex.update(exchange)
        return {
            "storage": {"url": self.url},
            "ingest": {"since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.start / 1000)),
                       "poll_interval": "1s"},
            "exchanges": {"binance": ex},
        }

    def start_system(self, **exchange: Any) -> System:
        system = candlekeeper.start(self.config(**exchange), control=False,
                                    runtime=Runtime(wall=self.clock, allow_crash_injection=True))
        self.systems.append(system)
        return system


@contextmanager
def pg_run(pg_db: PgDatabase) -> Iterator[Run]:
    clock = ShiftedClock.before_boundary(60.0, LEAD_S)  # no candle closes during a test
    start = (clock.ms() // TF) * TF - LOOKBACK_MIN * 60_000
    sim = BinanceSimulator(["BTC/USDT", "ETH/USDT", "SOL/USDT"], history_start_ms=start - 3600_000,
                           now_ms=clock.ms).start()
    run = Run(sim, clock, start, pg_db.url, [])
    try:
        yield run
    finally:
        for system in run.systems:
            system.stop()
        sim.stop()


def pg_rows(url: str, symbol: str) -> list[tuple[Any, ...]]:
    """The stored candles of a series, oldest first ([] while the server or table is away)."""
    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            return conn.execute(
                "SELECT ts, open, high, low, close, volume FROM candles"
                " WHERE exchange = 'binance' AND symbol = %s AND timeframe = '1m' ORDER BY ts", (symbol,)
            ).fetchall()
    except psycopg.Error:
        return []


def expected(run: Run, symbol: str) -> list[tuple[Any, ...]]:
    horizon = (run.sim.now_ms() // TF) * TF  # open time of the candle in progress
    return [tuple(c) for c in run.sim.expected_candles(symbol, "1m", run.start, horizon)]


def complete(run: Run, symbols: list[str] = SYMBOLS) -> Callable[[], bool]:
    return lambda: all(len(pg_rows(run.url, s)) >= len(expected(run, s)) for s in symbols)


def assert_exact(run: Run, symbols: list[str] = SYMBOLS) -> None:
    for symbol in symbols:
        rows = pg_rows(run.url, symbol)
        assert rows == expected(run, symbol), f"{symbol}: the store differs from the exchange's closed candles"


def wait_health(system: System, predicate: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    last: list[dict[str, Any]] = [{}]

    def check() -> bool:
        last[0] = system.health()
        return predicate(last[0])

    try:
        wait_until(check, timeout=WAIT, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last health: {last[0]}") from None
    return last[0]


def storage_failing(h: dict[str, Any]) -> bool:
    return not h["storage"]["ok"] and h["status"] == "down"


def recovered(h: dict[str, Any]) -> bool:
    return h["storage"]["ok"] and h["status"] == "ok" and {s["status"] for s in h["series"]} == {"ok"}


def admin(db: PgDatabase, *statements: str) -> None:
    with db.admin() as conn:
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]


def drop_connections(db: PgDatabase) -> None:
    """Terminate every session of the daemon (as a network blip or a pooler restart would)."""
    admin(db, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
              f" WHERE application_name = 'candlekeeper' AND datname = '{db.name}'")


def in_thread(fn: Callable[[], None]) -> Callable[[], None]:
    """A `trip_at` action that runs `fn` off the simulator's server thread (it may take seconds)."""
    return lambda: threading.Thread(target=fn, daemon=True).start()


# -- the tests -------------------------------------------------------------------------------------


def test_backfill_exact_on_postgresql(pg_db) -> None:
    with pg_run(pg_db) as run:
        system = run.start_system()
        wait_until(complete(run), timeout=WAIT, what="backfill")
        assert_exact(run)
        h = wait_health(system, recovered, "every series ok")
        assert h["storage"] == {"ok": True, "detail": None}
        assert "cluster" not in h and all("owner" not in s for s in h["series"])
        assert system.latest("binance", "BTC/USDT", n=2)["candles"][0]["ts"] == expected(run, "BTC/USDT")[-1][0]
        counted = system.health(counts=True)  # candle counts are read from PostgreSQL too
        assert {s["symbol"]: s["candles"] for s in counted["series"]} == {s: len(expected(run, s)) for s in SYMBOLS}
        # data out reads PostgreSQL as it reads SQLite: ranges, coverage, the export command
        assert list(system.read_candles("binance", "BTC/USDT", batch=7)) == expected(run, "BTC/USDT")
        cov = {c["symbol"]: c for c in system.coverage("binance")}
        assert all(cov[s]["complete"] and cov[s]["count"] == len(expected(run, s)) for s in SYMBOLS)
        with pytest.raises(CommandError, match="clustering is off"):
            system.cluster()
        out = forkserver.run(["export", "binance:ETH/USDT", "--db", run.url], Path.cwd())
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].startswith("time,ts,open") and [int(r.split(",")[1]) for r in lines[1:]] == [
            c[0] for c in expected(run, "ETH/USDT")]


def test_restart_resumes_where_the_store_is(pg_db) -> None:
    with pg_run(pg_db) as run:
        first = run.start_system(rate_limit=4)  # slow: stopped half-way
        wait_until(lambda: len(pg_rows(run.url, "BTC/USDT")) >= PAGE, timeout=WAIT, what="a first page")
        first.stop()
        run.systems.remove(first)
        partial = len(pg_rows(run.url, "BTC/USDT")) + len(pg_rows(run.url, "ETH/USDT"))
        assert partial < len(expected(run, "BTC/USDT")) * 2, "finished before the stop: proves nothing"
        run.sim.reset_stats()
        run.start_system()
        wait_until(complete(run), timeout=WAIT, what="backfill after the restart")
        assert_exact(run)
        # resumed after the stored candles, not from the start: fewer pages than a whole backfill
        assert run.sim.stats().by_path.get("/api/v3/klines", 0) < 2 * (LOOKBACK_MIN // PAGE + 1) + 2


def test_connection_dropped_mid_run_loses_nothing(pg_db) -> None:
    with pg_run(pg_db) as run:
        done = trip_at(run.sim, 4, lambda: drop_connections(pg_db))
        system = run.start_system()
        assert done.wait(WAIT)
        wait_until(complete(run), timeout=WAIT, what="backfill after the connection dropped")
        assert_exact(run)
        wait_health(system, recovered, "storage ok again")


def test_server_restart_mid_run_loses_nothing(pg_db, pg_cluster) -> None:
    with pg_run(pg_db) as run:
        down = threading.Event()
        done = trip_at(run.sim, 4, in_thread(lambda: (pg_cluster.stop("immediate"), down.set())))
        system = run.start_system()
        assert done.wait(WAIT) and down.wait(WAIT)
        try:
            h = wait_health(system, storage_failing, "storage failing while the server is down")
            assert any("storage failing" in r for r in h["reasons"])
        finally:
            pg_cluster.start()
        wait_until(complete(run), timeout=WAIT, what="backfill after the server came back")
        assert_exact(run)
        wait_health(system, recovered, "storage ok again")


def set_read_only(db: PgDatabase, on: bool) -> None:
    with db.cluster.admin() as conn:  # from another database: this one refuses DDL when read-only
        conn.execute(f"ALTER DATABASE {db.name} "  # type: ignore[arg-type]
                     + ("SET default_transaction_read_only = on" if on else "RESET default_transaction_read_only"))


def test_read_only_server_fails_storage_until_writable(pg_db) -> None:
    """A failover to a standby, played by a database made read-only (new sessions only, so the
    daemon's connections are dropped too): writes fail, health says so, nothing is lost."""
    with pg_run(pg_db) as run:
        done = trip_at(run.sim, 4, lambda: (set_read_only(pg_db, True), drop_connections(pg_db)))
        system = run.start_system()
        assert done.wait(WAIT)
        wait_health(system, lambda h: storage_failing(h) and "read-only" in (h["storage"]["detail"] or ""),
                    "storage failing, read-only")
        set_read_only(pg_db, False)
        wait_until(complete(run), timeout=WAIT, what="backfill once writable")
        assert_exact(run)
        wait_health(system, recovered, "storage ok again")


def test_full_disk_fails_storage_until_space_is_back(pg_db) -> None:
    """The server runs out of space (a trigger raises SQLSTATE 53100, as a full tablespace
    does): nothing of the failing batches is stored, and everything is once space is back."""
    with pg_run(pg_db) as run:
        full = ("CREATE FUNCTION full_disk() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                " RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = 'disk_full';"
                " END $$",
                "CREATE TRIGGER full_disk BEFORE INSERT ON candles FOR EACH ROW EXECUTE FUNCTION full_disk()")
        done = trip_at(run.sim, 4, lambda: admin(pg_db, *full))
        system = run.start_system()
        assert done.wait(WAIT)
        wait_health(system, lambda h: storage_failing(h) and "No space left" in (h["storage"]["detail"] or ""),
                    "storage failing, disk full")
        admin(pg_db, "DROP TRIGGER full_disk ON candles")
        wait_until(complete(run), timeout=WAIT, what="backfill once there is space")
        assert_exact(run)
        wait_health(system, recovered, "storage ok again")


def test_candles_table_dropped_is_recreated_and_refilled(pg_db) -> None:
    with pg_run(pg_db) as run:
        system = run.start_system()
        wait_until(complete(run), timeout=WAIT, what="backfill")
        admin(pg_db, "DROP TABLE candles")
        # no candle needs to close and nothing needs a reset: the storage actor notices within
        # seconds, recreates the table (a new generation) and every series refills it
        wait_until(complete(run), timeout=WAIT, what="refill after the table was dropped")
        assert_exact(run)
        wait_health(system, recovered, "every series ok again")


def test_bad_credentials_refuse_to_start_without_showing_the_password(pg_db) -> None:
    with pg_run(pg_db) as run:
        url = pg_db.password_url("not-the-password")
        cfg = {**run.config(), "storage": {"url": url}}
        with pytest.raises(candlekeeper.StorageUnusable) as info:
            candlekeeper.start(cfg, control=False, runtime=Runtime(wall=run.clock))
        assert "password authentication failed" in str(info.value) and "not-the-password" not in str(info.value)
        assert "[storage] url" in str(info.value)
