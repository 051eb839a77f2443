"""Storage faults that come from outside the process: a full filesystem, another process holding
the database's write lock, a read-only file. The store maps each onto its own exceptions; the
running system answers writes with the error, says storage is failing (and the alert fires),
never restarts the storage actor for it, and once the cause goes away stores everything exactly
once by itself. Real faults: a small tmpfs filled to the last byte, a second process in
``BEGIN EXCLUSIVE``, ``chattr +i`` (see tests/faults_fs.py)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from candlekeeper.actors.messages import StoredCandle
from candlekeeper.actors.stores.errors import StoreError, StoreGone, StoreUnavailable
from candlekeeper.actors.stores.sqlite import Store
from candlekeeper.app import config as config_mod
from candlekeeper.app.system import System
from candlekeeper.simulator.server import BinanceSimulator
from candlekeeper.supervisors.child import Runtime
from candlekeeper.supervisors.clock import ShiftedClock
from tests.faults_fs import Filler, Immutable, Locker, small_tmpfs
from tests.test_alerts import LogWatch
from tests.test_ingest import TF, assert_exact, complete, make_config, stored, wait_until

pytestmark = pytest.mark.usefixtures("quick_storage")

SYMBOLS = ["BTC/USDT", "ETH/USDT"]
STORAGE_ALERT = "candlekeeper/storage"
KEY = ("binance", "BTC/USDT", "1m")


def rows(times: range | list[int]) -> list[tuple[Any, ...]]:
    return [(*KEY, t, 1.0, 2.0, 0.5, 1.5, 3.0) for t in times]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "fs") as where:
        yield where


@pytest.fixture
def sim_start(clock: ShiftedClock) -> int:
    return (clock.ms() // TF) * TF - 3 * 3600_000


@pytest.fixture
def sim(sim_start: int, clock: ShiftedClock) -> Iterator[BinanceSimulator]:
    s = BinanceSimulator(SYMBOLS, history_start_ms=sim_start, now_ms=clock.ms).start()
    yield s
    s.stop()


class Delivered:
    """A subscriber counting each candle delivered: none may come twice."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: dict[tuple[str, str, str, int], int] = {}

    def __call__(self, candle: StoredCandle) -> None:
        with self.lock:
            key = (candle.exchange, candle.symbol, candle.timeframe, candle.ts)
            self.seen[key] = self.seen.get(key, 0) + 1

    def twice(self) -> list[tuple[str, str, str, int]]:
        with self.lock:
            return [k for k, n in self.seen.items() if n > 1]


@pytest.fixture
def running(clock: ShiftedClock) -> Iterator[Callable[..., System]]:
    systems: list[System] = []

    def start(cfg: config_mod.Config, subscribers: tuple[Any, ...] = ()) -> System:
        system = System(cfg, runtime=Runtime(wall=clock), subscribers=subscribers).start()
        systems.append(system)
        return system

    yield start
    for system in systems:
        system.stop()


def storage_crashes(system: System) -> tuple[int, float]:
    """(restarts, crashes) of the storage actor so far."""
    crashes = system.metrics.registry.get_sample_value("candlekeeper_crashes_total", {"kind": "storage"})
    return system.health()["restarts_by_kind"].get("storage", 0), crashes or 0.0


def assert_failing_truthfully(system: System, what: str) -> None:
    """Health says storage is failing, why, and on every series."""
    health = system.health()
    assert health["status"] == "down", health
    assert health["storage"]["ok"] is False and what in health["storage"]["detail"], health["storage"]
    assert any(r.startswith("storage failing") for r in health["reasons"]), health["reasons"]
    for s in health["series"]:
        assert "storage failing" in s["detail"], s


# -- the store: every SQLite failure is one of its exceptions --------------------------------


def test_full_filesystem_is_unavailable_full_and_passes(tmpfs: Path) -> None:
    with Store(str(tmpfs / "c.db")) as store:
        store.upsert(rows(range(0, 100 * TF, TF)))
        filler = Filler(tmpfs)
        with pytest.raises(StoreUnavailable, match="full") as info:
            for start in range(100, 10_000, 200):  # the WAL grows until the filesystem is full
                store.upsert(rows(range(start * TF, (start + 200) * TF, TF)))
        assert info.value.reason == "full" and not info.value.needs_reopen
        assert not isinstance(info.value.__cause__, StoreError)  # raised from the sqlite3 error, mapped
        stored_before = store.count(*KEY)  # reads still work
        filler.release()
        assert store.upsert(rows(range(20_000 * TF, 20_010 * TF, TF))) == 10  # the same connection recovers
        assert store.count(*KEY) == stored_before + 10


