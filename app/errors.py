"""Why the application refuses: a bad operator command, or a start-up resource it cannot have."""

from __future__ import annotations


class CommandError(Exception):
    """A control command that was refused (unknown target, bad arguments): its message is the reason."""


class StorageUnusable(Exception):
    """The database cannot be opened at all (a bad path, no permission): a mistake to report at
    start, not a crash loop of the storage actor that ends with the root giving up."""


class SocketInUse(Exception):
    """A socket or port the daemon must listen on is taken (another daemon, or anything else): a
    supervisor restarting the listener could not fix that, so start-up refuses."""
