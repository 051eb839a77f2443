"""Supervision semantics: strategies x restart types x ways to die, intensity, backoff, order."""

from __future__ import annotations

import itertools
import queue
import threading
from typing import Any

import pykka
import pytest

from candlekeeper.supervisors.child import Address, Child, Exit, Runtime
from candlekeeper.supervisors.intensity import NO_BACKOFF, BackoffConfig
from candlekeeper.supervisors.supervisor import (
    ChildExists,
    ChildSpec,
    NoSuchChild,
    Supervisor,
    SupervisorGaveUp,
    start_root,
)
from tests.conftest import EventRecorder


class Journal:
    """What the workers did, in order, across threads."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.entries: list[tuple[str, str]] = []
        self.fail_starts: dict[str, int] = {}

    def add(self, what: str, who: str) -> None:
        with self.lock:
            self.entries.append((what, who))
            self.lock.notify_all()

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> bool:
        with self.lock:
            return self.lock.wait_for(predicate, timeout)

    def of(self, what: str) -> list[str]:
        with self.lock:
            return [who for w, who in self.entries if w == what]

    def take_start_failure(self, who: str) -> bool:
        with self.lock:
            left = self.fail_starts.get(who, 0)
            if left:
                self.fail_starts[who] = left - 1
            return bool(left)


class Worker(Child):
    def __init__(self, name: str, journal: Journal) -> None:
        super().__init__()
        self.name = name
        self.journal = journal

    def on_start(self) -> None:
        if self.journal.take_start_failure(self.name):
            raise RuntimeError(f"{self.name} cannot start")
        self.journal.add("start", self.name)

    def on_stop(self) -> None:
        self.journal.add("stop", self.name)

    def on_receive(self, message: Any) -> Any:
        if message == "crash":
            raise RuntimeError(f"{self.name} crashed")
        if message == "ask-error":
            raise ValueError("bad question")
        if isinstance(message, tuple) and message[0] == "schedule":
            self.schedule(message[1], ("timer", message[2]))
            return None
        if isinstance(message, tuple) and message[0] == "timer":
            self.journal.add("timer", f"{self.name}:{message[1]}")
            return None
        return ("pong", self.name)


class PooledWorker(Worker):
    """The same worker on the runtime's dispatcher (`candlekeeper.supervisors.dispatcher`)."""

    pooled = True


def specs(journal: Journal, names: str = "abc", *, worker: type[Worker] = Worker, **overrides: Any) -> list[ChildSpec]:
    out = []
    for n in names:
        kw = overrides.get(n, {})
        out.append(ChildSpec(n, worker, args=(n, journal), **kw))
    return out


@pytest.fixture
def journal() -> Journal:
    return Journal()


class Root:
    """A root supervisor for one test, stopped at the end."""

    def __init__(self, runtime: Runtime, children: list[ChildSpec], **options: Any) -> None:
        self.exited = threading.Event()
        self.exit: Exit | None = None
        self.ref, self.actor = start_root(runtime, children, on_exit=self._on_exit, **options)
        self.proxy = self.ref.proxy()

    def _on_exit(self, exit_: Exit) -> None:
        self.exit = exit_
        self.exited.set()

    def child(self, child_id: str) -> pykka.ActorRef[Any]:
        return self.proxy.child_ref(child_id).get()

    def states(self) -> dict[str, tuple[str, int]]:
        return {c["id"]: (c["state"], c["restarts"]) for c in self.proxy.which_children().get()}

    def stop(self) -> None:
        self.ref.stop()
        assert self.exited.wait(10)


@pytest.fixture
def make_root(runtime: Runtime):
    roots: list[Root] = []

    def make(children: list[ChildSpec], **options: Any) -> Root:
        options.setdefault("backoff", NO_BACKOFF)
        root = Root(runtime, children, **options)
        roots.append(root)
        return root

    yield make
    for root in roots:
        if not root.exited.is_set():
            root.stop()


# ---------------------------------------------------------------------------------------
# The table: each strategy x each restart type x each way to die.
# The target is child "b" of (a, b, c); a and c are permanent.

STRATEGIES = ["one_for_one", "one_for_all", "rest_for_one"]
RESTARTS = ["permanent", "transient", "temporary"]
DEATHS = ["tell", "on_start", "external_stop"]

RESTARTED_GROUP = {"one_for_one": "b", "one_for_all": "abc", "rest_for_one": "bc"}


def _expect_restart(restart: str, death: str) -> bool:
    if restart == "temporary":
        return False
    if restart == "transient":
        return death != "external_stop"  # a stop from outside is a normal exit
    return True


