"""The real daemon process: `python run.py`, its exit codes, `ctl`, and `kill -9`."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from candlekeeper.simulator.server import BinanceSimulator
from tests import forkserver
from tests.test_ingest import TF, expected, now_ms, wait_until

ROOT = Path(__file__).resolve().parent.parent
RUN = [sys.executable, str(ROOT / "run.py")]


@pytest.fixture
def workdir() -> Iterator[Path]:
    # short path: a Unix socket path must fit in 108 bytes
    d = Path(tempfile.mkdtemp(prefix="ck-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def write_config(d: Path, body: str) -> Path:
    p = d / "config.toml"
    p.write_text(body)
    return p


def run(args: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python run.py ARGS` in `cwd`, its output captured: forked from the fork server (a real
    process without its second of imports; `RUN` itself is run by test_daemon_sigterm.py)."""
    return forkserver.run(args, cwd, timeout)


def ctl_here(cwd: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    """`run(args, cwd)` for a `ctl` command line, in this process (see `Daemon.ctl_here`)."""
    from candlekeeper.surfaces.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as exc:  # argparse's usage errors: as the interpreter would exit
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("this is not toml [", "TOML"),
        ("[storage]\npath = 'x.db'\n[exchanges.binance]\nsymbols = ['BTC/USDT']\nfoo = 1\n", "foo"),
        ("[exchanges.binance]\nsymbols = ['BTC/USDT']\nrate_limit = 'fast'\n", "rate_limit"),
        ("[ingest]\npoll_interval = '10 parsecs'\n[exchanges.binance]\nsymbols = ['BTC/USDT']\n", "poll_interval"),
        ("[storage]\npath = 'x.db'\n", "exchange"),
        ("[exchanges.binance]\nsymbols = 'BTC/USDT'\n", "symbols"),
        ("[exchanges.cc]\nexchange = 'coincheck'\nsymbols = ['BTC/JPY']\n", "fetchOHLCV"),
    ],
)
def test_bad_config_exits_2_with_one_line(workdir: Path, body: str, needle: str) -> None:
    cfg = write_config(workdir, body)
    res = run(["--config", str(cfg)], workdir)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert needle.lower() in lines[0].lower()


def test_missing_config_file_exits_2(workdir: Path) -> None:
    res = run(["--config", str(workdir / "nope.toml")], workdir)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "nope.toml" in res.stderr


def test_unusable_storage_path_exits_2_at_once(workdir: Path) -> None:
    """A database that cannot be created is the user's mistake: one line at start, not a minute
    of storage-actor crashes ending in the root giving up."""
    (workdir / "file").write_text("")
    cfg = write_config(workdir, f"[storage]\npath = '{workdir}/file/sub/c.db'\n"
                                f"[control]\nsocket = '{workdir}/c.sock'\n"
                                "[exchanges.binance]\nsymbols = ['BTC/USDT']\napi_base = 'http://127.0.0.1:9'\n")
    res = run(["--config", str(cfg)], workdir, timeout=30)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "[storage] path" in lines[0] and "c.db" in lines[0]


def test_ctl_without_daemon_says_so(workdir: Path) -> None:
    res = run(["ctl", "--socket", str(workdir / "none.sock"), "health", "--json"], workdir)
    assert res.returncode == 1
    assert "not running" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("entry", ["python run.py", "python -m candlekeeper", "candlekeeper"])
def test_every_entry_point_is_the_same_cli(workdir: Path, entry: str) -> None:
    """The programs a user runs, exec'd for real (the other tests fork `main` from the fork server)."""
    program = {"python run.py": RUN, "python -m candlekeeper": [sys.executable, "-m", "candlekeeper"],
               "candlekeeper": [str(Path(sys.executable).parent / "candlekeeper")]}[entry]
    res = subprocess.run([*program, "ctl", "--socket", str(workdir / "none.sock"), "health"], cwd=workdir,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "not running" in res.stderr and "Traceback" not in res.stderr, res
    assert res.stdout == ""


def listening(path: Path) -> bool:
    """Someone accepts connections on the Unix socket `path` (a stale file refuses them)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(5)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


class Daemon:
    def __init__(self, workdir: Path, config: Path) -> None:
        self.workdir = workdir
        self.config = config
        self.proc: forkserver.Forked | None = None
        self.log = open(workdir / "daemon.log", "a")

    def start(self) -> Daemon:
        self.proc = forkserver.launch(["--config", str(self.config)], self.workdir, stdout=self.log)
        # listening, not merely there: a daemon killed with -9 leaves its socket file behind
        wait_until(lambda: listening(self.workdir / "ctl.sock") or self.proc.poll() is not None, timeout=30,
                   what="daemon socket")
        assert self.proc.poll() is None, (self.workdir / "daemon.log").read_text()
        return self

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run(["ctl", "--config", str(self.config), *args], self.workdir)

    def ctl_here(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`ctl` as `ctl()` runs it, but in this process: the same `main`, arguments, working
        directory, exit code, stdout and stderr, without a second of imports per question (the
        daemon is still its own process; `ctl` as a process is what `ctl()` and `run()` test)."""
        return ctl_here(self.workdir, ["ctl", "--config", str(self.config), *args])

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        self.log.close()
        return self.proc.returncode


class CandleGate:
    """A request hook that answers the first `passed` candle requests and holds every later one
    until `release()`: a daemon killed while it waits is killed in the middle of its backfill,
    however fast or slow the machine, with no slow rate limit to make it so."""

    def __init__(self, passed: int) -> None:
        self.passed = passed
        self.seen = 0
        self._lock = threading.Lock()
        self._released = threading.Event()

    def __call__(self, path: str, params: Any, status: Any, fault: Any) -> None:
        if not any(word in path.lower() for word in ("kline", "candles", "ohlc")):
            return
        with self._lock:
            self.seen += 1
            hold = self.seen > self.passed
        if hold:
            self._released.wait(60)

    def release(self) -> None:
        self._released.set()


def daemon_config(workdir: Path, sim: BinanceSimulator, since_ms: int, rate_limit: float = 200) -> Path:
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since_ms / 1000))
    return write_config(
        workdir,
        f"""
[storage]
path = "candles.db"

[control]
socket = "ctl.sock"

[ingest]
since = "{since}"
poll_interval = "2s"

[resilience]
retry_base_delay = "50ms"
retry_max_delay = "500ms"

[exchanges.binance]
symbols = ["BTC/USDT", "ETH/USDT"]
api_base = "{sim.url}"
rate_limit = {rate_limit}
timeout = "2s"
""",
    )


