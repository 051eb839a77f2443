"""Real storage faults for tests: a small tmpfs that can be filled, a second process holding a
SQLite write lock, an immutable file. Each needs root (CI runs as root); without it the test
using it is skipped with the reason."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "8M") -> Iterator[Path]:
    """A real tmpfs of `size` mounted at `where`, unmounted afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


class Filler:
    """Fills a filesystem to the last byte with one file; `release` gives the space back."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "filler"
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        chunk = b"\0" * 65536
        while chunk:
            try:
                os.write(self.fd, chunk)
            except OSError:  # ENOSPC: write smaller pieces until not even one byte fits
                chunk = chunk[: len(chunk) // 2]
        os.fsync(self.fd)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            os.remove(self.path)


LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
conn.execute("ROLLBACK")
conn.close()
"""


class Locker:
    """Another process holding ``BEGIN EXCLUSIVE`` on a SQLite file until `release`."""

    def __init__(self, db: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", LOCKER, db], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line == "locked", f"the locker did not get the lock: {line!r}"

    def release(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            assert self.proc.wait(30) == 0


class Immutable:
    """The file cannot be written, not even by root (``chattr +i``), until `release`."""

    def __init__(self, path: str) -> None:
        self.path = path
        res = subprocess.run(["chattr", "+i", path], capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot make a file immutable here (chattr needs root): {res.stderr.strip()}")
        self.held = True

    def release(self) -> None:
        if self.held:
            subprocess.run(["chattr", "-i", self.path], check=True)
            self.held = False
