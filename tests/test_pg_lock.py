"""One daemon per PostgreSQL database without `[cluster]` (issue 14, point 3's guard, for the
other store): a second daemon on the same database refuses to start (exit 2, one line naming the
database and the other daemon); the lock is the server's (a session-level advisory lock), so a
daemon killed with -9 leaves nothing behind, and clustered daemons never take it. Real PostgreSQL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import candlekeeper
from candlekeeper.actors.stores.postgres import PostgresStore
from candlekeeper.actors.stores.postgres_lock import DatabaseInUse
from tests.test_daemon import run

if TYPE_CHECKING:
    from tests.pg import PgDatabase

pytest_plugins = ["tests.pg"]

def me() -> str:
    """How a lock names this process (asked when needed: test modules may be imported by another
    process, the fork server the workers come from)."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


def config(url: str, **more: Any) -> dict[str, Any]:
    return {"storage": {"url": url}, **more,
            "exchanges": {"binance": {"symbols": ["BTC/USDT"], "api_base": "http://127.0.0.1:9"}}}


def kill_lock_sessions(db: PgDatabase) -> None:
    with db.admin() as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                     " WHERE application_name LIKE 'candlekeeper daemon:%%' AND datname = %s", (db.name,))


@pytest.mark.long
def test_a_writing_store_holds_the_database_and_names_itself(pg_db: PgDatabase) -> None:
    first = PostgresStore(pg_db.url, exclusive=True).open()
    try:
        with pytest.raises(DatabaseInUse) as info:
            PostgresStore(pg_db.url, exclusive=True).open()
        message = str(info.value)
        assert "\n" not in message and pg_db.name in message and me() in message, message
        with PostgresStore(pg_db.url, readonly=True, exclusive=True) as reader:  # readers never lock
            assert reader.list_series() == []
        with PostgresStore(pg_db.url) as other:  # a clustered daemon's store never locks
            assert other.list_series() == []
        first.reopen()  # a reconnect keeps the lock
        with pytest.raises(DatabaseInUse):
            PostgresStore(pg_db.url, exclusive=True).open()
        # its session lost (a server restart, a dropped connection): taken again at the next
        # reopen, unless another daemon got in first
        kill_lock_sessions(pg_db)
        second = PostgresStore(pg_db.url, exclusive=True).open()
        with pytest.raises(DatabaseInUse, match=me()):
            first.reopen()
        second.close()
        first.reopen()
        assert first.upsert([("binance", "BTC/USDT", "1m", 0, 1.0, 1.0, 1.0, 1.0, 1.0)]) == 1
    finally:
        first.close()
    PostgresStore(pg_db.url, exclusive=True).open().close()  # closed: free again


def test_a_second_system_on_the_database_refuses_and_clustered_ones_do_not_lock(pg_db: PgDatabase) -> None:
    first = candlekeeper.start(config(pg_db.url), control=False)
    try:
        with pytest.raises(candlekeeper.StorageUnusable) as info:
            candlekeeper.start(config(pg_db.url), control=False)
        message = str(info.value)
        assert "\n" not in message and message.startswith("[storage] url:"), message
        assert pg_db.name in message and me() in message and "[cluster]" in message, message
        # a clustered daemon shares the database by leases: no lock
        clustered = candlekeeper.start(config(pg_db.url, cluster={"enabled": True, "node": "n1", "lease": "3s"}),
                                       control=False)
        clustered.stop()
    finally:
        first.stop()
    candlekeeper.start(config(pg_db.url), control=False).stop()  # stopped: free again


HOLDER = """
import sys, time
from candlekeeper.actors.stores.postgres import PostgresStore
store = PostgresStore(sys.argv[1], exclusive=True).open()
print("held", flush=True)
time.sleep(600)
"""


def test_second_daemon_exits_2_naming_the_database_and_kill_9_leaves_no_lock(
    pg_db: PgDatabase, tmp_path: Path
) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, pg_db.url], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        (tmp_path / "c.toml").write_text(
            f'[storage]\nurl = "{pg_db.url}"\n\n[control]\nsocket = "ctl.sock"\n\n'
            '[exchanges.binance]\nsymbols = ["BTC/USDT"]\napi_base = "http://127.0.0.1:9"\n'
        )
        res = run(["--config", str(tmp_path / "c.toml")], tmp_path, timeout=60)
        assert res.returncode == 2, res.stderr
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
        assert pg_db.name in lines[0] and f"pid {holder.pid} on {socket.gethostname()}" in lines[0], lines[0]
        assert not (tmp_path / "ctl.sock").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    PostgresStore(pg_db.url, exclusive=True).open().close()  # the server dropped the dead one's lock
