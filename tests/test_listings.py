"""Market lists that change while the daemon runs (issue 16, points 6 and 9a), in process on the
shared test clock.

- A configured symbol the exchange lists only after start-up is `invalid`, then picked up without a
  restart: at once on an operator's `reset`, and by itself at the next market refresh.
- `ctl add` of a symbol listed after start-up is accepted at once (a fresh market list is asked).
- A symbol the market list has but the exchange refuses (Binance's 200 `{"code":-1121}`) is a
  transient failure, retried, never `invalid` on that alone; the market list is refreshed, and
  only a refreshed list without the symbol makes the series `invalid`."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from candlekeeper.actors import exchange as exchange_mod
from candlekeeper.app.system import System
from candlekeeper.simulator.faults import PoisonKind
from candlekeeper.supervisors.clock import ShiftedClock
from candlekeeper.surfaces.control import commands
from tests.sim_variants import VariantSimulator
from tests.test_ingest import TF, assert_exact, complete, make_config, wait_until

NEW = "NEW/USDT"
EXCHANGE_INFO = "/api/v3/exchangeInfo"


@pytest.fixture
def sim_start(clock: ShiftedClock) -> int:
    return (clock.ms() // TF) * TF - 2 * 3600_000


@pytest.fixture
def sim(sim_start: int, clock: ShiftedClock) -> Iterator[VariantSimulator]:
    """NEW/USDT trades from an hour into the history, but is not on the market list yet."""
    s = VariantSimulator(["BTC/USDT", "ETH/USDT", NEW], history_start_ms=sim_start, now_ms=clock.ms,
                         unlisted=[NEW], listed_at={NEW: sim_start + 3600_000}).start()
    yield s
    s.stop()


def status(system: System, symbol: str) -> str | None:
    return next((s["status"] for s in system.health()["series"] if s["symbol"] == symbol), None)


def market_loads(sim: VariantSimulator) -> int:
    return sim.stats().by_path.get(EXCHANGE_INFO, 0)


def test_a_listing_after_start_is_picked_up_on_reset(tmp_path, sim, sim_start, running) -> None:
    cfg = make_config(tmp_path, sim, sim_start, symbols=["BTC/USDT", NEW])
    system = running(cfg)
    wait_until(lambda: status(system, NEW) == "invalid", timeout=30, what="the unlisted symbol invalid")
    sim.list_symbol(NEW)
    system.reset("binance", NEW)  # the operator's word: look again now, not at the next refresh
    wait_until(complete(system, cfg.storage.path, sim, sim_start, [NEW, "BTC/USDT"]), timeout=30,
               what="the new listing backfilled")
    assert_exact(sim, cfg.storage.path, NEW, sim_start)
    assert_exact(sim, cfg.storage.path, "BTC/USDT", sim_start)


def test_a_listing_after_start_is_picked_up_by_the_market_refresh(tmp_path, sim, sim_start, running) -> None:
    cfg = make_config(tmp_path, sim, sim_start, symbols=["BTC/USDT", NEW], markets_refresh="2s")
    system = running(cfg)
    wait_until(lambda: status(system, NEW) == "invalid", timeout=30, what="the unlisted symbol invalid")
    loads = market_loads(sim)
    wait_until(lambda: market_loads(sim) > loads, timeout=10, what="a scheduled market refresh")
    assert status(system, NEW) == "invalid"
    sim.list_symbol(NEW)  # no command: the schedule finds it, the invalid series asks again
    wait_until(complete(system, cfg.storage.path, sim, sim_start, [NEW]), timeout=30,
               what="the new listing backfilled")
    assert_exact(sim, cfg.storage.path, NEW, sim_start)


def test_add_of_a_symbol_listed_after_start_is_accepted(tmp_path, sim, sim_start, running, clock) -> None:
    cfg = make_config(tmp_path, sim, sim_start, symbols=["BTC/USDT"])
    system = running(cfg)
    wait_until(complete(system, cfg.storage.path, sim, sim_start, ["BTC/USDT"]), timeout=30, what="backfill")
    table = commands(system)
    sim.list_symbol("LATE/USDT", listed_at_ms=clock.ms() - 30 * 60_000)  # a market the exchange never had
    reply = table["add"]({"exchange": "binance", "symbol": "LATE/USDT"})  # as `ctl add` sends it
    assert reply["added"] is True
    wait_until(complete(system, cfg.storage.path, sim, sim_start, ["LATE/USDT"]), timeout=30,
               what="the added listing backfilled")
    assert_exact(sim, cfg.storage.path, "LATE/USDT", sim_start)
    with pytest.raises(Exception, match="does not list NOPE/USDT"):
        table["add"]({"exchange": "binance", "symbol": "NOPE/USDT"})
    conn = sqlite3.connect(cfg.storage.path)
    try:
        assert conn.execute("SELECT symbol, active FROM series").fetchall() == [("LATE/USDT", 1)]
    finally:
        conn.close()


@pytest.fixture
def refused_refresh(monkeypatch: pytest.MonkeyPatch) -> float:
    """The floor between market refreshes a refused symbol triggers, shrunk for tests (10 s)."""
    monkeypatch.setattr(exchange_mod, "REFUSED_REFRESH_S", 2.0)
    return 2.0


def test_bad_symbol_for_a_listed_symbol_is_transient(tmp_path, sim, sim_start, running, logs,
                                                     refused_refresh) -> None:
    sim.poison("ETH/USDT", PoisonKind.BAD_SYMBOL_200)  # 200 {"code":-1121,"msg":"Invalid symbol."}
    cfg = make_config(tmp_path, sim, sim_start, symbols=["BTC/USDT", "ETH/USDT"])
    system = running(cfg)
    db = cfg.storage.path
    wait_until(complete(system, db, sim, sim_start, ["BTC/USDT"]), timeout=30, what="the other series")
    loads = market_loads(sim)
    # refused for longer than the list's own refresh floor: the list is asked again, has it still
    wait_until(lambda: market_loads(sim) > loads, timeout=30, what="a market refresh after the refusals")
    row = next(s for s in system.health()["series"] if s["symbol"] == "ETH/USDT")
    assert row["status"] in ("retrying", "lagging", "quarantined"), row
    assert "market list has ETH/USDT" in row.get("detail", ""), row
    assert not logs.of("symbol_not_listed")
    sim.unpoison("ETH/USDT")
    system.reset("binance", "ETH/USDT")
    wait_until(complete(system, db, sim, sim_start, ["ETH/USDT"]), timeout=30, what="recovered")
    assert_exact(sim, db, "ETH/USDT", sim_start)
    wait_until(lambda: status(system, "ETH/USDT") == "ok", timeout=10, what="ETH ok")  # its word follows its write


def test_bad_symbol_and_a_refreshed_list_without_it_make_the_series_invalid(tmp_path, sim, sim_start, running,
                                                                          logs, refused_refresh) -> None:
    cfg = make_config(tmp_path, sim, sim_start, symbols=["BTC/USDT", "ETH/USDT"])
    system = running(cfg)
    db = cfg.storage.path
    wait_until(complete(system, db, sim, sim_start, ["BTC/USDT", "ETH/USDT"]), timeout=30, what="backfill")
    sim.delist("ETH/USDT")  # its candle requests now get 400 -1121; the daemon's list still has it
    system.reset("binance", "ETH/USDT")  # poll now
    wait_until(lambda: status(system, "ETH/USDT") == "invalid", timeout=40, what="invalid after a refreshed list")
    refused = [e for e in logs.of("retrying") if "market list has ETH/USDT" in e.get("error", "")]
    assert refused, "the first refusals were not retried as transient"
    invalid = logs.of("symbol_not_listed")
    assert len(invalid) == 1 and "does not list ETH/USDT" in invalid[0]["error"], invalid
    assert status(system, "BTC/USDT") == "ok"


def test_a_refusal_answered_after_a_refreshed_list_dropped_the_symbol_says_it_is_not_listed(
        tmp_path, sim, sim_start, running, logs) -> None:
    """The request was sent while the list had the symbol; the list, refreshed meanwhile, no
    longer has it when the exchange's refusal comes back: the list decides, as it would have
    before sending (the series is `invalid`: "does not list", not the exchange's bare words)."""
    cfg = make_config(tmp_path, sim, sim_start, symbols=["BTC/USDT", "ETH/USDT"])
    system = running(cfg)
    wait_until(complete(system, cfg.storage.path, sim, sim_start, ["BTC/USDT", "ETH/USDT"]), timeout=30,
               what="backfill")
    held, release = threading.Event(), threading.Event()

    def hold_eth(path: str, params: Any, status: Any, fault: Any) -> None:
        if "klines" in path and "ETHUSDT" in str(params):
            held.set()
            release.wait(30)

    sim.add_request_hook(hold_eth)
    sim.delist("ETH/USDT")
    system.reset("binance", "ETH/USDT")  # poll now: the request goes out, and is held
    assert held.wait(30), "the series did not ask"
    exchange = system.blueprint.exchanges["binance"].proxy()
    assert exchange.listing("OTHER/USDT").get(timeout=10).result(30) is False  # a fresh list, without ETH
    assert exchange.lists("ETH/USDT").get(timeout=10) is False
    release.set()
    wait_until(lambda: status(system, "ETH/USDT") == "invalid", timeout=30, what="invalid")
    invalid = logs.of("symbol_not_listed")
    assert len(invalid) == 1 and "does not list ETH/USDT" in invalid[0]["error"], invalid
    assert status(system, "BTC/USDT") == "ok"
