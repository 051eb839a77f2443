"""Pooled actors (`candlekeeper.supervisors.dispatcher`): many actors on a few threads, each still
one message at a time, in order, with its own failure; a flooded actor does not starve the others.

The supervision semantics of pooled actors (every strategy x restart type x way to die) are
tests/test_supervision.py's table, run for both kinds of actor."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pykka
import pytest

from candlekeeper.supervisors.child import Child, Runtime
from candlekeeper.supervisors.dispatcher import THROUGHPUT, Dispatcher
from candlekeeper.supervisors.supervisor import ChildSpec
from tests.conftest import EventRecorder
from tests.test_supervision import make_root  # noqa: F401 - the fixture


class Pooled(Child):
    pooled = True

    def __init__(self, name: str, journal: list[Any], gate: threading.Event | None = None) -> None:
        super().__init__()
        self.name = name
        self.journal = journal
        self.gate = gate
        self.inside = 0
        self.seen: list[Any] = []

    def on_receive(self, message: Any) -> Any:
        self.inside += 1
        try:
            assert self.inside == 1, "two threads in one actor"
            if message == "seen":
                return list(self.seen)
            if message == "wait-gate":
                assert self.gate is not None and self.gate.wait(10)
            elif message == "base-exception":
                raise KeyboardInterrupt
            self.seen.append(message)
            self.journal.append((self.name, message))
            return None
        finally:
            self.inside -= 1


@pytest.fixture
def one_thread() -> Iterator[Runtime]:
    rt = Runtime(dispatcher=Dispatcher(threads=1, name="test-pool"))
    rt.start()
    yield rt
    rt.stop()


def pool_threads(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


def test_many_pooled_actors_run_on_the_dispatchers_threads_each_in_order(make_root) -> None:
    log: list[Any] = []
    actors = 300
    before = len(threading.enumerate())
    root = make_root([ChildSpec(f"p{i}", Pooled, args=(f"p{i}", log)) for i in range(actors)])
    assert len(threading.enumerate()) - before < 10  # the root and the pool's few workers, not 300 threads
    refs = [root.child(f"p{i}") for i in range(actors)]
    assert all(type(r.actor_inbox).__name__ == "PooledInbox" for r in refs)
    senders, each = 8, 50

    def send(s: int) -> None:
        for n in range(each):
            for r in refs:
                r.tell((s, n))

    threads = [threading.Thread(target=send, args=(s,)) for s in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in refs:
        seen = r.ask("seen", timeout=30)
        assert len(seen) == senders * each
        for s in range(senders):
            assert [n for x, n in seen if x == s] == list(range(each))  # each sender's order kept


def test_a_flooded_actor_lets_the_others_run_after_each_slice(one_thread: Runtime) -> None:
    from candlekeeper.supervisors.supervisor import start_root

    log: list[Any] = []
    gate = threading.Event()
    ref, _ = start_root(one_thread, [ChildSpec("a", Pooled, args=("a", log, gate)),
                                     ChildSpec("b", Pooled, args=("b", log))])
    try:
        root = ref.proxy()
        a, b = root.child_ref("a").get(), root.child_ref("b").get()
        a.tell("wait-gate")  # holds the pool's one thread until b's message is queued
        for n in range(10 * THROUGHPUT):
            a.tell(n)
        b.tell("hello")
        gate.set()
        assert b.ask("seen", timeout=10) == ["hello"]
        assert a.ask("seen", timeout=10)[-1] == 10 * THROUGHPUT - 1
        position = log.index(("b", "hello"))
        assert position < 2 * THROUGHPUT, "b waited for a's whole mailbox"
    finally:
        ref.stop()


def test_an_ask_to_a_pooled_actor_raises_at_the_asker_and_the_actor_lives(make_root, recorder: EventRecorder) -> None:
    class Asked(Child):
        pooled = True

        def on_receive(self, message: Any) -> Any:
            if message == "bad":
                raise ValueError("bad question")
            return "fine"

    root = make_root([ChildSpec("q", Asked)])
    ref = root.child("q")
    with pytest.raises(ValueError, match="bad question"):
        ref.ask("bad", timeout=10)
    assert ref.ask("ok", timeout=10) == "fine"
    assert "crashed" not in recorder.kinds()


def test_a_base_exception_kills_only_its_actor_and_the_pool_runs_on(one_thread: Runtime) -> None:
    from candlekeeper.supervisors.supervisor import start_root

    log: list[Any] = []
    recorder = EventRecorder()
    one_thread.events.subscribe(recorder)
    ref, _ = start_root(one_thread, [ChildSpec("a", Pooled, args=("a", log)), ChildSpec("b", Pooled, args=("b", log))])
    try:
        root = ref.proxy()
        root.child_ref("a").get().tell("base-exception")
        recorder.wait_for(lambda evs: any(e.kind == "restarted" and e.child_id == "a" for e in evs))
        assert root.child_ref("b").get().ask("seen", timeout=10) == []
        assert root.child_ref("a").get().ask("seen", timeout=10) == []  # the new incarnation runs on the same pool
    finally:
        ref.stop()


def test_a_stopped_pooled_actor_answers_what_was_left_in_its_mailbox(make_root) -> None:
    log: list[Any] = []
    gate = threading.Event()
    root = make_root([ChildSpec("a", Pooled, args=("a", log, gate))])
    ref = root.child("a")
    ref.tell("wait-gate")
    stopped = ref.stop(block=False)
    left = ref.ask("seen", block=False)  # queued behind the stop
    gate.set()
    stopped.get(timeout=10)
    with pytest.raises(pykka.ActorDeadError):
        left.get(timeout=10)
