"""One-shot backfill (`candlekeeper backfill`) through the real command line and in process
(its progress lines), and the daemon's own backfill progress log (`BackfillLog`, the health
actor)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from candlekeeper.actors.progress import BackfillLog, by_exchange, series_numbers
from candlekeeper.app import config as config_mod
from candlekeeper.app import data
from candlekeeper.app.system import System
from candlekeeper.simulator.server import BinanceSimulator
from candlekeeper.supervisors.child import Runtime
from candlekeeper.surfaces import backfill as backfill_mod
from tests.test_daemon import daemon_config, rows, run, workdir  # noqa: F401 - fixture
from tests.test_ingest import TF, expected, make_config, now_ms, sim, sim_start, wait_until  # noqa: F401 - fixtures

# -- the arithmetic --------------------------------------------------------------------------


def test_series_numbers() -> None:
    assert series_numbers(0, None, TF, 10 * TF) == (0, 10)
    assert series_numbers(0, 3 * TF, TF, 10 * TF) == (4, 10)
    assert series_numbers(0, 20 * TF, TF, 10 * TF) == (10, 10)  # past the end: done
    assert series_numbers(None, 3 * TF, TF, 10 * TF) == (0, 0)


def row(symbol: str, status: str, last: int | None, start: int = 0, exchange: str = "binance") -> dict:
    return {"exchange": exchange, "symbol": symbol, "timeframe": "1m", "status": status, "last_ts": last,
            "start_ms": start}


def test_by_exchange_names_the_slowest_series() -> None:
    p = by_exchange([row("BTC/USDT", "ok", 9 * TF), row("ETH/USDT", "backfilling", 1 * TF),
                     row("SOL/USDT", "backfilling", 5 * TF)], lambda tf: 10 * tf)["binance"]
    assert (p.series, p.backfilling, p.done, p.expected) == (3, 2, 10 + 2 + 6, 30)
    assert p.slowest == "binance:ETH/USDT@1m" and p.slowest_left == 8 and p.percent == 60.0


def test_backfill_log_progress_lines_and_completion() -> None:
    rows: dict[str, dict] = {"a": row("BTC/USDT", "backfilling", None), "b": row("ETH/USDT", "backfilling", None)}
    lines: list[tuple[str, dict]] = []
    log = BackfillLog(lambda event, **kw: lines.append((event, kw)), lambda ex: list(rows.values()))
    now = 100 * TF + 1  # candles 0..99 closed
    log.status("binance", "a", "backfilling", now, 0.0)
    log.status("binance", "b", "backfilling", now, 0.0)
    log.tick(now, 10.0)
    rows["a"]["last_ts"], rows["b"]["last_ts"] = 49 * TF, 19 * TF
    log.tick(now, 20.0)
    assert [e for e, _ in lines] == ["backfill_progress", "backfill_progress"]
    second = lines[1][1]
    assert second["candles"] == 70 and second["expected"] == 200 and second["rate_per_s"] == 7.0
    assert second["eta_s"] == round(130 / 7) and second["slowest"] == "binance:ETH/USDT@1m"
    rows["a"].update(status="ok", last_ts=99 * TF)
    log.status("binance", "a", "ok", now, 25.0)
    assert len(lines) == 2  # one series still backfilling: not complete
    rows["b"].update(status="ok", last_ts=99 * TF)
    log.status("binance", "b", "ok", now, 30.0)
    assert lines[-1] == ("backfill_complete", {"exchange": "binance", "series": 2, "candles": 200, "took_s": 30.0})
    log.tick(now, 40.0)
    assert len(lines) == 3  # nothing backfilling: no more lines


def test_the_daemon_logs_backfill_completion_per_exchange(tmp_path, sim, sim_start, clock) -> None:
    cfg = make_config(tmp_path, sim, sim_start)
    with capture_logs() as logs:
        system = System(cfg, runtime=Runtime(wall=clock)).start()
        try:
            wait_until(lambda: any(e["event"] == "backfill_complete" for e in logs), what="completion line")
        finally:
            system.stop()
    done = next(e for e in logs if e["event"] == "backfill_complete")
    assert done["exchange"] == "binance" and done["series"] == 2
    assert done["candles"] == 2 * (3 * 60)  # every closed candle of both series, from their start


# -- the command -----------------------------------------------------------------------------


def test_backfill_completes_then_exits_0(workdir: Path) -> None:
    start = (now_ms() // TF) * TF - 5 * 3600_000
    with BinanceSimulator(["BTC/USDT", "ETH/USDT"], history_start_ms=start) as sim:
        cfg = daemon_config(workdir, sim, start)
        launched = now_ms()
        res = run(["backfill", "--config", str(cfg), "--progress", "lines"], workdir, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr[-3000:]
        assert "backfill complete: 2 series" in res.stdout
        db = workdir / "candles.db"
        for symbol in ("BTC/USDT", "ETH/USDT"):
            got = rows(db, symbol)
            assert got[:len(expected(sim, symbol, start, (launched // TF) * TF))] == expected(
                sim, symbol, start, (launched // TF) * TF)  # every candle closed at launch, exactly
        events = [json.loads(line)["event"] for line in res.stderr.splitlines() if line.startswith("{")]
        assert "backfill_done" in events and "backfill_complete" not in events  # the daemon's lines left out
        assert not (workdir / "ctl.sock").exists()


def test_backfill_until_and_an_unlisted_symbol_exit_1_listing_it(workdir: Path) -> None:
    start = (now_ms() // TF) * TF - 6 * 3600_000
    with BinanceSimulator(["BTC/USDT", "ETH/USDT"], history_start_ms=start) as sim:
        cfg = daemon_config(workdir, sim, start, rate_limit=4)  # 60-candle pages at 4/s: stopped mid-way
        cfg.write_text(cfg.read_text().replace('symbols = ["BTC/USDT", "ETH/USDT"]', 'symbols = ["BTC/USDT", "NOPE/USDT"]')
                       .replace('timeout = "2s"', 'timeout = "2s"\npage_limit = 60'))
        until = start + 2 * 3600_000 + 30_000
        res = run(["backfill", "--config", str(cfg), "--until", data.iso(until), "--progress", "lines"], workdir,
                  timeout=120)
        assert res.returncode == 1, res.stdout + res.stderr[-3000:]
        assert "1 of 2 series complete" in res.stdout
        assert "binance:NOPE/USDT@1m  invalid: BadSymbol" in res.stdout
        got = rows(workdir / "candles.db", "BTC/USDT")
        assert got[:120] == expected(sim, "BTC/USDT", start, start + 120 * TF)
        assert len(got) <= 300  # it stopped soon after --until, not at now


@pytest.mark.parametrize(("args", "needle"), [
    (["--until", "2999-01-01"], "future"),
    (["--since", "later"], "bad time"),
    (["--since", "1h", "--until", "2h"], "--since must be before --until"),
])
def test_backfill_usage_errors(workdir: Path, args: list[str], needle: str) -> None:
    res = run(["backfill", *args], workdir)
    assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr


def test_backfill_progress_lines_in_process(tmp_path, sim, sim_start, clock, monkeypatch) -> None:
    """Without a terminal: one `backfill_progress` line per exchange every LINE_EVERY seconds,
    counted against the end of the run."""
    monkeypatch.setattr(backfill_mod, "LINE_EVERY", 0.2)
    cfg = make_config(tmp_path, sim, sim_start, rate_limit=20)  # slow enough for a few lines
    cfg = config_mod.from_dict({**config_mod.to_dict(cfg, secrets=True),
                                "control": {"socket": str(tmp_path / "c.sock")}})
    until = (sim.now_ms() // TF) * TF
    with capture_logs() as logs:
        rc = backfill_mod.Backfill(cfg, until, stall=60, bars=False, runtime=Runtime(wall=clock)).run()
    assert rc == 0
    lines = [e for e in logs if e["event"] == "backfill_progress"]
    assert lines and all(e["exchange"] == "binance" and e["expected"] == 2 * 3 * 60 for e in lines)
    assert lines[-1]["candles"] >= lines[0]["candles"]


def test_backfill_bars_in_process(tmp_path, sim, sim_start, clock, capsys, monkeypatch) -> None:
    """On a terminal (here forced by `bars=True`): rich progress bars on stderr, per exchange,
    candles stored of expected; the last frame shows the run complete."""
    monkeypatch.setenv("COLUMNS", "200")
    cfg = make_config(tmp_path, sim, sim_start)
    cfg = config_mod.from_dict({**config_mod.to_dict(cfg, secrets=True),
                                "control": {"socket": str(tmp_path / "c.sock")}})
    until = (sim.now_ms() // TF) * TF
    rc = backfill_mod.Backfill(cfg, until, stall=60, bars=True, runtime=Runtime(wall=clock)).run()
    assert rc == 0
    err = capsys.readouterr().err
    expected = 2 * 3 * 60
    bar = next(line for line in err.splitlines() if line.startswith("binance"))
    assert f"{expected}/{expected}" in bar and "candles 100%" in bar and "ETA" in bar, err