def test_locked_by_another_process_is_unavailable_locked(tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    with Store(db, busy_timeout=0.2) as store:
        store.upsert(rows([0]))
        locker = Locker(db)
        try:
            with pytest.raises(StoreUnavailable, match="locked") as info:
                store.upsert(rows([TF]))
            assert info.value.reason == "locked"
            with pytest.raises(StoreUnavailable):
                store.probe_write()
            assert store.last_ts(*KEY) == 0  # WAL: readers are not blocked by the writer's lock
            assert not store._conn.in_transaction  # type: ignore[union-attr]
        finally:
            locker.release()
        assert store.upsert(rows([TF])) == 1


def test_read_only_file_is_unavailable_readonly_until_reopened(tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    with Store(db) as store:
        store.upsert(rows([0]))
    frozen = Immutable(db)
    try:
        store = Store(db).open()  # SQLite falls back to a read-only connection without a word
        with pytest.raises(StoreUnavailable, match="read-only") as info:
            store.upsert(rows([TF]))
        assert info.value.reason == "readonly" and info.value.needs_reopen
        with pytest.raises(StoreUnavailable):
            store.probe_write()
    finally:
        frozen.release()
    with pytest.raises(StoreUnavailable):
        store.upsert(rows([TF]))  # still read-only: SQLite does not notice the file is writable again
    store.reopen()
    assert store.upsert(rows([TF])) == 1
    store.close()


def test_no_sqlite_error_leaves_the_store(tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    with Store(db) as store:
        store.upsert(rows([0]))
        with sqlite3.connect(db) as other:
            other.execute("DROP TABLE candles")
        with pytest.raises(StoreGone, match="schema"):  # reopen() recreates the schema
            store.count(*KEY)
        store.reopen()
        assert store.count(*KEY) == 0
        with pytest.raises(StoreError) as info:
            store.upsert([(*KEY, TF, None, 2.0, 0.5, 1.5, 3.0)])
        assert not isinstance(info.value, sqlite3.Error)


# -- the running system ------------------------------------------------------------------------


def test_full_disk_while_running_fails_storage_alerts_and_recovers_exactly(
    tmpfs: Path, sim: BinanceSimulator, sim_start: int, running: Callable[..., System], clock: ShiftedClock,
    logs: LogWatch,
) -> None:
    cfg = make_config(tmpfs, sim, sim_start)  # the database on the small filesystem
    db = cfg.storage.path
    delivered = Delivered()
    system = running(cfg, (delivered,))
    wait_until(complete(system, db, sim, sim_start, SYMBOLS), what="backfill")
    assert system.health()["storage"]["ok"] is True
    filler = Filler(tmpfs)
    try:
        clock.offset += 10 * 60  # ten more candles close on the exchange...
        system.reset("binance")  # ...and the series fetch them now rather than at their next poll
        wait_until(lambda: not system.health()["storage"]["ok"], timeout=30, what="storage failing")
        assert_failing_truthfully(system, "full")
        logs.wait("alert", action="trigger", dedup_key=STORAGE_ALERT, timeout=10)
        before = {s: len(stored(db, s)) for s in SYMBOLS}
        # the series keep fetching and writing; every write is answered with the error
        logs.wait("store_write_failed", n=3, timeout=30)
        assert {s: len(stored(db, s)) for s in SYMBOLS} == before
    finally:
        filler.release()
    wait_until(lambda: system.health()["storage"]["ok"], timeout=30, what="storage recovered")
    wait_until(complete(system, db, sim, sim_start, SYMBOLS), timeout=30, what="the rest stored")
    logs.wait("alert", action="resolve", dedup_key=STORAGE_ALERT, timeout=10)
    for symbol in SYMBOLS:
        assert_exact(sim, db, symbol, sim_start)
    assert storage_crashes(system) == (0, 0)
    assert delivered.twice() == []
    assert len(delivered.seen) == sum(len(stored(db, s)) for s in SYMBOLS)


@pytest.mark.parametrize("when", ["at start", "while running"])
def test_database_locked_by_another_process_fails_storage_and_recovers_exactly(
    when: str, tmp_path: Path, sim: BinanceSimulator, sim_start: int, running: Callable[..., System],
    clock: ShiftedClock, logs: LogWatch,
) -> None:
    cfg = make_config(tmp_path, sim, sim_start)
    db = cfg.storage.path
    locker: Locker | None = None
    if when == "at start":
        Store(db).open().close()  # a database made by an earlier run
        locker = Locker(db)
    try:
        system = running(cfg)
        if locker is None:
            wait_until(complete(system, db, sim, sim_start, SYMBOLS), what="backfill")
            locker = Locker(db)
            clock.offset += 10 * 60
            system.reset("binance")
        wait_until(lambda: not system.health()["storage"]["ok"], timeout=30, what="storage failing")
        assert_failing_truthfully(system, "locked")
        logs.wait("alert", action="trigger", dedup_key=STORAGE_ALERT, timeout=10)
        # resume queries and `latest` are answered while the lock is held (WAL readers go on)
        latest = system.latest("binance", "BTC/USDT", "1m")
        assert latest["last_ts"] == (stored(db, "BTC/USDT")[-1][0] if stored(db, "BTC/USDT") else None)
        logs.wait("store_write_failed", n=2, timeout=30)
    finally:
        if locker is not None:
            locker.release()
    wait_until(lambda: system.health()["storage"]["ok"], timeout=30, what="storage recovered")
    wait_until(complete(system, db, sim, sim_start, SYMBOLS), timeout=30, what="the rest stored")
    logs.wait("alert", action="resolve", dedup_key=STORAGE_ALERT, timeout=10)
    for symbol in SYMBOLS:
        assert_exact(sim, db, symbol, sim_start)
    assert storage_crashes(system) == (0, 0)
