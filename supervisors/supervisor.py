"""The `Supervisor` actor: OTP supervision on top of pykka.

Meanings follow Erlang/OTP's `supervisor`:

- strategies `one_for_one`, `one_for_all`, `rest_for_one`;
- restart types `permanent` (always restarted), `transient` (restarted only after an abnormal
  exit), `temporary` (never restarted; forgotten when it exits);
- children start in spec order and stop in reverse order, each given `shutdown` seconds;
- more than `max_restarts` restarts within `max_seconds` and the supervisor gives up: it stops
  its children and exits abnormally, which its own supervisor sees as a crash (escalation).

Departures from OTP, and why:

- Defaults are 10 restarts in 60 s, not OTP's 1 in 5 s, because restarts here are spread out by
  an Akka-style backoff (see `candlekeeper.supervisors.intensity.BackoffConfig`): a child that keeps dying
  on start is restarted at 0, 0.1, 0.2, 0.4 ... s, never spinning a CPU, and escalates after
  about a minute instead of within milliseconds.
- A child that fails in `on_start` while its supervisor starts is restarted like any crash,
  instead of failing the supervisor's own start: one bad series must not keep the daemon from
  starting. Intensity still bounds it.
- `restart_child` also restarts a running child (OTP's only restarts a terminated one), which is
  what an operator's "restart this actor" means; `delete_child` terminates first if needed.
- pykka threads cannot be killed: a child that does not stop within its shutdown timeout is
  abandoned (its daemon thread cannot keep the process alive) and reported in the log.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pykka

from .child import Address, Child, Exit, Link, Runtime
from .events import EventKind, LifecycleEvent
from .intensity import Backoff, BackoffConfig, RestartIntensity

Strategy = Literal["one_for_one", "one_for_all", "rest_for_one"]
RestartType = Literal["permanent", "transient", "temporary"]
STRATEGIES: tuple[str, ...] = ("one_for_one", "one_for_all", "rest_for_one")
RESTART_TYPES: tuple[str, ...] = ("permanent", "transient", "temporary")

DEFAULT_MAX_RESTARTS = 10
DEFAULT_MAX_SECONDS = 60.0
DEFAULT_BACKOFF = BackoffConfig()


@dataclass(frozen=True)
class ChildSpec:
    """How to build and look after one child.

    `actor` is a `Child` subclass started with `args`/`kwargs`; `address`, when given, is kept
    pointing at the live incarnation so other actors can reach it across restarts.
    """

    id: str
    actor: type[Child]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    restart: RestartType = "permanent"
    shutdown: float = 5.0
    kind: str = "worker"
    address: Address | None = None

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("a child needs a non-empty id")
        if self.restart not in RESTART_TYPES:
            raise ValueError(f"restart must be one of {RESTART_TYPES}, got {self.restart!r}")
        if self.shutdown <= 0:
            raise ValueError("shutdown must be > 0 seconds")


class SupervisorGaveUp(Exception):
    """Raised by a supervisor whose restart intensity was exceeded: its parent sees a crash."""


class ChildExists(ValueError):
    pass


class NoSuchChild(KeyError):
    def __str__(self) -> str:
        return f"no child {self.args[0]!r}"


@dataclass(eq=False)
class _Record:
    spec: ChildSpec
    backoff: Backoff
    state: str = "new"  # running | restarting | terminated | exited
    incarnation: int = 0
    restarts: int = 0
    ref: pykka.ActorRef[Any] | None = None
    actor: Child | None = None
    pending: int = 0  # token of the scheduled restart this record waits for


@dataclass(frozen=True)
class _RestartDue:
    ids: tuple[str, ...]
    token: int
    delay: float


class Supervisor(Child):
    """Starts, watches and restarts children; see the module docstring for the semantics."""

    def __init__(
        self,
        children: Sequence[ChildSpec] = (),
        *,
        strategy: Strategy = "one_for_one",
        max_restarts: int = DEFAULT_MAX_RESTARTS,
        max_seconds: float = DEFAULT_MAX_SECONDS,
        backoff: BackoffConfig = DEFAULT_BACKOFF,
        start_timeout: float = 5.0,
    ) -> None:
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.strategy: Strategy = strategy
        self.backoff_config = backoff
        self.start_timeout = start_timeout
        self._intensity = RestartIntensity(max_restarts, max_seconds, clock=self.runtime.clock)
        self._order: list[_Record] = []
        self._by_id: dict[str, _Record] = {}
        self._tokens = 0
        for spec in children:
            self._add(spec)

    # -- lifecycle -------------------------------------------------------------------------

    def on_start(self) -> None:
        try:
            for rec in list(self._order):
                self._start(rec, restarted=False)
        except BaseException:
            self._stop_all()
            raise

    def on_stop(self) -> None:
        self._stop_all()

    def on_failure(self, *_exc_info: Any) -> None:
        self._stop_all()

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Exit):
            return self._on_exit(message)
        if isinstance(message, _RestartDue):
            return self._on_restart_due(message)
        return super().on_receive(message)

    # -- public API (call through the proxy: ``sup.proxy().start_child(spec).get()``) -------

    def start_child(self, spec: ChildSpec) -> pykka.ActorRef[Any]:
        """Add and start a child at the end of the start order."""
        rec = self._add(spec)
        self._start(rec, restarted=False)
        assert rec.ref is not None or rec.state != "running"
        return rec.ref  # type: ignore[return-value]

    def terminate_child(self, child_id: str) -> None:
        """Stop a child and keep its spec (restart_child brings it back)."""
        rec = self._get(child_id)
        self._terminate(rec)
        rec.state = "terminated"
        self._publish("stopped", rec, reason="terminated")

    def restart_child(self, child_id: str) -> pykka.ActorRef[Any] | None:
        """Restart a child now, running or not; counted in its restarts, not in intensity."""
        rec = self._get(child_id)
        self._terminate(rec)
        rec.restarts += 1
        self._start(rec, restarted=True)
        return rec.ref

    def delete_child(self, child_id: str) -> None:
        """Stop a child if needed and forget its spec."""
        rec = self._get(child_id)
        if rec.state in ("running", "restarting"):
            self.terminate_child(child_id)
        self._remove(rec)

    def which_children(self) -> list[dict[str, Any]]:
        return [
            {
                "id": r.spec.id,
                "path": self._child_path(r.spec.id),
                "kind": r.spec.kind,
                "state": r.state,
                "restarts": r.restarts,
            }
            for r in self._order
        ]

    def child_ref(self, child_id: str) -> pykka.ActorRef[Any] | None:
        return self._get(child_id).ref

    def tree(self) -> dict[str, Any]:
        """This supervisor and, recursively, its subtree, with states and restart counts."""
        futures: list[tuple[dict[str, Any], pykka.Future[Any] | None]] = []
        for row in self.which_children():
            rec = self._by_id[row["id"]]
            fut = None
            if rec.state == "running" and rec.ref is not None and issubclass(rec.spec.actor, Supervisor):
                try:
                    fut = rec.ref.proxy().tree()
                except pykka.ActorDeadError:
                    fut = None
            futures.append((row, fut))
        children = []
        for row, fut in futures:
            if fut is not None:
                try:
                    sub = fut.get(timeout=self.start_timeout)
                    row = {**row, "strategy": sub["strategy"], "children": sub["children"]}
                except (pykka.ActorDeadError, pykka.Timeout):
                    pass  # it died or is busy while we asked: report the row we have
            children.append(row)
        return {"path": self.path, "strategy": self.strategy, "children": children}

    # -- internals -------------------------------------------------------------------------

    def _child_path(self, child_id: str) -> str:
        return f"{self.path}/{child_id}"

    def _add(self, spec: ChildSpec) -> _Record:
        if spec.id in self._by_id:
            raise ChildExists(f"child {spec.id!r} already exists")
        rec = _Record(spec=spec, backoff=Backoff(self.backoff_config, rng=self.runtime.rng))
        self._order.append(rec)
        self._by_id[spec.id] = rec
        return rec

    def _remove(self, rec: _Record) -> None:
        self._order.remove(rec)
        del self._by_id[rec.spec.id]

    def _get(self, child_id: str) -> _Record:
        try:
            return self._by_id[child_id]
        except KeyError:
            raise NoSuchChild(child_id) from None

    def _publish(self, kind: EventKind, rec: _Record, *, reason: str | None = None, delay: float = 0.0) -> None:
        self.runtime.events.publish(
            LifecycleEvent(
                kind=kind,
                path=self._child_path(rec.spec.id),
                child_id=rec.spec.id,
                supervisor=self.path,
                kind_of_actor=rec.spec.kind,
                reason=reason,
                restarts=rec.restarts,
                delay=delay,
            )
        )

    def _start(self, rec: _Record, *, restarted: bool, delay: float = 0.0) -> None:
        spec = rec.spec
        rec.incarnation += 1
        rec.pending = 0
        link = Link(
            child_id=spec.id,
            incarnation=rec.incarnation,
            path=self._child_path(spec.id),
            runtime=self.runtime,
            parent=self.actor_ref,
            leftovers=spec.address.leftovers if spec.address is not None and spec.address.keep else None,
        )
        rec.state = "running"
        try:
            ref, actor = spec.actor.start_linked(link, *spec.args, **spec.kwargs)
        except Exception as exc:  # noqa: BLE001 - the constructor failed: a crash at uptime 0
            self.log.error("child_init_failed", child=spec.id, error=repr(exc))
            # Told, not handled inline: if it makes us give up, that must crash this actor
            # even when we are answering an ask (start_child) rather than handling a tell.
            self.actor_ref.tell(Exit(spec.id, rec.incarnation, exc, 0.0))
            return
        rec.ref, rec.actor = ref, actor
        if spec.address is not None:
            spec.address.attach(ref)
        if not actor._ready.wait(self.start_timeout):
            self.log.warning("child_slow_to_start", child=spec.id, timeout=self.start_timeout)
        self._publish("restarted" if restarted else "started", rec, delay=delay)

    def _terminate(self, rec: _Record) -> None:
        """Stop one child synchronously (if running) and mark it not running."""
        ref, actor = rec.ref, rec.actor
        rec.state = "terminating"
        rec.ref = rec.actor = None
        rec.pending = 0
        if rec.spec.address is not None:
            rec.spec.address.detach()
        if ref is None or actor is None:
            return
        try:
            ref.stop(block=True, timeout=rec.spec.shutdown)
        except pykka.Timeout:
            self.log.error("child_shutdown_timeout", child=rec.spec.id, timeout=rec.spec.shutdown)
            return
        actor._await_exit(rec.spec.shutdown)

    def _stop_all(self) -> None:
        for rec in reversed(list(self._order)):
            if rec.state in ("running", "restarting"):
                self._terminate(rec)
                rec.state = "terminated"

    def _on_exit(self, exit_: Exit) -> None:
        rec = self._by_id.get(exit_.child_id)
        if rec is None or rec.incarnation != exit_.incarnation or rec.state != "running":
            return  # stale: an incarnation we stopped ourselves, or one already replaced
        rec.ref = rec.actor = None
        if rec.spec.address is not None:
            rec.spec.address.detach()
        if exit_.normal:
            self._publish("stopped", rec, reason="normal")
        else:
            self.log.warning("child_crashed", child=rec.spec.id, reason=exit_.reason, restarts=rec.restarts)
            self._publish("crashed", rec, reason=exit_.reason)
        restart = rec.spec.restart
        if restart == "temporary":
            self._remove(rec)
            return
        if restart == "transient" and exit_.normal:
            rec.state = "exited"
            return
        if not self._intensity.record():
            self._give_up(rec, exit_)
        delay = rec.backoff.next_delay(exit_.uptime)
        group = self._restart_group(rec)
        self._tokens += 1
        for member in group:
            member.pending = self._tokens
            member.state = "restarting"
        if delay <= 0:
            self._restart_group_now([m.spec.id for m in group], self._tokens, 0.0)
        else:
            self.log.info("child_restart_delayed", child=rec.spec.id, delay=round(delay, 3))
            self.schedule(delay, _RestartDue(tuple(m.spec.id for m in group), self._tokens, delay))

    def _restart_group(self, crashed: _Record) -> list[_Record]:
        """The children to restart for this strategy; siblings are stopped in reverse order."""
        if self.strategy == "one_for_one":
            return [crashed]
        idx = self._order.index(crashed)
        group = list(self._order) if self.strategy == "one_for_all" else self._order[idx:]
        for sibling in reversed(group):
            if sibling is crashed or sibling.state not in ("running", "restarting"):
                continue
            self._terminate(sibling)
            sibling.state = "terminated"
            self._publish("stopped", sibling, reason=f"sibling {crashed.spec.id} crashed ({self.strategy})")
        members = []
        for rec in group:
            if rec is crashed:
                members.append(rec)
            elif rec.spec.restart == "temporary":
                self._remove(rec)  # OTP: temporary siblings are not restarted
            elif rec.state == "terminated":
                members.append(rec)
        return members

    def _on_restart_due(self, due: _RestartDue) -> None:
        self._restart_group_now(list(due.ids), due.token, due.delay)

    def _restart_group_now(self, ids: list[str], token: int, delay: float) -> None:
        for child_id in ids:
            rec = self._by_id.get(child_id)
            if rec is None or rec.pending != token or rec.state != "restarting":
                continue  # terminated, deleted or restarted by hand in the meantime
            rec.restarts += 1
            self._start(rec, restarted=True, delay=delay)

    def _give_up(self, rec: _Record, exit_: Exit) -> None:
        reason = (
            f"{self.path}: restart intensity exceeded "
            f"(more than {self._intensity.max_restarts} restarts in {self._intensity.period:g}s); "
            f"last: {rec.spec.id} {exit_.reason}"
        )
        self.log.error("supervisor_gave_up", reason=reason)
        self._stop_all()
        self.runtime.events.publish(
            LifecycleEvent(kind="gave_up", path=self.path, child_id=self._link.child_id,
                           supervisor=self.path, kind_of_actor="supervisor", reason=reason)
        )
        parent = "the system (stopping)" if self._link.parent is None else "parent supervisor"
        self.runtime.events.publish(
            LifecycleEvent(kind="escalated", path=self.path, child_id=self._link.child_id,
                           supervisor=self.path, kind_of_actor="supervisor", reason=f"to {parent}: {reason}")
        )
        raise SupervisorGaveUp(reason)


def start_root(
    runtime: Runtime,
    children: Sequence[ChildSpec],
    *,
    on_exit: Any = None,
    on_ref: Callable[[pykka.ActorRef[Supervisor]], None] | None = None,
    name: str = "root",
    **options: Any,
) -> tuple[pykka.ActorRef[Supervisor], Supervisor]:
    """Start a root supervisor and wait until its children have started; `on_exit(Exit)` is called
    when it stops for any reason, `on_ref(ref)` as soon as it exists (before its children start,
    so a child that serves requests, a control server say, can already reach it)."""
    link = Link(child_id=name, incarnation=1, path=name, runtime=runtime, parent=None, on_exit=on_exit)
    ref, actor = Supervisor.start_linked(link, children, **options)
    if on_ref is not None:
        on_ref(ref)
    actor._ready.wait()
    return ref, actor  # type: ignore[return-value]
