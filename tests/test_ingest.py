"""Ingestion end to end, in process: the real system, real ccxt, real SQLite, the loopback exchange.

One case per fault kind (random faults, outages, poisoned symbols, crashes) lives in
`tests/test_fault_matrix.py`, which reuses the exactness helpers defined here."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from candlekeeper.app import config as config_mod
from candlekeeper.app.system import System
from candlekeeper.simulator.faults import RANDOM_KINDS, FaultKind, Faults, OutageMode
from candlekeeper.simulator.server import BinanceSimulator
from candlekeeper.supervisors.child import Runtime
from candlekeeper.supervisors.clock import ShiftedClock

TF = 60_000
HOURS = 3


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
def sim_start(clock: ShiftedClock) -> int:
    return (clock.ms() // TF) * TF - HOURS * 3600_000


@pytest.fixture
def sim(sim_start: int, clock: ShiftedClock) -> Iterator[BinanceSimulator]:
    """The simulated exchange on the test's clock (see tests/conftest.py `clock`)."""
    s = BinanceSimulator(["BTC/USDT", "ETH/USDT", "SOL/USDT"], history_start_ms=sim_start, now_ms=clock.ms).start()
    yield s
    s.stop()


def make_config(tmp_path: Any, sim: BinanceSimulator, since_ms: int, **exchange: Any) -> config_mod.Config:
    ex = {
        "symbols": ["BTC/USDT", "ETH/USDT"],
        "exchange": "binance",
        "api_base": sim.url,
        "rate_limit": 200,
        "timeout": "2s",
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since_ms / 1000)),
        "poll_interval": "2s",
        "retry_base_delay": "50ms",
        "retry_max_delay": "500ms",
        "breaker_recovery": "1s",
        "page_limit": 20,  # many small pages: many requests for the faults to hit
    }
    ex.update(exchange)
    return config_mod.from_dict(
        {
            "storage": {"path": str(tmp_path / "candles.db")},
            "exchanges": {"binance": ex},
        }
    )


