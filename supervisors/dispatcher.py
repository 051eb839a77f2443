"""`Dispatcher`: a few threads that run many actors, one message at a time per actor.

A pykka `ThreadingActor` is a thread. At 10,000 series that is 10,000 threads, and at a minute's
close thousands of them wake at once to do a few microseconds of work each: every wake is a
futex wake and a fight for the GIL, and a profile of the REST burst after a close put more of
the daemon's CPU in the kernel (`futex_wake`, the GIL's mutex and condition) than in Python.

Erlang runs its processes on one scheduler per core and Akka its actors on dispatchers for the
same reason. An actor on a dispatcher keeps everything that makes it an actor: its own mailbox,
one message at a time, in order, never two threads in it at once, its own failure. What it gives
up is blocking: a handler that waits (an `ask(...).get()`, a socket, a sleep) holds one of the
dispatcher's few threads, so only actors whose handlers never wait may run here (the series
actors: every wait of theirs is a scheduled message already). The others keep their own thread.

The mailbox (`PooledInbox`) is pykka's inbox protocol (`put`, `get`, `empty`), so `tell`, `ask`
and `stop` work unchanged; a `put` makes its actor runnable, and a worker runs at most
`THROUGHPUT` of its messages before giving the others their turn (Akka's `throughput`).
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable
from typing import Any

import structlog

THREADS = 2  # the GIL runs one at a time anyway; the second keeps the others moving past a long handler
THROUGHPUT = 16  # messages one actor handles before the next runnable actor's turn


class PooledInbox:
    """An actor's mailbox whose `put` schedules the actor on a dispatcher instead of waking a thread."""

    __slots__ = ("_dispatcher", "_lock", "_messages", "_scheduled", "run")

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher
        self._lock = threading.Lock()
        self._messages: collections.deque[Any] = collections.deque()
        self._scheduled = False
        #: the actor's slice (`Child._run_slice`): set once the actor may run; returns True when it is done
        self.run: Callable[[], bool] | None = None

    def put(self, envelope: Any, /) -> None:
        with self._lock:
            self._messages.append(envelope)
            if self._scheduled or self.run is None:
                return
            self._scheduled = True
        self._dispatcher.submit(self)

    def get(self) -> Any:
        return self._messages.popleft()

    def empty(self) -> bool:
        return not self._messages

    def activate(self, run: Callable[[], bool]) -> None:
        """Let the actor run: its first slice (its `on_start`) is scheduled now."""
        with self._lock:
            self.run = run
            self._scheduled = True
        self._dispatcher.submit(self)

    def _after_slice(self, done: bool) -> bool:
        """True when the actor must run again (messages came while it ran)."""
        with self._lock:
            if done:
                self.run = None
                self._scheduled = False
                return False
            if self._messages:
                return True
            self._scheduled = False
            return False


class Dispatcher:
    """Runs the slices of runnable `PooledInbox` actors on `threads` worker threads (started on
    the first submit, stopped by `stop`)."""

    def __init__(self, threads: int = THREADS, name: str = "candlekeeper-pool") -> None:
        self._threads_wanted = threads
        self._name = name
        self._runnable: queue.SimpleQueue[PooledInbox | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def inbox(self) -> PooledInbox:
        return PooledInbox(self)

    def submit(self, inbox: PooledInbox) -> None:
        if not self._threads:
            self._start()
        self._runnable.put(inbox)

    def _start(self) -> None:
        with self._lock:
            if self._threads:
                return
            self._threads = [threading.Thread(target=self._work, name=f"{self._name}-{i}", daemon=True)
                             for i in range(self._threads_wanted)]
            for t in self._threads:
                t.start()

    def _work(self) -> None:
        while True:
            inbox = self._runnable.get()
            if inbox is None:
                return
            run = inbox.run
            try:
                done = True if run is None else run()
            except BaseException:  # noqa: BLE001 - a bug in an actor's own failure path: the pool runs on
                structlog.get_logger("candlekeeper").exception("dispatcher_slice_failed", dispatcher=self._name)
                done = True
            if inbox._after_slice(done):
                self._runnable.put(inbox)

    def stop(self) -> None:
        """Stop the workers once the actors queued before now have had their slice (actors still
        running by then are the system's to stop first)."""
        with self._lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            self._runnable.put(None)
        for t in threads:
            if t is not threading.current_thread():
                t.join(5.0)
