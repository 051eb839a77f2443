"""PostgreSQL errors onto the store's exceptions, with the password redacted from every text.

``StoreUnavailable`` is transient (write again after ``reopen()``), ``StoreGone`` means a table
was dropped (``reopen()`` recreates it), plain ``StoreError`` is anything else the store cannot
do. A bad row (NOT NULL, a value out of range) stays psycopg's own error, as the SQLite store
lets sqlite3's through: that is a bug, not a fault.
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlsplit

import psycopg

from .errors import StoreError, StoreGone, StoreUnavailable

__all__ = ["Redactor", "StoreUnavailable", "connect_error", "translate"]

# StoreUnavailable (the one every store raises): the server cannot take this now (connection
# lost, restarting, read-only, disk full, lock timeout): nothing was committed. Answer with an
# error; ``reopen()`` before writing again (its default reason asks for that).


# SQLSTATE classes and codes after which the same write can succeed later:
# 08 connection, 53 insufficient resources (53100 disk full), 57 operator intervention
# (shutdown, crash, cannot connect now, query/statement cancelled), 40 serialization failure
# and deadlock, 58 system (I/O) error; 25006 read-only transaction, 55P03 lock timeout,
# 55006 object in use, 25P03 idle-in-transaction timeout.
TRANSIENT_CLASSES = ("08", "53", "57", "40", "58")
TRANSIENT_CODES = frozenset({"25006", "55P03", "55006", "25P03"})
GONE_CODES = frozenset({"42P01"})  # undefined_table: dropped while we ran
# Connection failures (libpq gives no SQLSTATE) that trying again will not fix.
PERMANENT_CONNECT = (
    "password authentication failed",
    "no password supplied",
    "does not exist",
    "pg_hba.conf",
    "invalid port",
    "invalid URI",
    "invalid connection option",
    "invalid sslmode",
    "could not translate host name",
)

_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


class Redactor:
    """Replaces the connection's password (from the URL, a ``password=`` item, or PGPASSWORD)
    with ``***``, and any URL or conninfo password shape as well."""

    def __init__(self, url: str) -> None:
        found: list[str] = []
        try:
            raw = urlsplit(url).password if "://" in url else None
        except ValueError:
            raw = None
        if raw:
            found += [raw, unquote(raw)]
        m = _KV_PASSWORD.search(url)
        if m:
            found.append(m.group(2).strip("'"))
        if os.environ.get("PGPASSWORD"):
            found.append(os.environ["PGPASSWORD"])
        self._secrets = sorted({s for s in found if s}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        text = _URL_PASSWORD.sub(r"\1***@", text)
        return _KV_PASSWORD.sub(r"\1***", text)


def _reason(state: str) -> str:
    """The StoreUnavailable reason of a SQLSTATE: full and locked need no reconnect."""
    if state[:2] == "53":  # disk full, out of memory, too many connections
        return "full" if state == "53100" else "unavailable"
    if state == "25006":
        return "readonly"
    if state == "55P03":
        return "locked"
    return "unavailable"


def connect_error(exc: psycopg.Error, url: str, redact: Redactor) -> StoreError:
    """A failed connect: unavailable (refused, timed out, starting up) or misconfigured."""
    text = redact(str(exc)).strip()
    if isinstance(exc, psycopg.OperationalError) and not any(m in text for m in PERMANENT_CONNECT):
        return StoreUnavailable(f"cannot connect to {url}: {text}")
    return StoreError(f"cannot open {url}: {text}")


def translate(exc: psycopg.Error, url: str, what: str, redact: Redactor, broken: bool) -> BaseException:
    """The store exception for a driver error, or the error itself when it is a bug.

    The new exception carries ``sqlstate`` and is chained to the driver's error only when the
    driver's text holds no secret.
    """
    state = exc.sqlstate or ""
    raw = str(exc).strip()
    text = redact(raw)
    out: BaseException
    if state in GONE_CODES:
        out = StoreGone(f"{url}: {what}: a table was dropped while open ({text}); reopen() recreates it")
    elif (
        state[:2] in TRANSIENT_CLASSES
        or state in TRANSIENT_CODES
        or (isinstance(exc, psycopg.OperationalError) and not state)
        or broken
    ):
        out = StoreUnavailable(f"{url}: {what}: {text}", _reason(state))
    elif isinstance(exc, (psycopg.IntegrityError, psycopg.DataError)) and text == raw:
        return exc
    else:
        out = StoreError(f"{url}: {what}: {text}")
    if text == raw:
        out.__cause__ = exc
    else:  # scrub the driver's error too, in case something still holds it
        exc.args = (text,)
    if state:
        out.sqlstate = state  # type: ignore[attr-defined]
    return out
