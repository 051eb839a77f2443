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
    """A handle on a scheduled call; `cancel()` is cheap and idempotent."""

    __slots__ = ("__weakref__", "args", "cancelled", "fn", "seq", "when")

    def __init__(self, when: float, seq: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.when = when
        self.seq = seq
        self.fn = fn
        self.args = args
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
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, name: str = "candlekeeper-timers") -> None:
        self._clock = clock
        self._name = name
        self._heap: list[Timer] = []  # the timer thread's own
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
        if self._stopping:
            timer.cancelled = True
            return timer
        self._incoming.append(timer)
        if timer.when < self._wake_at:
            self._wake.set()
        return timer

    def send_later(self, delay: float, ref: pykka.ActorRef[Any], message: Any) -> Timer:
        """Tell `message` to exactly this actor incarnation after `delay` seconds."""
        return self.call_later(delay, _tell, ref, message)

    def pending(self) -> int:
        return sum(1 for t in [*self._heap, *self._incoming] if not t.cancelled)

    def _run(self) -> None:
        heap, incoming, wake = self._heap, self._incoming, self._wake
        while not self._stopping:
            self._wake_at = -math.inf  # awake: every new timer wakes the next sleep at once
            wake.clear()
            while incoming:
                heapq.heappush(heap, incoming.popleft())
            while heap and not self._stopping:
                top = heap[0]
                if top.cancelled:
                    heapq.heappop(heap)
                    continue
                if top.when > self._clock():
                    break
                heapq.heappop(heap)
                fn, args = top.fn, top.args
                if top.cancelled:
                    continue
                try:
                    fn(*args)
                except Exception:
                    log.exception("timer_callback_failed", callback=getattr(fn, "__qualname__", repr(fn)))
            if self._stopping:
                break
            if heap:
                self._wake_at = heap[0].when
                timeout: float | None = max(0.0, heap[0].when - self._clock())
            else:
                self._wake_at = math.inf
                timeout = None
            if incoming:
                continue  # came while the thread was awake (each also set the event)
            wake.wait(timeout)
        heap.clear()
        incoming.clear()
