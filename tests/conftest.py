"""Shared fixtures: a runtime per test, and a check that nothing is left behind."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pykka
import pytest
from hypothesis import settings as hypothesis_settings

from candlekeeper.actors import storage as storage_mod
from candlekeeper.actors.stores import sqlite as sqlite_mod
from candlekeeper.supervisors.child import Runtime
from candlekeeper.supervisors.clock import ShiftedClock
from candlekeeper.supervisors.events import LifecycleEvent

# The property tests draw the same examples on every run ("ci"): a run must not fail on an example
# nobody has seen before it lands. `HYPOTHESIS_PROFILE=explore` draws new ones each run, to hunt.
hypothesis_settings.register_profile("ci", derandomize=True, database=None)
hypothesis_settings.register_profile("explore", derandomize=False, database=None)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class EventRecorder:
    """Collects lifecycle events; tests wait on a condition instead of sleeping."""

    def __init__(self) -> None:
        self.events: list[LifecycleEvent] = []
        self._cond = threading.Condition()

    def __call__(self, event: LifecycleEvent) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[LifecycleEvent]], bool], timeout: float = 10.0) -> list[LifecycleEvent]:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.events), timeout):
                raise AssertionError(f"timed out; events so far: {[(e.kind, e.path) for e in self.events]}")
            return list(self.events)

    def kinds(self, path: str | None = None) -> list[str]:
        with self._cond:
            return [e.kind for e in self.events if path is None or e.path == path]


#: Where in the minute in-process system tests start: 45 s before a 1m candle closes, so no
#: candle closes during a typical test (its store is complete the moment the backfill is), and a
#: test that wants one waits for `clock.until_next_close()` seconds, not up to a minute.
LEAD_S = 45.0


@pytest.fixture
def clock() -> ShiftedClock:
    """The wall clock a test's simulated exchange and system share (see LEAD_S)."""
    return ShiftedClock.before_boundary(60.0, LEAD_S)


@pytest.fixture
def runtime() -> Iterator[Runtime]:
    rt = Runtime()
    rt.start()
    yield rt
    rt.stop()


@pytest.fixture
def recorder(runtime: Runtime) -> EventRecorder:
    rec = EventRecorder()
    runtime.events.subscribe(rec)
    return rec


def wait_threads_gone(before: set[threading.Thread], timeout: float = 5.0) -> list[threading.Thread]:
    """Threads started since `before` that are still alive after `timeout` (joined, not polled)."""
    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if t not in before and t is not threading.current_thread():
            t.join(max(0.0, deadline - time.monotonic()))
    return [t for t in threading.enumerate() if t not in before and t.is_alive()]


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Every test must leave no actor thread and no registered actor behind."""
    before = set(threading.enumerate())
    yield
    left = wait_threads_gone(before)
    actors = pykka.ActorRegistry.get_all()
    pykka.ActorRegistry.stop_all(block=True, timeout=5)
    assert not actors, f"actors left registered: {actors}"
    assert not left, f"threads left running: {[t.name for t in left]}"


@pytest.fixture
def quick_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock held elsewhere fails a write after 1 s (not 5), and a failing store is probed every
    second at most (not every 5): the same failures and recoveries, without waiting them out."""
    monkeypatch.setattr(sqlite_mod, "BUSY_TIMEOUT_S", 1.0)
    monkeypatch.setattr(storage_mod, "PROBE_FIRST_S", 0.2)
    monkeypatch.setattr(storage_mod, "PROBE_MAX_S", 1.0)
    monkeypatch.setattr(storage_mod, "PROBE_BUSY_S", 0.5)


@pytest.fixture
def logs() -> Iterator[Any]:
    """The daemon's structlog events of this test (`tests.test_alerts.LogWatch`)."""
    import structlog

    from tests.test_alerts import LogWatch

    watch = LogWatch()
    with structlog.testing.capture_logs(processors=[watch]):
        yield watch


@pytest.fixture
def running(clock: ShiftedClock) -> Iterator[Callable[[Any], Any]]:
    """Start `System`s on the test's shifted clock; every one is stopped at the end."""
    from candlekeeper.app.system import System

    systems: list[System] = []

    def start(cfg: Any) -> System:
        systems.append(System(cfg, runtime=Runtime(wall=clock)).start())
        return systems[-1]

    yield start
    for system in systems:
        system.stop()
