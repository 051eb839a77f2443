"""Storage faults that come from outside the process: a full filesystem, another process holding
the database's write lock, a read-only file. The store maps each onto its own exceptions; the
running system answers writes with the error, says storage is failing (and the alert fires),
never restarts the storage actor for it, and once the cause goes away stores everything exactly
once by itself. Real faults: a small tmpfs filled to the last byte, a second process in
``BEGIN EXCLUSIVE``, ``chattr +i`` (see tests/faults_fs.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from candlekeeper.actors.stores.errors import StoreError, StoreGone, StoreUnavailable
from candlekeeper.actors.stores.sqlite import Store
from tests.faults_fs import Filler, Immutable, Locker, small_tmpfs
from tests.test_ingest import TF

KEY = ("binance", "BTC/USDT", "1m")


def rows(times: range | list[int]) -> list[tuple[Any, ...]]:
    return [(*KEY, t, 1.0, 2.0, 0.5, 1.5, 3.0) for t in times]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "fs") as where:
        yield where


# -- the store: every SQLite failure is one of its exceptions --------------------------------


def test_full_filesystem_is_unavailable_full_and_passes(tmpfs: Path) -> None:
    with Store(str(tmpfs / "c.db")) as store:
        store.upsert(rows(range(0, 100 * TF, TF)))
        filler = Filler(tmpfs)
        with pytest.raises(StoreUnavailable, match="full") as info:
            for start in range(100, 10_000, 200):  # the WAL grows until the filesystem is full
                store.upsert(rows(range(start * TF, (start + 200) * TF, TF)))
        assert info.value.reason == "full" and not info.value.needs_reopen
        assert not isinstance(info.value.__cause__, StoreError)  # raised from the sqlite3 error, mapped
        stored_before = store.count(*KEY)  # reads still work
        filler.release()
        assert store.upsert(rows(range(20_000 * TF, 20_010 * TF, TF))) == 10  # the same connection recovers
        assert store.count(*KEY) == stored_before + 10


def test_locked_by_another_process_is_unavailable_locked(tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    with Store(db, busy_timeout=0.2) as store:
        store.upsert(rows([0]))
        locker = Locker(db)
        try:
            with pytest.raises(StoreUnavailable, match="locked") as info:
                store.upsert(rows([TF]))
            assert info.value.reason == "locked"
            with pytest.raises(StoreUnavailable):
                store.probe_write()
            assert store.last_ts(*KEY) == 0  # WAL: readers are not blocked by the writer's lock
            assert not store._conn.in_transaction  # type: ignore[union-attr]
        finally:
            locker.release()
        assert store.upsert(rows([TF])) == 1


def test_read_only_file_is_unavailable_readonly_until_reopened(tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    with Store(db) as store:
        store.upsert(rows([0]))
    frozen = Immutable(db)
    try:
        store = Store(db).open()  # SQLite falls back to a read-only connection without a word
        with pytest.raises(StoreUnavailable, match="read-only") as info:
            store.upsert(rows([TF]))
        assert info.value.reason == "readonly" and info.value.needs_reopen
        with pytest.raises(StoreUnavailable):
            store.probe_write()
    finally:
        frozen.release()
    with pytest.raises(StoreUnavailable):
        store.upsert(rows([TF]))  # still read-only: SQLite does not notice the file is writable again
    store.reopen()
    assert store.upsert(rows([TF])) == 1
    store.close()


def test_no_sqlite_error_leaves_the_store(tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    with Store(db) as store:
        store.upsert(rows([0]))
        with sqlite3.connect(db) as other:
            other.execute("DROP TABLE candles")
        with pytest.raises(StoreGone, match="schema"):  # reopen() recreates the schema
            store.count(*KEY)
        store.reopen()
        assert store.count(*KEY) == 0
        with pytest.raises(StoreError) as info:
            store.upsert([(*KEY, TF, None, 2.0, 0.5, 1.5, 3.0)])
        assert not isinstance(info.value, sqlite3.Error)
