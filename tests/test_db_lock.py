"""One daemon per SQLite file: a second daemon (or a second `System` in the same process) on the
same database refuses to start, naming the file and the other daemon; a lock left by a daemon
killed with `kill -9` never blocks a restart (the kernel drops a flock with its holder)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

import candlekeeper
from candlekeeper.actors.stores.lock import DatabaseInUse, DatabaseLock, read_holder
from candlekeeper.simulator.server import BinanceSimulator
from tests.test_daemon import Daemon, count, daemon_config, run, workdir, write_config  # noqa: F401
from tests.test_ingest import TF, now_ms, wait_until


def test_lock_names_its_holder_and_is_released(tmp_path: Path) -> None:
    db = str(tmp_path / "sub" / "c.db")
    first = DatabaseLock(db, control_socket="/run/ck.sock").acquire()
    assert read_holder(db + ".lock") == {"pid": os.getpid(), "host": socket.gethostname(),
                                         "control_socket": "/run/ck.sock"}
    with pytest.raises(DatabaseInUse) as info:  # another open file description: refused, same process or not
        DatabaseLock(db).acquire()
    assert db in str(info.value) and f"pid {os.getpid()}" in str(info.value) and "/run/ck.sock" in str(info.value)
    first.release()
    assert os.path.exists(db + ".lock")  # never deleted (see DatabaseLock._open)
    second = DatabaseLock(db).acquire()
    assert second.held
    second.release()
    DatabaseLock(":memory:").acquire().release()  # nothing to lock


def test_second_system_in_the_same_process_refuses(tmp_path: Path) -> None:
    cfg = {"storage": {"path": str(tmp_path / "c.db")},
           "exchanges": {"binance": {"symbols": ["BTC/USDT"], "api_base": "http://127.0.0.1:9"}}}
    first = candlekeeper.start(cfg, control=False)
    try:
        with pytest.raises(candlekeeper.StorageUnusable) as info:
            candlekeeper.start(cfg, control=False)
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith("[storage] path:") and str(tmp_path / "c.db") in message
        assert f"pid {os.getpid()}" in message
    finally:
        first.stop()
    again = candlekeeper.start(cfg, control=False)  # stopped: the file is free again
    again.stop()


def test_second_daemon_refuses_and_kill_9_leaves_no_stale_lock(workdir: Path) -> None:
    start = (now_ms() // TF) * TF - 3600_000
    with BinanceSimulator(["BTC/USDT", "ETH/USDT"], history_start_ms=start) as sim:
        cfg = daemon_config(workdir, sim, start)
        db = workdir / "candles.db"
        first = Daemon(workdir, cfg).start()
        try:
            wait_until(lambda: count(db, "BTC/USDT") > 0, what="the first daemon writes")
            assert first.proc is not None
            holder = json.loads((workdir / "candles.db.lock").read_text())
            assert holder["pid"] == first.proc.pid and holder["control_socket"] == str(workdir / "ctl.sock")
            # same database, its own control socket: refused at once, one line, nothing touched
            other = workdir / "other"
            other.mkdir()
            second_cfg = write_config(other, cfg.read_text().replace('path = "candles.db"', f'path = "{db}"')
                                      .replace('socket = "ctl.sock"', 'socket = "other.sock"'))
            res = run(["--config", str(second_cfg)], other, timeout=30)
            assert res.returncode == 2, res.stderr
            lines = [line for line in res.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
            assert str(db) in lines[0] and f"pid {first.proc.pid}" in lines[0] and "ctl.sock" in lines[0], lines[0]
            assert not (other / "other.sock").exists()
            # the very same config: the database is named first, as the reason
            res = run(["--config", str(cfg)], workdir, timeout=30)
            assert res.returncode == 2 and f"pid {first.proc.pid}" in res.stderr, res.stderr
            assert first.proc.poll() is None  # the first daemon is untouched
        finally:
            first.kill9()  # the lock file stays behind, naming a dead process
        assert json.loads((workdir / "candles.db.lock").read_text())["pid"] == first.proc.pid
        restarted = Daemon(workdir, cfg).start()
        try:
            assert restarted.proc is not None
            wait_until(lambda: (json.loads((workdir / "candles.db.lock").read_text() or "{}").get("pid")
                                == restarted.proc.pid), timeout=10, what="the new daemon holds the lock")
            before = count(db, "BTC/USDT")
            wait_until(lambda: count(db, "BTC/USDT") >= 59, what="the restarted daemon ingests")
            assert count(db, "BTC/USDT") >= before
            assert restarted.ctl_here("health", "--json").returncode == 0
        finally:
            assert restarted.stop() == 0
        DatabaseLock(str(db)).acquire().release()
