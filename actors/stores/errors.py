"""What a store raises, whatever the database: the storage actor reacts by kind, not by text.

No database library's own exception ever leaves a store: each is one of these.
"""

from __future__ import annotations


class StoreError(Exception):
    """The store cannot do what was asked (not open, cannot open the file, a statement the
    database refuses): not expected to go away by waiting."""


class StoreGone(StoreError):
    """The database file was deleted or replaced while open: call ``reopen()``."""


class StoreCorrupt(StoreGone):
    """The file is not a usable SQLite database: ``reopen()`` moves it aside."""


class StoreUnavailable(StoreError):
    """The store cannot write (or read) right now, for a reason outside the process that may go
    away by itself: keep the data, retry later, nothing needs recreating.

    ``reason`` says which: ``full`` (disk or quota full), ``locked`` (another process holds a
    lock), ``readonly`` (the file, directory, filesystem or server became read-only), ``io`` (an
    I/O error on a file that is still ours), ``unavailable`` (anything else that passes: a lost
    connection, a server restarting). Unless full or locked, a retry reopens first: SQLite keeps
    a read-only connection read-only, a lost server connection stays lost.
    """

    REASONS = ("full", "locked", "readonly", "io", "unavailable")

    def __init__(self, message: str, reason: str = "unavailable") -> None:
        super().__init__(message)
        self.reason = reason if reason in self.REASONS else "unavailable"

    @property
    def needs_reopen(self) -> bool:
        return self.reason not in ("full", "locked")
