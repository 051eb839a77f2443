"""`ctl top`: the pure render, the refresh loop with injected keys, the terminal's mode, and the
CLI's exit code when no daemon runs."""

from __future__ import annotations

import io
import os
import pty
import shutil
import sys
import tempfile
import termios
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import candlekeeper
from candlekeeper.simulator.server import BinanceSimulator
from candlekeeper.surfaces.cli import _result
from candlekeeper.surfaces.control import request
from candlekeeper.surfaces.top import _TerminalKeys, lag_seconds, render, run_top
from tests import forkserver
from tests.test_ingest import wait_until

NOW_MS = 1_700_000_040_000  # a minute boundary
NOW = NOW_MS / 1000
M, H = 60_000, 3_600_000


def series(symbol: str, status: str = "ok", *, tf: str = "1m", ago_ms: int = 2 * M, exchange: str = "binance",
           **extra: Any) -> dict[str, Any]:
    """A series row whose newest candle opened `ago_ms` before NOW."""
    return {"exchange": exchange, "symbol": symbol, "timeframe": tf, "status": status,
            "last_ts": NOW_MS - ago_ms if ago_ms is not None else None, "restarts": 0, "failures": 0,
            "exchange_down": False, **extra}


HEALTH = {
    "status": "degraded",
    "reasons": ["kraken: probing for recovery (breaker half-open)", "1 series retrying: binance:ETH/USDT@1m"],
    "exchanges": [
        {"name": "binance", "breaker": "closed", "status": "ok", "next_probe_in": None, "openings": 0},
        {"name": "kraken", "breaker": "half_open", "status": "recovering", "next_probe_in": 12.4, "openings": 3},
        {"name": "okx", "breaker": "open", "status": "down", "next_probe_in": 40, "openings": 1},
    ],
    "series": [
        series("BTC/USDT"),  # closed 1 min ago: lag 1m00s
        series("ETH/USDT", "retrying", ago_ms=22 * M, restarts=3, failures=7, detail="timeout after 2s"),
        series("SOL/USDT", "paused", tf="1h", ago_ms=H + 90_000),  # lag 1m30s
        series("XRP/USDT", "backfilling", ago_ms=None),
        series("BTC/USDT", exchange="okx", ago_ms=5 * M, exchange_down=True),
        series("DOGE/USDT", "invalid", ago_ms=None, detail="okx does not list DOGE/USDT", exchange="okx"),
    ],
    "storage": {"ok": True, "detail": None},
    "restarts_by_kind": {"series": 3},
}
TREE = {"path": "root", "strategy": "one_for_one", "children": [
    {"id": "storage", "path": "root/storage", "state": "running", "restarts": 0, "kind": "storage"},
    {"id": "health", "path": "root/health", "state": "running", "restarts": 0, "kind": "health"},
    {"id": "binance", "path": "root/binance", "state": "running", "restarts": 0, "kind": "supervisor",
     "strategy": "rest_for_one", "children": [
         {"id": "exchange", "path": "root/binance/exchange", "state": "running", "restarts": 2, "kind": "exchange"},
         {"id": "series", "path": "root/binance/series", "state": "running", "restarts": 0, "kind": "supervisor",
          "strategy": "one_for_one", "children": [
              {"id": "BTC/USDT@1m", "path": "root/binance/series/BTC/USDT@1m", "state": "running", "restarts": 0,
               "kind": "series"}]}]},
]}


def text_of(renderable: Any, *, width: int = 120, colour: bool = False) -> str:
    console = Console(record=True, width=width, file=io.StringIO(), force_terminal=colour,
                      color_system="standard" if colour else None)
    console.print(renderable)
    return console.export_text(styles=colour)


def test_render_shows_states_lag_and_restarts() -> None:
    out = text_of(render(HEALTH, NOW, tree=TREE))
    assert "DEGRADED" in out and "3 exchanges" in out and "6 series" in out
    assert "kraken: probing for recovery" in out  # the reasons
    for word in ("closed", "half_open", "open", "recovering", "12s"):
        assert word in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    eth = rows["binance:ETH/USDT@1m"]
    assert "retrying" in eth and "21m00s" in eth and " 3 " in eth and " 7 " in eth and "timeout after 2s" in eth
    btc = rows["binance:BTC/USDT@1m"]
    assert "ok" in btc and "1m00s" in btc and "11-14 22:12" in btc
    assert "1m30s" in rows["binance:SOL/USDT@1h"]
    assert "exchange down" in rows["okx:BTC/USDT@1m"]
    assert "exchange running ↻2" in out and "series" not in out.split("actors:")[1].splitlines()[0]


