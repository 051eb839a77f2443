"""The daemon over OANDA v20, end to end and in process: the real system, the real `OandaSource`
(aiohttp), real SQLite, the simulated OANDA on loopback, on a shared shifted clock placed where
each case needs it (a Monday after a weekend, a Friday's close, a Saturday, a Sunday's reopening).

- the exactness suite for an OANDA config: a backfill across a weekend stores exactly the
  exchange's closed candles of every timeframe, the weekend recorded as `market_closed` gaps
  and nothing else missing; live candles up to Friday's close and after Sunday's reopening; a
  restart resumes where it stopped; random faults at a rate; a 429 with Retry-After;
- a closed market is not polled (counted at the simulator), and is no lag for health;
- a bad token: health says `invalid` with the reason, and the requests stay few and flat; a
  missing token variable refuses the start (exit 2, one line naming the variable);
- the token appears in no log line;
- config: OANDA's keys, symbols and timeframes; `--simulate` serves an OANDA exchange.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog

from candlekeeper.actors.exchange import _closed_spans
from candlekeeper.actors.market.candles import timeframe_ms
from candlekeeper.actors.market.gaps import MARKET_CLOSED, NO_TRADES
from candlekeeper.actors.market.paging import Served
from candlekeeper.actors.market.progress import take
from candlekeeper.actors.sources.oanda import PROFILE, OandaSource
from candlekeeper.app import config as config_mod
from candlekeeper.app import data, settings
from candlekeeper.app.errors import CommandError, CredentialsMissing
from candlekeeper.app.system import System
from candlekeeper.simulator import ExchangeSimulator, FaultKind, Faults
from candlekeeper.simulator.faults import DRAWABLE_KINDS
from candlekeeper.supervisors.child import Runtime
from candlekeeper.supervisors.clock import ShiftedClock
from tests import forkserver
from tests.test_ingest import wait_until

MIN = 60_000
HOUR = 3_600_000
DAY = 86_400_000
TF_MS = {"1m": MIN, "1h": HOUR, "4h": 4 * HOUR, "1d": DAY}
TOKEN = "0f3c9a7d2e4b6a8c1d3e5f7a9b0c2d4e-7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d"  # OANDA's shape
TOKEN_ENV = "CK_TEST_OANDA_TOKEN"
NAME = "fx"
SYMBOLS = ["EUR/USD", "XAU/USD"]  # a currency pair and a metal (its week reopens an hour later)
CANDLES = "/v3/instruments/"  # the candle endpoint's path prefix


def utc(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp()) * 1000  # type: ignore[misc]


# A winter weekend (New York on EST, UTC-5): the week closes Friday 17:00 New York = 22:00 UTC
# and reopens Sunday 17:00 = 22:00 UTC (metals 18:00 = 23:00 UTC).
FRIDAY_CLOSE = utc(2025, 1, 10, 22)
SUNDAY_OPEN = utc(2025, 1, 12, 22)
METAL_OPEN = utc(2025, 1, 12, 23)
HISTORY_START = utc(2025, 1, 6)  # the Monday before
SINCE = utc(2025, 1, 10, 18)  # Friday, four hours before the close
MONDAY = utc(2025, 1, 13, 2)
SATURDAY = utc(2025, 1, 11, 12)


def clock_at(boundary_ms: int, lead_s: float = 45.0) -> ShiftedClock:
    """A clock shared by the simulator and the system, reading `lead_s` before `boundary_ms` now."""
    return ShiftedClock(boundary_ms / 1000 - lead_s - time.time())


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- harness -------------------------------------------------------------------------------


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> str:
    """The token in the variable the config names (the source reads the process environment)."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    return TOKEN


@pytest.fixture
def simulator() -> Iterator[Callable[..., ExchangeSimulator]]:
    """Simulated OANDAs on a test's clock (a week of history from the Monday before the weekend)."""
    made: list[ExchangeSimulator] = []

    def make(clock: ShiftedClock, *, token: str = TOKEN, **kwargs: Any) -> ExchangeSimulator:
        made.append(ExchangeSimulator(SYMBOLS, dialect="oanda", now_ms=clock.ms, history_start_ms=HISTORY_START,
                                      dialect_options={"token": token}, **kwargs).start())
        return made[-1]

    yield make
    for sim in made:
        sim.stop()


def make_config(tmp_path: Any, sim: ExchangeSimulator, **exchange: Any) -> config_mod.Config:
    return config_of(tmp_path, {NAME: section(sim, **exchange)})


def config_of(tmp_path: Any, exchanges: dict[str, dict[str, Any]]) -> config_mod.Config:
    return config_mod.from_dict({"storage": {"path": str(tmp_path / "fx.db")},
                                 "control": {"socket": str(tmp_path / "fx.sock")}, "exchanges": exchanges})


def section(sim: ExchangeSimulator, **exchange: Any) -> dict[str, Any]:
    """An OANDA section served by `sim`, with short timeouts and retries for tests."""
    ex = {
        "source": "oanda",
        "token_env": TOKEN_ENV,
        "symbols": SYMBOLS,
        "api_base": sim.url,
        "timeframes": ["1m"],
        "since": iso(SINCE),
        "timeout": "2s",
        "poll_interval": "2s",
        "retry_base_delay": "50ms",
        "retry_max_delay": "500ms",
        "breaker_recovery": "1s",
        "page_limit": 500,  # a weekend of minutes takes several pages
    }
    ex.update(exchange)
    return ex


class Daemons:
    """Systems started on one clock; each is stopped at the end."""

    def __init__(self, clock: ShiftedClock) -> None:
        self.clock = clock
        self.systems: list[System] = []

    def start(self, cfg: config_mod.Config) -> System:
        system = System(cfg, runtime=Runtime(wall=self.clock)).start()
        self.systems.append(system)
        return system

    def stop(self, system: System) -> None:
        system.stop()
        self.systems.remove(system)


