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
import threading
import time
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
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, name: str = "candlekeeper-timers") -> None:
        self._clock = clock
        self._name = name
        self._heap: list[Timer] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread; pending timers are dropped."""
        with self._cond:
            self._stopping = True
            self._heap.clear()
            self._cond.notify()
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Timer:
        timer = Timer(self._clock() + max(0.0, delay), next(self._seq), fn, args)
        with self._cond:
            if self._stopping:
                timer.cancelled = True
                return timer
            heapq.heappush(self._heap, timer)
            if self._heap[0] is timer:
                self._cond.notify()
        return timer

    def send_later(self, delay: float, ref: pykka.ActorRef[Any], message: Any) -> Timer:
        """Tell `message` to exactly this actor incarnation after `delay` seconds."""
        return self.call_later(delay, _tell, ref, message)

    def pending(self) -> int:
        with self._cond:
            return sum(1 for t in self._heap if not t.cancelled)

    def _run(self) -> None:
        cond = self._cond
        heap = self._heap
        while True:
            with cond:
                while True:
                    if self._stopping:
                        return
                    if not heap:
                        cond.wait()
                        continue
                    top = heap[0]
                    if top.cancelled:
                        heapq.heappop(heap)
                        continue
                    wait = top.when - self._clock()
                    if wait > 0:
                        cond.wait(wait)
                        continue
                    heapq.heappop(heap)
                    break
            fn, args = top.fn, top.args
            if top.cancelled:
                continue
            try:
                fn(*args)
            except Exception:
                log.exception("timer_callback_failed", callback=getattr(fn, "__qualname__", repr(fn)))
