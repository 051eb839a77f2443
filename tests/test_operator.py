"""The operator's side against the real daemon process: start-up refusals (a control socket that
cannot be created, a storage file that is not a database), `restart control` end to end, the
health table saying why, `ctl top` without a terminal, `| head`, messages that agree, operator
commands in the log, `ctl coverage` with and without the daemon; `--simulate`'s market list."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from candlekeeper.app import config as config_mod
from candlekeeper.simulator.server import BinanceSimulator
from candlekeeper.surfaces.control import request
from candlekeeper.surfaces.simulate import simulated as _simulated
from tests.test_daemon import RUN, Daemon, count, ctl_here, daemon_config, run, workdir, write_config  # noqa: F401 - fixture
from tests.test_ingest import TF, now_ms, wait_until


def one_line(res: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    return lines[0]


@pytest.mark.parametrize("socket_path", ["{d}/no/such/dir/c.sock", "{d}/" + "x" * 120 + ".sock"])
def test_control_socket_that_cannot_be_created_exits_2_at_start(workdir: Path, socket_path: str) -> None:
    path = socket_path.format(d=workdir)
    cfg = write_config(workdir, f"[storage]\npath = '{workdir}/c.db'\n[control]\nsocket = '{path}'\n"
                                "[exchanges.binance]\nsymbols = ['BTC/USDT']\napi_base = 'http://127.0.0.1:9'\n")
    res = run(["--config", str(cfg)], workdir, timeout=30)
    assert res.returncode == 2
    line = one_line(res)
    assert path in line and "[control] socket" in line
    assert ("does not exist" in line) if "no/such" in path else ("longer than a Unix socket path" in line)


def test_storage_file_that_is_not_a_database_exits_2_and_is_left_alone(workdir: Path) -> None:
    db = workdir / "notes.db"
    db.write_text("these are my notes, not a database\n" * 100)
    cfg = write_config(workdir, f"[storage]\npath = '{db}'\n[control]\nsocket = '{workdir}/c.sock'\n"
                                "[exchanges.binance]\nsymbols = ['BTC/USDT']\napi_base = 'http://127.0.0.1:9'\n")
    res = run(["--config", str(cfg)], workdir, timeout=30)
    assert res.returncode == 2
    line = one_line(res)
    assert "[storage] path" in line and str(db) in line and "not a usable SQLite database" in line
    assert db.read_text().startswith("these are my notes")  # not moved aside, not replaced
    assert [p.name for p in workdir.iterdir() if "corrupt" in p.name] == []


@pytest.mark.long(12)
def test_operator_surfaces_against_the_daemon(workdir: Path) -> None:
    start = (now_ms() // TF) * TF - 20 * 3600_000  # 1200 candles: `latest -n 1000` fills a pipe
    with BinanceSimulator(["BTC/USDT", "ETH/USDT"], history_start_ms=start) as sim:
        cfg = daemon_config(workdir, sim, start)
        cfg.write_text(cfg.read_text().replace('symbols = ["BTC/USDT", "ETH/USDT"]',
                                               'symbols = ["BTC/USDT", "ETH/USDT", "NOPE/USDT"]'))
        sock = str(workdir / "ctl.sock")
        db = workdir / "candles.db"
        daemon = Daemon(workdir, cfg).start()
        try:
            wait_until(lambda: count(db, "ETH/USDT") >= 1199 and count(db, "BTC/USDT") >= 1199, what="backfill")
            wait_until(lambda: {s["symbol"]: s["status"] for s in request(sock, "health")["result"]["series"]}
                       .get("NOPE/USDT") == "invalid", what="invalid series")

            # the table says why: the reason, the detail of the invalid series, lag and candle count
            table = daemon.ctl_here("health")
            assert table.returncode == 0, table.stderr
            assert "1 series invalid: binance:NOPE/USDT@1m" in table.stdout
            nope = next(line for line in table.stdout.splitlines() if line.startswith("binance:NOPE/USDT@1m"))
            assert "does not list NOPE/USDT" in nope
            head = next(line for line in table.stdout.splitlines() if line.startswith("SERIES"))
            assert "LAG" in head and "CANDLES" in head and "DETAIL" in head
            eth = next(line for line in table.stdout.splitlines() if line.startswith("binance:ETH/USDT@1m"))
            assert str(count(db, "ETH/USDT")) in eth.split()

            # messages that agree with each other
            paused = daemon.ctl_here("pause", "binance:BTC/USDT")
            assert paused.returncode == 0 and paused.stdout.strip() == "paused binance:BTC/USDT (1 series)"
            assert daemon.ctl_here("resume", "binance").stdout.strip() == "resumed binance (3 series)"
            missing = daemon.ctl_here("reset", "binance:BTC/USDT@5m")
            assert missing.returncode == 1 and "refused: no series binance:BTC/USDT@5m" in missing.stderr
            missing = daemon.ctl_here("latest", "binance:XRP/USDT")
            assert missing.returncode == 1 and "refused: no series binance:XRP/USDT@1m" in missing.stderr
            bad_n = daemon.ctl_here("latest", "binance:BTC/USDT", "-n", "0")
            assert bad_n.returncode == 2 and "-n must be 1-1000" in one_line(bad_n)
            root = daemon.ctl_here("restart", "root")
            assert root.returncode == 1 and "cannot restart the root supervisor" in root.stderr
            assert daemon.ctl_here("restart", "root/binance/exchange").stdout.strip() == "restarted root/binance/exchange"

            # `ctl top` without a terminal: one frame; with --json: one snapshot
            top = daemon.ctl_here("top")
            assert top.returncode == 0 and "binance:ETH/USDT@1m" in top.stdout and "\x1b[" not in top.stdout
            snap = json.loads(daemon.ctl_here("top", "--json").stdout)
            assert set(snap) == {"health", "tree"} and snap["tree"]["path"] == "root"

            # a reader that goes away early: a quiet exit, no traceback
            piped = subprocess.run(f"{sys.executable} {RUN[1]} ctl --config {cfg} latest binance:BTC/USDT -n 1000 "
                                   f"| head -3", shell=True, capture_output=True, text=True, timeout=60, cwd=workdir)
            assert len(piped.stdout.splitlines()) == 3 and piped.stderr == "", piped.stderr
            piped = subprocess.run(f"{sys.executable} {RUN[1]} ctl --config {cfg} tree --json | head -1", shell=True,
                                   capture_output=True, text=True, timeout=60, cwd=workdir)
            assert piped.stdout.strip() == "{" and piped.stderr == ""

            # coverage through the daemon
            cov = daemon.ctl_here("coverage", "binance:ETH/USDT", "--json")
            assert cov.returncode == 0, cov.stderr
            [eth_cov] = json.loads(cov.stdout)
            assert eth_cov["first_ts"] == start and eth_cov["count"] == count(db, "ETH/USDT")
            assert eth_cov["complete"] and eth_cov["missing"] == []
            text = daemon.ctl_here("coverage", "binance")
            assert text.returncode == 0 and "binance:NOPE/USDT@1m  0 candles" in text.stdout
            assert daemon.ctl_here("coverage", "binance:BTC").returncode == 1  # no such series: refused

            # restart of the control server itself: the reply arrives, then it listens again (the
            # new one: the old one answers until it is stopped, just after its reply)
            def control_back(restarts: int) -> bool:
                tree = daemon.ctl_here("tree", "--json")
                if tree.returncode != 0:
                    return False
                rows = [c for c in json.loads(tree.stdout)["children"] if c["id"] == "control"]
                return rows[0]["restarts"] >= restarts and rows[0]["state"] == "running"

            reply = request(sock, "restart", target="control")
            assert reply == {"id": 1, "ok": True, "result": {"restarted": "root/control"}}
            wait_until(lambda: control_back(1), timeout=10, what="control back")
            restarted = daemon.ctl_here("restart", "control")
            assert restarted.returncode == 0 and restarted.stdout.strip() == "restarted root/control"
            wait_until(lambda: control_back(2), timeout=10, what="control back")
        finally:
            assert daemon.stop() == 0
        log = (workdir / "daemon.log").read_text()
        assert "child_shutdown_timeout" not in log
        commands = [json.loads(line) for line in log.splitlines() if '"operator_command"' in line]
        assert {(c["command"], c.get("target")) for c in commands} >= {
            ("pause", "binance:BTC/USDT"), ("resume", "binance"), ("restart", "root/binance/exchange"),
            ("restart", "root/control")}

        # coverage with the daemon stopped: straight from the database
        offline = ctl_here(workdir, ["ctl", "--config", str(cfg), "coverage", "binance:BTC/USDT", "--json"])
        assert offline.returncode == 0, offline.stderr
        [btc] = json.loads(offline.stdout)
        assert btc["count"] == count(db, "BTC/USDT") and btc["first_ts"] == start


def test_restart_control_replies_with_connections_open(workdir: Path) -> None:
    """An idle connection and a half-sent message do not hold up a restart of the control server:
    the reply comes, the listener is back at once, and no shutdown timeout is logged."""
    import socket

    start = (now_ms() // TF) * TF - 3600_000
    with BinanceSimulator(["BTC/USDT", "ETH/USDT"], history_start_ms=start) as sim:
        daemon = Daemon(workdir, daemon_config(workdir, sim, start)).start()
        sock = str(workdir / "ctl.sock")
        idle, half = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
        try:
            idle.connect(sock)
            half.connect(sock)
            half.sendall(msgpack.packb({"id": 1, "cmd": "health"})[:4])
            res = daemon.ctl_here("restart", "control")
            assert res.returncode == 0 and res.stdout.strip() == "restarted root/control", res.stderr
            wait_until(lambda: daemon.ctl_here("health", "--json").returncode == 0, timeout=10, what="control back")
        finally:
            idle.close()
            half.close()
            assert daemon.stop() == 0
        assert "child_shutdown_timeout" not in (workdir / "daemon.log").read_text()


def test_simulate_also_lists_markets_beyond_the_configured_ones() -> None:
    cfg = config_mod.from_dict({"storage": {"path": "/tmp/x.db"},
                                "exchanges": {"binance": {"symbols": ["BTC/USDT", "PEPE/USDT"]}}})
    simulated, sims = _simulated(cfg)
    try:
        [sim] = sims
        listed = {m.symbol for m in sim.history.markets}
        assert {"BTC/USDT", "PEPE/USDT", "SOL/USDT", "ETH/USDT"} <= listed
        assert simulated.storage.path == "/tmp/x.simulate.db"
    finally:
        for s in sims:
            s.stop()


def test_describe_carries_the_root_cause_of_a_network_error() -> None:
    """ccxt's NetworkError names only the request; `describe` adds what actually failed (the real
    ccxt client, pointed at a loopback port nobody listens on)."""
    import asyncio
    import socket
    import time

    from candlekeeper.actors.market.errors import describe
    from candlekeeper.actors.sources.base import SourceFailure
    from candlekeeper.actors.sources.ccxt_source import CcxtSource

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()

    async def load() -> BaseException:
        source = CcxtSource("binance", symbols=["BTC/USDT"], timeout=2, wall=time.time,
                            api_base=f"http://127.0.0.1:{port}")
        try:
            await source.load_markets()
        except SourceFailure as failure:
            return failure.error
        finally:
            await source.close()
        raise AssertionError("nobody listens there")

    text = describe(asyncio.run(load()))
    assert text.startswith("ExchangeNotAvailable: binance GET") and "connect call failed" in text.lower()
    assert describe(ValueError("plain")) == "ValueError: plain"


def test_the_sample_config_is_valid_and_documents_every_section() -> None:
    sample = Path(__file__).resolve().parent.parent / "examples" / "candlekeeper.toml"
    cfg = config_mod.load(sample)
    assert [e.name for e in cfg.exchanges] and cfg.storage.path and cfg.control.socket
    text = sample.read_text()
    for section in ("[storage]", "[control]", "[ingest]", "[resilience]", "[metrics]", "[alerts]", "[exchanges.",
                    "[cluster]"):
        assert section in text, section
    assert config_mod.to_dict(cfg)  # round-trips through the dumper
