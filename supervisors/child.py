"""`Child`: a pykka actor that tells its supervisor how it died.

pykka has no links or monitors, so supervised actors subclass `Child`, which reports its exit
to its parent for every way a pykka actor can die:

- an exception while handling a `tell` (pykka calls `on_failure` and stops the actor),
- an exception in `on_start` (pykka stops the actor without calling `on_failure`),
- an exception in `on_stop`,
- a stop from outside (`ref.stop()`), reported as a normal exit.

An exception raised while answering an `ask` goes back to the asker and the actor keeps
running (pykka's behaviour, kept on purpose): an ask is a question whose failure the asker
handles, like an error reply from a gen_server call, so it is not a crash and does not count
toward restart intensity. Handlers must therefore validate before they mutate state.

The message path is pykka's, with one change: a `Child`'s inbox is a `queue.SimpleQueue` (C,
no Python-level lock) instead of pykka's `queue.Queue`, whose `put` and `get` take one mutex in
Python code. At 10,000 series, thousands of series threads telling the storage actor at once
queued on that mutex; a holder preempted by the GIL stalled every other, and the storage actor,
the one consumer, lost the race for it for up to 24 s while its inbox filled.

A `Child` with `pooled = True` has no thread of its own: its inbox is a `PooledInbox` and the
runtime's `Dispatcher` runs it in slices (`candlekeeper.supervisors.dispatcher` says why and
what such an actor must never do). Everything above holds for it the same way.
"""

from __future__ import annotations

import collections
import logging
import queue
import random
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, Self

import pykka
import structlog

from .clock import Clock, WallClock, monotonic
from .clock import wall as wall_clock
from .dispatcher import THROUGHPUT, Dispatcher, PooledInbox
from .events import EventBus
from .scheduler import Scheduler, Timer


@dataclass
class Runtime:
    """The services one actor system shares: its timer thread, its event bus, its clocks
    (`clock` monotonic, for delays; `wall` epoch seconds, for candle times; see
    `candlekeeper.supervisors.clock`).

    One per system, passed down the tree, never global: two systems can live in one process.
    """

    scheduler: Scheduler = field(default_factory=Scheduler)
    dispatcher: Dispatcher = field(default_factory=Dispatcher)  # runs the `pooled` actors
    events: EventBus = field(default_factory=EventBus)
    clock: Clock = monotonic
    wall: WallClock = wall_clock
    rng: random.Random = field(default_factory=random.Random)
    allow_crash_injection: bool = False  # tests and chaos soaks only: honour `Crash` messages

    def __post_init__(self) -> None:
        # timers for a wall instant (a close) follow the runtime's wall clock, moves included
        self.scheduler.wall = self.wall
        watch = getattr(self.wall, "watch", None)
        if watch is not None:
            watch(self.scheduler.wake)

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()
        self.dispatcher.stop()


@dataclass(frozen=True)
class Exit:
    """How an actor incarnation ended: `error` is None for a normal stop."""

    child_id: str
    incarnation: int
    error: BaseException | None
    uptime: float

    @property
    def normal(self) -> bool:
        return self.error is None

    @property
    def reason(self) -> str:
        if self.error is None:
            return "normal"
        text = str(self.error).splitlines()[0] if str(self.error) else ""
        return f"{type(self.error).__name__}: {text}" if text else type(self.error).__name__


@dataclass(frozen=True)
class Crash:
    """Told to any `Child` whose runtime allows crash injection: it raises while handling it,
    exactly like a bug would. Ignored (logged) otherwise."""

    reason: str = "injected crash"


class InjectedCrash(RuntimeError):
    pass


