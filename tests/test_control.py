"""Every control command through the real socket against the real daemon process."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import msgpack
import pytest

from simulator.faults import OutageMode
from simulator.server import BinanceSimulator
from supervisors.control import request
from tests.test_daemon import Daemon, count, daemon_config, rows, workdir  # noqa: F401 - fixture
from tests.test_ingest import TF, expected, now_ms, wait_until


def ok(reply: dict) -> object:
    assert reply.get("ok") is True, reply
    return reply["result"]


def test_every_command_against_the_daemon(workdir: Path) -> None:
    start = (now_ms() // TF) * TF - 2 * 3600_000
    with BinanceSimulator(["BTC/USDT", "ETH/USDT", "SOL/USDT"], history_start_ms=start) as sim:
        cfg = daemon_config(workdir, sim, start)
        sock = str(workdir / "ctl.sock")
        db = workdir / "candles.db"
        daemon = Daemon(workdir, cfg).start()
        try:
            assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
            wait_until(lambda: count(db, "ETH/USDT") >= 119, what="backfill")

            health = ok(request(sock, "health"))
            assert health["status"] == "ok" and len(health["series"]) == 2

            tree = ok(request(sock, "tree"))
            assert [c["id"] for c in tree["children"]][:2] == ["storage", "health"]

            latest = ok(request(sock, "latest", exchange="binance", symbol="BTC/USDT", timeframe="1m", n=3))
            assert len(latest["candles"]) == 3 and latest["stale_seconds"] < 70
            assert latest["candles"][0]["ts"] > latest["candles"][1]["ts"]

            # pause / resume a series
            ok(request(sock, "pause", exchange="binance", symbol="BTC/USDT"))
            wait_until(lambda: _status(sock, "BTC/USDT") == "paused", what="paused")
            assert ok(request(sock, "health"))["status"] == "ok"  # a pause is not a degradation
            ok(request(sock, "resume", exchange="binance", symbol="BTC/USDT"))
            wait_until(lambda: _status(sock, "BTC/USDT") in ("ok", "backfilling"), what="resumed")

            # restart an actor through its supervisor
            res = ok(request(sock, "restart", target="binance/series/ETH/USDT@1m"))
            assert res["restarted"] == "root/binance/series/ETH/USDT@1m"
            wait_until(lambda: _series(sock, "ETH/USDT").get("restarts") == 1, what="restart counted")
            refused = request(sock, "restart", target="binance/nope")
            assert refused["ok"] is False and "no actor" in refused["error"]

            # add and remove at run time, persisted across a restart of the daemon
            ok(request(sock, "add", exchange="binance", symbol="SOL/USDT", timeframe="1m"))
            wait_until(lambda: count(db, "SOL/USDT") >= 119, what="added series backfilled")
            dup = request(sock, "add", exchange="binance", symbol="SOL/USDT", timeframe="1m")
            assert dup["ok"] is False and "already" in dup["error"]
            unknown = request(sock, "add", exchange="binance", symbol="DOGE/USDT")
            assert unknown["ok"] is False and "does not list" in unknown["error"]
            ok(request(sock, "remove", exchange="binance", symbol="BTC/USDT", timeframe="1m"))
            assert "BTC/USDT" not in {s["symbol"] for s in ok(request(sock, "health"))["series"]}

            # reset during an outage: breaker open, then reset closes it at once
            sim.set_outage(OutageMode.HTTP_503)
            for _ in range(3):
                request(sock, "reset", exchange="binance", symbol="ETH/USDT")
            wait_until(lambda: ok(request(sock, "health"))["exchanges"][0]["breaker"] == "open", what="breaker open")
            degraded = ok(request(sock, "health"))
            assert degraded["status"] == "down" and any("read-only" in r for r in degraded["reasons"])
            assert all(s["exchange_down"] for s in degraded["series"])
            latest = ok(request(sock, "latest", exchange="binance", symbol="ETH/USDT"))
            assert latest["read_only"] is True and latest["candles"]  # served from the store
            sim.set_outage(None)
            ok(request(sock, "reset", exchange="binance"))
            assert ok(request(sock, "health"))["exchanges"][0]["breaker"] == "closed"

            # the human-readable CLI and its exit codes
            cli = daemon.ctl("latest", "binance:ETH/USDT@1m", "-n", "2")
            assert cli.returncode == 0 and "ETH/USDT" in cli.stdout
            assert daemon.ctl("reset", "nope").returncode == 1
            assert daemon.ctl("add").returncode == 2
            assert json.loads(daemon.ctl("health", "--json").stdout)["status"] in ("ok", "degraded")
        finally:
            rc = daemon.stop()
        assert rc == 0

        # persisted: after a restart SOL/USDT is still there and BTC/USDT still removed
        daemon = Daemon(workdir, cfg).start()
        try:
            wait_until(lambda: {s["symbol"] for s in ok(request(sock, "health"))["series"]} == {"ETH/USDT", "SOL/USDT"},
                       what="series after restart")
            # shutdown through the socket: the daemon exits 0 by itself
            ok(request(sock, "shutdown"))
            assert daemon.proc is not None and daemon.proc.wait(60) == 0
        finally:
            daemon.stop()
        got = rows(db, "SOL/USDT")
        assert got == expected(sim, "SOL/USDT", start, got[-1][0] + TF)


def _series(sock: str, symbol: str) -> dict:
    for s in ok(request(sock, "health"))["series"]:
        if s["symbol"] == symbol:
            return s
    return {}


def _status(sock: str, symbol: str) -> str | None:
    return _series(sock, symbol).get("status")


def test_live_socket_is_not_stolen(workdir: Path) -> None:
    start = (now_ms() // TF) * TF - 3600_000
    with BinanceSimulator(["BTC/USDT", "ETH/USDT"], history_start_ms=start) as sim:
        cfg = daemon_config(workdir, sim, start)
        daemon = Daemon(workdir, cfg).start()
        try:
            second = subprocess.run(["python3", str(Path(__file__).parent.parent / "run.py"), "--config", str(cfg)],
                                    cwd=workdir, capture_output=True, text=True, timeout=60)
            assert second.returncode == 2 and "another candlekeeper" in second.stderr
            ok(request(str(workdir / "ctl.sock"), "health"))  # the first one still serves
        finally:
            assert daemon.stop() == 0


def test_tcp_listener_requires_the_token(workdir: Path) -> None:
    start = (now_ms() // TF) * TF - 3600_000
    with BinanceSimulator(["BTC/USDT", "ETH/USDT"], history_start_ms=start) as sim:
        cfg = daemon_config(workdir, sim, start)
        cfg.write_text(cfg.read_text().replace('socket = "ctl.sock"', 'socket = "ctl.sock"\ntcp = "127.0.0.1:0"\ntoken = "s3cret-token"'))
        daemon = Daemon(workdir, cfg).start()
        try:
            log = (workdir / "daemon.log").read_text()
            wait_until(lambda: "control_listening_tcp" in (workdir / "daemon.log").read_text(), what="tcp listener")
            log = (workdir / "daemon.log").read_text()
            port = next(json.loads(line)["port"] for line in log.splitlines() if "control_listening_tcp" in line)
            url = f"tcp://127.0.0.1:{port}"
            bad = request(url, "health", token="wrong")
            assert bad["ok"] is False and "unauthorized" in bad["error"]
            missing = request(url, "health")
            assert missing["ok"] is False
            assert ok(request(url, "health", token="s3cret-token"))["exchanges"][0]["name"] == "binance"
            cli = daemon.ctl("health", "--json")
            assert cli.returncode == 0
            cli = subprocess.run(["python3", str(Path(__file__).parent.parent / "run.py"), "ctl", "--socket", url,
                                  "--token", "s3cret-token", "health", "--json"], capture_output=True, text=True, timeout=60)
            assert cli.returncode == 0 and json.loads(cli.stdout)["status"]
        finally:
            daemon.stop()
        assert "s3cret-token" not in (workdir / "daemon.log").read_text()  # never logged
