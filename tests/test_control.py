"""Every control command through the real socket against the real daemon process, `ctl`'s
command line, and the listeners' timeouts and per-listener limits (an in-process server)."""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from candlekeeper.app.config import ControlConfig
from candlekeeper.simulator.faults import OutageMode
from candlekeeper.simulator.server import BinanceSimulator
from candlekeeper.supervisors.child import Link, Runtime
from candlekeeper.surfaces import control
from candlekeeper.surfaces.control import ControlServer, request
from tests.test_daemon import Daemon, count, daemon_config, rows, run, workdir, write_config  # noqa: F401 - fixture
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

            # crash injection is off unless [control] chaos = true: a clear refusal, nothing crashes
            restarts = _node(ok(request(sock, "tree")), "root/binance/exchange")["restarts"]
            refused = request(sock, "crash", target="binance/exchange")
            assert refused["ok"] is False and "crash injection is off" in refused["error"], refused
            cli = daemon.ctl("crash", "binance/exchange")
            assert cli.returncode == 1 and "refused: crash injection is off" in cli.stderr
            assert _node(ok(request(sock, "tree")), "root/binance/exchange")["restarts"] == restarts
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


def _node(tree: dict, path: str) -> dict:
    """The row of the actor at `path` (e.g. "root/binance/exchange") in a `tree` reply."""
    for child in tree.get("children", []):
        if child["path"] == path:
            return child
        if path.startswith(child["path"] + "/"):
            return _node(child, path)
    raise AssertionError(f"no {path} in {tree}")