@dataclass(frozen=True)
class Link:
    """Where a child reports its exit: its parent supervisor, or a callback at the root."""

    child_id: str
    incarnation: int
    path: str
    runtime: Runtime
    parent: pykka.ActorRef[Any] | None = None
    on_exit: Callable[[Exit], None] | None = None
    #: where the tells this incarnation leaves unread go (its `Address`, when that keeps them)
    leftovers: Callable[[list[Any]], None] | None = None

    def notify(self, exit_: Exit) -> None:
        if self.parent is not None:
            try:
                self.parent.tell(exit_)
            except pykka.ActorDeadError:
                pass  # parent already gone: it is stopping the whole subtree anyway
        if self.on_exit is not None:
            self.on_exit(exit_)


class Child(pykka.ThreadingActor):
    """Base class of every supervised actor.

    Start it through a supervisor (or `start_linked`), never with pykka's `start()`: the
    link must exist before the actor's thread runs. `self.path`, `self.runtime` and `self.log`
    (a structlog logger bound with the actor's path) are available from `__init__` on.
    """

    use_daemon_thread = True  # a child stuck past its shutdown timeout must not keep the process alive
    #: run on the runtime's `Dispatcher` instead of a thread of its own: only for actors whose
    #: handlers never wait (see `candlekeeper.supervisors.dispatcher`)
    pooled: ClassVar[bool] = False

    _link: Link
    _thread: threading.Thread
    _ready: threading.Event
    _exit_error: BaseException | None
    _timers: weakref.WeakSet[Timer]
    _started_at: float
    log: Any

    @classmethod
    def start_linked(cls, link: Link, *args: Any, **kwargs: Any) -> tuple[pykka.ActorRef[Self], Child]:
        """Create and start an incarnation bound to `link`; returns its ref and the actor.

        The actor object is returned so the supervisor can wait for `on_start` and join the
        thread on stop; nobody else should touch it.
        """
        obj = cls.__new__(cls)
        obj._link = link
        obj._ready = threading.Event()
        obj._exit_error = None
        obj._timers = weakref.WeakSet()
        obj._started_at = link.runtime.clock()
        obj.log = structlog.get_logger("candlekeeper").bind(actor=link.path)
        obj.__init__(*args, **kwargs)  # type: ignore[misc]
        pykka.ActorRegistry.register(obj.actor_ref)
        obj._start_actor_loop()
        return obj.actor_ref, obj

    # -- services for subclasses ---------------------------------------------------------

    @property
    def path(self) -> str:
        return self._link.path

    @property
    def runtime(self) -> Runtime:
        return self._link.runtime

    def schedule(self, delay: float, message: Any) -> Timer:
        """Tell `message` to this incarnation after `delay` seconds; cancelled if it dies."""
        timer = self._link.runtime.scheduler.send_later(delay, self.actor_ref, message)
        self._timers.add(timer)
        return timer

    def schedule_at(self, instant: float, message: Any) -> Timer:
        """Tell `message` to this incarnation once the runtime's wall clock reads `instant`
        (epoch seconds: a candle's close, say); cancelled if it dies."""
        timer = self._link.runtime.scheduler.send_at(instant, self.actor_ref, message)
        self._timers.add(timer)
        return timer

    def schedule_soonest(self, timer: Timer | None, delay: float, message: Any) -> Timer:
        """One wake-up timer at a time, the soonest wanted wins: `timer` (the one pending, or
        None) when it fires within `delay` anyway, else a new one in its place."""
        if timer is not None:
            runtime = self._link.runtime
            if timer.when <= (runtime.wall() if timer.on_wall else runtime.clock()) + delay:
                return timer
            timer.cancel()
        return self.schedule(delay, message)

    # -- pykka integration ---------------------------------------------------------------

    def _create_actor_inbox(self) -> Any:  # type: ignore[override]  # pykka's is static; ours needs the runtime
        if self.pooled:
            return self._link.runtime.dispatcher.inbox()
        return queue.SimpleQueue()  # see the module docstring

    def on_receive(self, message: Any) -> Any:
        """Subclasses pass messages they do not know here (`super().on_receive(message)`)."""
        if isinstance(message, Crash):
            if self._link.runtime.allow_crash_injection:
                raise InjectedCrash(message.reason)
            self.log.warning("crash_injection_refused")
            return None
        self.log.warning("unexpected_message", message=repr(message)[:200])
        return None

    def _start_actor_loop(self) -> None:
        self._exited = threading.Event()
        if isinstance(self.actor_inbox, PooledInbox):
            self.actor_inbox.activate(self._run_slice)
            return
        self._thread = threading.Thread(target=self._actor_loop, name=self._link.path, daemon=True)
        self._thread.start()

    def _await_exit(self, timeout: float | None) -> None:
        """Wait until this incarnation has finished (its `Exit` told)."""
        self._exited.wait(timeout)

    def _actor_loop(self) -> None:
        try:
            self._actor_loop_setup()
            self._ready.set()
            self._actor_loop_running()
            self._actor_loop_teardown()
        finally:
            self._report_exit()

    def _run_slice(self) -> bool:
        """A pooled actor's turn on a dispatcher thread: its `on_start` the first time, then up to
        `THROUGHPUT` messages; True once it has stopped (torn down and its exit told)."""
        try:
            if not self._ready.is_set():
                self._actor_loop_setup()
                self._ready.set()
            handled = 0
            while handled < THROUGHPUT and not self.actor_stopped.is_set() and not self.actor_inbox.empty():
                self._handle_envelope(self.actor_inbox.get())
                handled += 1
            if not self.actor_stopped.is_set():
                return False
            self._actor_loop_teardown()
        except BaseException as exc:  # noqa: BLE001 - a dispatcher thread must survive its actors
            self._handle_failure(type(exc), exc, exc.__traceback__)
            self._actor_loop_teardown()
        self._report_exit()
        return True

    def _handle_envelope(self, envelope: Any) -> None:
        """pykka's loop body (`Actor._actor_loop_running`), one message, for a pooled actor: an
        ask's exception goes back to the asker, a tell's crashes the actor."""
        try:
            response = self._handle_receive(envelope.message)
            if envelope.reply_to is not None:
                envelope.reply_to.set(response)
        except Exception:  # noqa: BLE001 - as pykka's loop: every error goes to the asker or crashes the actor
            if envelope.reply_to is not None:
                _PYKKA_LOG.info(f"Exception returned from {self} to caller:", exc_info=sys.exc_info())
                envelope.reply_to.set_exception()
            else:
                self._handle_failure(*sys.exc_info())
                try:
                    self.on_failure(*sys.exc_info())
                except Exception:  # noqa: BLE001
                    self._handle_failure(*sys.exc_info())

    def _actor_loop_teardown(self) -> None:
        """pykka's, but the tells left unread go to `Link.leftovers` when there is one (the
        asks stay for pykka, which tells each asker the actor died)."""
        if self._link.leftovers is not None:
            envelopes = []
            while not self.actor_inbox.empty():
                envelopes.append(self.actor_inbox.get())
            # put back for pykka: nobody else puts any more (a stopped actor refuses tells), and
            # a pooled inbox does not schedule an actor that is in its slice already
            for envelope in envelopes:
                if envelope.reply_to is not None:
                    self.actor_inbox.put(envelope)
            left = [e.message for e in envelopes if e.reply_to is None]
            if left:
                self._link.leftovers(left)
        super()._actor_loop_teardown()

    def _report_exit(self) -> None:
        self._ready.set()
        for timer in list(self._timers):
            timer.cancel()
        self._link.notify(
            Exit(
                child_id=self._link.child_id,
                incarnation=self._link.incarnation,
                error=self._exit_error,
                uptime=self._link.runtime.clock() - self._started_at,
            )
        )
        self._exited.set()

    def _handle_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Record why we die and log it with structlog (pykka would use stdlib logging)."""
        if self._exit_error is None:
            self._exit_error = exception_value or (exception_type() if exception_type else RuntimeError("unknown"))
        self.log.error(
            "actor_crashed",
            error=repr(exception_value),
            exc_info=(exception_type, exception_value, traceback),
        )
        pykka.ActorRegistry.unregister(self.actor_ref)
        self.actor_stopped.set()


_PYKKA_LOG = logging.getLogger("pykka")


class Address:
    """A stable name for a child across restarts, like an Erlang registered name.

    The supervisor swaps the ref on each restart (`attach`, `detach`); between incarnations
    `tell` drops the message and returns False, `ask` raises `pykka.ActorDeadError`.

    Unless the address `keep`s messages of some types: those told between incarnations, and
    those the crashed incarnation left unread, are held (the newest `keep_max`) and delivered to
    the next incarnation before anything told after it started, each sender's in the order it
    told them. Erlang drops a message sent to a name nobody holds, and a restarted process
    asks for what it needs. The health actor and the alerts notifier are told status reports by
    thousands of actors that never resend one unless something changes, and ask nobody: a
    report lost in a restart would leave health showing a stale status until the next change.
    """

    __slots__ = ("_kept", "_lock", "_proxy", "keep", "name", "ref")

    def __init__(self, name: str, ref: pykka.ActorRef[Any] | None = None, *, keep: tuple[type, ...] = (),
                 keep_max: int = 100_000) -> None:
        self.name = name
        self.ref = ref
        self._proxy: tuple[pykka.ActorRef[Any], Any] | None = None
        self.keep = keep
        self._kept: collections.deque[Any] = collections.deque(maxlen=keep_max)
        self._lock = threading.Lock()

    def tell(self, message: Any) -> bool:
        ref = self.ref
        if ref is not None:
            try:
                ref.tell(message)
                return True
            except pykka.ActorDeadError:
                pass
        if not isinstance(message, self.keep):
            return False
        with self._lock:  # only between incarnations: never on the way of a running one's tells
            ref = self.ref
            if ref is not None and ref.is_alive():  # attached meanwhile: after what it was handed
                ref.tell(message)
            else:
                self._kept.append(message)
        return True

    def attach(self, ref: pykka.ActorRef[Any]) -> None:
        """A new incarnation runs: it is handed what was kept, then takes tells itself."""
        with self._lock:
            while self._kept:
                message = self._kept.popleft()
                try:
                    ref.tell(message)
                except pykka.ActorDeadError:  # died at once: the rest waits for the next one
                    self._kept.appendleft(message)
                    break
            self.ref = ref

    def detach(self) -> None:
        """No incarnation runs (stopped or crashed, maybe to be restarted)."""
        with self._lock:
            self.ref = None

    def leftovers(self, messages: list[Any]) -> None:
        """The tells an incarnation left unread: kept ahead of those told since (they were told
        before them)."""
        kept = [m for m in messages if isinstance(m, self.keep)]
        with self._lock:
            self._kept.extendleft(reversed(kept))

    def ask(self, message: Any, *, timeout: float | None = None) -> Any:
        ref = self.ref
        if ref is None:
            raise pykka.ActorDeadError(f"{self.name} is not running")
        return ref.ask(message, timeout=timeout)

    def proxy(self) -> Any:
        """The incarnation's proxy, made once per incarnation: pykka reads every attribute of
        the actor to make one (milliseconds of CPU), and health is asked through it."""
        ref = self.ref
        if ref is None:
            raise pykka.ActorDeadError(f"{self.name} is not running")
        made = self._proxy
        if made is None or made[0] is not ref:
            made = self._proxy = (ref, ref.proxy())
        return made[1]

    @property
    def alive(self) -> bool:
        ref = self.ref
        return ref is not None and ref.is_alive()

    def __repr__(self) -> str:
        return f"Address({self.name!r})"


class Fanout:
    """Tell one message to several addresses: status reports go to health, alerts and metrics."""

    __slots__ = ("name", "targets")

    def __init__(self, *targets: Address) -> None:
        self.targets = targets
        self.name = "+".join(t.name for t in targets)

    def tell(self, message: Any) -> bool:
        delivered = False
        for target in self.targets:
            delivered = target.tell(message) or delivered
        return delivered