def count(db: Path, symbol: str) -> int:
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute("SELECT count(*) FROM candles WHERE symbol=?", (symbol,)).fetchone()[0]
    except sqlite3.OperationalError:
        return 0  # schema not created yet
    finally:
        conn.close()


def rows(db: Path, symbol: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(
            "SELECT ts, open, high, low, close, volume FROM candles WHERE exchange='binance' AND symbol=? AND timeframe='1m'"
            " ORDER BY ts", (symbol,)).fetchall()
    finally:
        conn.close()


def test_daemon_health_json_and_graceful_stop(workdir: Path) -> None:
    start = (now_ms() // TF) * TF - 2 * 3600_000
    with BinanceSimulator(["BTC/USDT", "ETH/USDT"], history_start_ms=start) as sim:
        daemon = Daemon(workdir, daemon_config(workdir, sim, start)).start()
        try:
            db = workdir / "candles.db"
            wait_until(lambda: count(db, "ETH/USDT") >= 119, what="backfill")
            res = daemon.ctl("health", "--json")
            assert res.returncode == 0, res.stderr
            health = json.loads(res.stdout)
            assert set(health) >= {"status", "exchanges", "series"}
            assert health["exchanges"][0]["name"] == "binance"
            assert health["exchanges"][0]["breaker"] in ("closed", "open", "half_open")
            s = health["series"][0]
            assert set(s) >= {"exchange", "symbol", "timeframe", "status", "last_ts", "restarts", "failures"}
            table = daemon.ctl("health")
            assert table.returncode == 0 and "BTC/USDT" in table.stdout
            assert daemon.ctl("tree").returncode == 0
        finally:
            rc = daemon.stop()
        assert rc == 0, (workdir / "daemon.log").read_text()[-3000:]
        assert not (workdir / "ctl.sock").exists()


def test_kill_9_mid_backfill_then_resume_exact(workdir: Path) -> None:
    start = (now_ms() // TF) * TF - 30 * 3600_000  # 1800 candles per symbol: several pages
    gate = CandleGate(passed=1)  # one page answered (1000 candles at most), the next ones held on the wire
    with BinanceSimulator(["BTC/USDT", "ETH/USDT"], history_start_ms=start, on_request=gate) as sim:
        cfg = daemon_config(workdir, sim, start)
        db = workdir / "candles.db"
        daemon = Daemon(workdir, cfg).start()
        try:
            wait_until(lambda: count(db, "BTC/USDT") + count(db, "ETH/USDT") > 0, what="first page stored")
        finally:
            daemon.kill9()
            gate.release()
        for symbol in ("BTC/USDT", "ETH/USDT"):
            assert count(db, symbol) < 1799, "backfill finished before the kill: test proves nothing"
        assert (workdir / "ctl.sock").exists()  # stale socket left by the crash
        daemon = Daemon(workdir, cfg).start()  # replaces the stale socket
        try:
            wait_until(lambda: all(count(db, s) >= len(expected(sim, s, start, (now_ms() // TF) * TF - TF))
                                   for s in ("BTC/USDT", "ETH/USDT")), timeout=90, what="backfill after restart")
        finally:
            assert daemon.stop() == 0
        for symbol in ("BTC/USDT", "ETH/USDT"):
            got = rows(db, symbol)
            assert got == expected(sim, symbol, start, got[-1][0] + TF)
            assert len({r[0] for r in got}) == len(got)