def test_series_are_sorted_worst_first() -> None:
    out = text_of(render(HEALTH, NOW))
    order = [line.split()[0] for line in out.splitlines() if "@1" in line.split(" ")[0]]
    assert order == ["okx:DOGE/USDT@1m", "binance:ETH/USDT@1m", "okx:BTC/USDT@1m", "binance:XRP/USDT@1m",
                     "binance:SOL/USDT@1h", "binance:BTC/USDT@1m"]


def test_states_are_coloured() -> None:
    out = text_of(render(HEALTH, NOW), colour=True)
    assert "\x1b[32mclosed" in out  # breaker closed: green
    assert "\x1b[33mhalf_open" in out  # half-open: yellow
    assert "\x1b[1;31mopen" in out  # open: red
    assert "\x1b[33mretrying" in out and "\x1b[1;31minvalid" in out and "\x1b[32mok" in out
    assert "\x1b[1;30;43m DEGRADED " in out
    assert "\x1b[1;31m21m00s" in out  # 21 minutes behind a 1m series: red


def test_series_are_cut_to_the_terminal_height() -> None:
    many = dict(HEALTH, series=[series(f"S{i:03d}/USDT") for i in range(60)]
                + [series("BAD/USDT", "stopped", detail="crashed: " + "a very long reason " * 20)])
    out = text_of(render(many, NOW, height=24))
    lines = out.rstrip("\n").splitlines()
    assert len(lines) <= 24
    shown = [line for line in lines if line.startswith("binance:")]
    assert "binance:BAD/USDT@1m" in shown[0] and "stopped" in shown[0]  # the worst row survives the cut
    assert "1m00s" in shown[0] and "a very long reason" in shown[0]  # a long note is cut, not the data
    assert f"+{61 - len(shown)} more" in out and "enlarge the terminal" in out
    assert "+" not in text_of(render(many, NOW, height=200))  # room for all: no cut


def test_the_actors_line_wraps_in_a_narrow_terminal_and_the_view_still_fits() -> None:
    wide = dict(TREE, children=[*TREE["children"], *({"id": f"exchange{i}", "path": f"root/exchange{i}",
                                                       "state": "running", "restarts": 0, "kind": "supervisor"}
                                                      for i in range(8))])
    many = dict(HEALTH, series=[series(f"S{i:03d}/USDT") for i in range(60)])
    out = text_of(render(many, NOW, tree=wide, height=30, width=60), width=60)
    assert len(out.rstrip("\n").splitlines()) <= 30
    flat = " ".join(out.split())
    assert "binance/exchange running ↻2" in flat and "exchange7 running" in flat  # every actor shown


def test_a_narrow_terminal_cuts_names_and_notes_not_the_data() -> None:
    out = text_of(render(HEALTH, NOW), width=80)
    assert all(len(line) <= 80 for line in out.splitlines())
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "retrying" in rows["binance:ETH/USDT@1m"] and "21m00s" in rows["binance:ETH/USDT@1m"]
    assert "quarantined" in text_of(render({"series": [series("A/B", "quarantined", detail="x " * 200)]}, NOW), width=80)


def test_lag() -> None:
    assert lag_seconds(series("A/B", ago_ms=3 * M), NOW) == 120
    assert lag_seconds(series("A/B", ago_ms=None), NOW) is None
    assert lag_seconds(series("A/B", tf="7m"), NOW) is None  # unknown timeframe
    assert lag_seconds(series("A/B", ago_ms=0), NOW) == 0  # a candle not closed yet is not negative lag


def test_render_survives_odd_reports() -> None:
    assert "DOWN" in text_of(render({"status": "down", "exchanges": [], "series": [], "error": "health actor restarting"},
                                    NOW))
    assert "UNKNOWN" in text_of(render(None, NOW))
    assert "no series" in text_of(render({"series": []}, NOW))
    assert "1 series (1 ?)" in text_of(render({"series": [{"status": None}, 3]}, NOW, tree={"children": [None]}))


