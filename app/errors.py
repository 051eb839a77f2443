"""Why the application refuses: a bad operator command, or a start-up resource it cannot have."""

from __future__ import annotations


class CommandError(Exception):
    """A control command that was refused (unknown target, bad arguments): its message is the reason."""


class StartupError(Exception):
    """Something the system needs at start cannot be had; the message is one line naming it. A
    mistake to report at start (the daemon exits 2), not a crash loop ending in the root giving up."""


class StorageUnusable(StartupError):
    """The database cannot be opened at all (a bad path, no permission, a file that is not a
    SQLite database)."""


class CredentialsMissing(StartupError):
    """An exchange's credentials are not where the config says (an unset or empty environment
    variable): the message names the variable, never a value."""


class SocketInUse(StartupError):
    """A socket or port the daemon must listen on is taken (another daemon, or anything else): a
    supervisor restarting the listener could not fix that, so start-up refuses."""


class SocketUnusable(StartupError):
    """The control socket cannot be created at its path (no such directory, no permission, a path
    longer than a Unix socket allows)."""


class MissingDependency(Exception):
    """An optional dependency is not installed; the message names the extra that installs it."""