@pytest.mark.parametrize("worker", [Worker, PooledWorker], ids=["thread", "pooled"])
@pytest.mark.parametrize(
    ("strategy", "restart", "death"), list(itertools.product(STRATEGIES, RESTARTS, DEATHS))
)
def test_supervision_table(make_root, recorder: EventRecorder, journal: Journal, strategy, restart, death,
                           worker) -> None:
    children = specs(journal, b={"restart": restart}, worker=worker)
    if death == "on_start":
        journal.fail_starts["b"] = 1  # b dies in on_start on its first start
    root = make_root(children, strategy=strategy)

    if death == "tell":
        root.child("b").tell("crash")
    elif death == "external_stop":
        root.child("b").stop()

    restarted = _expect_restart(restart, death)
    if restarted:
        group = RESTARTED_GROUP[strategy]
        recorder.wait_for(lambda evs: {e.child_id for e in evs if e.kind == "restarted"} >= set(group))
        states = root.states()
        for name in "abc":
            expected_restarts = 1 if name in group else 0
            assert states[name] == ("running", expected_restarts), (name, states)
        # every restarted child answers from its new incarnation
        for name in "abc":
            assert root.child(name).ask("ping") == ("pong", name)
        # siblings outside the group were never stopped
        for name in "abc":
            if name not in group:
                assert journal.of("stop").count(name) == 0
        # rest_for_one / one_for_all stop siblings in reverse start order
        stopped_siblings = [n for n in journal.of("stop") if n != "b"]
        assert stopped_siblings == sorted(set(group) - {"b"}, reverse=True)
    else:
        kind = "stopped" if death == "external_stop" else "crashed"
        recorder.wait_for(lambda evs: any(e.kind == kind and e.child_id == "b" for e in evs))
        states = root.states()
        if restart == "temporary":
            assert "b" not in states  # OTP: a temporary child is forgotten when it exits
        else:
            assert states["b"] == ("exited", 0)
        assert states["a"] == ("running", 0) and states["c"] == ("running", 0)
        assert "restarted" not in recorder.kinds()

    root.stop()
    assert root.exit is not None and root.exit.normal


# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("worker", [Worker, PooledWorker], ids=["thread", "pooled"])
def test_start_in_order_stop_in_reverse(make_root, journal: Journal, worker) -> None:
    root = make_root(specs(journal, "abcde", worker=worker))
    assert journal.of("start") == list("abcde")
    root.stop()
    assert journal.of("stop") == list("edcba")


def test_intensity_exceeded_escalates_to_parent(make_root, recorder: EventRecorder, journal: Journal) -> None:
    inner = ChildSpec(
        "inner",
        Supervisor,
        args=(specs(journal, "x"),),
        kwargs={"max_restarts": 2, "max_seconds": 60, "backoff": NO_BACKOFF},
        kind="supervisor",
        shutdown=30,
    )
    root = make_root([*specs(journal, "a"), inner], max_restarts=5)
    for i in range(3):
        inner_sup = root.child("inner")
        x = inner_sup.proxy().child_ref("x").get()
        x.tell("crash")
        if i < 2:
            recorder.wait_for(lambda evs, n=i + 1: [e.kind for e in evs if e.path == "root/inner/x"].count("restarted") == n)
    evs = recorder.wait_for(lambda evs: any(e.kind == "restarted" and e.path == "root/inner" for e in evs))
    kinds = [(e.kind, e.path) for e in evs]
    assert ("gave_up", "root/inner") in kinds
    assert ("escalated", "root/inner") in kinds
    crashed = [e for e in evs if e.kind == "crashed" and e.path == "root/inner"]
    assert crashed and "SupervisorGaveUp" in (crashed[0].reason or "")
    assert kinds.index(("gave_up", "root/inner")) < kinds.index(("crashed", "root/inner"))
    # the sibling of the failed subtree was not touched (root is one_for_one)
    assert root.states()["a"] == ("running", 0)
    # the restarted subtree works, with fresh intensity
    inner_sup = root.child("inner")
    assert inner_sup.proxy().child_ref("x").get().ask("ping") == ("pong", "x")
    root.stop()


def test_root_gives_up_and_reports_abnormal_exit(make_root, recorder: EventRecorder, journal: Journal) -> None:
    root = make_root(specs(journal, "ab"), max_restarts=1, max_seconds=60)
    root.child("a").tell("crash")
    recorder.wait_for(lambda evs: "restarted" in [e.kind for e in evs])
    root.child("a").tell("crash")
    assert root.exited.wait(10)
    assert root.exit is not None and isinstance(root.exit.error, SupervisorGaveUp)
    assert "restart intensity exceeded" in root.exit.reason
    assert journal.of("stop")[-2:] == ["b", "a"] or journal.of("stop")[-1] == "b"
    assert ("escalated", "root") in [(e.kind, e.path) for e in recorder.events]


