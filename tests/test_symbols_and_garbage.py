"""Smaller faults of issue 16, point 9, in process on the shared test clock.

(b) `add` checks the symbol grammar always, also while the exchange's market list is not loaded
    (a newline, a path, dashes only, 10 KB: refused, nothing persisted, no series started); a
    well-formed symbol is accepted then, and checked against the list once it loads.
(d) Health's `detail` says which garbage a series got where candles were expected: an HTML
    page, a truncated JSON body, an empty body, or an empty list of candles (a trading halt?).
"""

from __future__ import annotations

import sqlite3

import pytest

from candlekeeper.app import config as config_mod
from candlekeeper.supervisors.clock import ShiftedClock
from candlekeeper.surfaces.control import commands
from tests.sim_variants import EMPTY_BODY, HTML_PAGE, NO_CANDLES, TRUNCATED_JSON, VariantSimulator
from tests.test_ingest import TF, assert_exact, complete, make_config, wait_until

BAD_SYMBOLS = ["BTC/USDT\n", "../..", "--/--", "A" * 10_240 + "/USDT", "BTC/USDT\x00", "BTC/USDT/../x"]


@pytest.fixture
def sim_start(clock: ShiftedClock) -> int:
    return (clock.ms() // TF) * TF - 3600_000


def series_rows(db: str) -> list[tuple[str, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT exchange, symbol, timeframe FROM series").fetchall()
    finally:
        conn.close()


def test_add_checks_the_grammar_while_the_market_list_is_not_loaded(tmp_path, clock, sim_start, running) -> None:
    sim = VariantSimulator(["BTC/USDT", "ETH/USDT"], history_start_ms=sim_start, now_ms=clock.ms,
                           fail_listing={"spot": 500}).start()  # the market list cannot be loaded
    try:
        cfg = make_config(tmp_path, sim, sim_start, symbols=["BTC/USDT"])
        system = running(cfg)
        exchange = system.blueprint.exchanges["binance"].proxy()
        wait_until(lambda: sim.stats().by_path.get("/api/v3/exchangeInfo", 0) >= 2, timeout=20,
                   what="market loads failing")
        assert exchange.lists("BTC/USDT").get(timeout=5) is None  # not loaded
        add = commands(system)["add"]
        for bad in BAD_SYMBOLS:
            with pytest.raises(Exception, match="bad symbol") as refused:
                add({"exchange": "binance", "symbol": bad})
            assert len(str(refused.value)) < 300, "the refusal echoes a 10 KB name"
        assert series_rows(cfg.storage.path) == []
        assert {s["symbol"] for s in system.health()["series"]} == {"BTC/USDT"}
        # a well-formed symbol is accepted while the list is not loaded, and checked when it is
        assert add({"exchange": "binance", "symbol": "NOPE/USDT"})["added"] is True
        assert series_rows(cfg.storage.path) == [("binance", "NOPE/USDT", "1m")]
        sim.update_faults(fail_listing={})
        wait_until(lambda: {s["symbol"]: s["status"] for s in system.health()["series"]}.get("NOPE/USDT") == "invalid",
                   timeout=30, what="the unlisted symbol invalid once the list loads")
        wait_until(complete(system, cfg.storage.path, sim, sim_start, ["BTC/USDT"]), timeout=30, what="backfill")
        assert_exact(sim, cfg.storage.path, "BTC/USDT", sim_start)
    finally:
        sim.stop()


def test_config_symbols_follow_the_same_grammar(tmp_path) -> None:
    for bad in BAD_SYMBOLS:
        with pytest.raises(config_mod.ConfigError, match="symbol"):
            config_mod.from_dict({"storage": {"path": str(tmp_path / "c.db")},
                                  "exchanges": {"binance": {"symbols": [bad]}}})


GARBAGE = {
    "BTC/USDT": (HTML_PAGE, "an HTML page where JSON was expected"),
    "ETH/USDT": (TRUNCATED_JSON, "truncated or garbled JSON"),
    "SOL/USDT": (EMPTY_BODY, "an empty body where JSON was expected"),
    "XRP/USDT": (NO_CANDLES, "a trading halt?"),
}


def test_health_detail_says_which_garbage(tmp_path, clock, sim_start, running) -> None:
    symbols = [*GARBAGE, "ETH/BTC"]
    sim = VariantSimulator(symbols, history_start_ms=sim_start, now_ms=clock.ms).start()
    try:
        for symbol, (reply, _) in GARBAGE.items():
            sim.reply_with(symbol, reply)
        cfg = make_config(tmp_path, sim, sim_start, symbols=symbols)
        system = running(cfg)

        def details() -> dict[str, str]:
            return {s["symbol"]: s.get("detail") or "" for s in system.health()["series"]}

        wait_until(lambda: all(words in details().get(symbol, "") for symbol, (_, words) in GARBAGE.items()),
                   timeout=30, what="each series' detail naming its garbage")
        shown = details()
        for symbol in GARBAGE:
            others = [w for s, (_, w) in GARBAGE.items() if s != symbol]
            assert not any(w in shown[symbol] for w in others), (symbol, shown[symbol])
            assert "truncated or garbled response" not in shown[symbol]
        wait_until(complete(system, cfg.storage.path, sim, sim_start, ["ETH/BTC"]), timeout=30, what="the clean one")
        assert_exact(sim, cfg.storage.path, "ETH/BTC", sim_start)
    finally:
        sim.stop()
