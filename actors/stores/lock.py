"""One daemon per database file: an OS lock on ``<db>.lock``, held for the daemon's life.

SQLite's own locks guard transactions, not ownership: two daemons on one file would both ingest
into it, and across hosts (a network filesystem) SQLite's locking cannot be trusted at all. So a
daemon takes ``flock(LOCK_EX | LOCK_NB)`` on ``<db>.lock`` before it opens or writes anything,
and a second daemon is refused. The kernel drops a flock when its holder dies, however it dies
(``kill -9`` included), so a lock file left behind never blocks a restart; its content (the
holder's pid, host and control socket) only serves to name the other daemon in the refusal.
A flock belongs to one open file description, so a second `System` in the same process is
refused too.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from typing import Any

from .errors import StoreError


class DatabaseInUse(StoreError):
    """Another daemon holds the database's lock."""


class DatabaseLock:
    """The lock of the database at `db_path` (nothing to lock for ``:memory:``)."""

    def __init__(self, db_path: str, *, control_socket: str | None = None) -> None:
        self.db_path = db_path
        self.path = f"{db_path}.lock"
        self.control_socket = control_socket
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> DatabaseLock:
        """Take the lock or raise: `DatabaseInUse` naming the holder, `StoreError` when the lock
        file cannot be created or opened."""
        if self._fd is not None or self.db_path in (":memory:", ""):
            return self
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = describe(read_holder(self.path))
            raise DatabaseInUse(
                f"{os.path.abspath(self.db_path)} is in use by another candlekeeper ({holder});"
                " SQLite cannot be shared between daemons"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
        self._fd = fd
        self._write_holder(fd)
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # the holder is gone: leave no name behind (the file stays: see _open)
        except OSError:
            pass
        os.close(fd)  # closing the last descriptor drops the flock

    def _open(self) -> int:
        # The file is never deleted: deleting it would let a second daemon lock a new file
        # while the first still holds the old, unlinked one.
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            try:  # a read-only directory holding an existing lock file: a shared fd locks too
                return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                why = exc.strerror or exc
                raise StoreError(f"cannot lock {self.db_path}: cannot create {self.path}: {why}") from None

    def _write_holder(self, fd: int) -> None:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "control_socket": self.control_socket}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        except OSError:
            pass  # read-only or full: the lock holds all the same, only the name is missing


def read_holder(path: str) -> dict[str, Any] | None:
    """Who holds the lock file at `path`, as its holder wrote it (None if unreadable)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.loads(fh.read() or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "holder unknown"
    where = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    sock = holder.get("control_socket")
    return f"{where}, control socket {sock}" if sock else where