@pytest.fixture
def running(clock: ShiftedClock) -> Iterator[Callable[[config_mod.Config], System]]:
    """Start systems on the test's clock; each is stopped at the end."""
    systems: list[System] = []

    def start(cfg: config_mod.Config) -> System:
        system = System(cfg, runtime=Runtime(wall=clock, allow_crash_injection=True)).start()
        systems.append(system)
        return system

    yield start
    for system in systems:
        system.stop()


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "condition",
               every: float = 0.05) -> None:
    """Wait on state owned by other threads/processes. The daemon offers no event to await for
    'the store is complete', so this polls, with a generous deadline (`every`: the pause
    between polls, longer for a costly question)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def stored(db: str, symbol: str, tf: str = "1m") -> list[tuple[Any, ...]]:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.OperationalError:
        return []  # not created (again) yet
    try:
        return conn.execute(
            "SELECT ts, open, high, low, close, volume FROM candles"
            " WHERE exchange='binance' AND symbol=? AND timeframe=? ORDER BY ts",
            (symbol, tf),
        ).fetchall()
    except sqlite3.OperationalError:
        return []  # a recreated file whose schema is being written right now
    finally:
        conn.close()


def expected(sim: BinanceSimulator, symbol: str, start: int, end: int) -> list[tuple[Any, ...]]:
    return [tuple(c) for c in sim.expected_candles(symbol, "1m", start, end)]


def series_status(system: System) -> dict[str, str]:
    return {s["symbol"]: s["status"] for s in system.health()["series"]}


def complete(system: System, db: str, sim: BinanceSimulator, start: int, symbols: list[str]) -> Callable[[], bool]:
    def check() -> bool:
        horizon = (sim.now_ms() // TF) * TF
        return all(len(stored(db, s)) >= len(expected(sim, s, start, horizon - TF)) for s in symbols)

    return check


def assert_exact(sim: BinanceSimulator, db: str, symbol: str, start: int) -> None:
    rows = stored(db, symbol)
    assert rows, f"nothing stored for {symbol}"
    end = rows[-1][0] + TF
    assert rows == expected(sim, symbol, start, end), f"{symbol}: store differs from the exchange's history"
    now = sim.now_ms()
    assert end <= now, "an open candle was stored"
    assert end >= (now // TF) * TF - TF, "the store is behind the last closed candle"


def test_backfill_exact_then_live_candles_arrive(tmp_path, sim, sim_start, running, clock) -> None:
    clock.offset += clock.until_boundary(60) - 3  # the next candle closes 3 s from now
    last = (clock.ms() // TF) * TF - TF  # the last closed candle before it
    cfg = make_config(tmp_path, sim, sim_start)
    db = cfg.storage.path
    system = running(cfg)
    wait_until(complete(system, db, sim, sim_start, ["BTC/USDT", "ETH/USDT"]), what="backfill")
    for symbol in ("BTC/USDT", "ETH/USDT"):
        assert_exact(sim, db, symbol, sim_start)
    wait_until(lambda: set(series_status(system).values()) == {"ok"}, what="series ok")
    health = system.health()
    assert health["status"] == "ok"
    assert health["exchanges"][0]["breaker"] == "closed"
    # the series are actors on the runtime's dispatcher, not a thread each
    assert not [t.name for t in threading.enumerate() if "/series/" in t.name]
    # the next candle: stored after it closes, never before (how soon is bench/ingest.py's to measure;
    # on a loaded machine the backfill may already have taken it)
    next_close = last + 2 * TF
    wait_until(lambda: stored(db, "BTC/USDT")[-1][0] > last, timeout=(next_close - clock.ms()) / 1000 + 30,
               what="live candle")
    assert clock.ms() >= next_close, "a candle was stored before it closed"
    assert_exact(sim, db, "BTC/USDT", sim_start)


@pytest.mark.long
def test_all_fault_kinds_together(tmp_path, sim, sim_start, running) -> None:
    """Every random fault kind at 5 % at once, and a server-side rate limit below the daemon's
    configured one (a misconfigured rate_limit): the store still ends exact."""
    sim.set_faults(Faults(rates={k: 0.05 for k in RANDOM_KINDS}, seed=11, stall_s=1.5, retry_after_s=1,
                          rate_limit_per_s=8))
    cfg = make_config(tmp_path, sim, sim_start, timeout="1s", retry_attempts=5, rate_limit=200)
    system = running(cfg)
    wait_until(complete(system, cfg.storage.path, sim, sim_start, ["BTC/USDT", "ETH/USDT"]), timeout=120, what="backfill under all faults")
    for symbol in ("BTC/USDT", "ETH/USDT"):
        assert_exact(sim, cfg.storage.path, symbol, sim_start)
    injected = sim.stats().by_fault
    assert sum(injected.get(k, 0) for k in RANDOM_KINDS) >= 10, injected
    assert injected.get(FaultKind.RATE_LIMIT, 0) > 0, injected  # the server's own limiter answered 429


def test_unlisted_symbol_is_invalid_and_others_run(tmp_path, sim, sim_start, running) -> None:
    cfg = make_config(tmp_path, sim, sim_start, symbols=["BTC/USDT", "NOPE/USDT"])
    system = running(cfg)
    wait_until(complete(system, cfg.storage.path, sim, sim_start, ["BTC/USDT"]), what="listed series")
    wait_until(lambda: series_status(system).get("NOPE/USDT") == "invalid", what="invalid series")
    assert_exact(sim, cfg.storage.path, "BTC/USDT", sim_start)


def test_reset_during_outage_is_prompt(tmp_path, sim, sim_start, running) -> None:
    cfg = make_config(tmp_path, sim, sim_start, breaker_threshold=2, breaker_recovery="1h")
    system = running(cfg)
    sim.set_outage(OutageMode.HTTP_503)
    wait_until(lambda: system.health()["exchanges"][0]["breaker"] == "open", what="breaker open")
    sim.set_outage(None)
    system.reset("binance")
    # the reset, not a probe (next one an hour away), brings it back
    wait_until(complete(system, cfg.storage.path, sim, sim_start, ["BTC/USDT", "ETH/USDT"]), timeout=30,
               what="recovery after reset")
    assert system.health()["exchanges"][0]["breaker"] == "closed"


def test_store_deleted_while_running_is_refilled(tmp_path, sim, sim_start, running) -> None:
    import os

    cfg = make_config(tmp_path, sim, sim_start)
    system = running(cfg)
    db = cfg.storage.path
    wait_until(complete(system, db, sim, sim_start, ["BTC/USDT", "ETH/USDT"]), what="backfill")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.remove(db + suffix)
    # no new candle needs to close, and nothing needs a reset: the storage actor notices the
    # deletion within seconds and tells every series to resync
    wait_until(lambda: os.path.exists(db) and complete(system, db, sim, sim_start, ["BTC/USDT", "ETH/USDT"])(),
               timeout=30, what="refill after deletion")
    for symbol in ("BTC/USDT", "ETH/USDT"):
        assert_exact(sim, db, symbol, sim_start)
