"""`accept-gap` (issue 16, point 9c): a stretch the exchange keeps serving with candles that fail
validation halts its series (retrying, then quarantined), since the answer cannot be trusted and
the cursor must not skip what it has not stored. The operator accepts the stretch as lost: it is
recorded as a confirmed gap (`operator_accepted`), logged as an `operator_command`, and the series
moves past it at once, storing everything around it exactly; after a restart too (the series
learns the accepted stretches from the store when candles fail validation again)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

import pytest

from candlekeeper.actors.stores.sqlite import Store
from candlekeeper.app import config as config_mod
from candlekeeper.app import data
from candlekeeper.app.errors import CommandError
from candlekeeper.app.system import System
from candlekeeper.supervisors.clock import ShiftedClock
from candlekeeper.surfaces import cli
from candlekeeper.surfaces.control import commands
from tests.sim_variants import VariantSimulator
from tests.test_ingest import TF, complete, expected, make_config, stored, wait_until

BAD = (45, 48)  # candles 45, 46 and 47 after the series' start come with low above high


@pytest.fixture
def sim_start(clock: ShiftedClock) -> int:
    return (clock.ms() // TF) * TF - 2 * 3600_000


@pytest.fixture
def sim(sim_start: int, clock: ShiftedClock) -> Iterator[VariantSimulator]:
    s = VariantSimulator(["BTC/USDT", "ETH/USDT"], history_start_ms=sim_start, now_ms=clock.ms).start()
    s.corrupt("BTC/USDT", sim_start + BAD[0] * TF, sim_start + BAD[1] * TF)
    yield s
    s.stop()


def config(tmp_path: Any, sim: VariantSimulator, start: int) -> config_mod.Config:
    return make_config(tmp_path, sim, start, quarantine_after=2, retry_attempts=2, quarantine_probe="1h")


def series(system: System, symbol: str) -> dict[str, Any]:
    return next(s for s in system.health()["series"] if s["symbol"] == symbol)


def without_bad(sim: VariantSimulator, start: int, end: int) -> list[tuple[Any, ...]]:
    return [c for c in expected(sim, "BTC/USDT", start, end)
            if not start + BAD[0] * TF <= c[0] < start + BAD[1] * TF]


def assert_exact_around_the_gap(sim: VariantSimulator, db: str, start: int) -> None:
    rows = stored(db, "BTC/USDT")
    assert rows == without_bad(sim, start, rows[-1][0] + TF)
    assert rows[-1][0] + TF >= (sim.now_ms() // TF) * TF - TF, "the series did not catch up"


def test_a_stretch_of_invalid_candles_accepted_as_lost_lets_the_series_move_on(tmp_path, sim, sim_start, running,
                                                                            logs) -> None:
    cfg = config(tmp_path, sim, sim_start)
    db = cfg.storage.path
    system = running(cfg)
    wait_until(lambda: series(system, "BTC/USDT")["status"] == "quarantined", timeout=30, what="BTC quarantined")
    assert "InvalidCandles" in series(system, "BTC/USDT")["detail"]
    wait_until(complete(system, db, sim, sim_start, ["ETH/USDT"]), timeout=30, what="ETH backfilled")
    halted = stored(db, "BTC/USDT")
    assert len(halted) == 40  # two pages of 20, then the page with the bad candles (from 40) fails whole

    # one shape of the command per surface: the control table (ISO and epoch ms, as `ctl` sends them)
    reply = commands(system)["accept_gap"]({
        "exchange": "binance", "symbol": "BTC/USDT", "from": data.iso(sim_start + BAD[0] * TF),
        "to": sim_start + BAD[1] * TF, "reason": "the exchange serves low above high there",
    })
    assert reply["from"] == sim_start + BAD[0] * TF and reply["to"] == sim_start + BAD[1] * TF
    assert reply["candles"] == 3 and reply["gap"] == "operator_accepted"
    wait_until(lambda: len(stored(db, "BTC/USDT")) == len(without_bad(sim, sim_start, (sim.now_ms() // TF) * TF)),
               timeout=30, what="BTC past the accepted gap")
    assert_exact_around_the_gap(sim, db, sim_start)
    wait_until(lambda: series(system, "BTC/USDT")["status"] == "ok", timeout=10, what="BTC ok")
    # recorded with its reason, shown by health and coverage, logged
    assert series(system, "BTC/USDT")["detail"] == "confirmed gaps: operator_accepted 1 (3 candles)"
    with Store(db, readonly=True) as store:
        assert (sim_start + BAD[0] * TF, sim_start + BAD[1] * TF, "operator_accepted") in \
            store.gap_reasons("binance", "BTC/USDT", "1m")
    (cov,) = system.coverage("binance", "BTC/USDT", "1m")
    assert cov["complete"], cov
    assert "operator_accepted" in cov["gaps_by_reason"], cov
    (audit,) = logs.of("operator_command", command="accept_gap")
    assert audit["target"] == "binance:BTC/USDT@1m" and audit["reason"] == "the exchange serves low above high there"
    assert audit["candles"] == 3


def test_after_a_restart_the_series_learns_the_accepted_stretch_from_the_store(tmp_path, sim, sim_start,
                                                                            running, logs) -> None:
    cfg = config(tmp_path, sim, sim_start)
    db = cfg.storage.path
    # the store of an earlier run: the first 30 candles, and the operator's accepted stretch after them
    with Store(db) as store:
        store.upsert([("binance", "BTC/USDT", "1m", *c) for c in expected(sim, "BTC/USDT", sim_start,
                                                                           sim_start + 30 * TF)])
        store.record_gap("binance", "BTC/USDT", "1m", sim_start + BAD[0] * TF, sim_start + BAD[1] * TF,
                         "operator_accepted")
    system = running(cfg)
    wait_until(lambda: len(stored(db, "BTC/USDT")) == len(without_bad(sim, sim_start, (sim.now_ms() // TF) * TF)),
               timeout=30, what="BTC past the accepted gap")
    assert_exact_around_the_gap(sim, db, sim_start)
    # its word to health follows its write
    wait_until(lambda: series(system, "BTC/USDT")["status"] == "ok", timeout=10, what="BTC ok")
    assert logs.of("accepted_gaps_skipped"), "learnt from the store after the page failed validation"
    with Store(db, readonly=True) as store:  # still an accepted stretch, not re-recorded as a hole
        assert store.gap_reasons("binance", "BTC/USDT", "1m") == [
            (sim_start + BAD[0] * TF, sim_start + BAD[1] * TF, "operator_accepted")]


def test_accept_gap_refusals(tmp_path, sim, sim_start, running, clock) -> None:
    system = running(config(tmp_path, sim, sim_start))
    now = clock.ms()
    with pytest.raises(CommandError, match="no series"):
        system.accept_gap("binance", "SOL/USDT", sim_start, sim_start + TF)
    with pytest.raises(CommandError, match="unknown exchange"):
        system.accept_gap("kraken", "BTC/USDT", sim_start, sim_start + TF)
    with pytest.raises(CommandError, match="must end by now"):
        system.accept_gap("binance", "BTC/USDT", sim_start, now + 3600_000)
    with pytest.raises(CommandError, match="start must come before the end"):
        system.accept_gap("binance", "BTC/USDT", sim_start + 5 * TF, sim_start + 5 * TF)
    with pytest.raises(CommandError, match="bad time"):
        system.accept_gap("binance", "BTC/USDT", "yesterday-ish", sim_start + TF)
    with pytest.raises(CommandError, match="reason"):
        system.accept_gap("binance", "BTC/USDT", sim_start, sim_start + TF, reason="")
    table = commands(system)
    for bad in ({"exchange": "binance", "symbol": "BTC/USDT", "to": sim_start},
                {"exchange": "binance", "symbol": "BTC/USDT", "from": 1.5, "to": sim_start},
                {"exchange": "binance", "symbol": "BTC/USDT", "from": True, "to": sim_start}):
        with pytest.raises(ValueError, match="from"):
            table["accept_gap"](bad)
    # the candle still open is never accepted: `to` = now stops at the last closed candle
    reply = system.accept_gap("binance", "ETH/USDT", now - 2 * TF, now)
    assert reply["to"] == now // TF * TF


def ctl_args(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["ctl", *argv])


def test_ctl_accept_gap_arguments() -> None:
    args = ctl_args("accept-gap", "binance:BTC/USDT@5m", "2024-03-01T10:00", "1709290800000", "--reason", "bad feed")
    assert cli._ctl_params(args) == {"exchange": "binance", "symbol": "BTC/USDT", "timeframe": "5m",
                                     "from": "2024-03-01T10:00", "to": 1709290800000, "reason": "bad feed"}
    assert cli._ctl_params(ctl_args("accept-gap", "binance:BTC/USDT", "a", "b"))["timeframe"] == "1m"
    for argv in (("accept-gap", "binance:BTC/USDT", "2024-03-01"), ("accept-gap", "binance", "a", "b"),
                 ("health", "x", "y"), ("reset", "binance", "--reason", "x")):
        with pytest.raises(ValueError):
            cli._ctl_params(ctl_args(*argv))
    shown = cli._human("accept-gap", {"exchange": "binance", "symbol": "BTC/USDT", "timeframe": "1m",
                                      "from_iso": "2024-03-01T10:00:00Z", "to_iso": "2024-03-01T10:03:00Z",
                                      "candles": 3, "gap": "operator_accepted", "series_status": "backfilling"})
    assert "accepted binance:BTC/USDT@1m 2024-03-01T10:00:00Z .. 2024-03-01T10:03:00Z (3 candles)" in shown
