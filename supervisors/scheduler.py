"""One timer thread and one heap for the whole system.

Actors never sleep: a retry, a probe or a restart backoff is a message delivered later by
this scheduler. One thread serves every timer (a `threading.Timer` per timer would mean
thousands of threads), and a timer aimed at an `ActorRef` can never reach a replacement
actor, because a restarted actor has a new ref; the dead one's timers are also cancelled
when it exits (see `candlekeeper.supervisors.child.Child`).
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import pykka
import structlog

log = structlog.get_logger("candlekeeper.scheduler")


class Timer:
    """A handle on a scheduled call; `cancel()` is cheap and idempotent. `when` is on the
    scheduler's monotonic clock, or on its wall clock for a timer made by `call_at` (`on_wall`)."""

    __slots__ = ("__weakref__", "args", "cancelled", "fn", "on_wall", "seq", "when")

    def __init__(self, when: float, seq: int, fn: Callable[..., Any], args: tuple[Any, ...],
                 on_wall: bool = False) -> None:
        self.when = when
        self.seq = seq
        self.fn = fn
        self.args = args
        self.on_wall = on_wall
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.args = ()

    def __lt__(self, other: Timer) -> bool:
        return (self.when, self.seq) < (other.when, other.seq)


def _tell(ref: pykka.ActorRef[Any], message: Any) -> None:
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        pass  # the target died before its timer fired: nothing to deliver


class Scheduler:
    """Delayed calls on one daemon thread, ordered by a heap.

    Callbacks run on the timer thread and must be quick (a `tell` is); anything slow belongs
    in an actor.

    `call_later` takes no lock: at 10,000 series, thousands of actor threads reschedule within
    the same second after a close, and a lock they all queue on (one holder preempted by the
    GIL stalls every other) cost more than the timers. A new timer goes on a deque (its append
    is atomic) that only the timer thread drains into its heap; the caller wakes the thread
    only when the new timer is due before the one it sleeps towards (`_wake_at`, published by
    the thread: minus infinity while it is awake, so nothing lands unseen between its last
    drain and its sleep).

    Timers for a wall-clock instant (`call_at`: a candle's close, a market's reopening) keep
    their own heap and fire when the wall clock reaches them, however it got there: a test that
    moves its clock to a moment before a close (`ShiftedClock`, which wakes this thread when it
    moves) sees the close's timers fire at the close, not a minute of real time later; a real
    clock that steps (NTP, a suspended machine) is looked at again at least every
    `WALL_RECHECK_S` while such timers wait.
    """

    WALL_RECHECK_S = 1.0

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 name: str = "candlekeeper-timers") -> None:
        self._clock = clock
        self.wall = wall
        self._name = name
        self._heap: list[Timer] = []  # the timer thread's own
        self._wall_heap: list[Timer] = []  # the timer thread's own: timers for a wall instant
        self._incoming: deque[Timer] = deque()
        self._seq = itertools.count()
        self._wake = threading.Event()
        self._wake_at = -math.inf
        self._lock = threading.Lock()  # start/stop only
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._stopping = False
            self._wake.clear()
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread; pending timers are dropped."""
        with self._lock:
            self._stopping = True
            self._incoming.clear()
            self._wake.set()
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Timer:
        timer = Timer(self._clock() + max(0.0, delay), next(self._seq), fn, args)
        return self._add(timer, timer.when)

    def send_later(self, delay: float, ref: pykka.ActorRef[Any], message: Any) -> Timer:
        """Tell `message` to exactly this actor incarnation after `delay` seconds."""
        return self.call_later(delay, _tell, ref, message)

    def call_at(self, instant: float, fn: Callable[..., Any], *args: Any) -> Timer:
        """Call `fn(*args)` once the wall clock reads `instant` (epoch seconds) or later."""
        timer = Timer(instant, next(self._seq), fn, args, on_wall=True)
        return self._add(timer, self._clock() + (instant - self.wall()))

    def _add(self, timer: Timer, due: float) -> Timer:
        """Hand `timer` to the timer thread, waking it only if it sleeps past `due` (monotonic)."""
        if self._stopping:
            timer.cancelled = True
            return timer
        self._incoming.append(timer)
        if due < self._wake_at:
            self._wake.set()
        return timer

    def send_at(self, instant: float, ref: pykka.ActorRef[Any], message: Any) -> Timer:
        """Tell `message` to exactly this actor incarnation once the wall clock reads `instant`."""
        return self.call_at(instant, _tell, ref, message)

    def wake(self) -> None:
        """Look at the clocks again now (the wall clock moved: see `ShiftedClock.watch`)."""
        self._wake.set()

    def pending(self) -> int:
        return sum(1 for t in [*self._heap, *self._wall_heap, *self._incoming] if not t.cancelled)

    def _fire_due(self, heap: list[Timer], now: Callable[[], float]) -> None:
        while heap and not self._stopping:
            top = heap[0]
            if top.cancelled:
                heapq.heappop(heap)
                continue
            if top.when > now():
                return
            heapq.heappop(heap)
            fn, args = top.fn, top.args
            if top.cancelled:
                continue
            try:
                fn(*args)
            except Exception:
                log.exception("timer_callback_failed", callback=getattr(fn, "__qualname__", repr(fn)))

    def _run(self) -> None:
        heap, wall_heap, incoming, wake = self._heap, self._wall_heap, self._incoming, self._wake
        while not self._stopping:
            self._wake_at = -math.inf  # awake: every new timer wakes the next sleep at once
            wake.clear()
            while incoming:
                timer = incoming.popleft()
                heapq.heappush(wall_heap if timer.on_wall else heap, timer)
            self._fire_due(heap, self._clock)
            self._fire_due(wall_heap, self.wall)
            if self._stopping:
                break
            timeout: float | None = None
            if heap:
                timeout = max(0.0, heap[0].when - self._clock())
            if wall_heap:  # the wall clock may move: looked at again within WALL_RECHECK_S
                wall_timeout = min(max(0.0, wall_heap[0].when - self.wall()), self.WALL_RECHECK_S)
                timeout = wall_timeout if timeout is None else min(timeout, wall_timeout)
            self._wake_at = math.inf if timeout is None else self._clock() + timeout
            if incoming:
                continue  # came while the thread was awake (each also set the event)
            wake.wait(timeout)
        heap.clear()
        wall_heap.clear()
        incoming.clear()
