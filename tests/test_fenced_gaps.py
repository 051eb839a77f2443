"""Clustering: every write of a series, not only its candles, is fenced by the database in the
write's own transaction (issue 14, point 2). A confirmed gap (with candles or alone) and an
operator's accepted gap carry the writer's token; a newer owner makes the database refuse them,
and a change of owner cannot commit between the check and the write. Real PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
import pykka
import pytest

from candlekeeper.actors.fencing import Fences, LeaseNotHeld
from candlekeeper.actors.market.gaps import OPERATOR_ACCEPTED
from candlekeeper.actors.messages import LeaseLost, Write
from candlekeeper.actors.metrics import Metrics
from candlekeeper.actors.storage import StorageActor
from candlekeeper.actors.stores.postgres import PostgresStore
from candlekeeper.supervisors.child import Runtime
from candlekeeper.supervisors.supervisor import ChildSpec, start_root
from tests.test_corrections import AckBox, Acks
from tests.test_pg_store import Thread, expire

if TYPE_CHECKING:
    from tests.pg import PgDatabase

pytest_plugins = ["tests.pg"]

KEY = ("binance", "BTC/USDT", "1m")
TF = 60_000
T0 = 1_700_000_040_000 // TF * TF
GAP = (*KEY, T0 + 10 * TF, T0 + 20 * TF, "exchange_hole")


class Told(pykka.ThreadingActor):
    """Stands in for the cluster actor: what storage tells it."""

    def __init__(self, got: list[Any]) -> None:
        super().__init__()
        self.got = got

    def on_receive(self, message: Any) -> None:
        self.got.append(message)


@dataclass
class Node:
    """A storage actor fenced for node "a", as a clustered daemon runs it."""

    ref: Any
    fences: Fences
    metrics: Metrics
    acks: AckBox
    acks_ref: Any
    told: list[Any]

    def write(self, rows: tuple[Any, ...] = (), gaps: tuple[Any, ...] = ()) -> None:
        self.ref.tell(Write(rows=rows, gaps=gaps, token=len(self.acks.acks) + 1, reply_to=self.acks_ref))

    def refused_metric(self) -> float:
        return self.metrics.registry.get_sample_value("candlekeeper_refused_writes_total") or 0.0


@pytest.fixture
def node(pg_db: PgDatabase, runtime: Runtime) -> Iterator[Node]:
    fences, metrics, told = Fences(), Metrics(), []
    cluster = Told.start(told)
    spec = ChildSpec("storage", StorageActor, args=(pg_db.url,),
                     kwargs={"metrics": metrics, "fences": fences, "cluster": cluster})
    root, _ = start_root(runtime, [spec])
    acks = AckBox()
    acks_ref = Acks.start(acks)
    try:
        yield Node(root.proxy().child_ref("storage").get(), fences, metrics, acks, acks_ref, told)
    finally:
        acks_ref.stop()
        root.stop()
        cluster.stop()


def stored_gaps(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT exchange, symbol, timeframe, ts_from, ts_to, reason FROM gaps").fetchall()


def lock_waits(db: PgDatabase) -> int:
    """How many of our sessions wait on a lock now (asked of the server: there is no event)."""
    with db.admin() as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'candlekeeper'"
                           " AND wait_event_type = 'Lock'").fetchone()
    return int(row[0]) if row else 0


def until(cond: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def candle(i: int) -> tuple[Any, ...]:
    return (*KEY, T0 + i * TF, 1.0, 2.0, 0.5, 1.5, 3.0)


@pytest.mark.parametrize("rows", [(), (candle(0),)], ids=["gaps-alone", "with-candles"])
def test_a_gap_write_holds_its_lease_until_it_commits(node: Node, pg_db: PgDatabase, rows: tuple[Any, ...]) -> None:
    """The gap insert is held up (the gaps table locked by an admin session); meanwhile another
    node tries to take the lease (expired, not yet taken). If the check and the gap were two
    transactions the taker would get the series at once and the gap would land after it, a
    write from a stale owner accepted; in one transaction the taker waits for the write."""
    with PostgresStore(pg_db.url) as a, PostgresStore(pg_db.url) as b:
        t_a = a.acquire(KEY, "a", 30)
        assert t_a is not None
        node.fences.set(KEY, t_a)
        expire(pg_db)  # expired but taken by nobody: a's token is still the current one
        with pg_db.admin() as admin:
            admin.execute("BEGIN")
            admin.execute("LOCK TABLE gaps IN EXCLUSIVE MODE")  # reads pass, inserts wait
            node.write(rows, (GAP,))
            until(lambda: lock_waits(pg_db) >= 1, "the gap write never waited on the gaps table")
            taker = Thread(lambda: b.acquire(KEY, "b", 30))
            taker.start()
            until(lambda: not taker.is_alive() or lock_waits(pg_db) >= 2, "the taker neither ended nor waited")
            assert taker.is_alive(), "another node took the lease while a's gap write was in flight"
            admin.execute("COMMIT")
        node.acks.wait(1)
        assert node.acks.acks[0].error is None
        assert taker.result() == t_a + 1  # after a's write committed
    assert stored_gaps(pg_db.url) == [GAP]
    assert node.refused_metric() == 0 and node.fences.refused == 0 and node.told == []


@pytest.mark.parametrize("rows", [(), (candle(0),)], ids=["gaps-alone", "with-candles"])
def test_a_stale_gap_write_is_refused_by_the_database_and_counted(
    node: Node, pg_db: PgDatabase, rows: tuple[Any, ...]
) -> None:
    with PostgresStore(pg_db.url) as a, PostgresStore(pg_db.url) as b:
        t_a = a.acquire(KEY, "a", 30)
        assert t_a is not None
        node.fences.set(KEY, t_a)
        expire(pg_db)
        assert b.acquire(KEY, "b", 30) == t_a + 1  # a stalled; b owns the series now
    node.write(rows, (GAP,))
    node.acks.wait(1)
    assert "refused" in (node.acks.acks[0].error or "")
    assert stored_gaps(pg_db.url) == []
    with psycopg.connect(pg_db.url) as conn:
        assert conn.execute("SELECT count(*) FROM candles").fetchone() == (0,)
    assert node.refused_metric() == 1 and node.fences.refused == 1
    assert node.fences.get(KEY) is None  # let go
    until(lambda: bool(node.told), "the cluster actor was never told")
    assert isinstance(node.told[0], LeaseLost) and [(k.exchange, k.symbol, k.timeframe) for k in node.told[0].keys] == [KEY]


def test_an_accepted_gap_is_fenced_like_any_write(node: Node, pg_db: PgDatabase) -> None:
    """`ctl accept-gap` on a node: stored under its current token; refused (naming the owner)
    when another node owns the series, whether this node never held it or holds a stale token."""
    lo, hi = T0, T0 + 5 * TF
    accepted = (*KEY, lo, hi, OPERATOR_ACCEPTED)
    storage = node.ref.proxy()
    with PostgresStore(pg_db.url) as a, PostgresStore(pg_db.url) as b:
        assert b.acquire(KEY, "b#run1", 30) == 1
        # a holds no lease of it: refused before the database is written, the owner named
        with pytest.raises(LeaseNotHeld, match="node 'b' owns it"):
            storage.accept_gap(*KEY, lo, hi).get()
        assert stored_gaps(pg_db.url) == [] and node.refused_metric() == 0
        b.release([KEY], "b#run1")
        t_a = a.acquire(KEY, "a", 30)
        assert t_a == 2
        node.fences.set(KEY, t_a)
        storage.accept_gap(*KEY, lo, hi).get()  # a's own: stored
        assert stored_gaps(pg_db.url) == [accepted]
        expire(pg_db)
        assert b.acquire(KEY, "b#run1", 30) == t_a + 1
        # a's token is stale now: the database refuses the write, counted, and a lets it go
        with pytest.raises(LeaseNotHeld, match="node 'b' owns it"):
            storage.accept_gap(*KEY, lo, hi + TF).get()
    assert stored_gaps(pg_db.url) == [accepted]
    assert node.refused_metric() == 1 and node.fences.refused == 1 and node.fences.get(KEY) is None
    until(lambda: bool(node.told), "the cluster actor was never told")
    assert isinstance(node.told[0], LeaseLost)


def test_fenced_upsert_records_gaps_in_the_candles_transaction(pg_db: PgDatabase) -> None:
    """The store's contract: gaps ride in the fenced upsert; a refused series stores neither."""
    eth = ("binance", "ETH/USDT", "1m")
    with PostgresStore(pg_db.url) as a:
        t_btc, t_eth = a.acquire(KEY, "a", 30), a.acquire(eth, "a", 30)
        assert t_btc is not None and t_eth is not None
        a.release([eth], "a")
        eth_gap = (*eth, T0, T0 + TF, "exchange_hole")
        result = a.upsert([candle(0)], fence={KEY: t_btc, eth: t_eth}, gaps=[GAP, eth_gap])
        assert result.changed == 1 and result.refused == {eth}
        assert a.refused_writes == 1
        assert a.gap_reasons(*KEY) == [GAP[3:]] and a.gap_reasons(*eth) == []
        with pytest.raises(ValueError, match="without a token"):
            a.upsert([], fence={KEY: t_btc}, gaps=[eth_gap])
        with pytest.raises(ValueError, match="empty gap"):
            a.upsert([], gaps=[(*KEY, T0, T0, "exchange_hole")])
        assert a.upsert([], gaps=[(*KEY, T0, T0 + TF, "listing")]) == 0  # unfenced: one transaction too
        assert a.gap_reasons(*KEY) == [(T0, T0 + TF, "listing"), GAP[3:]]

