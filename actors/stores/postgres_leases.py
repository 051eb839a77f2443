"""Nodes and leases: the database part of clustering, shared by every daemon of one store.

Each series is owned by at most one node through a lease row. A lease is free when released
(owner NULL) or expired; expiry is judged by the database's clock only (``clock_timestamp()``),
so nodes with skewed clocks agree. The fencing token of a series grows by one on every change
of owner and lease rows are never deleted, so a token is never reused: a write fenced with an
older token is refused (``PostgresStore.upsert(rows, fence=...)``, checked in the write's own
transaction under a share lock on the lease rows, see ``postgres_sql.FENCED_COMMIT``).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .postgres_sql import IN_KEYS, Conn, key_columns, key_of

__all__ = ["Acquired", "FencedWrite", "Lease", "LeasesMixin", "NodeInfo"]


@dataclass(frozen=True)
class FencedWrite:
    """What a fenced ``upsert`` did: rows inserted or changed, and the fence keys refused
    because their lease now has another owner or a newer token (nothing of those was stored)."""

    changed: int
    refused: frozenset[Any]


@dataclass(frozen=True)
class Lease:
    """One row of ``leases`` as ``ctl cluster`` shows it; ``remaining_s`` by the database clock
    (negative once expired); ``owner`` None once released."""

    exchange: str
    symbol: str
    timeframe: str
    owner: str | None
    token: int
    expires_at: datetime
    remaining_s: float

    @property
    def live(self) -> bool:
        return self.owner is not None and self.remaining_s > 0


@dataclass(frozen=True)
class NodeInfo:
    """One row of ``nodes`` as ``ctl cluster`` shows it, ages by the database clock."""

    node: str
    rate_budget: float
    incarnation: str | None
    heartbeat_age_s: float  # since its last heartbeat
    expires_in_s: float  # until it stops counting as live (negative: it has)
    started_at: datetime
    heartbeat_at: datetime

    @property
    def live(self) -> bool:
        return self.expires_in_s > 0


@dataclass(frozen=True)
class Acquired:
    """What ``acquire_many`` got: the fencing token of each lease taken (or extended), and how
    soon the soonest of the others, held by another owner, expires (None: none is held)."""

    tokens: dict[Any, int]
    retry_in_s: float | None


def _check_seconds(s: float) -> None:
    if not s >= 0:
        raise ValueError(f"lease_seconds must be >= 0, not {s!r}")


class LeasesMixin:
    """Node heartbeats and series leases, for a store class providing ``_db``."""

    def _db(self, what: str = "query", write: bool = False) -> AbstractContextManager[Conn]:
        raise NotImplementedError

    def db_now(self) -> datetime:
        """The database's clock: the only clock leases and heartbeats are judged by."""
        with self._db("db_now") as conn:
            row = conn.execute("SELECT clock_timestamp()").fetchone()
        assert row is not None
        return row[0]

    def heartbeat(self, node: str, rate_budget: float, lease_seconds: float, incarnation: str | None = None) -> bool:
        """Say ``node`` is alive for ``lease_seconds`` more (database clock), with its budget.

        With an ``incarnation`` (one run of a daemon), the name is refused (False) while
        another incarnation's heartbeat under it has not expired: a second daemon given the
        same name, or a stalled one woken after its successor took over, learns it here.
        """
        _check_seconds(lease_seconds)
        with self._db("heartbeat", write=True) as conn:
            row = conn.execute(
                "INSERT INTO nodes AS n (node, rate_budget, heartbeat_at, expires_at, started_at, incarnation) VALUES"
                " (%s, %s, clock_timestamp(), clock_timestamp() + make_interval(secs => %s::float8), clock_timestamp(),"
                " %s) ON CONFLICT (node) DO UPDATE SET rate_budget = excluded.rate_budget,"
                " heartbeat_at = excluded.heartbeat_at, expires_at = excluded.expires_at,"
                " started_at = CASE WHEN n.incarnation IS NOT DISTINCT FROM excluded.incarnation"
                " THEN n.started_at ELSE excluded.started_at END, incarnation = excluded.incarnation"
                " WHERE excluded.incarnation IS NULL OR n.incarnation IS NOT DISTINCT FROM excluded.incarnation"
                " OR n.expires_at <= clock_timestamp() RETURNING 1",
                (node, rate_budget, lease_seconds, incarnation),
            ).fetchone()
        return row is not None

    def nodes(self) -> list[NodeInfo]:
        """Every node that ever heartbeated, live or not, by name."""
        with self._db("nodes") as conn:
            rows = conn.execute(
                "SELECT node, rate_budget, incarnation, extract(epoch FROM clock_timestamp() - heartbeat_at)::float8,"
                " extract(epoch FROM expires_at - clock_timestamp())::float8, started_at, heartbeat_at"
                " FROM nodes ORDER BY node"
            ).fetchall()
        return [NodeInfo(n, float(b), inc, age, left, started, at) for n, b, inc, age, left, started, at in rows]

    def live_nodes(self, now: datetime | None = None) -> dict[str, float]:
        """{node: rate_budget} of the nodes whose heartbeat has not expired at ``now``
        (default: the database's clock now): the weights for ``placement.rendezvous_owner``."""
        with self._db("live_nodes") as conn:
            rows = conn.execute(
                "SELECT node, rate_budget FROM nodes WHERE expires_at > COALESCE(%s, clock_timestamp()) ORDER BY node",
                (now,),
            ).fetchall()
        return {n: float(b) for n, b in rows}

    def leave(self, node: str, owner: str | None = None, incarnation: str | None = None) -> int:
        """A graceful goodbye: the node stops counting as live and the leases of ``owner``
        (default: the node's name) are released at once. With an ``incarnation`` the node's
        row is left alone unless it is that incarnation's. Returns how many leases it held."""
        with self._db("leave", write=True) as conn, conn.transaction():
            conn.execute(
                "UPDATE nodes SET expires_at = clock_timestamp() WHERE node = %s"
                " AND (%s::text IS NULL OR incarnation = %s::text)",
                (node, incarnation, incarnation),
            )
            return conn.execute(
                "UPDATE leases SET owner = NULL, expires_at = clock_timestamp() WHERE (exchange, symbol, timeframe) IN"
                " (SELECT exchange, symbol, timeframe FROM leases WHERE owner = %s"
                " ORDER BY exchange, symbol, timeframe FOR UPDATE)",
                (owner or node,),
            ).rowcount

    def acquire(self, key: Any, node: str, lease_seconds: float) -> int | None:
        """Take (or extend) the lease of a series: its fencing token, or None while another node
        holds it unexpired. The token grows by one on every change of owner (after a release
        the next holder, even the same node, gets a new token) and is never reused."""
        _check_seconds(lease_seconds)
        e, s, t = key_of(key)
        with self._db("acquire", write=True) as conn:
            row = conn.execute(
                "INSERT INTO leases AS l (exchange, symbol, timeframe, owner, token, expires_at)"
                " VALUES (%s, %s, %s, %s, 1, clock_timestamp() + make_interval(secs => %s::float8))"
                " ON CONFLICT (exchange, symbol, timeframe) DO UPDATE SET owner = excluded.owner,"
                " token = l.token + CASE WHEN l.owner IS NOT DISTINCT FROM excluded.owner THEN 0 ELSE 1 END,"
                " expires_at = excluded.expires_at"
                " WHERE l.owner IS NULL OR l.owner = excluded.owner OR l.expires_at <= clock_timestamp()"
                " RETURNING token",
                (e, s, t, node, lease_seconds),
            ).fetchone()
        return None if row is None else int(row[0])

    def acquire_many(self, keys: Iterable[Any], node: str, lease_seconds: float) -> Acquired:
        """``acquire`` for many series in one statement (rows locked in key order, so nodes
        racing for overlapping sets cannot deadlock). Leases another owner holds unexpired
        are left alone; ``retry_in_s`` says when the first of them expires."""
        _check_seconds(lease_seconds)
        wanted = {key_of(k): k for k in keys}
        if not wanted:
            return Acquired({}, None)
        cols = key_columns(sorted(wanted))
        with self._db("acquire", write=True) as conn, conn.transaction():
            rows = conn.execute(
                "INSERT INTO leases AS l (exchange, symbol, timeframe, owner, token, expires_at)"
                " SELECT k.e, k.s, k.t, %s, 1, clock_timestamp() + make_interval(secs => %s::float8)"
                " FROM unnest(%s::text[], %s::text[], %s::text[]) AS k(e, s, t) ORDER BY k.e, k.s, k.t"
                " ON CONFLICT (exchange, symbol, timeframe) DO UPDATE SET owner = excluded.owner,"
                " token = l.token + CASE WHEN l.owner IS NOT DISTINCT FROM excluded.owner THEN 0 ELSE 1 END,"
                " expires_at = excluded.expires_at"
                " WHERE l.owner IS NULL OR l.owner = excluded.owner OR l.expires_at <= clock_timestamp()"
                " RETURNING exchange, symbol, timeframe, token",
                (node, lease_seconds, *cols),
            ).fetchall()
            tokens = {wanted[(e, s, t)]: int(tok) for e, s, t, tok in rows}
            retry_in: float | None = None
            if len(tokens) < len(wanted):
                blocked = sorted(set(wanted) - {(e, s, t) for e, s, t, _ in rows})
                row = conn.execute(
                    "SELECT min(extract(epoch FROM expires_at - clock_timestamp()))::float8 FROM leases"
                    f" WHERE owner IS NOT NULL AND {IN_KEYS}",
                    key_columns(blocked),
                ).fetchone()
                retry_in = None if row is None or row[0] is None else max(0.0, float(row[0]))
        return Acquired(tokens, retry_in)

    def renew(self, keys: Iterable[Any], node: str, lease_seconds: float) -> set[Any]:
        """Extend the leases ``node`` still owns among ``keys``; returns those keys. A lease
        that expired but was taken by nobody is renewed with its token unchanged (no other
        node can have written with a newer one)."""
        _check_seconds(lease_seconds)
        wanted = {key_of(k): k for k in keys}
        if not wanted:
            return set()
        with self._db("renew", write=True) as conn:
            rows = conn.execute(
                "UPDATE leases SET expires_at = clock_timestamp() + make_interval(secs => %s::float8)"
                " WHERE (exchange, symbol, timeframe) IN (SELECT exchange, symbol, timeframe FROM leases"
                f" WHERE owner = %s AND {IN_KEYS} ORDER BY exchange, symbol, timeframe FOR UPDATE)"
                " RETURNING exchange, symbol, timeframe",
                (lease_seconds, node, *key_columns(sorted(wanted))),
            ).fetchall()
        return {wanted[(e, s, t)] for e, s, t in rows}

    def release(self, keys: Iterable[Any], node: str) -> set[Any]:
        """Give up ``node``'s leases among ``keys`` (free at once); returns the keys released.
        The token stays with the row: the next owner gets token + 1."""
        wanted = {key_of(k): k for k in keys}
        if not wanted:
            return set()
        with self._db("release", write=True) as conn:
            rows = conn.execute(
                "UPDATE leases SET owner = NULL, expires_at = clock_timestamp()"
                " WHERE (exchange, symbol, timeframe) IN (SELECT exchange, symbol, timeframe FROM leases"
                f" WHERE owner = %s AND {IN_KEYS} ORDER BY exchange, symbol, timeframe FOR UPDATE)"
                " RETURNING exchange, symbol, timeframe",
                (node, *key_columns(sorted(wanted))),
            ).fetchall()
        return {wanted[(e, s, t)] for e, s, t in rows}

    def owner_of(self, key: Any) -> str | None:
        """The node holding the live lease of a series now (its name, without the run), or None."""
        e, s, t = key_of(key)
        with self._db("owner_of") as conn:
            row = conn.execute(
                "SELECT owner FROM leases WHERE exchange = %s AND symbol = %s AND timeframe = %s"
                " AND owner IS NOT NULL AND expires_at > clock_timestamp()",
                (e, s, t),
            ).fetchone()
        return None if row is None else str(row[0]).partition("#")[0]

    def leases(self) -> list[Lease]:
        """Every lease row (held, expired or released), by series: what ``ctl cluster`` shows."""
        with self._db("leases") as conn:
            rows = conn.execute(
                "SELECT exchange, symbol, timeframe, owner, token, expires_at,"
                " extract(epoch FROM expires_at - clock_timestamp())::float8"
                " FROM leases ORDER BY exchange, symbol, timeframe"
            ).fetchall()
        return [Lease(*r) for r in rows]