@pytest.fixture
def daemons(simulator: Any) -> Iterator[Callable[[ShiftedClock], Daemons]]:
    """Systems on a test's clock, stopped before its simulators."""
    made: list[Daemons] = []

    def make(clock: ShiftedClock) -> Daemons:
        made.append(Daemons(clock))
        return made[-1]

    yield make
    for d in made:
        for system in list(d.systems):
            system.stop()


class Requests:
    """What reached the simulated OANDA, by path (a request hook)."""

    def __init__(self, sim: ExchangeSimulator) -> None:
        self.paths: list[str] = []
        self._lock = threading.Lock()
        sim.add_request_hook(self._hook)

    def _hook(self, path: str, params: Mapping[str, str], status: int | None, fault: Any) -> None:
        with self._lock:
            self.paths.append(path)

    @property
    def total(self) -> int:
        with self._lock:
            return len(self.paths)

    @property
    def candles(self) -> int:
        with self._lock:
            return sum(p.startswith(CANDLES) for p in self.paths)


def stored(db: str, symbol: str, tf: str, exchange: str = NAME) -> list[tuple[Any, ...]]:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.OperationalError:
        return []
    try:
        return conn.execute("SELECT ts, open, high, low, close, volume FROM candles WHERE exchange=? AND symbol=?"
                            " AND timeframe=? ORDER BY ts", (exchange, symbol, tf)).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def gaps(db: str, symbol: str, tf: str, exchange: str = NAME) -> list[tuple[int, int, str]]:
    """The recorded gaps, adjacent or overlapping ones of one reason merged (a weekend may take
    several pages, and a restart may ask for it again in other pages)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT ts_from, ts_to, reason FROM gaps WHERE exchange=? AND symbol=? AND timeframe=?"
                            " ORDER BY ts_from", (exchange, symbol, tf)).fetchall()
    finally:
        conn.close()
    merged: list[tuple[int, int, str]] = []
    for a, b, why in rows:
        if merged and a <= merged[-1][1] and merged[-1][2] == why:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]), why)
        else:
            merged.append((a, b, why))
    return merged


def start_of(tf: str) -> int:
    """The series' first open time: the first at or after SINCE."""
    return -(-SINCE // TF_MS[tf]) * TF_MS[tf]


def horizon(sim: ExchangeSimulator, tf: str) -> int:
    """The open time of the candle in progress at the exchange's now."""
    return sim.now_ms() // TF_MS[tf] * TF_MS[tf]


def expected(sim: ExchangeSimulator, symbol: str, tf: str, end: int | None = None) -> list[tuple[Any, ...]]:
    return [tuple(c) for c in sim.expected_candles(symbol, tf, start_of(tf), end or horizon(sim, tf))]


def complete(db: str, sim: ExchangeSimulator, tfs: list[str]) -> Callable[[], bool]:
    return lambda: all(len(stored(db, s, tf)) >= len(expected(sim, s, tf)) for s in SYMBOLS for tf in tfs)


def assert_exact(db: str, sim: ExchangeSimulator, symbol: str, tf: str) -> None:
    rows = stored(db, symbol, tf)
    assert rows == expected(sim, symbol, tf), f"{symbol}@{tf}: the store differs from the exchange's history"
    assert rows[-1][0] + TF_MS[tf] <= sim.now_ms(), "an open candle was stored"


def assert_nothing_else_missing(db: str, symbol: str, tf: str, end: int) -> None:
    """Every stretch from the series' start to `end` is stored or a recorded gap."""
    with data.open_store(db) as store:
        missing = store.missing_ranges(NAME, symbol, tf, TF_MS[tf], start_of(tf), end)
    assert missing == [], f"{symbol}@{tf}: not stored and not a recorded gap: {[(iso(a), iso(b)) for a, b in missing]}"


def series(system: System) -> dict[str, dict[str, Any]]:
    return {f"{s['symbol']}@{s['timeframe']}": s for s in system.health()["series"]}


def all_ok(system: System) -> Callable[[], bool]:
    return lambda: bool(series(system)) and all(s["status"] == "ok" for s in series(system).values())


# -- the exactness suite -------------------------------------------------------------------


def test_backfill_across_a_weekend_is_exact_with_market_closed_gaps(tmp_path, token, simulator, daemons) -> None:
    """Monday morning, from Friday afternoon: every closed candle of every timeframe stored once, the
    weekend recorded as `market_closed` (the metal's an hour longer), and nothing else missing.
    Sunday's daily candle and the 4h candle of the reopening exist and are stored, though the
    market was closed at their open."""
    clock = clock_at(MONDAY)
    sim = simulator(clock)
    tfs = ["1m", "1h", "4h", "1d"]
    cfg = make_config(tmp_path, sim, timeframes=tfs)
    system = daemons(clock).start(cfg)
    db = cfg.storage.path
    wait_until(complete(db, sim, tfs), what="backfill across the weekend")
    wait_until(all_ok(system), what="series ok")
    for symbol in SYMBOLS:
        for tf in tfs:
            assert_exact(db, sim, symbol, tf)
            assert_nothing_else_missing(db, symbol, tf, horizon(sim, tf))
    reopen = {"EUR/USD": SUNDAY_OPEN, "XAU/USD": METAL_OPEN}
    for symbol, opens in reopen.items():
        assert gaps(db, symbol, "1m") == [(FRIDAY_CLOSE, opens, MARKET_CLOSED)]
        assert gaps(db, symbol, "1h") == [(FRIDAY_CLOSE, opens, MARKET_CLOSED)]
        # 4h: Friday 20:00 holds the last ticks, Sunday 20:00 the first: only what lies between is closed
        assert gaps(db, symbol, "4h") == [(utc(2025, 1, 11), utc(2025, 1, 12, 20), MARKET_CLOSED)]
        assert gaps(db, symbol, "1d") == [(utc(2025, 1, 11), utc(2025, 1, 12), MARKET_CLOSED)]
        assert [r[0] for r in stored(db, symbol, "1d")] == [utc(2025, 1, 12)]  # Sunday's, from the reopening
        assert [r[0] for r in stored(db, symbol, "4h")] == [utc(2025, 1, 10, 20), utc(2025, 1, 12, 20)]
    health = system.health()
    assert health["status"] == "ok", health["reasons"]
    assert health["exchanges"][0]["status"] == "ok"


def test_seconds_and_three_hour_candles_are_exact_and_stored_after_each_close(tmp_path, token, simulator,
                                                                             daemons) -> None:
    """OANDA's S5 and H3 (timeframes 5s and 3h), Monday 03:00 to 10:00: every closed candle
    stored once, nothing missing. Then live, with poll_interval far longer than 5 s: each new 5 s
    candle is stored soon after it closes (a caught-up series polls after each close, not every
    poll_interval)."""
    clock = clock_at(utc(2025, 1, 13, 10), lead_s=2.0)
    sim = simulator(clock)
    tfs = ["5s", "3h"]
    since = utc(2025, 1, 13, 3)
    cfg = make_config(tmp_path, sim, timeframes=tfs, since=iso(since), page_limit=5000, poll_interval="60s")
    system = daemons(clock).start(cfg)
    db = cfg.storage.path

    def want(symbol: str, tf: str) -> list[tuple[Any, ...]]:
        ms = timeframe_ms(tf)
        return [tuple(c) for c in sim.expected_candles(symbol, tf, since, sim.now_ms() // ms * ms)]

    def exact(symbol: str, tf: str) -> bool:
        """The store holds every closed candle, and only those (read around a close, a candle
        just closed may not be stored yet: asked again)."""
        return stored(db, symbol, tf) == want(symbol, tf)

    wait_until(lambda: all(len(stored(db, s, tf)) >= len(want(s, tf)) for s in SYMBOLS for tf in tfs),
               what="S5 and H3 backfill")
    wait_until(all_ok(system), what="series ok")
    wait_until(lambda: all(exact(s, tf) for s in SYMBOLS for tf in tfs), timeout=10, what="S5 and H3 exact")
    for symbol in SYMBOLS:
        for tf in tfs:
            assert gaps(db, symbol, tf) == []  # the market is open, and every interval has ticks
        assert [r[0] for r in stored(db, symbol, "3h")] == [utc(2025, 1, 13, 3), utc(2025, 1, 13, 6)]
        assert stored(db, symbol, "5s")[0][0] == since
    assert system.health()["status"] == "ok"
    # live, caught up: the next 5 s candle comes from a poll after its close, well within one
    # poll_interval (60 s)
    last = {s: stored(db, s, "5s")[-1][0] for s in SYMBOLS}
    wait_until(lambda: all(stored(db, s, "5s")[-1][0] > last[s] for s in SYMBOLS), timeout=30,
               what="the next 5 s candle, polled after its close")
    wait_until(lambda: all(exact(s, "5s") for s in SYMBOLS), timeout=10, what="the live 5 s candles exact")


def test_bid_and_ask_as_two_sections_of_one_account_side_by_side(tmp_path, token, simulator, daemons) -> None:
    """price = "BA" cannot be one stored candle: bid and ask are two sections of the same account
    (the config error says so), run side by side in one daemon, each storing its own component
    exactly under its section's name, the weekend a `market_closed` gap in both."""
    clock = clock_at(MONDAY)
    sim = simulator(clock)
    sides = {"fx_bid": "B", "fx_ask": "A"}
    cfg = config_of(tmp_path, {name: section(sim, price=price) for name, price in sides.items()})
    system = daemons(clock).start(cfg)
    db = cfg.storage.path

    def want(symbol: str, price: str) -> list[tuple[Any, ...]]:
        return [tuple(c) for c in sim.expected_candles(symbol, "1m", start_of("1m"), horizon(sim, "1m"), price=price)]

    wait_until(lambda: all(len(stored(db, s, "1m", name)) >= len(want(s, price))
                           for s in SYMBOLS for name, price in sides.items()), what="bid and ask backfill")
    wait_until(lambda: len(rows := system.health()["series"]) == 2 * len(SYMBOLS)
               and all(s["status"] == "ok" for s in rows), what="the four series ok")
    for symbol in SYMBOLS:
        bid, ask = stored(db, symbol, "1m", "fx_bid"), stored(db, symbol, "1m", "fx_ask")
        assert bid == want(symbol, "B") and ask == want(symbol, "A")
        assert bid and all(b[0] == a[0] and b[4] < a[4] for b, a in zip(bid, ask, strict=True))  # bid below ask
        opens = {"EUR/USD": SUNDAY_OPEN, "XAU/USD": METAL_OPEN}[symbol]
        for name in sides:
            assert gaps(db, symbol, "1m", name) == [(FRIDAY_CLOSE, opens, MARKET_CLOSED)]
    assert stored(db, "EUR/USD", "1m") == []  # nothing under any other name
    health = system.health()
    assert health["status"] == "ok", health["reasons"]
    assert sorted(e["name"] for e in health["exchanges"]) == ["fx_ask", "fx_bid"]


@pytest.mark.long
def test_live_candles_up_to_the_close_then_no_polling(tmp_path, token, simulator, daemons) -> None:
    """Friday, the week's last candle closing in 3 s: it is stored once closed, then the series
    wait for Sunday's reopening (health: ok, not lagging, the detail says until when) and the
    exchange sees no candle request while the market is closed."""
    clock = clock_at(FRIDAY_CLOSE, lead_s=3.0)
    sim = simulator(clock)
    requests = Requests(sim)
    cfg = make_config(tmp_path, sim, heartbeat="off")
    system = daemons(clock).start(cfg)
    db = cfg.storage.path
    last = FRIDAY_CLOSE - MIN
    wait_until(lambda: all(stored(db, s, "1m") and stored(db, s, "1m")[-1][0] == last for s in SYMBOLS),
               timeout=40, what="the week's last candle")
    assert clock.ms() >= FRIDAY_CLOSE, "a candle was stored before it closed"
    for symbol in SYMBOLS:
        assert_exact(db, sim, symbol, "1m")
    wait_until(lambda: all(s["status"] == "ok" and "market closed until" in (s.get("detail") or "")
                           for s in series(system).values()), what="series waiting for the reopening")
    rows = series(system)
    assert rows["EUR/USD@1m"]["detail"] == f"market closed until {iso(SUNDAY_OPEN)}"
    assert rows["XAU/USD@1m"]["detail"] == f"market closed until {iso(METAL_OPEN)}"
    before = requests.candles
    time.sleep(3.0)  # the one fixed wait: a series still polling would ask every poll_interval (2 s)
    assert requests.candles == before, "a closed market was polled"
    health = system.health()
    assert health["status"] == "ok", health["reasons"]
    assert all(s["lag_seconds"] == 0 for s in health["series"]), health["series"]


def test_a_saturday_is_not_polled_and_is_no_lag(tmp_path, token, simulator, daemons) -> None:
    """Started on a Saturday: the backfill records Friday's close to now as `market_closed`, then
    no candle request until Sunday's reopening, and health is ok (a weekend is no lag)."""
    clock = clock_at(SATURDAY, lead_s=2.0)  # a series polling every minute would come 2 s from now
    sim = simulator(clock)
    requests = Requests(sim)
    cfg = make_config(tmp_path, sim, timeframes=["1m", "1h"], heartbeat="off")
    system = daemons(clock).start(cfg)
    db = cfg.storage.path
    wait_until(all_ok(system), what="series ok")
    for symbol in SYMBOLS:
        for tf in ("1m", "1h"):
            assert_exact(db, sim, symbol, tf)
            assert_nothing_else_missing(db, symbol, tf, horizon(sim, tf))
            assert all(why == MARKET_CLOSED for _, _, why in gaps(db, symbol, tf))
    before, at = requests.candles, clock.ms()
    wait_until(lambda: clock.ms() >= (at // MIN + 1) * MIN + 2_500, timeout=70, what="a minute boundary passed")
    assert requests.candles == before, "a closed market was polled"
    health = system.health()
    assert health["status"] == "ok", health["reasons"]
    assert all(s["status"] == "ok" and s["lag_seconds"] == 0 for s in health["series"]), health["series"]
    # a timeframe OANDA has no candles of is refused at once, not a series failing forever
    with pytest.raises(CommandError, match="OANDA has no 3m candles"):
        system.add_series(NAME, "EUR/USD", "3m")
    assert len(system.health()["series"]) == len(health["series"])


def test_live_candles_after_the_reopening(tmp_path, token, simulator, daemons) -> None:
    """Sunday, just after the currencies reopened: the first candle of the week is fetched once it
    closes, the weekend is one `market_closed` gap, and the store is exact."""
    clock = clock_at(SUNDAY_OPEN + MIN, lead_s=3.0)  # the week's first candle closes in 3 s
    sim = simulator(clock)
    cfg = make_config(tmp_path, sim, symbols=["EUR/USD"])
    system = daemons(clock).start(cfg)
    db = cfg.storage.path
    wait_until(lambda: bool(stored(db, "EUR/USD", "1m")) and stored(db, "EUR/USD", "1m")[-1][0] == SUNDAY_OPEN,
               timeout=40, what="the week's first candle")
    assert clock.ms() >= SUNDAY_OPEN + MIN, "a candle was stored before it closed"
    assert stored(db, "EUR/USD", "1m") == expected(sim, "EUR/USD", "1m")
    assert gaps(db, "EUR/USD", "1m") == [(FRIDAY_CLOSE, SUNDAY_OPEN, MARKET_CLOSED)]
    wait_until(all_ok(system), what="series ok")
    assert system.health()["status"] == "ok"


def test_a_one_shot_backfill_on_a_saturday_completes(tmp_path, token, simulator, capsys) -> None:
    """`candlekeeper backfill` on a Saturday: the newest candle is Friday's last, the rest up to
    now a `market_closed` gap, and the run completes (exit 0) rather than waiting for a candle."""
    import signal

    from candlekeeper.surfaces.backfill import Backfill

    clock = clock_at(SATURDAY)
    sim = simulator(clock)
    cfg = make_config(tmp_path, sim, timeframes=["1m", "1h"])
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        code = Backfill(cfg, clock.ms(), stall=30.0, bars=False, runtime=Runtime(wall=clock)).run()
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "backfill complete: 4 series" in out
    for symbol in SYMBOLS:
        assert stored(cfg.storage.path, symbol, "1m")[-1][0] == FRIDAY_CLOSE - MIN


def test_restart_resumes_from_saturday_to_monday(tmp_path, token, simulator, daemons) -> None:
    """Stopped on a Saturday, started again on Monday: the second run asks only for what is new,
    and the store is exact with the weekend one `market_closed` stretch."""
    clock = clock_at(SATURDAY)
    sim = simulator(clock)
    requests = Requests(sim)
    cfg = make_config(tmp_path, sim)
    db = cfg.storage.path
    runs = daemons(clock)
    first = runs.start(cfg)
    wait_until(all_ok(first), what="first run caught up")
    runs.stop(first)
    clock.offset += (MONDAY - SATURDAY) / 1000  # the daemon was down for the rest of the weekend
    asked = requests.candles
    second = runs.start(cfg)
    wait_until(complete(db, sim, ["1m"]), what="second run caught up")
    wait_until(all_ok(second), what="series ok")
    for symbol in SYMBOLS:
        assert_exact(db, sim, symbol, "1m")
        assert_nothing_else_missing(db, symbol, "1m", horizon(sim, "1m"))
    assert gaps(db, "EUR/USD", "1m") == [(FRIDAY_CLOSE, SUNDAY_OPEN, MARKET_CLOSED)]
    # resumed after the last stored candle (Friday 21:59), not from the start: Friday's close to
    # Monday 02:00 is 52 h = 3120 minutes, 7 pages of 500 per series
    assert requests.candles - asked <= 2 * 8, requests.candles - asked


@pytest.mark.long
def test_random_faults_at_a_rate_leave_the_store_exact(tmp_path, token, simulator, daemons) -> None:
    """Every random fault kind at 2.5 %, so about a quarter of the requests fail (OANDA's shapes:
    JSON errors, 429 with Retry-After, resets, stalls, cut bodies, trickles), through a backfill
    across the weekend: the store ends exact, with no gap but the weekend."""
    clock = clock_at(MONDAY)
    faults = Faults(rates={k: 0.025 for k in DRAWABLE_KINDS}, seed=15, stall_s=1.0, retry_after_s=1)
    sim = simulator(clock, faults=faults)
    cfg = make_config(tmp_path, sim, timeout="500ms", retry_attempts=5, page_limit=100)
    system = daemons(clock).start(cfg)
    db = cfg.storage.path
    wait_until(complete(db, sim, ["1m"]), timeout=120, what="backfill under faults")
    for symbol in SYMBOLS:
        assert_exact(db, sim, symbol, "1m")
        assert_nothing_else_missing(db, symbol, "1m", horizon(sim, "1m"))
        assert {why for _, _, why in gaps(db, symbol, "1m")} == {MARKET_CLOSED}
    injected = sim.stats().by_fault
    assert sum(injected.get(k, 0) for k in DRAWABLE_KINDS) >= 5, injected
    sim.set_faults(Faults())
    wait_until(all_ok(system), what="series ok after the faults")


def test_a_429_with_retry_after_is_waited_out(tmp_path, token, simulator, daemons) -> None:
    """Every request answered 429 with Retry-After: 1 mid-backfill: the breaker stays closed, the
    series say they are rate limited, the exchange asks about once per Retry-After instead of
    spinning, and once the limit lifts the store is exact."""
    clock = clock_at(MONDAY)
    sim = simulator(clock)
    requests = Requests(sim)
    cfg = make_config(tmp_path, sim, page_limit=100, retry_attempts=10, retry_max_delay="3s")
    tripped = threading.Event()

    def trip(path: str, params: Mapping[str, str], status: int | None, fault: Any) -> None:
        if path.startswith(CANDLES) and requests.candles >= 4 and not tripped.is_set():
            tripped.set()
            sim.set_faults(Faults(rates={FaultKind.HTTP_429: 1.0}, retry_after_s=1))

    sim.add_request_hook(trip)
    system = daemons(clock).start(cfg)
    db = cfg.storage.path
    wait_until(tripped.is_set, what="the limit switched on")
    wait_until(lambda: any("RateLimitExceeded" in (s.get("detail") or "") for s in series(system).values()),
               what="series rate limited")
    at = requests.total
    time.sleep(2.0)  # the one fixed wait: how many requests 2 s of a held budget let through
    during = requests.total - at
    assert during <= 8, f"{during} requests in 2 s while told to wait 1 s (spinning would be hundreds)"
    health = system.health()
    assert health["exchanges"][0]["breaker"] == "closed"
    sim.set_faults(Faults())
    wait_until(complete(db, sim, ["1m"]), what="backfill after the limit lifted")
    for symbol in SYMBOLS:
        assert_exact(db, sim, symbol, "1m")
    assert sim.stats().http_429 >= 2


# -- a bad token ---------------------------------------------------------------------------


def test_a_bad_token_is_invalid_with_the_reason_and_no_request_storm(tmp_path, monkeypatch, simulator, daemons,
                                                                     caplog) -> None:
    """The exchange answers 401 to the token in the variable: the exchange and its series are
    `invalid` with the reason, a handful of requests reach the exchange and then none, and the
    token is in no log line."""
    wrong = "deadbeef" * 4 + "-" + "feedface" * 4
    monkeypatch.setenv(TOKEN_ENV, wrong)
    clock = clock_at(MONDAY)
    sim = simulator(clock)
    requests = Requests(sim)
    cfg = make_config(tmp_path, sim, timeframes=["1m", "1h"], heartbeat="1s")
    with structlog.testing.capture_logs() as lines:
        system = daemons(clock).start(cfg)
        wait_until(lambda: system.health()["exchanges"][0]["status"] == "invalid"
                   and all(s["status"] == "invalid" for s in series(system).values()), what="invalid")
        health = system.health()
        ex = health["exchanges"][0]
        assert ex["detail"].startswith(f"AuthenticationError: OANDA rejected the token in ${TOKEN_ENV}: "), ex
        assert "HTTP 401" in ex["detail"]
        assert any(r.startswith(f"{NAME}: invalid: AuthenticationError: OANDA rejected the token") for r in
                   health["reasons"]), health["reasons"]
        assert health["status"] == "degraded"
        for s in health["series"]:
            assert f"OANDA rejected the token in ${TOKEN_ENV}" in s["detail"], s
        asked = requests.total
        assert asked <= 2, requests.paths  # one market load (its first request), maybe a series' one
        time.sleep(2.5)  # the one fixed wait: heartbeats are due every second, series re-ask on failures
        assert requests.total == asked, requests.paths
        # an operator reset checks the token again: one market load, still refused
        system.reset(NAME)
        wait_until(lambda: requests.total > asked, what="the re-check")
        wait_until(lambda: system.health()["exchanges"][0]["status"] == "invalid", what="invalid again")
        assert requests.total <= asked + 4, requests.paths
    assert any(line["event"] == "credentials_refused" and line["log_level"] == "error" for line in lines)
    for text in [repr(line) for line in lines] + [r.getMessage() for r in caplog.records]:
        assert wrong not in text and TOKEN not in text


def test_a_token_revoked_at_run_time_then_restored_and_reset(tmp_path, token, simulator, daemons) -> None:
    """The token stops working while the daemon runs: the next heartbeat makes the exchange
    `invalid`, no request follows; the token works again and an operator `reset` brings every
    series back, the store exact."""
    clock = clock_at(MONDAY)
    sim = simulator(clock)
    requests = Requests(sim)
    cfg = make_config(tmp_path, sim, heartbeat="1s")
    with structlog.testing.capture_logs() as lines:
        system = daemons(clock).start(cfg)
        db = cfg.storage.path
        wait_until(complete(db, sim, ["1m"]), what="backfill")
        wait_until(all_ok(system), what="series ok")
        sim.dialect.set_token("someone-else")  # type: ignore[attr-defined]
        wait_until(lambda: system.health()["exchanges"][0]["status"] == "invalid", what="exchange invalid")
        asked = requests.total
        time.sleep(2.5)  # the one fixed wait: heartbeats were due every second
        assert requests.total == asked, requests.paths[-10:]
        sim.dialect.set_token(TOKEN)  # type: ignore[attr-defined]
        system.reset(NAME)
        wait_until(lambda: system.health()["exchanges"][0]["status"] == "ok", what="exchange ok after the reset")
        wait_until(all_ok(system), what="series ok after the reset")
    for symbol in SYMBOLS:
        assert_exact(db, sim, symbol, "1m")
    assert any(line["event"] == "credentials_accepted" for line in lines)
    assert all(TOKEN not in repr(line) for line in lines)


def test_a_missing_token_variable_refuses_the_start(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    cfg = config_mod.from_dict({"storage": {"path": str(tmp_path / "fx.db")},
                                "exchanges": {NAME: {"source": "oanda", "token_env": TOKEN_ENV,
                                                     "symbols": ["EUR/USD"]}}})
    with pytest.raises(CredentialsMissing, match=f"environment variable {TOKEN_ENV} is not set"):
        System(cfg).start()
    monkeypatch.setenv(TOKEN_ENV, "  ")
    with pytest.raises(CredentialsMissing, match=f"environment variable {TOKEN_ENV} is empty"):
        System(cfg).start()


def test_the_daemon_exits_2_naming_the_variable(tmp_path) -> None:
    path = tmp_path / "fx.toml"
    path.write_text(f'[storage]\npath = "{tmp_path / "fx.db"}"\n[control]\nsocket = "{tmp_path / "s.sock"}"\n'
                    f'[exchanges.fx]\nsource = "oanda"\ntoken_env = "{TOKEN_ENV}"\nsymbols = ["EUR/USD"]\n')
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    # the daemon's own process (forked: tests/forkserver.py); test_daemon.py starts each entry point
    done = forkserver.run(["--config", str(path)], tmp_path, env=env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [f"candlekeeper: [exchanges.fx] token_env: environment variable {TOKEN_ENV} is not set;"
                     " it must hold the OANDA API token"], done.stderr


# -- --simulate ----------------------------------------------------------------------------


def test_simulate_serves_an_oanda_exchange_with_a_token_it_never_shows(tmp_path, monkeypatch) -> None:
    """`--simulate`: an OANDA exchange is served by the OANDA dialect, with a made-up token put in
    its variable (a real one there is never sent), and the token is in no log line."""
    from candlekeeper.surfaces.simulate import simulated as _simulated

    monkeypatch.setenv(TOKEN_ENV, "a-real-token-that-must-not-leave")
    cfg = config_mod.from_dict({
        "storage": {"path": str(tmp_path / "fx.db")},
        "exchanges": {NAME: {"source": "oanda", "token_env": TOKEN_ENV, "symbols": ["EUR/USD"], "lookback": "3d",
                             "timeframes": ["1h"]}},
    })
    with structlog.testing.capture_logs() as lines:
        simulated, sims = _simulated(cfg)
        try:
            made_up = os.environ[TOKEN_ENV]
            assert made_up != "a-real-token-that-must-not-leave"
            (ex,) = simulated.exchanges
            assert ex.source == "oanda" and ex.api_base == sims[0].url and sims[0].dialect.name == "oanda"
            assert simulated.storage.path.endswith("fx.simulate.db")
            system = System(simulated).start()
            try:
                wait_until(lambda: system.health()["exchanges"][0]["status"] == "ok", what="markets loaded")
                wait_until(lambda: bool(stored(simulated.storage.path, "EUR/USD", "1h")), what="candles stored")
            finally:
                system.stop()
        finally:
            for sim in sims:
                sim.stop()
    assert lines and all(made_up not in repr(line) for line in lines)


# -- config ---------------------------------------------------------------------------------


def oanda_section(**values: Any) -> dict[str, Any]:
    return {"exchanges": {NAME: {"source": "oanda", "symbols": ["EUR/USD"], **values}}}


BID_AND_ASK = ('[exchanges.fx] price: "BA" asks for several price components at once, but a stored candle holds one'
               " price (its OHLC); collect each in a section of its own for the same account, e.g."
               ' [exchanges.fx_bid] source = "oanda", price = "B" and [exchanges.fx_ask] source = "oanda",'
               ' price = "A" (the section name keeps their rows apart)')


def test_config_takes_every_fixed_length_granularity() -> None:
    """S5 ... W: the config accepts each timeframe OANDA has candles of (M, a month, aside)."""
    (ex,) = config_mod.from_dict(oanda_section(timeframes=["5s", "3h"])).exchanges
    assert ex.ingest.timeframes == ("5s", "3h")
    every = ["5s", "10s", "15s", "30s", "1m", "2m", "4m", "5m", "10m", "15m", "30m", "1h", "2h", "3h", "4h", "6h",
             "8h", "12h", "1d", "1w"]
    assert config_mod.from_dict(oanda_section(timeframes=every)).exchanges[0].ingest.timeframes == tuple(every)
    # ccxt exchanges keep what their ccxt table has: Gate's 10s, Deribit's 3h
    assert config_mod.from_dict({"exchanges": {"gate": {"symbols": ["BTC/USDT"], "timeframes": ["10s"]}}})
    assert config_mod.from_dict({"exchanges": {"deribit": {"symbols": ["BTC/USD:BTC"], "timeframes": ["3h"]}}})


def test_bid_and_ask_together_exit_2_with_the_way_out(tmp_path, capsys) -> None:
    """The daemon refuses price = "BA" at start, one line on stderr, exit 2 (a usage error)."""
    from candlekeeper.surfaces import cli

    path = tmp_path / "fx.toml"
    path.write_text(f'[storage]\npath = "{tmp_path / "fx.db"}"\n'
                    f'[exchanges.fx]\nsource = "oanda"\nsymbols = ["EUR/USD"]\nprice = "BA"\n')
    assert cli.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"candlekeeper: {path}: {BID_AND_ASK}\n"


def test_config_oanda_keys_and_round_trip() -> None:
    c = config_mod.from_dict(oanda_section(token_env="MY_TOKEN", environment="live", price="B",
                                           account_id="001-001-1234567-001", timeframes=["1m", "1d", "1w"]))
    (ex,) = c.exchanges
    assert (ex.name, ex.exchange, ex.source, ex.token_env, ex.environment, ex.price, ex.account_id) == (
        NAME, "oanda", "oanda", "MY_TOKEN", "live", "B", "001-001-1234567-001")
    assert config_mod.from_dict(config_mod.to_dict(c)) == c
    defaults = config_mod.from_dict(oanda_section()).exchanges[0]
    assert (defaults.token_env, defaults.environment, defaults.price, defaults.account_id) == (
        "OANDA_TOKEN", "practice", "M", None)
    assert config_mod.from_dict({"exchanges": {"binance": {"symbols": ["BTC/USDT"]}}}).exchanges[0].source == "ccxt"


@pytest.mark.parametrize(("data", "message"), [
    (oanda_section(timeframes=["1m", "3m"]),
     "[exchanges.fx] timeframes: OANDA has no 3m candles (it has: 5s 10s 15s 30s 1m 2m 4m 5m 10m 15m 30m 1h 2h 3h 4h 6h 8h 12h 1d 1w)"),
    ({"ingest": {"timeframes": ["3d"]}, **oanda_section()},
     "[exchanges.fx] timeframes: OANDA has no 3d candles (it has: 5s 10s 15s 30s 1m 2m 4m 5m 10m 15m 30m 1h 2h 3h 4h 6h 8h 12h 1d 1w)"
     " (inherited from [ingest]: set timeframes here)"),
    ({"exchanges": {"kraken": {"symbols": ["BTC/USD"], "timeframes": ["1m", "3m"]}}},
     "[exchanges.kraken] timeframes: kraken has no 3m candles (it has: 1m 5m 15m 30m 1h 4h 1d 1w)"),
    ({"ingest": {"timeframes": ["2h"]}, "exchanges": {"k": {"exchange": "kraken", "symbols": ["BTC/USD"]}}},
     "[exchanges.k] timeframes: kraken has no 2h candles (it has: 1m 5m 15m 30m 1h 4h 1d 1w)"
     " (inherited from [ingest]: set timeframes here)"),
    (oanda_section(timeframes=["1d", "1M"]),
     '[exchanges.fx] timeframes: "1M": monthly candles are not supported: months differ in length, and a series'
     " steps through time by one fixed length (use 1d or 1w and roll up)"),
    ({"exchanges": {"okx": {"symbols": ["BTC/USDT"], "timeframes": ["1m", "5s"]}}},
     "[exchanges.okx] timeframes: okx has no 5s candles (it has: "),
    ({"ingest": {"timeframes": ["3h"]}, "exchanges": {"binance": {"symbols": ["BTC/USDT"]}}},
     "[exchanges.binance] timeframes: binance has no 3h candles (it has: 1m 3m 5m 15m 30m 1h 2h 4h 6h 8h 12h 1d 3d"
     " 1w) (inherited from [ingest]: set timeframes here)"),
    (oanda_section(price="BA"), BID_AND_ASK),
    (oanda_section(price="MBA"), BID_AND_ASK.replace('"BA"', '"MBA"')),
    (oanda_section(symbols=["BTC/USDT:USDT"]), '[exchanges.fx] symbols: "BTC/USDT:USDT" is not an OANDA instrument'),
    (oanda_section(exchange="binance"), '[exchanges.fx] exchange: with source = "oanda" the exchange is "oanda"'),
    (oanda_section(environment="demo"), '[exchanges.fx] environment: expected "practice" or "live", got "demo"'),
    (oanda_section(price="MID"), '[exchanges.fx] price: expected "M" or "B" or "A", got "MID"'),
    (oanda_section(page_limit=5001), "[exchanges.fx] page_limit: OANDA serves at most 5000 candles a request"),
    (oanda_section(source="fix"), '[exchanges.fx] source: expected "ccxt" or "oanda", got "fix"'),
    ({"exchanges": {"binance": {"symbols": ["BTC/USDT"], "token_env": "X"}}},
     '[exchanges.binance] token_env: only for source = "oanda" (this section\'s source is "ccxt")'),
    ({"exchanges": {"oanda": {"symbols": ["EUR/USD"]}}},
     '[exchanges.oanda] "oanda" is not a ccxt exchange id; set exchange = "<ccxt id>" (OANDA: set source = "oanda")'),
])
def test_config_errors(data: dict[str, Any], message: str) -> None:
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.from_dict(data, source="c.toml")
    assert str(err.value).startswith(f"c.toml: {message}"), str(err.value)
    assert "\n" not in str(err.value)


def test_the_documented_oanda_sections_load() -> None:
    """The README's example and the sample config's commented section are valid configs."""
    import re
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    example = re.search(r"### OANDA v20\n\n```toml\n(.*?)```", readme, re.S)
    assert example is not None
    sample = (root / "examples" / "candlekeeper.toml").read_text().split("# [exchanges.fx]\n", 1)[1]
    section = "[exchanges.fx]\n" + "".join(line[2:] + "\n" for line in sample.splitlines() if line.startswith("# "))
    for text in (example.group(1), section):
        (ex,) = config_mod.from_dict(tomllib.loads(text)).exchanges
        assert ex.source == "oanda" and ex.token_env == "OANDA_TOKEN" and "XAU/USD" in ex.symbols
    # bid and ask: two sections of one account
    sides = re.search(r"\n  ```toml\n  (\[exchanges\.oanda_bid\].*?)  ```", readme, re.S)
    assert sides is not None
    bid, ask = config_mod.from_dict(tomllib.loads(sides.group(1).replace("\n  ", "\n"))).exchanges
    assert (bid.name, bid.price, ask.name, ask.price) == ("oanda_bid", "B", "oanda_ask", "A")
    assert bid.source == ask.source == "oanda" and bid.token_env == ask.token_env


def test_a_token_written_as_token_env_is_not_echoed() -> None:
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.from_dict(oanda_section(token_env=TOKEN))
    assert TOKEN not in str(err.value)
    assert "token_env: expected the name of an environment variable" in str(err.value)


def test_settings_use_the_oanda_source_and_its_budget(monkeypatch) -> None:
    monkeypatch.setenv("OANDA_TOKEN", TOKEN)
    ex = config_mod.from_dict(oanda_section(api_base="http://127.0.0.1:9")).exchanges[0]
    source = settings.exchange_settings(ex).source(time.time)
    assert isinstance(source, OandaSource) and source.profile is PROFILE
    assert source.settings.base_url == "http://127.0.0.1:9" and source.settings.environment == "practice"
    assert TOKEN not in repr(source)
    assert settings.requests_per_second(ex) == 100.0  # OANDA's seed budget
    assert settings.requests_per_second(config_mod.from_dict(oanda_section(rate_limit=7)).exchanges[0]) == 7


# -- closed spans, pure --------------------------------------------------------------------


@pytest.mark.parametrize(("symbol", "tf", "lo", "hi", "spans"), [
    # whole candles only: Friday's 20:00 4h candle and Sunday's 20:00 one are not closed
    ("EUR/USD", "4h", utc(2025, 1, 10, 16), utc(2025, 1, 13), [(utc(2025, 1, 11), utc(2025, 1, 12, 20))]),
    ("EUR/USD", "1d", utc(2025, 1, 9), utc(2025, 1, 14), [(utc(2025, 1, 11), utc(2025, 1, 12))]),
    ("EUR/USD", "1h", utc(2025, 1, 10, 20), utc(2025, 1, 13), [(FRIDAY_CLOSE, SUNDAY_OPEN)]),
    ("XAU/USD", "1h", utc(2025, 1, 10, 20), utc(2025, 1, 13), [(FRIDAY_CLOSE, METAL_OPEN)]),
    # metals' daily break: 17:00-18:00 New York, one whole hour
    ("XAU/USD", "1h", utc(2025, 1, 14, 20), utc(2025, 1, 15), [(utc(2025, 1, 14, 22), utc(2025, 1, 14, 23))]),
    ("XAU/USD", "2h", utc(2025, 1, 14, 20), utc(2025, 1, 15), []),  # 22:00-24:00 holds ticks from 23:00
    # clipped to the window asked about
    ("EUR/USD", "1m", utc(2025, 1, 11), utc(2025, 1, 11, 1), [(utc(2025, 1, 11), utc(2025, 1, 11, 1))]),
    ("EUR/USD", "1m", utc(2025, 1, 13), utc(2025, 1, 13, 1), []),
])
def test_closed_spans_hold_whole_closed_candles_only(symbol, tf, lo, hi, spans) -> None:
    source = OandaSource(environ={})  # its market hours by the instrument's name (no market list loaded)
    assert list(_closed_spans(source, symbol, lo, hi, timeframe_ms(tf))) == spans


def test_a_window_ending_in_a_closed_market_needs_no_settling() -> None:
    """Friday 21:59 was quiet, then the market closed: once 21:59 has settled, an answer confirms
    the quiet minute and the closed stretch after it, though the window's end is younger than
    `settle_ms` (it moves with the clock all weekend: waiting for it to settle would poll the
    closed market until Sunday)."""
    since, end = FRIDAY_CLOSE - 2 * MIN, FRIDAY_CLOSE + MIN
    candle = (FRIDAY_CLOSE - 2 * MIN, 1.0, 1.0, 1.0, 1.0, 1.0)
    served = Served(since, end, None, NO_TRADES)
    spans = [(FRIDAY_CLOSE, end)]

    def answer(now_ms: int) -> Any:
        return take([candle], served, since=since, bound=None, tf_ms=MIN, now_ms=now_ms,
                    settle_ms=PROFILE.settle_ms, first_ever=False, closed_spans=spans)

    out = answer(end + 1_000)
    assert out.gaps == [] and out.covered_to == FRIDAY_CLOSE - MIN  # 21:59 may still be published
    out = answer(FRIDAY_CLOSE + PROFILE.settle_ms)  # before end + settle_ms
    assert out.gaps == [(FRIDAY_CLOSE - MIN, FRIDAY_CLOSE, NO_TRADES), (FRIDAY_CLOSE, end, MARKET_CLOSED)]
    assert out.covered_to == end
