"""One daemon per PostgreSQL database without clustering: a session-level advisory lock.

Without ``[cluster]`` a daemon collects every configured series, so two of them on one database
would both ingest into it (the SQLite counterpart is ``stores.lock``). The writing store takes
``pg_advisory_lock`` (waiting at most ``RELEASE_WAIT_S``) on a connection of its own, kept for
as long as the store is open: the server drops the lock when that session ends, however the
daemon ends (``kill -9`` included),
so nothing is ever left to clean up. The key is per database (advisory locks are) and per
schema (``current_schema()``: several stores may share a database in their own schemas).
The lock's session names its daemon in ``application_name``, so a refusal can name it.
Clustered daemons never take it: they share the database by leases.
"""

from __future__ import annotations

import os
import socket
import zlib

import psycopg

from .errors import StoreError
from .postgres_sql import Conn

__all__ = ["LOCK_CLASS", "DatabaseInUse", "holder_name", "take_lock"]

LOCK_CLASS = 0x636B_6462  # the high half of every key: candlekeeper's
APP_PREFIX = "candlekeeper daemon: "
NAME_MAX = 63  # the server truncates application_name at 63 bytes
RELEASE_WAIT_S = 2.0  # how long a held lock is waited for before the database counts as in use


class DatabaseInUse(StoreError):
    """Another daemon holds the database's lock."""


def holder_name() -> str:
    """This daemon as the lock's session names it (``application_name``)."""
    return (APP_PREFIX + f"pid {os.getpid()} on {socket.gethostname()}")[:NAME_MAX]


def take_lock(conn: Conn, shown: str) -> None:
    """Take the lock on ``conn``'s session or raise ``DatabaseInUse`` naming its holder
    (``shown``: the database as it may be shown)."""
    row = conn.execute("SELECT current_schema()").fetchone()
    schema = str(row[0]) if row and row[0] is not None else ""
    objid = zlib.crc32(schema.encode())
    # Waited for a moment, not tried once: a daemon that has just stopped closed its session, but
    # the server drops the lock only when that backend has ended, a moment later (a restart
    # found the lock still held by nobody it could name).
    conn.execute(f"SET lock_timeout = '{int(RELEASE_WAIT_S * 1000)}ms'")
    try:
        conn.execute("SELECT pg_advisory_lock(%s::int8)", ((LOCK_CLASS << 32) | objid,))
        return
    except psycopg.errors.LockNotAvailable:
        pass
    holder = conn.execute(
        "SELECT a.application_name, host(a.client_addr) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND l.classid::int8 = %s AND l.objid::int8 = %s",
        (LOCK_CLASS, objid),
    ).fetchone()
    who = "holder unknown"
    if holder is not None and holder[0]:
        name = str(holder[0]).removeprefix(APP_PREFIX)
        who = f"{name}, connected from {holder[1]}" if holder[1] else name
    where = f", schema {schema}" if schema and schema != "public" else ""
    raise DatabaseInUse(
        f"{shown}{where} is in use by another candlekeeper ({who}); without [cluster] one daemon"
        " per database: stop the other, or enable [cluster] on both"
    )
