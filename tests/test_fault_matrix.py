"""The fault matrix: one case per way the exchange (or the daemon itself) can fail.

Every case runs the real system in process (`candlekeeper.start`, real ccxt, real SQLite) against
a loopback `BinanceSimulator`, and checks two things:

- DURING the fault, the health report tells the truth (observed at least once while the fault
  is active, by waiting on a condition of `system.health()`);
- AFTER the fault is removed, health is back to `ok` (every series ok, breaker closed) and the
  store is exact: for every series the stored candles are exactly the exchange's closed candles
  from the configured start, no duplicate, no hole, no invalid row, no open candle, no bogus gap.

The fault is switched on mid-backfill, from inside the simulator, when the N-th klines request
arrives (`trip_at`): the store already holds a few pages, and more pages are still to be fetched,
so the daemon is guaranteed to run into the fault, whatever the machine's speed. No case sleeps
for a fixed time; every wait is on a condition, with generous deadlines.

| family | fault | truth during |
|---|---|---|
| random, counted by the breaker | 500 502 503 504, reset, stall, short read | breaker open, exchange `down`, roll-up `down`, every series `exchange_down` and not `ok` |
| random, rate limit | 429, 418 (with Retry-After) | breaker closed, exchange `ok`, every series `retrying` (DDoSProtection), roll-up `degraded` |
| random, garbage | truncated JSON | breaker closed, exchange `ok`, every series `retrying` (BadResponse), roll-up `degraded` |
| outage | refuse, reset, 503 | as the breaker row, plus: `latest` answers read-only from the store, and only probes reach the exchange while the breaker is open |
| poison | inverted, nulls, empty | that series `quarantined`, the others `ok`, breaker closed, roll-up `degraded`, nothing invalid stored |
| poison | bad symbol | that series `invalid`, the others `ok`, breaker closed, roll-up `degraded` |
| crash | a series actor, the exchange actor (during an outage) | the restart is counted where it happened (one_for_one / rest_for_one), and it did not close the open breaker |

Random faults run in three phases: every klines request fails (the truth is stable, so it is
observed deterministically), then the fault at a high seeded rate until the backfill completes
under it (the store is exact even while faults continue), then no fault.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

import candlekeeper
from candlekeeper.app.system import System
from candlekeeper.simulator.faults import FaultKind, Faults, OutageMode, PoisonKind
from candlekeeper.simulator.server import BinanceSimulator
from candlekeeper.supervisors.child import Runtime
from candlekeeper.supervisors.clock import ShiftedClock
from tests.conftest import LEAD_S
from tests.test_ingest import TF, assert_exact, complete, stored, wait_until

# 5 pages of 20 per series, the last one ending with the candle in progress (so the backfill
# itself meets an open candle it must not store); the fault hits with pages still to fetch
LOOKBACK_MIN = 90
PAGE = 20
TRIP_AT = 4  # the klines request that switches the fault on (of 10 in the backfill)
BREAKER_THRESHOLD = 3
SEED = 20240611
HIGH_RATE = 0.3  # the "high rate" phase of random faults
KLINES = frozenset({"/api/v3/klines"})
SYMBOLS = ["BTC/USDT", "ETH/USDT"]
WAIT = 60.0  # generous: the machine is shared


# -- harness -------------------------------------------------------------------------------------


@dataclass
class Run:
    sim: BinanceSimulator
    system: System
    start: int  # open time of the first candle every series must hold
    db: str
    symbols: list[str]

    def health(self) -> dict[str, Any]:
        return self.system.health()


def config(tmp_path: Any, sim: BinanceSimulator, start: int, symbols: list[str], **exchange: Any) -> dict[str, Any]:
    """The TOML's keys, as a dict: short timeouts so a stall or an open breaker costs ~1 s."""
    ex: dict[str, Any] = {
        "symbols": symbols,
        "api_base": sim.url,
        "rate_limit": 100,
        "timeout": "1s",
        "page_limit": PAGE,
        "retry_attempts": 3,
        "retry_base_delay": "50ms",
        "retry_max_delay": "300ms",
        "breaker_threshold": BREAKER_THRESHOLD,
        "breaker_recovery": "500ms",
        # a quarantined series is probed after 60 s: only the poison cases want quarantine
        "quarantine_after": 100,
    }
    ex.update(exchange)
    return {
        "storage": {"path": str(tmp_path / "candles.db")},
        "control": {"chaos": True, "socket": str(tmp_path / "ctl.sock")},
        "ingest": {
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start / 1000)),
            "poll_interval": "1s",
        },
        "exchanges": {"binance": ex},
    }


