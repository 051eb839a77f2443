"""Several systems sharing one PostgreSQL database and its series by leases (in process, on the
test's clock): placement by weighted rendezvous, joining and leaving, fencing of stale writes,
one name per live daemon, and what health, tree and `cluster` show."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import psycopg
import pytest

import candlekeeper
from candlekeeper.actors.placement import rendezvous_owner
from candlekeeper.app import config as config_mod
from candlekeeper.app.system import System
from candlekeeper.simulator.server import BinanceSimulator, synthetic_symbols
from candlekeeper.supervisors.child import Runtime
from candlekeeper.supervisors.clock import ShiftedClock
from candlekeeper.supervisors.events import LifecycleEvent
from tests.conftest import LEAD_S
from tests.test_fault_matrix import trip_at
from tests.test_ingest import TF, wait_until

if TYPE_CHECKING:
    from tests.pg import PgDatabase

pytest_plugins = ["tests.pg"]

LOOKBACK_MIN = 60
LEASE = "3s"
WAIT = 60.0


@dataclass
class Cluster:
    sim: BinanceSimulator
    clock: ShiftedClock
    start: int
    url: str
    symbols: list[str]
    systems: dict[str, System] = field(default_factory=dict)
    _conn: psycopg.Connection[Any] | None = field(default=None, repr=False)

    def config(self, node: str, **cluster: Any) -> dict[str, Any]:
        return {
            "storage": {"url": self.url},
            "cluster": {"enabled": True, "node": node, "lease": LEASE, **cluster},
            "ingest": {"since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.start / 1000)),
                       "poll_interval": "1s"},
            "exchanges": {"binance": {
                "symbols": self.symbols, "api_base": self.sim.url, "rate_limit": 200, "timeout": "1s",
                "page_limit": 30, "retry_base_delay": "50ms", "retry_max_delay": "300ms",
            }},
        }

    def start_node(self, node: str, events: list[LifecycleEvent] | None = None, **cluster: Any) -> System:
        runtime = Runtime(wall=self.clock, allow_crash_injection=True)
        if events is not None:
            runtime.events.subscribe(events.append)
        system = candlekeeper.start(self.config(node, **cluster), control=False, runtime=runtime)
        self.systems[node] = system
        return system

    def stop_node(self, node: str) -> None:
        self.systems.pop(node).stop()

    def _polls(self) -> psycopg.Connection[Any]:
        """The test's own connection for what it polls (a connection per poll costs the server a
        backend's start and end each time)."""
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.url, autocommit=True)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def leases(self) -> dict[str, tuple[str | None, int, bool]]:
        """{symbol: (owner node, token, live)} from the database."""
        rows = self._polls().execute("SELECT symbol, owner, token, expires_at > clock_timestamp() FROM leases").fetchall()
        return {s: (o.partition("#")[0] if o else None, t, live) for s, o, t, live in rows}

    def owners(self) -> dict[str, str | None]:
        return {s: (o if live else None) for s, (o, _, live) in self.leases().items()}

    def placed(self, nodes: list[str]) -> dict[str, str]:
        """Where weighted rendezvous puts every series among these (equal budget) nodes."""
        weights = {n: 1.0 for n in nodes}
        return {s: rendezvous_owner(("binance", s, "1m"), weights) or "" for s in self.symbols}

    def stored(self) -> dict[str, list[tuple[Any, ...]]]:
        rows = self._polls().execute("SELECT symbol, ts, open, high, low, close, volume FROM candles"
                                     " WHERE exchange = 'binance' AND timeframe = '1m' ORDER BY symbol, ts").fetchall()
        out: dict[str, list[tuple[Any, ...]]] = {s: [] for s in self.symbols}
        for symbol, *candle in rows:
            out.setdefault(symbol, []).append(tuple(candle))
        return out

    def expected(self, symbol: str) -> list[tuple[Any, ...]]:
        horizon = (self.sim.now_ms() // TF) * TF
        return [tuple(c) for c in self.sim.expected_candles(symbol, "1m", self.start, horizon)]

    def complete(self) -> bool:
        stored = self.stored()
        return all(len(stored.get(s, [])) >= len(self.expected(s)) for s in self.symbols)

    def assert_exact(self) -> None:
        stored = self.stored()
        for s in self.symbols:
            assert stored[s] == self.expected(s), f"{s}: the store differs from the exchange's closed candles"


@contextmanager
def cluster(pg_db: PgDatabase, n_symbols: int = 12) -> Iterator[Cluster]:
    clock = ShiftedClock.before_boundary(60.0, LEAD_S)  # no candle closes during a test
    start = (clock.ms() // TF) * TF - LOOKBACK_MIN * 60_000
    symbols = synthetic_symbols(n_symbols)
    sim = BinanceSimulator(symbols, history_start_ms=start - 3600_000, now_ms=clock.ms).start()
    c = Cluster(sim, clock, start, pg_db.url, symbols)
    try:
        yield c
    finally:
        for system in list(c.systems.values()):
            system.stop()
        sim.stop()
        c.close()


def refused_metric(system: System) -> float:
    return system.metrics.registry.get_sample_value("candlekeeper_refused_writes_total") or 0.0


def running_here(system: System) -> set[str]:
    tree = system.tree()
    (ex,) = [c for c in tree["children"] if c["id"] == "binance"]
    (series,) = [c for c in ex["children"] if c["id"] == "series"]
    return {row["id"].rpartition("@")[0] for row in series["children"] if row["state"] == "running"}


# -- the tests -------------------------------------------------------------------------------------


def test_two_nodes_share_the_series_by_placement_and_store_them_exactly(pg_db) -> None:
    with cluster(pg_db) as c:
        a, b = c.start_node("a"), c.start_node("b")
        placed = c.placed(["a", "b"])
        assert set(placed.values()) == {"a", "b"}, "a placement this lopsided proves little: pick other names"
        wait_until(lambda: c.owners() == placed, timeout=WAIT, what="every series owned where it is placed")
        wait_until(c.complete, timeout=WAIT, what="backfill")
        c.assert_exact()
        for node, system in (("a", a), ("b", b)):
            mine = {s for s, n in placed.items() if n == node}
            assert running_here(system) == mine
            h = system.health()
            assert {s["symbol"] for s in h["series"]} == mine and {s["owner"] for s in h["series"]} == {node}
            assert h["cluster"]["node"] == node and h["cluster"]["state"] == "member"
            assert h["cluster"]["live_nodes"] == ["a", "b"] and h["cluster"]["owned"] == len(mine)
            assert h["cluster"]["wanted"] == len(c.symbols) and h["cluster"]["refused_writes"] == 0
            tree = system.tree()
            assert tree["node"] == node
            rows = [r for ex in tree["children"] if ex["id"] == "binance" for sup in ex["children"]
                    if sup["id"] == "series" for r in sup["children"]]
            assert {r["owner"] for r in rows} == {node} and all(isinstance(r["token"], int) for r in rows)
        view = a.cluster()
        assert [(n["node"], n["live"], n["owned"]) for n in view["nodes"]] == [
            ("a", True, sum(1 for n in placed.values() if n == "a")), ("b", True, sum(1 for n in placed.values() if n == "b"))]
        assert all(n["rate_budget"] == 200 and n["last_heartbeat_s"] < 3 for n in view["nodes"])
        assert {lease["symbol"]: lease["owner"] for lease in view["leases"]} == placed
        assert all(lease["token"] >= 1 and 0 < lease["expires_in_s"] <= 3 for lease in view["leases"])
        # an operator's accepted gap is a write of the series: on the owner only (fenced by its token)
        of_b = min(s for s, n in placed.items() if n == "b")
        with pytest.raises(candlekeeper.CommandError, match="node 'b' owns it"):
            a.accept_gap("binance", of_b, c.start, c.start + TF)
        assert b.accept_gap("binance", of_b, c.start, c.start + TF)["gap"] == "operator_accepted"
        assert refused_metric(a) == refused_metric(b) == 0


def test_a_joining_node_takes_its_share_and_nothing_else_moves(pg_db) -> None:
    with cluster(pg_db) as c:
        events: list[LifecycleEvent] = []
        a = c.start_node("a", events)
        wait_until(lambda: c.owners() == {s: "a" for s in c.symbols}, timeout=WAIT, what="a owns everything")
        wait_until(c.complete, timeout=WAIT, what="backfill")
        tokens = {s: t for s, (_, t, _) in c.leases().items()}
        events.clear()
        c.start_node("b")
        placed = c.placed(["a", "b"])
        wait_until(lambda: c.owners() == placed, timeout=WAIT, what="b took its share")
        moved = {s for s, n in placed.items() if n == "b"}
        kept = set(c.symbols) - moved
        assert moved and kept
        # a stopped exactly the series that moved; the ones it kept were never restarted
        touched = {e.path.split("/series/", 1)[1].rpartition("@")[0] for e in events if "/series/" in e.path}
        assert touched == moved
        assert running_here(a) == kept
        leases = c.leases()
        assert all(leases[s][1] == tokens[s] for s in kept), "a kept lease changed token"
        assert all(leases[s][1] == tokens[s] + 1 for s in moved), "a moved lease: one change of owner"
        c.assert_exact()
        assert refused_metric(a) == 0  # a released them after its last writes: nothing refused


def test_a_node_that_stops_hands_its_series_over_at_once(pg_db) -> None:
    with cluster(pg_db) as c:
        c.start_node("a")
        c.start_node("b")
        wait_until(lambda: c.owners() == c.placed(["a", "b"]), timeout=WAIT, what="placed")
        wait_until(c.complete, timeout=WAIT, what="backfill")
        c.stop_node("b")
        # released on the way out, not left to expire
        assert all(owner != "b" for owner, _, live in c.leases().values() if live)
        wait_until(lambda: c.owners() == {s: "a" for s in c.symbols}, timeout=WAIT, what="a took b's series")
        view = c.systems["a"].cluster()
        assert [(n["node"], n["live"]) for n in view["nodes"]] == [("a", True), ("b", False)]
        c.assert_exact()


def test_a_write_under_a_stale_token_is_refused_and_the_series_let_go(pg_db) -> None:
    """Another owner takes a lease from under a node in the middle of its backfill (the lease
    row changed by hand, as a node that judged it expired would): the node's next write of
    that series is refused by the database, counted, and the series stops there. Once that
    lease expires (its owner is not a live node) the series is placed and taken again, and
    the store ends exact."""
    with cluster(pg_db, n_symbols=2) as c:
        symbol = c.symbols[0]

        def steal() -> None:
            with psycopg.connect(c.url, autocommit=True) as conn:
                conn.execute("UPDATE leases SET owner = 'ghost#1', token = token + 1,"
                             " expires_at = clock_timestamp() + interval '2 seconds' WHERE symbol = %s", (symbol,))

        done = trip_at(c.sim, 2, steal, symbol=symbol)  # its second page: the first is stored by then
        a = c.start_node("a")
        assert done.wait(WAIT)
        wait_until(lambda: a.health()["cluster"]["refused_writes"] >= 1, timeout=WAIT, what="a refused write")
        assert refused_metric(a) >= 1
        wait_until(lambda: c.owners().get(symbol) == "a" and c.leases()[symbol][1] >= 3, timeout=WAIT,
                   what="the series taken again after the ghost's lease expired")
        wait_until(c.complete, timeout=WAIT, what="backfill")
        c.assert_exact()


def test_a_second_daemon_under_a_live_node_name_is_refused(pg_db) -> None:
    with cluster(pg_db, n_symbols=2) as c:
        c.start_node("a")
        wait_until(lambda: bool(c.owners()) and set(c.owners().values()) == {"a"}, timeout=WAIT, what="a up")
        with pytest.raises(candlekeeper.StartupError, match="node 'a' is in use by another live daemon"):
            candlekeeper.start(c.config("a"), control=False, runtime=Runtime(wall=c.clock))


def set_node_row(url: str, node: str, incarnation: str, seconds: float) -> None:
    """Make `node` look held by another run, heartbeating now, live for `seconds`."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO nodes (node, rate_budget, heartbeat_at, expires_at, started_at, incarnation)"
                     " VALUES (%s, 1, clock_timestamp(), clock_timestamp() + make_interval(secs => %s),"
                     " clock_timestamp(), %s) ON CONFLICT (node) DO UPDATE SET incarnation = excluded.incarnation,"
                     " heartbeat_at = excluded.heartbeat_at, expires_at = excluded.expires_at",
                     (node, seconds, incarnation))


@pytest.mark.long
def test_a_node_whose_name_is_taken_over_stands_down_then_rejoins(pg_db) -> None:
    """Another run takes this node's name (a successor started while this one was stalled): this
    one's next heartbeat is refused, it stops every series and holds no lease (health down,
    saying why); once the other's heartbeat expires, it joins again and takes its series back."""
    with cluster(pg_db, n_symbols=4) as c:
        a = c.start_node("a")
        wait_until(lambda: c.owners() == {s: "a" for s in c.symbols}, timeout=WAIT, what="a owns everything")
        set_node_row(c.url, "a", "successor", 4.0)
        wait_until(lambda: a.health()["cluster"]["state"] == "superseded", timeout=WAIT, what="a stood down")
        h = a.health()
        assert h["status"] == "down" and any("superseded" in r for r in h["reasons"])
        wait_until(lambda: not a.health()["series"] and not running_here(a), timeout=WAIT, what="a runs nothing")
        wait_until(lambda: a.health()["cluster"]["state"] == "member" and c.owners() == {s: "a" for s in c.symbols},
                   timeout=WAIT, what="a back once the other run expired")
        wait_until(c.complete, timeout=WAIT, what="backfill")
        c.assert_exact()


def test_a_restart_waits_for_the_previous_runs_heartbeat_to_expire(pg_db) -> None:
    """A heartbeat left by a previous run that is not renewed (it was killed) does not refuse the
    start; the new run joins once it expires, and its leases carry new tokens."""
    with cluster(pg_db, n_symbols=2) as c:
        c.start_node("a")
        wait_until(lambda: c.owners() == {s: "a" for s in c.symbols}, timeout=WAIT, what="a owns everything")
        tokens = {s: t for s, (_, t, _) in c.leases().items()}
        c.stop_node("a")
        # as if it had been killed instead: its leases and heartbeat left behind, renewed by nobody
        with psycopg.connect(c.url, autocommit=True) as conn:
            conn.execute("UPDATE leases SET owner = (SELECT 'a#' || incarnation FROM nodes WHERE node = 'a'),"
                         " expires_at = clock_timestamp() + interval '3 seconds'")
            conn.execute("UPDATE nodes SET expires_at = clock_timestamp() + interval '2 seconds' WHERE node = 'a'")
        again = c.start_node("a")
        assert again.health()["cluster"]["state"] in ("joining", "member")
        wait_until(lambda: c.owners() == {s: "a" for s in c.symbols}
                   and all(t > tokens[s] for s, (_, t, _) in c.leases().items()), timeout=WAIT,
                   what="the new run owns everything, with new tokens")


def test_a_cluster_actor_restart_keeps_every_series_running(pg_db) -> None:
    with cluster(pg_db, n_symbols=6) as c:
        events: list[LifecycleEvent] = []
        a = c.start_node("a", events)
        wait_until(lambda: c.owners() == {s: "a" for s in c.symbols}, timeout=WAIT, what="a owns everything")
        wait_until(c.complete, timeout=WAIT, what="backfill")
        tokens = {s: t for s, (_, t, _) in c.leases().items()}
        events.clear()
        a.crash("cluster")
        wait_until(lambda: any(e.kind == "restarted" and e.path.endswith("/cluster") for e in list(events)),
                   timeout=WAIT, what="the cluster actor restarted")
        expiry = {s: live for s, (_, _, live) in c.leases().items()}
        wait_until(lambda: a.health()["cluster"]["state"] == "member", timeout=WAIT, what="member again")
        assert all(expiry.values())
        assert {s: t for s, (_, t, _) in c.leases().items()} == tokens  # renewed, never re-taken
        assert not [e for e in events if "/series/" in e.path], "a series was stopped or restarted"
        assert running_here(a) == set(c.symbols)


def test_rate_budget_weighs_the_share(pg_db) -> None:
    with cluster(pg_db, n_symbols=40) as c:
        c.start_node("a", rate_budget=1)
        c.start_node("b", rate_budget=3)
        weights = {"a": 1.0, "b": 3.0}
        placed = {s: rendezvous_owner(("binance", s, "1m"), weights) for s in c.symbols}
        wait_until(lambda: c.owners() == placed, timeout=WAIT, what="placed by weight")
        assert sum(1 for n in placed.values() if n == "b") > sum(1 for n in placed.values() if n == "a")
        assert {n["node"]: n["rate_budget"] for n in c.systems["a"].cluster()["nodes"]} == {"a": 1.0, "b": 3.0}


def test_add_and_remove_at_run_time_reach_every_node(pg_db) -> None:
    with cluster(pg_db, n_symbols=4) as c:
        c.sim.list_symbol("NEW/USDT")
        a, b = c.start_node("a"), c.start_node("b")
        wait_until(lambda: len(c.owners()) == 4 and None not in c.owners().values(), timeout=WAIT, what="placed")
        wait_until(lambda: a.health()["exchanges"][0]["status"] == "ok", timeout=WAIT, what="markets loaded")
        a.add_series("binance", "NEW/USDT")
        owner = rendezvous_owner(("binance", "NEW/USDT", "1m"), {"a": 1.0, "b": 1.0})
        wait_until(lambda: c.owners().get("NEW/USDT") == owner, timeout=WAIT, what="the new series placed")
        wait_until(lambda: "NEW/USDT" in running_here(c.systems[owner]), timeout=WAIT, what="running on its owner")
        b.remove_series("binance", c.symbols[0])
        wait_until(lambda: c.owners().get(c.symbols[0]) is None, timeout=WAIT, what="the removed series released")
        assert all(c.symbols[0] not in running_here(s) for s in (a, b))


def test_cluster_config_rules_and_the_password_never_shown() -> None:
    ex = {"binance": {"symbols": ["BTC/USDT"]}}
    with pytest.raises(config_mod.ConfigError, match=r"\[cluster\] enabled: .* set \[storage\] url"):
        config_mod.from_dict({"cluster": {"enabled": True}, "exchanges": ex})
    with pytest.raises(config_mod.ConfigError, match="path and url are both given"):
        config_mod.from_dict({"storage": {"path": "x.db", "url": "postgresql://u@h/db"}, "exchanges": ex})
    with pytest.raises(config_mod.ConfigError, match="lease") as info:
        config_mod.from_dict({"storage": {"url": "postgresql://u@h/db"}, "cluster": {"lease": "100ms"},
                              "exchanges": ex})
    with pytest.raises(config_mod.ConfigError, match="node"):
        config_mod.from_dict({"storage": {"url": "postgresql://u@h/db"}, "cluster": {"node": "a b"},
                              "exchanges": ex})
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.from_dict({"storage": {"url": "postgresql://u:hunter2@h:99999/db"}, "exchanges": ex})
    assert "hunter2" not in str(info.value) and "***" in str(info.value)
    cfg = config_mod.from_dict({"storage": {"url": "postgresql://u:hunter2@h/db"},
                                "cluster": {"enabled": True, "node": "n1"}, "exchanges": ex})
    assert cfg.cluster.lease == 15.0 and cfg.cluster.node == "n1"
    assert config_mod.from_dict({"exchanges": ex}).cluster.enabled is False
    for text in (repr(cfg), str(cfg), repr(cfg.storage), str(config_mod.to_dict(cfg)), cfg.storage.display):
        assert "hunter2" not in text
    assert config_mod.to_dict(cfg)["storage"] == {"url": "postgresql://u:***@h/db"}
    assert config_mod.from_dict(config_mod.to_dict(cfg, secrets=True)) == cfg


def test_the_password_never_reaches_logs_health_or_errors(pg_db, pg_cluster) -> None:
    """A URL with a password: the daemon runs, and neither its log lines, health, the cluster
    view nor a storage error text ever carries the password."""
    from structlog.testing import capture_logs

    from tests.pg import PASSWORD, PASSWORD_USER

    with pg_db.admin() as conn:  # PostgreSQL 15+: only the owner may create in public
        conn.execute(f"GRANT CREATE, USAGE ON SCHEMA public TO {PASSWORD_USER}")  # type: ignore[arg-type]
    with cluster(pg_db, n_symbols=2) as c, capture_logs() as logs:
        c.url = pg_db.password_url()
        a = c.start_node("a")
        wait_until(c.complete, timeout=WAIT, what="backfill")
        pg_cluster.restart("fast")  # every connection lost: errors are logged and reported
        wait_until(lambda: any("StoreUnavailable" in repr(entry) for entry in list(logs)), timeout=WAIT,
                   what="a storage error logged")
        wait_until(lambda: a.health()["status"] == "ok" and a.health()["cluster"]["state"] == "member",
                   timeout=WAIT, what="back after the restart")
        texts = [repr(logs), repr(a.health()), repr(a.cluster()), repr(a.tree())]
        for text in texts:
            assert PASSWORD not in text and quote(PASSWORD, safe="") not in text
