"""What a store raises, whatever the database: the storage actor reacts by kind, not by text."""

from __future__ import annotations


class StoreError(Exception):
    """The store cannot do what was asked (not open, read-only, cannot open the file)."""


class StoreGone(StoreError):
    """The database file was deleted or replaced while open: call ``reopen()``."""


class StoreCorrupt(StoreGone):
    """The file is not a usable SQLite database: ``reopen()`` moves it aside."""