@contextmanager
def running(tmp_path: Any, *, symbols: list[str] = SYMBOLS, faults: Faults | None = None,
            **exchange: Any) -> Iterator[Run]:
    """A simulator and the system ingesting from it; both stopped whatever happens."""
    clock = ShiftedClock.before_boundary(60.0, LEAD_S)  # no candle closes during a case
    start = (clock.ms() // TF) * TF - LOOKBACK_MIN * 60_000
    sim = BinanceSimulator(["BTC/USDT", "ETH/USDT", "SOL/USDT"], history_start_ms=start - 3600_000,
                           faults=faults, now_ms=clock.ms).start()
    system: System | None = None
    try:
        cfg = config(tmp_path, sim, start, symbols, **exchange)
        system = candlekeeper.start(cfg, control=False, runtime=Runtime(wall=clock, allow_crash_injection=True))
        yield Run(sim, system, start, cfg["storage"]["path"], list(symbols))
    finally:
        if system is not None:
            system.stop()
        sim.stop()


def trip_at(sim: BinanceSimulator, n: int, action: Callable[[], None], symbol: str | None = None) -> threading.Event:
    """Run `action` (switch a fault on) when the simulator receives its n-th klines request (of
    `symbol`, if given), from the server thread, before that request is answered: the switch
    happens mid-backfill on every machine. Returns an event set once it has happened."""
    lock = threading.Lock()
    seen = [0]
    done = threading.Event()

    def hook(path: str, params: Mapping[str, str], status: int | None, fault: FaultKind | None) -> None:
        if path != "/api/v3/klines" or (symbol is not None and params.get("symbol") != symbol.replace("/", "")):
            return
        with lock:
            seen[0] += 1
            if seen[0] != n:
                return
        action()
        done.set()

    sim.add_request_hook(hook)
    return done


def wait_health(run: Run, predicate: Callable[[dict[str, Any]], bool], what: str,
                timeout: float = WAIT) -> dict[str, Any]:
    """Poll `health` until `predicate` holds; returns that report (the last one seen on failure)."""
    last: list[dict[str, Any]] = [{}]

    def check() -> bool:
        last[0] = run.health()
        return predicate(last[0])

    try:
        wait_until(check, timeout=timeout, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last health: {last[0]}") from None
    return last[0]


def exchange(h: dict[str, Any]) -> dict[str, Any]:
    return h["exchanges"][0]


def by_symbol(h: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["symbol"]: s for s in h["series"]}


def breaker_down(symbols: list[str]) -> Callable[[dict[str, Any]], bool]:
    """The truth while the exchange is unreachable: breaker open, exchange down, roll-up down, and
    every series flagged exchange_down (none of them claims to be caught up)."""

    def check(h: dict[str, Any]) -> bool:
        rows = by_symbol(h)
        return (
            exchange(h)["breaker"] == "open"
            and exchange(h)["status"] == "down"
            and h["status"] == "down"
            and any("exchange down (breaker open)" in r for r in h["reasons"])
            and set(rows) == set(symbols)
            and all(r["exchange_down"] and r["status"] != "ok" for r in rows.values())
        )

    return check


def series_failing(symbols: list[str], error: str) -> Callable[[dict[str, Any]], bool]:
    """The truth while every request fails in a way that is the series' problem, not the
    exchange's: breaker closed, exchange ok, every series retrying with that error, degraded."""

    def check(h: dict[str, Any]) -> bool:
        rows = by_symbol(h)
        return (
            exchange(h)["breaker"] == "closed"
            and exchange(h)["status"] == "ok"
            and h["status"] == "degraded"
            and set(rows) == set(symbols)
            and all(r["status"] == "retrying" and not r["exchange_down"] and error in r.get("detail", "")
                    for r in rows.values())
            and any(f"{len(symbols)} series retrying" in r for r in h["reasons"])
        )

    return check


def all_ok(symbols: list[str]) -> Callable[[dict[str, Any]], bool]:
    def check(h: dict[str, Any]) -> bool:
        rows = by_symbol(h)
        return (
            h["status"] == "ok"
            and not h["reasons"]
            and exchange(h)["breaker"] == "closed"
            and exchange(h)["status"] == "ok"
            and set(rows) == set(symbols)
            and all(r["status"] == "ok" and not r["exchange_down"] for r in rows.values())
        )

    return check


def table_count(db: str, table: str) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()


def assert_store_exact(run: Run) -> None:
    """Every series holds exactly the exchange's closed candles from the start (no duplicate, hole,
    invalid row or open candle), nothing else is stored, and no gap was invented."""
    for symbol in run.symbols:
        assert_exact(run.sim, run.db, symbol, run.start)
    assert table_count(run.db, "candles") == sum(len(stored(run.db, s)) for s in run.symbols)
    assert table_count(run.db, "gaps") == 0, "a gap was recorded although the exchange has none"


def assert_recovered(run: Run) -> None:
    """AFTER: health back to ok and the store exact."""
    wait_health(run, all_ok(run.symbols), "health back to ok")
    wait_until(complete(run.system, run.db, run.sim, run.start, run.symbols), timeout=WAIT, what="store complete")
    assert_store_exact(run)
    h = run.health()
    assert h["status"] == "ok" and exchange(h)["breaker"] == "closed", h


# -- random faults -------------------------------------------------------------------------------

COUNTED = "breaker"  # the exchange is failing: counts toward its breaker
RATE_LIMITED = "rate_limited"  # the exchange is up and says slow down: the bucket's penalty, series retry
GARBLED = "garbled"  # the exchange answered garbage: the series retries, the exchange is fine

RANDOM_CASES = [
    (FaultKind.HTTP_500, COUNTED),
    (FaultKind.HTTP_502, COUNTED),
    (FaultKind.HTTP_503, COUNTED),
    (FaultKind.HTTP_504, COUNTED),
    (FaultKind.RESET, COUNTED),
    (FaultKind.STALL, COUNTED),  # held past the 1 s client timeout
    (FaultKind.SHORT_READ, COUNTED),
    (FaultKind.HTTP_429, RATE_LIMITED),
    (FaultKind.HTTP_418, RATE_LIMITED),
    (FaultKind.TRUNCATED, GARBLED),
]


def random_faults(kind: FaultKind, rate: float) -> Faults:
    # klines only: the fault hits ingestion, not the market list loaded once at start
    return Faults(rates={kind: rate}, seed=SEED, paths=KLINES, stall_s=1.5, retry_after_s=1)


@pytest.mark.parametrize(("kind", "family"), RANDOM_CASES, ids=[k.value for k, _ in RANDOM_CASES])
@pytest.mark.long
def test_random_fault(tmp_path, kind: FaultKind, family: str) -> None:
    with running(tmp_path) as run:
        sim = run.sim
        tripped = trip_at(sim, TRIP_AT, lambda: sim.set_faults(random_faults(kind, 1.0)))
        assert tripped.wait(WAIT), "the backfill never reached the fault"
        # DURING (every klines request fails): the truth is stable, wait for it
        if family == COUNTED:
            wait_health(run, breaker_down(run.symbols), f"breaker open under {kind.value}")
        else:
            # only once more of these faults than the breaker's threshold have been answered (at
            # most one request per series may still be on its way back): a breaker that wrongly
            # counted them would be open by now
            enough = BREAKER_THRESHOLD + len(run.symbols)
            wait_until(lambda: sim.stats().by_fault.get(kind, 0) >= enough, timeout=WAIT,
                       what=f"{enough} x {kind.value}")
            error = "DDoSProtection" if family == RATE_LIMITED else "BadResponse"
            wait_health(run, series_failing(run.symbols, error), f"series retrying under {kind.value}")
        # the store holds what it had before the fault, exactly, and nothing from the fault
        for symbol in run.symbols:
            rows = stored(run.db, symbol)
            assert rows == [tuple(c) for c in sim.expected_candles(symbol, "1m", run.start, run.start + len(rows) * TF)]
        # DURING (the fault at a high, seeded rate): the backfill completes under it, exactly
        before = sim.stats().by_fault.get(kind, 0)
        sim.set_faults(random_faults(kind, HIGH_RATE))
        wait_until(complete(run.system, run.db, sim, run.start, run.symbols), timeout=WAIT,
                   what=f"backfill under {kind.value} at {HIGH_RATE:.0%}")
        assert sim.stats().by_fault.get(kind, 0) > before, "the high-rate phase injected nothing"
        assert_store_exact(run)
        # AFTER
        sim.set_faults(Faults())
        assert_recovered(run)


def test_every_series_failing_while_the_exchanges_clock_answers_opens_the_breaker(tmp_path) -> None:
    """A series failing again gets the exchange asked directly (its heartbeat), whose answer makes
    that series' failures its own while the other series are served. Not when every series fails:
    the candle endpoint is down (a 504 on every klines request) though the clock answers. The
    series retry slowly here, so the heartbeat's answer comes between their failures (before this
    was fixed, the breaker stayed closed and the exchange `ok` through 140 failures a series)."""
    faults = Faults(rates={FaultKind.HTTP_504: 1.0}, seed=SEED, paths=KLINES)
    with running(tmp_path, faults=faults, retry_base_delay="300ms", retry_max_delay="300ms", heartbeat="1s",
                 breaker_threshold=5) as run:
        wait_health(run, breaker_down(run.symbols), "breaker open: every series failing, the clock answering")


# -- outages -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(OutageMode), ids=[f"outage-{m.value}" for m in OutageMode])
def test_outage(tmp_path, mode: OutageMode) -> None:
    with running(tmp_path) as run:
        sim = run.sim
        tripped = trip_at(sim, TRIP_AT, lambda: sim.set_outage(mode))
        assert tripped.wait(WAIT), "the backfill never reached the outage"
        # DURING: the breaker opens, everything says so
        h = wait_health(run, breaker_down(run.symbols), f"breaker open during {mode.value} outage")
        # what was stored before the outage is served read-only from the store
        latest = {}

        def read_only() -> bool:
            latest.update(run.system.latest("binance", "BTC/USDT", "1m", 5))
            return latest["read_only"]

        wait_until(read_only, timeout=WAIT, what="latest read-only")
        assert latest["exchange_breaker"] == "open" and latest["candles"], latest
        assert latest["stale_seconds"] > 0
        # while open, only probes reach the exchange: at most one per opening (and the at most
        # one request per series that was admitted before it opened)
        requests, openings = sim.stats().total, exchange(h)["openings"]
        h = wait_health(run, lambda h: exchange(h)["openings"] > openings and breaker_down(run.symbols)(h),
                        "a failed probe reopening the breaker")
        extra = sim.stats().total - requests
        assert extra <= exchange(h)["openings"] - openings + len(run.symbols), (
            f"{extra} requests reached the exchange while its breaker was open")
        # AFTER: the outage ends, a probe finds it, the series fill the gap
        sim.set_outage(None)
        assert_recovered(run)


# -- poisoned symbol -----------------------------------------------------------------------------

POISON_CASES = [
    (PoisonKind.INVERTED, "quarantined", "InvalidCandles"),
    (PoisonKind.NULLS, "quarantined", "InvalidCandles"),
    (PoisonKind.EMPTY, "quarantined", "EmptyAnswer"),  # the detail says which: not "garbled"
    # a symbol the market list has, refused: transient (retried, then quarantined), never invalid
    # while the list has it (tests/test_listings.py: a refreshed list without it makes it invalid)
    (PoisonKind.BAD_SYMBOL, "quarantined", "BadSymbol"),
]


@pytest.mark.parametrize(("kind", "status", "error"), POISON_CASES,
                         ids=[f"poison-{k.value}" for k, _, _ in POISON_CASES])
def test_poisoned_symbol(tmp_path, kind: PoisonKind, status: str, error: str) -> None:
    symbols = ["BTC/USDT", "SOL/USDT", "ETH/USDT"]
    with running(tmp_path, symbols=symbols, quarantine_after=2, retry_attempts=2) as run:
        sim = run.sim
        tripped = trip_at(sim, 2, lambda: sim.poison("SOL/USDT", kind), symbol="SOL/USDT")
        assert tripped.wait(WAIT), "SOL's backfill never reached the poison"
        healthy = ["BTC/USDT", "ETH/USDT"]

        def isolated(h: dict[str, Any]) -> bool:
            rows = by_symbol(h)
            sol = rows.get("SOL/USDT", {})
            return (
                sol.get("status") == status
                and error in sol.get("detail", "")
                and not sol["exchange_down"]
                and all(rows.get(s, {}).get("status") == "ok" for s in healthy)
                and exchange(h)["breaker"] == "closed"
                and exchange(h)["status"] == "ok"
                and h["status"] == "degraded"
                and any(f"1 series {status}: binance:SOL/USDT@1m" in r for r in h["reasons"])
            )

        # DURING: only the poisoned series is in trouble, and health says which and why
        wait_health(run, isolated, f"SOL/USDT {status}, the others ok")
        for symbol in healthy:
            assert_exact(sim, run.db, symbol, run.start)
        sol = stored(run.db, "SOL/USDT")  # its good first page(s), and no garbage
        assert len(sol) < LOOKBACK_MIN
        assert sol == [tuple(c) for c in sim.expected_candles("SOL/USDT", "1m", run.start, run.start + len(sol) * TF)]
        # AFTER: the exchange heals; a quarantined/invalid series is re-probed only slowly (60 s /
        # 1 h), so the operator's reset releases it, and it fills exactly
        sim.unpoison("SOL/USDT")
        run.system.reset("binance", "SOL/USDT")
        assert_recovered(run)


# -- crashes -------------------------------------------------------------------------------------

CRASH_CASES = ["series", "exchange"]


@pytest.mark.parametrize("victim", CRASH_CASES, ids=[f"crash-{v}" for v in CRASH_CASES])
def test_crash(tmp_path, victim: str) -> None:
    """A crash (as a bug would raise) while the exchange is down: the supervisor restarts the
    victim, the new incarnation resumes from the store, and the restart does not close the open
    breaker (or restarts would bypass it)."""
    with running(tmp_path) as run:
        sim, system = run.sim, run.system
        tripped = trip_at(sim, TRIP_AT, lambda: sim.set_outage(OutageMode.HTTP_503))
        assert tripped.wait(WAIT)
        wait_health(run, breaker_down(run.symbols), "breaker open")
        target = "binance/series/BTC/USDT@1m" if victim == "series" else "binance/exchange"
        path = f"root/{target}"
        restart = threading.Event()
        system.runtime.events.subscribe(lambda ev: ev.kind == "restarted" and ev.path == path and restart.set())
        assert system.crash(target) == {"crashed": path}
        assert restart.wait(WAIT), f"{path} was not restarted"
        # at once, before a fresh breaker could have re-opened on its own: the (new) exchange
        # actor still holds the open breaker; a restart must not bypass it
        status = system.blueprint.exchanges["binance"].proxy().status().get(timeout=WAIT)
        assert status["breaker"] != "closed", status

        def restarted(h: dict[str, Any]) -> bool:
            kinds = h["restarts_by_kind"]
            rows = by_symbol(h)
            if victim == "series":  # one_for_one: that series alone
                counted = kinds == {"series": 1} and {s: r["restarts"] for s, r in rows.items()} == {
                    "BTC/USDT": 1, "ETH/USDT": 0}
            else:  # rest_for_one: the exchange actor, and after it the series supervisor
                counted = kinds == {"exchange": 1, "supervisor": 1}
            return counted and breaker_down(run.symbols)(h)

        # DURING: the restart is reported, and the exchange is still (truthfully) down
        wait_health(run, restarted, f"{victim} restart reported, breaker still open")
        exchange_sup = next(c for c in system.tree()["children"] if c["id"] == "binance")
        rows = {c["id"]: c["restarts"] for c in exchange_sup["children"]}
        assert rows == ({"exchange": 0, "series": 0} if victim == "series" else {"exchange": 1, "series": 1})
        # AFTER: the exchange comes back, the new incarnations fill the store exactly
        sim.set_outage(None)
        assert_recovered(run)
        assert run.health()["restarts_by_kind"] == ({"series": 1} if victim == "series"
                                                    else {"exchange": 1, "supervisor": 1})
