"""What every candle store offers, whatever the database, and the one place a store is chosen.

The storage actor, the read-only data paths (export, coverage, `latest` counts) and the tests
work through these protocols, so SQLite (`sqlite.Store`, one file, the default) and PostgreSQL
(`postgres.PostgresStore`, shared by many daemons) are interchangeable. A store never logs,
never sleeps and never retries; every fault is one of `stores.errors`' exceptions.

`location` is how the config names a database: a file path (SQLite) or a ``postgresql://``
URL. URLs may carry a password: `redacted` is what may be shown.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

from ..market.candles import Candle, GapRow, Row
from .coverage import Coverage

__all__ = ["CandleStore", "ReadStore", "is_url", "make_store", "redacted"]

URL_SCHEMES = ("postgresql://", "postgres://")


@runtime_checkable
class ReadStore(Protocol):
    """The read API both stores share (export, coverage, resume points)."""

    readonly: bool

    @property
    def path(self) -> str:
        """The database's name as it may be shown: a file path, or a URL without its password."""
        ...

    @property
    def is_open(self) -> bool: ...

    def open(self) -> Self: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def last_ts(self, exchange: str, symbol: str, timeframe: str) -> int | None: ...

    def first_ts(self, exchange: str, symbol: str, timeframe: str) -> int | None: ...

    def count(
        self, exchange: str, symbol: str, timeframe: str, start_ms: int | None = None, end_ms: int | None = None
    ) -> int: ...

    def latest(self, exchange: str, symbol: str, timeframe: str, n: int = 1) -> list[Candle]: ...

    def candles(
        self, exchange: str, symbol: str, timeframe: str, start_ms: int | None = None, end_ms: int | None = None
    ) -> list[Candle]: ...

    def iter_candles(
        self, exchange: str, symbol: str, timeframe: str, start_ms: int | None = None, end_ms: int | None = None,
        batch: int = 50_000,
    ) -> Iterator[list[Candle]]: ...

    def missing_ranges(
        self, exchange: str, symbol: str, timeframe: str, timeframe_ms: int, start_ms: int, end_ms: int
    ) -> list[tuple[int, int]]: ...

    def coverage(
        self, exchange: str, symbol: str, timeframe: str, timeframe_ms: int, start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> Coverage: ...

    def series_keys(self) -> list[tuple[str, str, str]]: ...

    def stored_keys(self, ranges: Sequence[tuple[str, str, str, int, int]]) -> set[tuple[str, str, str, int]]: ...

    def gaps(self, exchange: str, symbol: str, timeframe: str) -> list[tuple[int, int]]: ...

    def gap_reasons(self, exchange: str, symbol: str, timeframe: str) -> list[tuple[int, int, str]]: ...

    def list_series(self) -> list[tuple[str, str, str, int, bool]]: ...


@runtime_checkable
class CandleStore(ReadStore, Protocol):
    """The writer's API: what the storage actor needs of a store."""

    def upsert(self, rows: Sequence[Row], *, gaps: Sequence[GapRow] = ()) -> int: ...

    def record_gap(
        self, exchange: str, symbol: str, timeframe: str, ts_from: int, ts_to: int, reason: str = "exchange_hole"
    ) -> None: ...

    def add_series(self, exchange: str, symbol: str, timeframe: str, added_at_ms: int | None = None) -> bool: ...

    def remove_series(self, exchange: str, symbol: str, timeframe: str, removed_at_ms: int | None = None) -> bool: ...

    def probe_write(self) -> None:
        """Commit a write that changes nothing: raises StoreUnavailable when writing is not possible now."""
        ...

    def check(self) -> bool:
        """Cheap: False when the database opened is not the one there now (or cannot be reached)."""
        ...

    def verify(self) -> None:
        """Raise StoreGone when the database opened was deleted, replaced or lost its tables
        (``reopen()``, then re-read resume points), StoreUnavailable when it cannot be reached."""
        ...

    def reopen(self) -> str | None:
        """Close and open again, recreating what was lost; a note saying what, or None."""
        ...

    @property
    def identity(self) -> object | None:
        """What the database opened is (a file's device and inode, a table's oid): a change
        across ``reopen()`` means its contents are not what series remember."""
        ...

    def set_busy_timeout(self, seconds: float) -> None:
        """How long a write waits for another connection's lock before it fails as unavailable."""
        ...


def is_url(location: str) -> bool:
    """Whether a `[storage]` location is a PostgreSQL URL rather than a SQLite file path."""
    return location.startswith(URL_SCHEMES)


def redacted(location: str) -> str:
    """The location as it may be logged or shown: a URL's password replaced by ``***``."""
    if not is_url(location):
        return location
    from .postgres_errors import Redactor

    return Redactor(location)(location)


def make_store(location: str, readonly: bool = False, **options: Any) -> CandleStore:
    """A store (not opened) for a file path or a ``postgresql://`` URL. `options` go to the
    PostgreSQL store (``timescale``, ``strategy``, ``connect_timeout_s``...)."""
    if is_url(location):
        from .postgres import PostgresStore

        return PostgresStore(location, readonly, **options)
    from .sqlite import Store

    return Store(location, readonly)