class FakeDaemon:
    def __init__(self, failures: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        self.calls: list[str] = []
        self.failures = failures  # numbers of the `health` calls that fail

    def __call__(self, cmd: str) -> Any:
        self.calls.append(cmd)
        if cmd == "health" and self.calls.count("health") in self.failures:
            raise ConnectionError("the daemon closed the connection without a reply")
        return HEALTH if cmd == "health" else TREE


def recorded() -> Console:
    return Console(record=True, width=120, height=40, file=io.StringIO())


def test_run_top_refreshes_until_q() -> None:
    fetch, console = FakeDaemon(), recorded()
    assert run_top(fetch, interval=0.01, console=console, keys=[None, None, "q"]) == 0
    assert fetch.calls.count("health") == 3 and fetch.calls.count("tree") == 3
    assert "binance:ETH/USDT@1m" in console.export_text()
    assert run_top(FakeDaemon(), interval=0.01, console=recorded(), keys=["Q"]) == 0


def test_run_top_shows_an_unreachable_daemon_and_recovers() -> None:
    fetch, console = FakeDaemon(failures={2, 3}), recorded()
    assert run_top(fetch, interval=0.01, console=console, keys=[None, None]) == 0  # keys run out: quits
    out = console.export_text()
    assert "daemon not reachable: the daemon closed the connection" in out and "retrying" in out
    assert "binance:ETH/USDT@1m" in out  # the last data stays on screen

    fetch, console = FakeDaemon(failures={2}), recorded()
    assert run_top(fetch, interval=0.01, console=console, keys=[None, None, "q"]) == 0
    assert fetch.calls.count("health") == 3 and "not reachable" not in console.export_text()


def test_run_top_raises_when_the_first_fetch_fails() -> None:
    def refused(cmd: str) -> Any:
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(ConnectionRefusedError):
        run_top(refused, interval=0.01, console=recorded(), keys=["q"])


def test_ctrl_c_quits_with_0() -> None:
    def keys() -> Any:
        yield None
        raise KeyboardInterrupt

    fetch = FakeDaemon()
    assert run_top(fetch, interval=0.01, console=recorded(), keys=keys()) == 0
    assert fetch.calls.count("health") == 2


def test_terminal_keys_cbreak_mode_is_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        with _TerminalKeys(slave) as keys:
            mode = termios.tcgetattr(slave)
            assert not mode[3] & termios.ICANON and not mode[3] & termios.ECHO and mode[3] & termios.ISIG
            assert keys.get(0.01) is None
            os.write(master, b"x")
            assert keys.get(1.0) == "x"
        assert termios.tcgetattr(slave) == before
        with pytest.raises(RuntimeError), _TerminalKeys(slave):
            raise RuntimeError("boom")
        assert termios.tcgetattr(slave) == before  # restored on an exception too

        # run_top with stdin a terminal: reads its keys, quits on q, restores the mode
        stdin = os.fdopen(os.dup(slave), "r")
        monkeypatch.setattr(sys, "stdin", stdin)
        os.write(master, b"q")
        fetch = FakeDaemon()
        assert run_top(fetch, interval=5.0, console=recorded()) == 0
        assert fetch.calls.count("health") == 1 and termios.tcgetattr(slave) == before
        stdin.close()
    finally:
        os.close(master)
        os.close(slave)


def test_run_top_against_a_real_system() -> None:
    d = tempfile.mkdtemp(dir="/tmp")
    with BinanceSimulator(["BTC/USDT"]) as sim:
        system = candlekeeper.start({
            "storage": {"path": f"{d}/candles.db"},
            "control": {"socket": f"{d}/ctl.sock"},
            "ingest": {"lookback": "10m"},
            "exchanges": {"binance": {"symbols": ["BTC/USDT"], "api_base": sim.url, "timeout": "2s"}},
        })
        try:
            sock = f"{d}/ctl.sock"
            wait_until(lambda: [s["status"] for s in _result(request(sock, "health"))["series"]] == ["ok"],
                       timeout=30, what="series caught up")
            console = recorded()
            assert run_top(lambda cmd: _result(request(sock, cmd)), interval=0.01, console=console,
                           keys=[None, "q"]) == 0
            out = console.export_text()
            assert " OK " in out and "binance:BTC/USDT@1m" in out and "closed" in out
            flat = " ".join(out.split())  # the actors line wraps at the terminal's width
            assert "actors: storage running" in flat and "binance/exchange running" in flat
        finally:
            system.stop()
            shutil.rmtree(d, ignore_errors=True)


def test_ctl_top_without_a_daemon_exits_1() -> None:
    run = forkserver.run(["ctl", "--socket", "/nonexistent.sock", "top"], Path.cwd())
    assert run.returncode == 1, run
    assert "not running" in run.stderr and "Traceback" not in run.stderr