def test_backoff_delays_grow_and_are_observed(make_root, recorder: EventRecorder, journal: Journal, runtime) -> None:
    journal.fail_starts["a"] = 5
    backoff = BackoffConfig(min_delay=0.02, max_delay=0.08, random_factor=0.0, reset_after=60)
    root = make_root(specs(journal, "a"), backoff=backoff, max_restarts=10)
    evs = recorder.wait_for(lambda evs: sum(e.kind == "restarted" for e in evs) == 5 and journal.of("start") == ["a"])
    crashes = [e for e in evs if e.kind == "crashed"]
    restarts = [e for e in evs if e.kind == "restarted"]
    assert len(crashes) == 5
    # 0 (first restart is immediate), then 0.02, 0.04, 0.08, 0.08 (capped)
    expected = [0.0, 0.02, 0.04, 0.08, 0.08]
    for crash, restart, delay in zip(crashes, restarts, expected, strict=True):
        assert restart.at - crash.at >= delay - 0.005  # never earlier than the backoff (lower bound only)
    assert [round(e.delay, 3) for e in restarts] == expected
    assert root.states()["a"] == ("running", 5)


def test_constructor_failure_is_a_crash(make_root, recorder: EventRecorder) -> None:
    attempts = []

    class Fragile(Child):
        def __init__(self) -> None:
            super().__init__()
            attempts.append(1)
            if len(attempts) < 3:
                raise RuntimeError("constructor failed")

    root = make_root([ChildSpec("f", Fragile)], max_restarts=5)
    recorder.wait_for(lambda evs: any(e.kind == "restarted" and e.child_id == "f" for e in evs) and len(attempts) == 3)
    assert root.states()["f"][0] == "running"


def test_ask_exception_goes_to_asker_and_is_not_a_crash(make_root, recorder: EventRecorder, journal: Journal) -> None:
    root = make_root(specs(journal, "a"))
    ref = root.child("a")
    with pytest.raises(ValueError, match="bad question"):
        ref.ask("ask-error")
    assert ref.ask("ping") == ("pong", "a")
    assert root.states()["a"] == ("running", 0)
    assert "crashed" not in recorder.kinds()


def test_dynamic_children(make_root, recorder: EventRecorder, journal: Journal) -> None:
    root = make_root(specs(journal, "a"))
    ref = root.proxy.start_child(ChildSpec("b", Worker, args=("b", journal))).get()
    assert ref.ask("ping") == ("pong", "b")
    with pytest.raises(ChildExists):
        root.proxy.start_child(ChildSpec("b", Worker, args=("b", journal))).get()
    root.proxy.terminate_child("b").get()
    assert root.states()["b"] == ("terminated", 0)
    assert not ref.is_alive()
    new = root.proxy.restart_child("b").get()
    assert new.ask("ping") == ("pong", "b") and new != ref
    assert root.states()["b"] == ("running", 1)
    # restart of a running child (the operator's "restart this actor")
    newer = root.proxy.restart_child("b").get()
    assert newer != new and not new.is_alive()
    assert root.states()["b"] == ("running", 2)
    root.proxy.delete_child("b").get()
    assert "b" not in root.states()
    with pytest.raises(NoSuchChild):
        root.proxy.terminate_child("nope").get()
    tree = root.proxy.tree().get()
    assert tree["path"] == "root" and [c["id"] for c in tree["children"]] == ["a"]


def test_address_follows_restarts(make_root, recorder: EventRecorder, journal: Journal) -> None:
    addr = Address("a")
    root = make_root([ChildSpec("a", Worker, args=("a", journal), address=addr)])
    first = addr.ref
    assert addr.ask("ping") == ("pong", "a")
    addr.tell("crash")
    recorder.wait_for(lambda evs: "restarted" in [e.kind for e in evs])
    assert addr.ref is not first and addr.ask("ping") == ("pong", "a")
    root.proxy.terminate_child("a").get()
    assert addr.tell("ping") is False
    with pytest.raises(pykka.ActorDeadError):
        addr.ask("ping")


class Report(tuple[str, int]):
    """A message type the addresses below keep between incarnations."""