def test_crash_with_chaos_on_restarts_the_target(workdir: Path) -> None:
    """With `[control] chaos = true` the `crash` command makes the actor raise; its supervisor
    restarts it, and `tree` and `health` show it."""
    start = (now_ms() // TF) * TF - 3600_000
    with BinanceSimulator(["BTC/USDT", "ETH/USDT"], history_start_ms=start) as sim:
        cfg = daemon_config(workdir, sim, start)
        cfg.write_text(cfg.read_text().replace('socket = "ctl.sock"', 'socket = "ctl.sock"\nchaos = true'))
        sock = str(workdir / "ctl.sock")
        daemon = Daemon(workdir, cfg).start()
        try:
            wait_until(lambda: ok(request(sock, "health"))["status"] == "ok", what="daemon up")
            crashed = ok(request(sock, "crash", target="binance/exchange", reason="chaos test"))
            assert crashed == {"crashed": "root/binance/exchange"}
            wait_until(lambda: _node(ok(request(sock, "tree")), "root/binance/exchange")["restarts"] == 1,
                       what="exchange restarted")
            assert _node(ok(request(sock, "tree")), "root/binance/exchange")["state"] == "running"
            wait_until(lambda: ok(request(sock, "health"))["restarts_by_kind"].get("exchange") == 1,
                       what="health counts the restart")
            wait_until(lambda: ok(request(sock, "health"))["status"] == "ok", what="healthy again")
            assert daemon.ctl("crash", "binance/nope").returncode == 1  # unknown target: refused
        finally:
            assert daemon.stop() == 0
        assert "chaos test" in (workdir / "daemon.log").read_text()  # the crash is logged with its reason


def test_live_socket_is_not_stolen(workdir: Path) -> None:
    start = (now_ms() // TF) * TF - 3600_000
    with BinanceSimulator(["BTC/USDT", "ETH/USDT"], history_start_ms=start) as sim:
        cfg = daemon_config(workdir, sim, start)
        daemon = Daemon(workdir, cfg).start()
        try:
            second = run(["--config", str(cfg)], workdir)
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
            cli = run(["ctl", "--socket", url, "--token", "s3cret-token", "health", "--json"], workdir)
            assert cli.returncode == 0 and json.loads(cli.stdout)["status"]
        finally:
            daemon.stop()
        assert "s3cret-token" not in (workdir / "daemon.log").read_text()  # never logged


@pytest.mark.parametrize("url", ["tcp://127.0.0.1:abc", "tcp://127.0.0.1", "tcp://[::1]:99999"])
def test_ctl_malformed_tcp_socket_is_a_usage_error(workdir: Path, url: str) -> None:
    res = run(["ctl", "--socket", url, "health"], workdir)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert url in lines[0] and "tcp://HOST:PORT" in lines[0]


def test_ctl_honours_the_top_level_config(workdir: Path) -> None:
    """`run.py --config F ctl health` asks the daemon F runs, not the default socket; `ctl --socket`
    still wins."""
    sock = workdir / "elsewhere.sock"
    cfg = write_config(workdir, f"[control]\nsocket = '{sock}'\n[exchanges.binance]\nsymbols = ['BTC/USDT']\n")
    res = run(["--config", str(cfg), "ctl", "health"], workdir)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert f"not running (no one listens on {sock})" in res.stderr
    other = workdir / "other.sock"
    res = run(["--config", str(cfg), "ctl", "--socket", str(other), "health"], workdir)
    assert res.returncode == 1 and f"no one listens on {other})" in res.stderr, res.stderr


# -- the listeners under abuse: an in-process ControlServer, its limits shrunk -------------------

TOKEN = "t0ken-for-tests"


class _FakeSystem:
    """Just enough of `System` to answer `health`: these tests are about the listeners."""

    def health(self, *, counts: bool = False) -> dict[str, Any]:
        return {"status": "ok", "exchanges": [], "series": []}


@pytest.fixture
def served(workdir: Path, runtime: Runtime) -> Iterator[tuple[str, tuple[str, int]]]:
    """A ControlServer on a Unix socket and a loopback TCP port: (socket path, (host, port))."""
    path = str(workdir / "c.sock")
    link = Link(child_id="control", incarnation=1, path="test/control", runtime=runtime)
    ref, server = ControlServer.start_linked(link, ControlConfig(socket=path, tcp="127.0.0.1:0", token=TOKEN),
                                             _FakeSystem())
    try:
        wait_until(lambda: isinstance(server, ControlServer) and server.tcp_port is not None, what="listeners up")
        assert isinstance(server, ControlServer) and server.tcp_port is not None
        yield path, ("127.0.0.1", server.tcp_port)
    finally:
        ref.stop(timeout=10)


def _unix(path: str) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(5)
    conn.connect(path)
    return conn


def _until_closed(conn: socket.socket, unpacker: msgpack.Unpacker | None = None) -> list[Any]:
    """Every reply until the server closes; fails if it does neither within the socket's timeout."""
    unpacker = unpacker or msgpack.Unpacker(raw=False)
    while True:
        try:
            data = conn.recv(65536)
        except ConnectionResetError:
            data = b""
        except TimeoutError:
            raise AssertionError("the server neither replied nor closed the connection") from None
        if not data:
            return list(unpacker)
        unpacker.feed(data)


def _health(conn: socket.socket, **extra: Any) -> dict[str, Any]:
    conn.sendall(msgpack.packb({"id": 1, "cmd": "health", **extra}))
    unpacker = msgpack.Unpacker(raw=False)
    while True:
        data = conn.recv(65536)
        assert data, "closed without a reply"
        unpacker.feed(data)
        for reply in unpacker:
            return reply


def test_tcp_clients_cannot_lock_out_the_unix_socket(served: tuple[str, tuple[str, int]],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """MAX_CONNECTIONS authenticated TCP clients fill the TCP listener; the next authenticated TCP
    client is refused, and the Unix socket, with slots of its own, still serves."""
    path, tcp = served
    monkeypatch.setattr(control, "MAX_CONNECTIONS", 4)
    held = [socket.create_connection(tcp, timeout=5) for _ in range(4)]
    try:
        assert all(_health(c, token=TOKEN)["ok"] is True for c in held)  # authenticated: they count
        with socket.create_connection(tcp, timeout=5) as extra:
            extra.sendall(msgpack.packb({"id": 1, "cmd": "health", "token": TOKEN}))
            assert _until_closed(extra) == [{"id": None, "ok": False, "error": "too many connections"}]
        # the Unix socket's own MAX_CONNECTIONS, every one of them (no connection closed just
        # before: the server frees a slot when it reads the client's EOF, a moment later)
        local = [_unix(path) for _ in range(4)]
        try:
            assert all(_health(c)["ok"] is True for c in local)
        finally:
            for c in local:
                c.close()
    finally:
        for c in held:
            c.close()


def test_unauthenticated_tcp_clients_cannot_lock_out_authorised_ones(served: tuple[str, tuple[str, int]],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """100 connections that never send a token (idle, or half a message) do not make a client with
    the right token get "too many connections": they have slots of their own, the oldest dropped
    for each newcomer, and each is closed if it has not authenticated within AUTH_TIMEOUT."""
    _, tcp = served
    monkeypatch.setattr(control, "MAX_CONNECTIONS", 4)
    idle = [socket.create_connection(tcp, timeout=5) for _ in range(100)]
    try:
        idle[-1].sendall(msgpack.packb({"id": 1, "cmd": "health", "token": TOKEN})[:10])  # half-sent
        with socket.create_connection(tcp, timeout=5) as good:
            assert _health(good, token=TOKEN)["ok"] is True
            assert _health(good, token=TOKEN)["ok"] is True  # and it stays served
        dropped = [c for c in idle[:90] if _until_closed(c) == []]
        assert len(dropped) == 90  # the oldest were closed to make room, without a reply
    finally:
        for c in idle:
            c.close()


def test_tcp_connection_must_authenticate_promptly(served: tuple[str, tuple[str, int]],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _, tcp = served
    monkeypatch.setattr(control, "AUTH_TIMEOUT", 0.5)
    with socket.create_connection(tcp, timeout=5) as silent:
        began = time.monotonic()
        replies = _until_closed(silent)
        waited = time.monotonic() - began
    assert replies == [{"id": None, "ok": False, "error": "unauthorized: no request with a valid token within 0.5 s"}]
    assert 0.3 <= waited < 4, waited
    with socket.create_connection(tcp, timeout=5) as conn:  # authenticated in time: the idle timeout applies
        assert _health(conn, token=TOKEN)["ok"] is True
        time.sleep(1.0)  # past AUTH_TIMEOUT, within IDLE_TIMEOUT: still open
        assert _health(conn, token=TOKEN)["ok"] is True
    with socket.create_connection(tcp, timeout=5) as bad:
        bad.sendall(msgpack.packb({"id": 7, "cmd": "health", "token": "wrong"}))
        assert _until_closed(bad) == [{"id": 7, "ok": False, "error": "unauthorized: a valid token is required"}]


@pytest.mark.parametrize("listener", ["unix", "tcp"])
def test_half_sent_message_is_answered_and_closed(served: tuple[str, tuple[str, int]], listener: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A message still incomplete MESSAGE_TIMEOUT after its first byte: an error reply, a close."""
    path, tcp = served
    monkeypatch.setattr(control, "MESSAGE_TIMEOUT", 0.5)
    with _unix(path) if listener == "unix" else socket.create_connection(tcp, timeout=5) as conn:
        assert _health(conn, token=TOKEN)["ok"] is True  # a whole message first: answered
        conn.sendall(msgpack.packb({"id": 2, "cmd": "health", "token": TOKEN})[:5])
        began = time.monotonic()
        replies = _until_closed(conn)
        waited = time.monotonic() - began
    assert replies == [{"id": None, "ok": False, "error": "incomplete message: not received whole within 0.5 s"}]
    assert 0.4 <= waited < 4, waited


def test_trickled_message_is_cut_off(served: tuple[str, tuple[str, int]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes that keep coming do not extend the deadline: a message trickled one byte at a time
    (slowloris) is cut off MESSAGE_TIMEOUT after its first byte."""
    path, _ = served
    monkeypatch.setattr(control, "MESSAGE_TIMEOUT", 0.5)
    data = msgpack.packb({"id": 1, "cmd": "health", "pad": "p" * 200})
    with _unix(path) as conn:
        conn.settimeout(0.05)  # the pace: a read that times out means the server is still waiting
        unpacker = msgpack.Unpacker(raw=False)
        began = time.monotonic()
        sent = 0
        while sent < len(data):
            try:
                conn.sendall(data[sent:sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                break  # closed meanwhile; its reply is still there to read
            sent += 1
            try:
                unpacker.feed(conn.recv(65536))
            except TimeoutError:
                continue
            break
        waited = time.monotonic() - began
        conn.settimeout(5)
        replies = _until_closed(conn, unpacker)
    assert sent < len(data) and 0.4 <= waited < 4, (sent, waited)
    assert replies == [{"id": None, "ok": False, "error": "incomplete message: not received whole within 0.5 s"}]


def test_idle_connection_is_closed(served: tuple[str, tuple[str, int]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection silent for IDLE_TIMEOUT between messages is closed, without a reply (no request
    is waiting for one); one that keeps talking is not."""
    path, _ = served
    monkeypatch.setattr(control, "IDLE_TIMEOUT", 0.5)
    with _unix(path) as conn:
        assert _health(conn)["ok"] is True
        began = time.monotonic()
        assert _until_closed(conn) == []
        waited = time.monotonic() - began
    assert 0.3 <= waited < 4, waited


def test_stopping_waits_for_no_command_in_progress(workdir: Path, runtime: Runtime,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A command in progress may wait on the supervisor that is stopping the server (`ctl tree`
    during `ctl restart control`): the stop does not wait for it (it would, until the supervisor
    gave up on the server), and the command's thread ends once it finds its connection closed."""
    import threading

    entered, release = threading.Event(), threading.Event()
    inside: list[threading.Thread] = []
    joined: list[threading.Thread] = []
    join = threading.Thread.join

    def recorded(self: threading.Thread, timeout: float | None = None) -> None:
        joined.append(self)
        join(self, timeout)

    class Blocked(_FakeSystem):
        def health(self, *, counts: bool = False) -> dict[str, Any]:
            inside.append(threading.current_thread())
            entered.set()
            release.wait(30)
            return super().health(counts=counts)

    path = str(workdir / "c.sock")
    link = Link(child_id="control", incarnation=1, path="test/control", runtime=runtime)
    ref, _ = ControlServer.start_linked(link, ControlConfig(socket=path), Blocked())

    def accepting() -> bool:  # the socket's file exists from its bind, before it listens
        try:
            _unix(path).close()
        except OSError:
            return False
        return True

    try:
        wait_until(accepting, what="listening")
        conn = _unix(path)
        conn.sendall(msgpack.packb({"id": 1, "cmd": "health"}))
        assert entered.wait(10)
        monkeypatch.setattr(threading.Thread, "join", recorded)
        try:
            ref.stop(block=True)
        finally:
            monkeypatch.undo()
    finally:
        release.set()
        ref.stop(block=True)  # no-op once stopped
    with conn:
        assert joined, "the stop waited for no thread at all"
        assert inside[0] not in joined, "the stop waited for the thread inside a command"
        assert _until_closed(conn) == []  # no reply: the server had gone
    wait_until(lambda: not inside[0].is_alive(), what="the command's thread to end")
