"""`System`: one running candlekeeper, in the daemon or inside another app; the operator commands.

`System` starts the tree (`candlekeeper.app.tree`), answers questions about it and carries out
the operator's commands (reset, pause, add, restart...), which the control socket, the CLI and an
embedding app all call. It knows no socket: the operator surfaces that serve it (the control
server) are handed in as `Surface`s, each checked before start and started as a child of the root.

Nothing here is global: two `System`s run side by side in one process.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import pykka
import structlog

from ..actors.cluster import Rebalance
from ..actors.fencing import LeaseNotHeld
from ..actors.market.candles import Candle, timeframe_ms
from ..actors.market.symbols import check_symbol
from ..actors.messages import ForgetSeries, Pause
from ..actors.metrics import Metrics
from ..actors.stores.base import make_store
from ..actors.stores.errors import StoreCorrupt, StoreError, StoreGone
from ..actors.stores.lock import DatabaseLock
from ..supervisors.child import Crash, Exit, Runtime
from ..supervisors.events import EventBus
from ..supervisors.supervisor import ChildExists, ChildSpec, NoSuchChild, Supervisor, start_root
from . import config as config_mod
from . import data, settings
from .config import ClusterConfig, Config, ExchangeConfig, StorageConfig, parse_host_port, timeframe_refusal
from .errors import CommandError, SocketInUse, SocketUnusable, StartupError, StorageUnusable
from .tree import Blueprint, SeriesChange, series_id

__all__ = ["CommandError", "SocketInUse", "SocketUnusable", "StartupError", "StorageUnusable", "Surface", "System",
           "as_config"]

ASK_TIMEOUT = 10.0

log = structlog.get_logger("candlekeeper")


class Surface(Protocol):
    """An operator surface the system serves (the control server): checked before the tree starts,
    then started as a child of the root."""

    def preflight(self) -> None:
        """Raise `SocketInUse` when what it listens on is taken, `SocketUnusable` when it cannot
        be created (both `StartupError`s)."""

    def spec(self, system: System) -> ChildSpec:
        """Its child spec, serving `system`."""


class System:
    """A running candlekeeper: start it, ask it, steer it, stop it."""

    def __init__(
        self,
        config: Config,
        *,
        runtime: Runtime | None = None,
        surfaces: Sequence[Surface] = (),
        on_shutdown: Callable[[], None] | None = None,
        subscribers: Iterable[Any] = (),
    ) -> None:
        self.config = config
        self.runtime = runtime or Runtime(allow_crash_injection=config.control.chaos)
        self.candles = EventBus()  # newly stored candles, for `subscribe`
        for subscriber in subscribers:  # before start, so they miss nothing of the backfill
            self.candles.subscribe(subscriber)
        self.metrics = Metrics(health=self.health, wall=self.runtime.wall)
        self.blueprint = Blueprint(config, self.runtime, metrics=self.metrics, candles=self.candles)
        self.storage = self.blueprint.storage
        self.health_address = self.blueprint.health
        self.surfaces = tuple(surfaces)
        self._on_shutdown = on_shutdown
        self._lock = threading.Lock()
        self.exited = threading.Event()
        self.exit: Exit | None = None
        self._root: pykka.ActorRef[Supervisor] | None = None
        # one daemon per SQLite file (a PostgreSQL database is shared: [cluster] divides its series)
        self.db_lock = None if config.storage.url else DatabaseLock(
            config.storage.path,  # names this daemon to a second one
            control_socket=os.path.abspath(config.control.socket) if self.surfaces else None)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> System:
        """Start the tree. Raises `SocketInUse` when another daemon holds the control socket (or a
        TCP or metrics port is taken), `CredentialsMissing` when an exchange's token variable is
        unset or empty, `StorageUnusable` when another daemon uses the database or
        it cannot be opened at all (see `stored_series_changes`)."""
        try:  # before anything is opened or written; held until `stop`
            if self.db_lock is not None:
                self.db_lock.acquire()
        except StoreError as exc:
            raise StorageUnusable(f"[storage] path: {exc}") from None
        try:
            for surface in self.surfaces:
                surface.preflight()
            if self.config.metrics.listen:
                check_port_free(self.config.metrics.listen)
            settings.check_credentials(self.config)
            self.blueprint.plan(stored_series_changes(self.config.storage, self.config.cluster))
            if self.blueprint.clustered:
                check_node_free(self.config)
        except BaseException:
            if self.db_lock is not None:
                self.db_lock.release()
            raise
        self.runtime.start()
        self.runtime.events.subscribe(self._forward_event)
        self.runtime.events.subscribe(self.metrics.on_event)
        specs = self.blueprint.root_specs([surface.spec(self) for surface in self.surfaces])
        self._root, _ = start_root(self.runtime, specs, on_exit=self._on_root_exit, on_ref=self._set_root,
                                   start_timeout=120.0)
        return self

    def _set_root(self, ref: pykka.ActorRef[Supervisor]) -> None:
        self._root = ref

    def _forward_event(self, event: Any) -> None:
        self.blueprint.status.tell(event)

    def _on_root_exit(self, exit_: Exit) -> None:
        self.exit = exit_
        self.exited.set()

    def stop(self, timeout: float = 300.0) -> None:
        """Stop every actor in reverse start order (storage flushes last), then the timer thread.
        Clustering: first this node leaves (its series stop, its leases are released at once)."""
        if self._root is not None:
            self._leave_cluster()
            self._root.stop(block=True, timeout=timeout)
            self.exited.wait(timeout)
        self.runtime.events.unsubscribe(self._forward_event)
        self.runtime.events.unsubscribe(self.metrics.on_event)
        self.runtime.stop()
        if self.db_lock is not None:
            self.db_lock.release()  # last: the store is closed by now

    def _leave_cluster(self) -> None:
        if not self.blueprint.clustered:
            return
        try:
            self.blueprint.cluster.proxy().leave().get(timeout=120.0)
        except (pykka.ActorDeadError, pykka.Timeout):
            pass  # its leases expire by themselves within one lease time

    def wait(self, timeout: float | None = None) -> Exit | None:
        self.exited.wait(timeout)
        return self.exit

    def __enter__(self) -> System:
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop()

    # -- asking --------------------------------------------------------------------------

    def health(self, *, counts: bool = False) -> dict[str, Any]:
        """The health report; `counts=True` adds each series' stored candle count (`candles`),
        read from the store on the caller's thread (a read-only connection, not the writer)."""
        try:
            report: dict[str, Any] = self.health_address.proxy().health().get(timeout=ASK_TIMEOUT)
        except pykka.ActorDeadError:
            return {"status": "down", "exchanges": [], "series": [], "error": "health actor restarting"}
        if counts:
            try:
                with data.open_store(self.config.storage.location) as store:
                    for s in report.get("series", []):
                        s["candles"] = store.count(s["exchange"], s["symbol"], s["timeframe"])
            except (StorageUnusable, StoreError) as exc:
                report.setdefault("errors", []).append(f"candle counts unavailable: {exc}")
        return report

    def progress(self) -> dict[str, Any]:
        """Backfill progress by exchange and by series (see `candlekeeper.actors.progress`)."""
        try:
            return self.health_address.proxy().progress().get(timeout=ASK_TIMEOUT)
        except pykka.ActorDeadError:
            return {"exchanges": {}, "series": []}

    def tree(self) -> dict[str, Any]:
        """The supervision tree; clustering: with this `node`, and each series' owner and token."""
        if self._root is None:
            raise CommandError("not started")
        tree: dict[str, Any] = self._root.proxy().tree().get(timeout=ASK_TIMEOUT)
        fences = self.blueprint.fences
        if fences is not None:
            tree["node"] = self.config.cluster.node
            for ex in tree.get("children", []):
                if ex["id"] not in self.blueprint.exchanges:
                    continue
                for sup in ex.get("children", []):
                    if sup["id"] != "series":
                        continue
                    for row in sup.get("children", []):
                        symbol, _, timeframe = row["id"].rpartition("@")
                        row["owner"] = self.config.cluster.node
                        row["token"] = fences.get((ex["id"], symbol, timeframe))
        return tree

    def cluster(self) -> dict[str, Any]:
        """Clustering: every node (rate budget, last heartbeat, live) and every lease (series,
        owner, fencing token, expires in), read from the database; and this node's view."""
        cs = self.blueprint.cluster_settings
        if cs is None:
            raise CommandError("clustering is off: set [cluster] enabled = true (with [storage] url)")
        try:
            here = self.blueprint.cluster.proxy().status().get(timeout=ASK_TIMEOUT)
        except (pykka.ActorDeadError, pykka.Timeout):
            here = {"node": cs.node, "state": "restarting"}
        from ..actors.stores.postgres import PostgresStore  # deferred: psycopg, for clusters only

        try:
            with PostgresStore(cs.url, readonly=True) as store:
                nodes, leases = store.nodes(), store.leases()
        except StoreError as exc:
            raise CommandError(f"cannot read the cluster's state: {exc}") from None
        owned: dict[str, int] = {}
        out_leases = []
        for lease in leases:
            node, _, incarnation = (lease.owner or "").partition("#")
            if lease.live:
                owned[node] = owned.get(node, 0) + 1
            out_leases.append({
                "series": f"{lease.exchange}:{lease.symbol}@{lease.timeframe}", "exchange": lease.exchange,
                "symbol": lease.symbol, "timeframe": lease.timeframe, "owner": node or None,
                "incarnation": incarnation or None, "token": lease.token,
                "expires_in_s": round(lease.remaining_s, 3), "live": lease.live,
            })
        out_nodes = [{
            "node": n.node, "rate_budget": n.rate_budget, "incarnation": n.incarnation,
            "last_heartbeat_s": round(n.heartbeat_age_s, 3), "expires_in_s": round(n.expires_in_s, 3),
            "live": n.live, "owned": owned.get(n.node, 0), "started_at": n.started_at.isoformat(),
        } for n in nodes]
        return {**here, "lease_s": cs.lease, "nodes": out_nodes, "leases": out_leases}

    def _sup(self, *path: str) -> Any:
        """The proxy of a supervisor by child ids from the root, e.g. ("binance", "series")."""
        ref: pykka.ActorRef[Any] | None = self._root
        for part in path:
            try:
                ref = ref.proxy().child_ref(part).get(timeout=ASK_TIMEOUT) if ref is not None else None
            except KeyError:
                raise CommandError(f"no such actor: {'/'.join(path)}") from None
            if ref is None:
                raise CommandError(f"{'/'.join(path)} is not running")
        assert ref is not None
        return ref.proxy()

    def metrics_address(self) -> tuple[str, int] | None:
        """Where the Prometheus endpoint listens (the real port when configured with port 0)."""
        if not self.config.metrics.listen:
            return None
        return self._sup().child_ref("metrics").get(timeout=ASK_TIMEOUT).proxy().address().get(timeout=ASK_TIMEOUT)

    def _exchange_config(self, exchange: str) -> ExchangeConfig:
        ex = self.blueprint.exchange_config(exchange)
        if ex is None:
            raise CommandError(f"unknown exchange {exchange!r}")
        return ex

    def _series_targets(self, exchange: str, symbol: str | None, timeframe: str | None) -> list[Any]:
        ex = self._exchange_config(exchange)
        series = self._sup(ex.name, "series")
        rows = series.which_children().get(timeout=ASK_TIMEOUT)
        out = []
        for row in rows:
            sym, _, tf = row["id"].rpartition("@")
            wanted = (symbol is None or sym == symbol) and (timeframe is None or tf == timeframe)
            if wanted and row["state"] == "running":
                    ref = series.child_ref(row["id"]).get(timeout=ASK_TIMEOUT)
                    if ref is not None:
                        out.append(ref)
        if symbol is not None and not out:
            name = f"{exchange}:{symbol}" + (f"@{timeframe}" if timeframe else "")
            if any(r["id"].rpartition("@")[0] == symbol and (timeframe is None or r["id"].endswith("@" + timeframe))
                   for r in rows):
                raise CommandError(f"series {name} is not running right now (restarting); try again")
            raise CommandError(f"no series {name}")
        return out

    def reset(self, exchange: str, symbol: str | None = None, timeframe: str | None = None) -> dict[str, Any]:
        """Reset the breaker of an exchange (and every series' retry state and quarantine), or one series'."""
        targets = self._series_targets(exchange, symbol, timeframe)
        _audit("reset", target=_name(exchange, symbol, timeframe), series=len(targets))
        # Asked, not told: when the reply comes, the new states have been reported to health, so
        # a `health` right after a `reset` already shows them.
        futures = [ref.proxy().reset() for ref in targets]
        if symbol is None:
            try:
                futures.append(self.blueprint.exchanges[exchange].proxy().reset())
            except pykka.ActorDeadError:
                raise CommandError(f"{exchange} exchange actor is restarting; try again") from None
        for future in futures:
            try:
                future.get(timeout=ASK_TIMEOUT)
            except pykka.ActorDeadError:
                pass  # that series crashed meanwhile; its replacement starts with a clean state
        result: dict[str, Any] = {"exchange": exchange, "series_reset": len(targets)}
        if symbol is not None:
            result["symbol"] = symbol
        if timeframe is not None:
            result["timeframe"] = timeframe
        return result

    def pause(
        self, exchange: str, symbol: str | None = None, timeframe: str | None = None, *, paused: bool = True
    ) -> dict[str, Any]:
        targets = self._series_targets(exchange, symbol, timeframe)
        for ref in targets:
            ref.tell(Pause(paused))
        _audit("pause" if paused else "resume", target=_name(exchange, symbol, timeframe), series=len(targets))
        result: dict[str, Any] = {"exchange": exchange, "series": len(targets), "paused": paused}
        if symbol is not None:
            result["symbol"] = symbol
        if timeframe is not None:
            result["timeframe"] = timeframe
        return result

    def latest(self, exchange: str, symbol: str, timeframe: str = "1m", n: int = 1) -> dict[str, Any]:
        """The newest stored candles and how stale the series is: answered from the store, so it
        works while the exchange is down (read-only mode)."""
        ex = self._exchange_config(exchange)
        if not isinstance(n, int) or not 1 <= n <= 1000:
            raise CommandError("n must be an integer from 1 to 1000")
        tf_ms = _timeframe(timeframe)
        rows = self._from_storage(self.storage.proxy().latest(exchange, symbol, timeframe, n))
        configured = self.blueprint.series_specs.get(ex.name, [])
        if not rows and not any(s.id == series_id(symbol, timeframe) for s in configured):
            raise CommandError(f"no series {exchange}:{symbol}@{timeframe}")
        now = self.runtime.wall()
        last = rows[0][0] if rows else None
        breaker = self.blueprint.breakers[ex.name].state
        return {
            "exchange": exchange,
            "symbol": symbol,
            "timeframe": timeframe,
            "candles": [dict(zip(("ts", "open", "high", "low", "close", "volume"), r, strict=True)) for r in rows],
            "last_ts": last,
            "stale_seconds": None if last is None else max(0.0, round(now - (last + tf_ms) / 1000, 3)),
            "exchange_breaker": breaker,
            "read_only": breaker == "open",
        }

    def add_series(self, exchange: str, symbol: str, timeframe: str = "1m") -> dict[str, Any]:
        """Start a series at run time and persist it, so a restart keeps it. Clustering: it is
        persisted in the shared database and the node it is placed on starts it (every node
        reads the changes at its next round)."""
        ex = self._exchange_config(exchange)
        _timeframe(timeframe)
        refusal = timeframe_refusal(ex.source, ex.exchange, timeframe)
        if refusal is not None:
            raise CommandError(refusal)
        try:
            check_symbol(symbol)
        except ValueError as exc:
            raise CommandError(f"bad symbol: {exc}") from None
        sid = series_id(symbol, timeframe)
        _audit("add", target=f"{exchange}:{sid}")
        with self._lock:
            specs = self.blueprint.series_specs[ex.name]
            if any(s.id == sid for s in specs):
                raise CommandError(f"{exchange}:{sid} is already running")
            listed = self._listed(ex.name, symbol)
            if listed is False:
                raise CommandError(f"{exchange} does not list {symbol}")
            self._from_storage(self.storage.proxy().set_series_active(exchange, symbol, timeframe, True))
            spec = self.blueprint.series_spec(ex, symbol, timeframe)
            specs.append(spec)
        if self.blueprint.clustered:
            self.blueprint.cluster.tell(Rebalance())
            return {"exchange": exchange, "symbol": symbol, "timeframe": timeframe, "added": True}
        try:
            self._sup(ex.name, "series").start_child(spec).get(timeout=ASK_TIMEOUT)
        except (ChildExists, CommandError):
            pass  # its supervisor restarted meanwhile and started it from the list
        return {"exchange": exchange, "symbol": symbol, "timeframe": timeframe, "added": True}

    def remove_series(self, exchange: str, symbol: str, timeframe: str = "1m") -> dict[str, Any]:
        """Stop a series and persist its removal; its stored candles stay."""
        ex = self._exchange_config(exchange)
        sid = series_id(symbol, timeframe)
        _audit("remove", target=f"{exchange}:{sid}")
        with self._lock:
            specs = self.blueprint.series_specs[ex.name]
            spec = next((s for s in specs if s.id == sid), None)
            if spec is None:
                raise CommandError(f"no series {exchange}:{sid}")
            self._from_storage(self.storage.proxy().set_series_active(exchange, symbol, timeframe, False))
            specs.remove(spec)
        if self.blueprint.clustered:
            self.blueprint.cluster.tell(Rebalance())
            return {"exchange": exchange, "symbol": symbol, "timeframe": timeframe, "removed": True}
        try:
            self._sup(ex.name, "series").delete_child(sid).get(timeout=ASK_TIMEOUT)
        except (NoSuchChild, CommandError):
            pass  # not running right now; it will not be started again
        path = f"root/{ex.name}/series/{sid}"
        self.health_address.tell(ForgetSeries(path))
        return {"exchange": exchange, "symbol": symbol, "timeframe": timeframe, "removed": True}

    def accept_gap(self, exchange: str, symbol: str, start: Any, end: Any, timeframe: str = "1m", *,
                   reason: str = "operator") -> dict[str, Any]:
        """Accept the candles opening in [start, end) of a series as lost: a confirmed gap (reason
        `operator_accepted`), never fetched again, and the series moves past it, out of its
        retries or quarantine (for a stretch the exchange keeps serving with candles that fail
        validation). `start`/`end`: epoch ms, a datetime or an ISO 8601 string (naive = UTC), as
        for `read_candles`; `end` no later than now (the candle still open is never included).
        `reason` goes to the log line."""
        ex = self._exchange_config(exchange)
        tf_ms = _timeframe(timeframe)
        if not isinstance(reason, str) or not reason.strip() or len(reason) > 200:
            raise CommandError("reason must be a non-empty string of at most 200 characters")
        sid = series_id(symbol, timeframe)
        if not any(s.id == sid for s in self.blueprint.series_specs.get(ex.name, [])):
            raise CommandError(f"no series {exchange}:{sid}")
        now = int(self.runtime.wall() * 1000)
        try:
            lo, hi = data.parse_time(start, now_ms=now), data.parse_time(end, now_ms=now)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if hi > now:
            raise CommandError(f"the gap must end by now ({data.iso(now)}), not at {data.iso(hi)}")
        # the candles opening in [start, end), the one still open left out
        lo, hi = -(-lo // tf_ms) * tf_ms, min(-(-hi // tf_ms) * tf_ms, now // tf_ms * tf_ms)
        if lo >= hi:
            raise CommandError(f"no {timeframe} candle opens in [{data.iso(lo)}, {data.iso(hi)}): "
                               "the start must come before the end")
        candles = (hi - lo) // tf_ms
        _audit("accept_gap", target=f"{exchange}:{sid}", gap_from=data.iso(lo), gap_to=data.iso(hi), candles=candles,
               reason=reason)
        self._from_storage(self.storage.proxy().accept_gap(exchange, symbol, timeframe, lo, hi))
        status = None
        try:
            targets = self._series_targets(exchange, symbol, timeframe)
        except CommandError:
            targets = []  # restarting: it resumes past the gap from the store
        for ref in targets:
            try:
                status = ref.proxy().accept_gap(lo, hi).get(timeout=ASK_TIMEOUT).get("status")
            except pykka.ActorDeadError:
                pass
        return {"exchange": exchange, "symbol": symbol, "timeframe": timeframe, "from": lo, "to": hi,
                "from_iso": data.iso(lo), "to_iso": data.iso(hi), "candles": candles, "gap": "operator_accepted",
                "reason": reason, "series_status": status}

    def _locate(self, target: Any, verb: str) -> tuple[pykka.ActorRef[Any], dict[str, Any]]:
        """The supervisor of the actor at `target` (its path below the root) and its child row."""
        if not isinstance(target, str) or not target.strip("/"):
            raise CommandError(f"{verb} needs a target path, e.g. binance/series/BTC/USDT@1m")
        if target.strip("/") == "root":
            raise CommandError(f"cannot {verb} the root supervisor: it is the daemon itself "
                               "(stop it with `shutdown` and start it again)")
        remaining = target.strip("/").removeprefix("root/")
        parent = self._root
        if parent is None:
            raise CommandError("not started")
        while True:
            rows = parent.proxy().which_children().get(timeout=ASK_TIMEOUT)
            matches = sorted((r for r in rows if remaining == r["id"] or remaining.startswith(r["id"] + "/")),
                             key=lambda r: len(r["id"]), reverse=True)
            if not matches:
                raise CommandError(f"no actor at {target!r} (paths as `ctl tree` shows them, below root: "
                                   "e.g. storage, binance, binance/exchange, binance/series/BTC/USDT@1m)")
            row = matches[0]
            remaining = remaining[len(row["id"]) + 1 :]
            if not remaining:
                return parent, row
            ref = parent.proxy().child_ref(row["id"]).get(timeout=ASK_TIMEOUT)
            if ref is None or row["kind"] != "supervisor":
                raise CommandError(f"no actor at {target!r}")
            parent = ref

    def restart(self, target: str) -> dict[str, Any]:
        """Restart an actor through its supervisor; `target` is its path below the root, e.g.
        ``binance/exchange``, ``binance/series/BTC/USDT@1m``, ``storage``, or ``binance``."""
        parent, row = self._locate(target, "restart")
        _audit("restart", target=row["path"])
        parent.proxy().restart_child(row["id"]).get(timeout=ASK_TIMEOUT)
        return {"restarted": row["path"]}

    def crash(self, target: str, reason: str = "injected crash") -> dict[str, Any]:
        """Make the actor at `target` raise, as a bug would (chaos tests; needs ``[control] chaos``)."""
        if not self.runtime.allow_crash_injection:
            raise CommandError("crash injection is off; set [control] chaos = true (tests and soaks only)")
        parent, row = self._locate(target, "crash")
        ref = parent.proxy().child_ref(row["id"]).get(timeout=ASK_TIMEOUT)
        if ref is None:
            raise CommandError(f"{row['path']} is not running")
        _audit("crash", target=row["path"], reason=reason)
        ref.tell(Crash(reason))
        return {"crashed": row["path"]}

    def shutdown(self) -> dict[str, Any]:
        """Stop the whole system (after this reply is sent)."""
        _audit("shutdown")
        if self._on_shutdown is not None:
            self._on_shutdown()
        else:
            threading.Thread(target=self.stop, name="candlekeeper-shutdown", daemon=True).start()
        return {"stopping": True}

    # -- data out ------------------------------------------------------------------------

    def read_candles(self, exchange: str, symbol: str, timeframe: str = "1m", since: Any = None, until: Any = None,
                     *, batch: int = 50_000) -> Iterator[Candle]:
        """Stored candles with open time in [since, until), oldest first, as (ts, open, high, low,
        close, volume) tuples. A generator over a read-only connection of its own, reading
        `batch` rows at a time: any range in constant memory, and the writer is never blocked.
        `since`/`until`: epoch ms, a datetime, an ISO 8601 string (naive = UTC), or a duration
        ago such as "30d"; None for no bound."""
        start, end = self._range(timeframe, since, until)  # refused here, not at the first row
        store = data.open_store(self.config.storage.location)

        def rows() -> Iterator[Candle]:
            with store:
                yield from data.iter_rows(store, exchange, symbol, timeframe, start, end, batch=batch)

        return rows()

    def read_table(self, exchange: str, symbol: str, timeframe: str = "1m", since: Any = None,
                   until: Any = None) -> Any:
        """The same range as a `pyarrow.Table`: `time` timestamp[ms, UTC], `open`..`volume` float64
        (needs the `parquet` extra; `MissingDependency` otherwise)."""
        start, end = self._range(timeframe, since, until)
        data.require_pyarrow()
        with data.open_store(self.config.storage.location) as store:
            return data.arrow_table(store, exchange, symbol, timeframe, start, end)

    def coverage(self, exchange: str | None = None, symbol: str | None = None,
                 timeframe: str | None = None) -> list[dict[str, Any]]:
        """Per series: first and last stored candle, the count, the missing stretches and the
        confirmed exchange gaps with their reasons (see `candlekeeper.app.data.series_coverage`)."""
        if timeframe is not None:
            _timeframe(timeframe)
        target = data.Target(exchange, symbol, timeframe)
        try:
            return data.coverage_report(self.config.storage.location, target, config=self.config,
                                        now_ms=int(self.runtime.wall() * 1000))
        except StorageUnusable as exc:
            raise CommandError(str(exc)) from None

    def _range(self, timeframe: str, since: Any, until: Any) -> tuple[int | None, int | None]:
        _timeframe(timeframe)
        now = int(self.runtime.wall() * 1000)
        try:
            start = None if since is None else data.parse_time(since, now_ms=now)
            end = None if until is None else data.parse_time(until, now_ms=now)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        return start, end

    def subscribe(self, subscriber: Any) -> None:
        """Receive each newly stored candle (`candlekeeper.StoredCandle`): a callable (called on
        the storage actor's thread, so keep it quick) or a pykka ActorRef (told)."""
        self.candles.subscribe(subscriber)

    def unsubscribe(self, subscriber: Any) -> None:
        self.candles.unsubscribe(subscriber)

    def _from_storage(self, future: Any) -> Any:
        """The storage actor's answer; a store that cannot answer now is a refusal that says why."""
        try:
            return future.get(timeout=ASK_TIMEOUT)
        except LeaseNotHeld as exc:  # clustering: another node owns the series
            raise CommandError(str(exc)) from None
        except StoreError as exc:
            raise CommandError(f"storage unavailable: {exc}") from None

    def _listed(self, exchange: str, symbol: str) -> bool | None:
        """Whether the exchange lists `symbol`, by a fresh market list when the one it has does
        not (a new listing is accepted at once); None when its markets cannot be loaded now."""
        try:
            answer = self.blueprint.exchanges[exchange].proxy().listing(symbol).get(timeout=ASK_TIMEOUT)
            listed: bool | None = answer.result(timeout=ASK_TIMEOUT)
        except (pykka.ActorDeadError, pykka.Timeout, concurrent.futures.TimeoutError):
            return None
        return listed


def check_port_free(listen: str) -> None:
    """Fail fast when the metrics port is taken: restarting the endpoint would not free it."""
    host, port = parse_host_port(listen)
    try:
        socket.create_server((host, port)).close()
    except OSError as exc:
        raise SocketInUse(f"[metrics] cannot listen on {listen}: {exc.strerror or exc}") from None


def stored_series_changes(storage: StorageConfig | str, cluster: ClusterConfig | None = None) -> list[SeriesChange]:
    """The series added and removed at run time, from the database; opening it is also the
    start-up check that fails fast (`StorageUnusable`) when it cannot be opened or created, or is
    not a SQLite database at all: at start that is the user's file, which is never moved aside
    (the storage actor does that only to a database that goes bad while running). A PostgreSQL
    database that cannot be reached, or refuses the URL's user, is refused the same way, and so
    is one whose lock another daemon holds (no `[cluster]`: `stores.postgres_lock`)."""
    if isinstance(storage, str):
        storage = StorageConfig(path=storage)
    key = "[storage] url" if storage.url else "[storage] path"
    try:
        with make_store(storage.location, **settings.store_options(storage, cluster)) as store:
            return store.list_series()
    except StoreCorrupt as exc:
        raise StorageUnusable(f"{key}: {storage.display} is not a usable SQLite database ({exc.__cause__ or exc});"
                              " move it away or point [storage] path elsewhere") from None
    except StoreGone as exc:  # replaced meanwhile: the storage actor recovers it
        log.warning("series_changes_unreadable", error=str(exc))
        return []
    except StoreError as exc:
        raise StorageUnusable(f"{key}: {exc}") from None


def check_node_free(config: Config) -> None:
    """Refuse to start (`StartupError`) when another live daemon heartbeats under this node
    name. A heartbeat left by a previous run of this daemon (killed, or stalled) is not
    renewed: the cluster actor joins once it expires. Waits at most one renewal interval
    (lease / 3), and only while such a heartbeat has not expired."""
    cs = settings.cluster_settings(config)
    if cs is None:
        return
    from ..actors.stores.postgres import PostgresStore  # deferred: psycopg, for clusters only

    try:
        with PostgresStore(cs.url, **dict(cs.store_options)) as store:
            first = next((n for n in store.nodes() if n.node == cs.node), None)
            if first is None or not first.live:
                return
            deadline = time.monotonic() + min(cs.poll + 1.0, first.expires_in_s)
            while time.monotonic() < deadline:
                time.sleep(0.2)
                now = next((n for n in store.nodes() if n.node == cs.node), None)
                if now is None or not now.live:
                    return
                if now.heartbeat_at != first.heartbeat_at:
                    raise StartupError(
                        f"[cluster] node {cs.node!r} is in use by another live daemon (it heartbeated"
                        f" {now.heartbeat_age_s:.1f} s ago); give each daemon its own node name")
    except StoreError as exc:
        raise StorageUnusable(f"[storage] url: {exc}") from None


def _name(exchange: str, symbol: str | None, timeframe: str | None) -> str:
    return exchange + (f":{symbol}" if symbol else "") + (f"@{timeframe}" if timeframe else "")


def _audit(command: str, **args: Any) -> None:
    """Every operator command that changes something is one log line, whoever sent it (the
    control socket, the CLI, an embedding app)."""
    log.info("operator_command", command=command, **args)


def _timeframe(timeframe: Any) -> int:
    try:
        return timeframe_ms(timeframe)
    except (ValueError, TypeError, KeyError):
        raise CommandError(f"unknown timeframe {timeframe!r}") from None


def as_config(config: Config | Mapping[str, Any] | str | os.PathLike[str] | None) -> Config:
    """A `Config` from a `Config`, a dict with the TOML's keys, a path to a TOML file, or None (the
    built-in defaults); `ConfigError` when it is unusable."""
    if config is None:
        return config_mod.default()
    if isinstance(config, Config):
        return config
    if isinstance(config, Mapping):
        return config_mod.from_dict(config)
    return config_mod.load(config)