class Reader(Child):
    """Writes what it is told into a list it does not own (as health keeps `HealthState`); a
    `("hold", event)` blocks it until the event is set, then it crashes."""

    def __init__(self, seen: list[Any]) -> None:
        super().__init__()
        self.seen = seen

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, tuple) and message and message[0] == "hold":
            assert message[1].wait(10)
            raise RuntimeError("crashed with messages waiting behind")
        if message == "seen":
            return list(self.seen)
        self.seen.append(message)
        return None


class PooledReader(Reader):
    pooled = True


def test_an_address_keeps_only_its_types_between_incarnations(make_root) -> None:
    seen: list[Any] = []
    addr = Address("r", keep=(Report,))
    assert addr.tell(Report(("between", 1))) is True
    assert addr.tell("not kept") is False  # OTP's way for every other message: dropped
    addr.leftovers([Report(("left", 0)), "not kept either"])  # an incarnation's unread tells: first
    make_root([ChildSpec("r", Reader, args=(seen,), address=addr)])
    addr.tell(Report(("after", 2)))
    assert addr.ask("seen", timeout=10) == [Report(("left", 0)), Report(("between", 1)), Report(("after", 2))]


@pytest.mark.parametrize("reader", [Reader, PooledReader], ids=["thread", "pooled"])
def test_what_a_crashed_incarnation_left_unread_and_what_came_meanwhile_reach_the_next(
        make_root, recorder: EventRecorder, reader: type[Reader]) -> None:
    seen: list[Any] = []
    addr = Address("r", keep=(Report,))
    make_root([ChildSpec("r", reader, args=(seen,), address=addr)])
    release = threading.Event()
    addr.tell(("hold", release))
    for n in range(3):  # queued behind the message that will crash it
        addr.tell(Report(("unread", n)))
    addr.tell("dropped")  # not a kept type: lost with the incarnation, as OTP would
    release.set()
    recorder.wait_for(lambda evs: "crashed" in [e.kind for e in evs])
    addr.tell(Report(("meanwhile", 3)))  # kept if no incarnation runs yet, else told to the new one
    recorder.wait_for(lambda evs: "restarted" in [e.kind for e in evs])
    addr.tell(Report(("after", 4)))
    assert addr.ask("seen", timeout=10) == [Report(("unread", 0)), Report(("unread", 1)), Report(("unread", 2)),
                                            Report(("meanwhile", 3)), Report(("after", 4))]


@pytest.mark.parametrize("worker", [Worker, PooledWorker], ids=["thread", "pooled"])
def test_timers_of_a_dead_actor_never_fire_into_its_replacement(make_root, recorder: EventRecorder, journal: Journal,
                                                                 worker) -> None:
    root = make_root(specs(journal, "a", worker=worker))
    old = root.child("a")
    old.ask(("schedule", 0.05, "old"))  # ask: the timer is registered before we crash it
    old.tell("crash")
    recorder.wait_for(lambda evs: "restarted" in [e.kind for e in evs])
    new = root.child("a")
    new.ask(("schedule", 0.1, "new"))
    # the replacement's own timer is due after the dead one's: once it fired, the old one had its chance
    assert journal.wait_for(lambda: journal.of("timer"))
    assert journal.of("timer") == ["a:new"]


def test_nested_supervisor_tree_reports_states(make_root, journal: Journal) -> None:
    inner = ChildSpec("inner", Supervisor, args=(specs(journal, "xy"),), kwargs={"strategy": "rest_for_one"}, kind="supervisor")
    root = make_root([*specs(journal, "a"), inner])
    tree = root.proxy.tree().get()
    inner_row = tree["children"][1]
    assert inner_row["strategy"] == "rest_for_one"
    assert [(c["id"], c["state"], c["restarts"]) for c in inner_row["children"]] == [("x", "running", 0), ("y", "running", 0)]
    root.stop()
    assert journal.of("stop") == ["y", "x", "a"]


class Counter(Child):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    def on_receive(self, message: Any) -> Any:
        if message == "seen":
            return list(self.seen)
        self.seen.append(message)
        return None


def test_many_threads_telling_one_child_lose_nothing_and_keep_each_senders_order(make_root) -> None:
    # a child's inbox takes no Python-level lock (a `queue.SimpleQueue`: pykka's `queue.Queue`
    # mutex made thousands of senders and the one consumer queue on it at 10,000 series)
    root = make_root([ChildSpec("counter", Counter)])
    ref = root.child("counter")
    assert type(ref.actor_inbox) is queue.SimpleQueue
    senders, each = 50, 200

    def send(i: int) -> None:
        for n in range(each):
            ref.tell((i, n))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seen = ref.ask("seen", timeout=10)
    assert len(seen) == senders * each
    for i in range(senders):
        assert [n for s, n in seen if s == i] == list(range(each))
