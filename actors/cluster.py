"""The cluster actor: which series run on this daemon, when several share one PostgreSQL database.

Every `poll` seconds (lease / 3) one round, on its own connection:

1. heartbeat: this node (name, incarnation, rate budget) is alive for one more lease time.
   A name held by another live incarnation is refused: this daemon stands down
   (`superseded`), lets every series go and waits for the name to be free again;
2. the live nodes and the wanted series (configured, plus run-time `add`/`remove` from the
   database's series table, so every node sees every node's changes);
3. renew the leases it holds. Those it no longer holds (it stalled past the lease, the
   database was out of reach for that long) are gone: their series stop here at once;
4. the series another live node should own now (weighted rendezvous over the live nodes,
   `placement.rendezvous_owner`, weight = rate budget) are stopped, their last writes
   flushed, and their leases released, so that node takes them at its next round: a joining
   node takes its fair share and nothing else moves;
5. acquire the leases of the series this node should own and does not hold (in one
   statement): a lease still held by a node that died is retried as soon as it expires.
   Each token is put in `Fences` before the series starts: its every write carries it.

Failover: a node that dies (kill -9) or stalls (SIGSTOP) stops heartbeating and renewing;
after one lease time its heartbeat and leases have expired and every other node's next round
(within one poll) places and takes its series: within lease + poll. A stalled node that wakes
finds its leases renewed by nobody (step 3), and its writes refused by the database (their
tokens are stale: `LeaseLost` from storage), and lets those series go.

Series start and stop through their exchange's series supervisor; the list of running specs
is the supervisor's own, so a restarted series supervisor starts exactly the owned series.
The series it keeps are never restarted. Starts are not waited for, and while a round waits for
stops (before a release) it heartbeats and renews every poll, so taking or handing over a
thousand series never lets the leases it keeps expire. A node that has just joined and sees no
other live node waits one poll before acquiring, so daemons started together share the series
at once instead of the first one taking all of them. Expiry is judged by the database's clock
only. The actor's state that must outlive its restarts (the tokens, the running lists) belongs
to the tree: a restarted cluster actor renews what the node holds and changes nothing else.
A graceful stop (`leave`) stops this node's series, flushes storage, and releases its leases
and its name at once, so the others take over without waiting for a lease to expire.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pykka

from ..supervisors.child import Address, Child
from ..supervisors.scheduler import Timer
from ..supervisors.supervisor import ChildExists, ChildSpec, NoSuchChild
from .fencing import Fences, Key
from .messages import ClusterStatus, ForgetSeries, LeaseLost, SeriesKey
from .placement import rendezvous_owner
from .stores.errors import StoreError

ASK_S = 30.0  # the longest a series supervisor may take to start or stop one series
MIN_ROUND_S = 0.1  # the soonest a round follows another (a lease about to expire)


@dataclass(frozen=True)
class ClusterSettings:
    """From `[cluster]` and `[storage] url` (by `candlekeeper.app.settings`)."""

    url: str = field(repr=False)  # may carry the password: never shown
    node: str
    lease: float = 15.0
    rate_budget: float = 1.0
    store_options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def poll(self) -> float:
        """How often leases are renewed and the placement recomputed."""
        return self.lease / 3


@dataclass(frozen=True)
class _Round:
    pass


@dataclass(frozen=True)
class Rebalance:
    """Run a round now (an operator added or removed a series)."""


_ROUND = _Round()


def new_incarnation() -> str:
    """One run of a daemon: leases are owned by node#incarnation, so a restarted daemon never
    shares a fencing token with the run before it."""
    return uuid.uuid4().hex[:8]


class ClusterActor(Child):
    def __init__(
        self,
        settings: ClusterSettings,
        *,
        incarnation: str,
        configured: Sequence[SeriesKey],
        spec_of: Callable[[SeriesKey], ChildSpec | None],
        supervisors: Mapping[str, Address],
        running: dict[str, list[ChildSpec]],
        fences: Fences,
        storage: Address | None = None,
        health: Any = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.node = settings.node
        self.incarnation = incarnation
        self.owner = f"{settings.node}#{incarnation}"
        self.configured = list(configured)
        self.spec_of = spec_of
        self.supervisors = supervisors
        self.running = running
        self.fences = fences
        self.storage = storage
        self.health = health
        from .stores.postgres import PostgresStore  # deferred: psycopg, for clustered daemons only

        self.store = PostgresStore(settings.url, **dict(settings.store_options))
        self.state = "joining"
        self.detail: str | None = None
        self.live: dict[str, float] = {}
        self.wanted: list[SeriesKey] = []
        self._timer: Timer | None = None
        self._left = False
        self._joined_at = 0.0
        self._was_member = len(fences) > 0  # a restart of this actor: the node was a member
        self._beat_at = self._renewed_at = -float("inf")
        self._lost: set[Key] = set()  # leases found gone, their series still to stop

    # -- lifecycle -----------------------------------------------------------------------

    def on_start(self) -> None:
        self._report()  # health has a cluster section from the start: joining
        self._timer = self.schedule(0.0, _ROUND)

    def on_stop(self) -> None:
        self.store.close()

    def on_failure(self, *_: Any) -> None:
        self.store.close()

    def on_receive(self, message: Any) -> Any:
        if message is _ROUND or isinstance(message, _Round):
            self._timer = None
            self._round()
        elif isinstance(message, Rebalance):
            if self._timer is not None:
                self._timer.cancel()
            self._timer = None
            self._round()
        elif isinstance(message, LeaseLost):
            self._on_lease_lost(message)
        else:
            return super().on_receive(message)
        return None

    # -- asked by the system -------------------------------------------------------------

    def leave(self) -> dict[str, Any]:
        """A graceful goodbye: stop this node's series, flush their writes, release every
        lease and the node's name at once. Rounds stop; called once, before the tree stops."""
        self._left = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held = self._held()
        self._stop_series(held | self._running_keys(), wait=True)
        self._sync_storage()
        released = 0
        try:
            self._ensure_open()
            released = self.store.leave(self.node, self.owner, self.incarnation)
        except StoreError as exc:  # the leases expire by themselves within one lease time
            self.log.warning("cluster_leave_failed", error=str(exc))
        self.fences.drop(held)
        self.state = "stopped"
        self.log.info("cluster_left", node=self.node, released=released)
        self._report()
        return {"node": self.node, "released": released}

    def status(self) -> dict[str, Any]:
        return {"node": self.node, "incarnation": self.incarnation, "state": self.state, "detail": self.detail,
                "live_nodes": sorted(self.live), "owned": len(self.fences), "wanted": len(self.wanted),
                "lease_s": self.settings.lease, "refused_writes": self.fences.refused}

    # -- the round -----------------------------------------------------------------------

    def _round(self) -> None:
        if self._left:
            return
        delay = self.settings.poll
        try:
            delay = self._step()
        except StoreError as exc:
            self._unreachable(exc)
        self._report()
        self._timer = self.schedule(max(MIN_ROUND_S, delay), _ROUND)

    def _step(self) -> float:
        """One round (see the module docstring); returns the delay until the next one."""
        self._ensure_open()
        if not self._beat():
            if not self._was_member:  # the previous run of this node, killed or stalled: wait it out
                self.detail = (f"waiting for the previous run of node {self.node!r} to expire"
                               " (or another daemon uses this name)")
            else:
                self._superseded()
            return self.settings.poll
        if self.state != "member":
            self.log.info("cluster_joined", node=self.node, incarnation=self.incarnation, was=self.state)
            self._joined_at = self.runtime.clock()
            self._was_member = True
        self.state, self.detail = "member", None
        self.live = self.store.live_nodes()
        self.wanted = self._wanted(self.store.list_series())
        mine = {_key(k) for k in self.wanted if rendezvous_owner(k, self.live) == self.node}
        kept = self._renew()
        self._let_go_lost()
        self._stop_unfenced()
        give = kept - mine
        if give:
            self._stop_series(give, wait=True)
            self._sync_storage()  # their last writes, with their tokens, before the release
            self.store.release(give, self.owner)
            self.fences.drop(give)
            self.log.info("leases_released", count=len(give), series=_names(give),
                          reason="placed on another live node (it joined, or the series was removed)")
        if self.runtime.clock() - self._joined_at < self.settings.poll and len(self.live) < 2:
            # just joined and alone so far: nodes started together see each other first, rather
            # than the first one taking every series and handing most of them over a poll later
            return self.settings.poll
        take = mine - self._held()
        if not take:
            return self.settings.poll
        got = self.store.acquire_many(take, self.owner, self.settings.lease)
        if got.tokens:
            for key, token in got.tokens.items():
                self.fences.set(key, token)
            self.log.info("leases_acquired", count=len(got.tokens), series=_names(got.tokens))
            self._start_series(got.tokens)
        if got.retry_in_s is not None:  # held by a node that is gone: take it as soon as it expires
            return min(self.settings.poll, got.retry_in_s + 0.05)
        return self.settings.poll

    def _beat(self) -> bool:
        """Heartbeat; False when another live daemon holds this node name."""
        ok = self.store.heartbeat(self.node, self.settings.rate_budget, self.settings.lease, self.incarnation)
        self._beat_at = self.runtime.clock()
        return ok

    def _renew(self) -> set[Key]:
        """Renew every lease held; those not renewed are gone (dropped from the fences now, so
        storage refuses their writes; their series are stopped by `_let_go_lost`)."""
        held = self._held()
        kept = {_key(k) for k in self.store.renew(held, self.owner, self.settings.lease)} if held else set()
        self._renewed_at = self.runtime.clock()
        lost = held - kept
        if lost:
            self.log.warning("leases_lost", count=len(lost), series=_names(lost),
                             reason="not renewed in time: another node may own them now")
            self.fences.drop_stale({k: t for k, t in self.fences.snapshot().items() if k in lost})
            self._lost |= lost
        return kept

    def _keepalive(self) -> None:
        """Heartbeat and renew when a poll has passed, in the middle of long work (starting or
        stopping a thousand series): the leases kept never wait for it."""
        if self._left or self.runtime.clock() - self._renewed_at < self.settings.poll:
            return
        try:
            if self._beat():
                self._renew()
        except StoreError as exc:
            self.log.warning("cluster_keepalive_failed", error=str(exc))
            self._renewed_at = self.runtime.clock()  # the round reports it; do not hammer

    def _let_go_lost(self) -> None:
        lost, self._lost = self._lost, set()
        lost -= self._held()  # taken again since
        if lost:
            self._stop_series(lost)

    def _ensure_open(self) -> None:
        if not self.store.is_open:
            self.store.open()
        elif not self.store.check():
            self.store.reopen()

    def _wanted(self, changes: Iterable[tuple[str, str, str, int, bool]]) -> list[SeriesKey]:
        """Configured series, plus those added and minus those removed at run time (by any node)."""
        wanted = list(self.configured)
        for exchange, symbol, timeframe, _, active in changes:
            key = SeriesKey(exchange, symbol, timeframe)
            if exchange not in self.supervisors:
                continue
            if active and key not in wanted:
                wanted.append(key)
            elif not active and key in wanted:
                wanted.remove(key)
        return wanted

    def _held(self) -> set[Key]:
        return set(self.fences.snapshot())

    def _superseded(self) -> None:
        """Another daemon runs under this node name: let everything go, touch no lease."""
        if self.state != "superseded":
            self.log.error("cluster_superseded", node=self.node, incarnation=self.incarnation,
                           reason="another daemon holds this node name (same [cluster] node, or this one stalled"
                                  " past its lease and was replaced): standing down")
        self.state = "superseded"
        self.detail = f"node name {self.node!r} is held by another live daemon"
        held = self._held()
        self.fences.drop(held)
        self._stop_series(held)
        self._stop_unfenced()
        self.live = {}

    def _unreachable(self, exc: StoreError) -> None:
        """The database cannot be reached: keep going (writes are fenced anyway), try again."""
        if self.state != "unreachable":
            self.log.error("cluster_unreachable", error=str(exc))
        self.state, self.detail = "unreachable", str(exc)
        try:
            self.store.close()
        except StoreError:
            pass

    def _on_lease_lost(self, msg: LeaseLost) -> None:
        """Storage says the database refused writes: stop those series now, unless the lease
        was taken again since (a new token)."""
        gone = {_key(k) for k in msg.keys} - self._held()
        if gone:
            self.log.warning("series_let_go", count=len(gone), series=_names(gone),
                             reason="their writes were refused: another node holds their leases")
            self._stop_series(gone)

    # -- starting and stopping series ----------------------------------------------------

    def _running_ids(self, exchange: str) -> set[str]:
        return {s.id for s in self.running.get(exchange, [])}

    def _running_keys(self) -> set[Key]:
        return {_spec_key(exchange, spec) for exchange, specs in self.running.items() for spec in list(specs)}

    def _stop_unfenced(self) -> None:
        """Series running here without a token (a write refused, a restart of this actor in
        between): stop them."""
        stray = self._running_keys() - self._held()
        if stray:
            self._stop_series(stray)

    def _start_series(self, keys: Iterable[Key]) -> None:
        """Start these series (their tokens already set); not waited for: the supervisor starts
        them one by one while this actor goes on renewing."""
        for key in sorted(keys):
            exchange = key[0]
            spec = self.spec_of(SeriesKey(*key))
            sup = self.supervisors.get(exchange)
            if spec is None or sup is None:
                continue
            specs = self.running.setdefault(exchange, [])
            if spec.id in self._running_ids(exchange):
                continue
            specs.append(spec)  # first: a series supervisor restarting now starts it from the list
            try:
                sup.proxy().start_child(spec)  # a ChildExists answer means a restart started it already
            except pykka.ActorDeadError:
                pass  # restarting: it starts every spec of the list

    def _stop_series(self, keys: Iterable[Key], *, wait: bool = False) -> None:
        """Stop these series and forget them in health; `wait`: until each has stopped (before
        its lease is released). Asks to one supervisor are served in order, so a stop never
        overtakes the start of the same series."""
        futures = []
        root = self.path.rpartition("/")[0]
        for key in sorted(keys):
            exchange, symbol, timeframe = key
            specs = self.running.get(exchange)
            if specs is None:
                continue
            sid = f"{symbol}@{timeframe}"
            for spec in [s for s in specs if s.id == sid]:
                specs.remove(spec)  # first: a restarting series supervisor must not start it again
            sup = self.supervisors.get(exchange)
            if sup is None:
                continue
            try:
                futures.append((f"{root}/{exchange}/series/{sid}", sup.proxy().delete_child(sid)))
            except pykka.ActorDeadError:
                pass  # restarting without it
        for path, future in futures:
            if wait:
                self._await(future)
            if self.health is not None:
                self.health.tell(ForgetSeries(path))  # it runs elsewhere now: not this node's to report

    def _await(self, future: Any) -> Any:
        """A supervisor's or storage's answer, renewing the leases while it takes long."""
        deadline = self.runtime.clock() + ASK_S
        while True:
            try:
                return future.get(timeout=min(0.5, self.settings.poll / 2))
            except pykka.Timeout:
                self._keepalive()
                if self.runtime.clock() > deadline:
                    return None
            except (NoSuchChild, ChildExists, pykka.ActorDeadError, StoreError):
                return None

    def _sync_storage(self) -> None:
        if self.storage is None:
            return
        try:
            self._await(self.storage.proxy().sync())
        except pykka.ActorDeadError:
            pass  # what it could not write is refused later, never stored under a stale token

    # -- reporting -----------------------------------------------------------------------

    def _report(self) -> None:
        if self.health is None:
            return
        self.health.tell(ClusterStatus(
            node=self.node, state=self.state, detail=self.detail, live_nodes=tuple(sorted(self.live)),
            owned=len(self.fences), wanted=len(self.wanted), refused_writes=self.fences.refused,
            lease_s=self.settings.lease,
        ))


def _key(k: Any) -> Key:
    if isinstance(k, tuple):
        e, s, t = k
        return (e, s, t)
    return (k.exchange, k.symbol, k.timeframe)


def _spec_key(exchange: str, spec: ChildSpec) -> Key:
    symbol, _, timeframe = spec.id.rpartition("@")
    return (exchange, symbol, timeframe)


def _names(keys: Iterable[Key], limit: int = 10) -> list[str]:
    return [f"{e}:{s}@{t}" for e, s, t in sorted(keys)[:limit]]
