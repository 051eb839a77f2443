"""Shared fixtures: a runtime per test, and a check that nothing is left behind."""

from __future__ import annotations

import gc
import itertools
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pykka
import pytest
import structlog

from candlekeeper.actors import storage as storage_mod
from candlekeeper.actors.stores import sqlite as sqlite_mod
from candlekeeper.supervisors.child import Runtime
from candlekeeper.supervisors.clock import ShiftedClock
from candlekeeper.supervisors.events import LifecycleEvent
from tests import forkserver
from tests.tmpfs import memory_dir


def _hypothesis_profiles() -> None:
    """The property tests draw the same examples on every run ("ci"): a run must not fail on an
    example nobody has seen before it lands. `HYPOTHESIS_PROFILE=explore` draws new ones each
    run, to hunt. Loaded before any test module is imported (their settings inherit it)."""
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, database=None)
    settings.register_profile("explore", derandomize=False, database=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# in a test process (an xdist worker, or the fork server the workers come from) now; in a run
# without xdist, in pytest_configure. The xdist controller imports no test module and never
# hypothesis: a third of a second before its workers can start
if os.environ.get("PYTEST_XDIST_WORKER") or os.environ.get(forkserver.PRELOAD_TESTS):
    _hypothesis_profiles()


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and not config.getoption("numprocesses", None):
        _hypothesis_profiles()  # no xdist: this process runs the tests
    # A test process makes many objects and few cycles; the collector's default pace (every 700
    # allocations) spent a twentieth of the suite's CPU walking them.
    gc.set_threshold(20_000, 20, 20)
    # Systems embedded in tests log through structlog's default console renderer, whose
    # tracebacks (rich's, highlighted) cost up to a second of CPU each: plain ones here.
    structlog.configure(processors=[
        *structlog.get_config()["processors"][:-1],
        structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback),
    ])
    config.addinivalue_line(
        "markers", "long(seconds=10): a test that waits out many seconds of real time (closes, "
        "graces, faults): started first on its worker, so none trails the run")
    if not hasattr(config, "workerinput") and config.getoption("numprocesses", None):
        _rewrite_test_modules_once(config)
        # one fork server for every worker (tests/forkserver.py): its imports paid once per run
        os.environ[forkserver.PRELOAD_TESTS] = "1"  # the asserts are rewritten by now
        server = forkserver.Server()
        os.environ[forkserver.SHARED] = server.path  # the workers, started next, inherit it
        config.add_cleanup(server.close)
        # the tests' files (tmp_path) in memory when there is room: pytest's own switch, read when
        # it makes the run's directory, which the workers are handed
        if memory_dir() is not None:
            os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", memory_dir())
        # one PostgreSQL data directory made for the run, copied for each worker's server (imported
        # here only: the test modules that name tests/pg.py as a plugin have its asserts rewritten)
        from tests import pg

        template = tempfile.mkdtemp(prefix="ck-pg-template-", dir=memory_dir())
        os.environ[pg.TEMPLATE] = template
        config.add_cleanup(lambda: shutil.rmtree(template, ignore_errors=True))
        # and the workers themselves forked from it (tests/forkpython.py), if xdist starts them
        # as local processes
        if config.option.tx and all(tx == "popen" for tx in config.option.tx):
            python = shlex.join([sys.executable, "-S", str(Path(__file__).with_name("forkpython.py")), server.path])
            config.option.tx = [f"popen//python={python}" for _ in config.option.tx]


@pytest.hookimpl(tryfirst=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    # Before pytest's last full collection, which looks for exceptions raised in finalizers: in a
    # worker it walks the heap of everything its tests left (a third of a second of CPU, on the
    # run's last worker too) for the cycles its last tests left. Finalizers that run during the
    # tests are watched by the same hook all along.
    if hasattr(config, "workerinput"):
        gc.freeze()


def _rewrite_test_modules_once(config: pytest.Config) -> None:
    """The xdist controller rewrites the test modules' asserts before its workers start, into
    pytest's cache of rewritten modules (tests/__pycache__, keyed by each source's hash), so the
    fork server the workers come from reads it (tests/forkserver.py) instead of each worker
    rewriting them: 1.5 s of CPU per worker. Python's own bytecode is still written only where
    the environment allows it (PYTHONDONTWRITEBYTECODE): pytest writes this cache only when it
    may, hence here. Private pytest API: if it moves,
    the workers rewrite as before."""
    if config.getoption("assertmode") != "rewrite":
        return
    try:
        from _pytest.assertion.rewrite import (
            PYC_TAIL,
            _read_pyc,
            _rewrite_test,
            _write_pyc,
            assertstate_key,
            get_cache_dir,
        )
        state = config.stash[assertstate_key]
    except (ImportError, KeyError):
        return
    here = Path(__file__).parent
    for source in sorted([here / "conftest.py", *here.glob("test_*.py")]):
        cache = get_cache_dir(source)
        pyc = cache / (source.name[:-3] + PYC_TAIL)
        if _read_pyc(source, pyc, state.trace) is not None:
            continue
        cache.mkdir(exist_ok=True)
        source_hash, code = _rewrite_test(source, config)
        _write_pyc(state, code, source_hash, pyc)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, each worker's first tests are the long ones, longest first.

    xdist's worksteal hands worker j the j-th of N contiguous slices of the collection and
    steals from the ends of the slices: a long test at the end of a slice (the six
    parametrisations of one long test sit together) runs last and trails the run by its length.
    Here the long tests are dealt out one per slice, at the slices' starts; every worker
    collects the same order, as xdist requires."""
    workers = int(getattr(config, "workerinput", {}).get("workercount", 0))
    if workers < 2:
        return
    def seconds(item: pytest.Item) -> float:
        mark = item.get_closest_marker("long")
        return float(mark.args[0]) if mark is not None and mark.args else 10.0

    long = sorted((i for i in items if i.get_closest_marker("long")), key=seconds, reverse=True)
    if not long:
        return
    rest = iter([i for i in items if not i.get_closest_marker("long")])
    sizes, left = [], len(items)
    for j in range(workers):  # as worksteal.check_schedule splits the pending items
        sizes.append(left // (workers - j))
        left -= sizes[-1]
    slices: list[list[pytest.Item]] = [[] for _ in range(workers)]
    for n, item in enumerate(long):
        slices[n % workers].append(item)
    for size, chunk in zip(sizes, slices, strict=True):
        chunk.extend(itertools.islice(rest, max(0, size - len(chunk))))
    slices[-1].extend(rest)
    items[:] = [item for chunk in slices for item in chunk]



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


# threads that live as long as the test process, started by the first test that needs them
LIFETIME_THREADS = frozenset({"forkserver"})  # tests/forkserver.py: the reader of its answers


def wait_threads_gone(before: set[threading.Thread], timeout: float = 5.0) -> list[threading.Thread]:
    """Threads started since `before` that are still alive after `timeout` (joined, not polled)."""
    deadline = time.monotonic() + timeout
    new = [t for t in threading.enumerate()
           if t not in before and t is not threading.current_thread() and t.name not in LIFETIME_THREADS]
    for t in new:
        t.join(max(0.0, deadline - time.monotonic()))
    return [t for t in new if t.is_alive()]


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
