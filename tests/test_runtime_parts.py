"""The pure parts of the runtime (intensity, backoff) and the timer thread."""

from __future__ import annotations

import random
import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from candlekeeper.supervisors.child import Runtime
from candlekeeper.supervisors.clock import FakeClock, ShiftedClock
from candlekeeper.supervisors.intensity import Backoff, BackoffConfig, RestartIntensity
from candlekeeper.supervisors.scheduler import Scheduler


@settings(max_examples=200, deadline=None)
@given(
    max_restarts=st.integers(0, 5),
    period=st.floats(0.5, 20),
    gaps=st.lists(st.floats(0, 10), min_size=1, max_size=40),
)
def test_intensity_matches_a_sliding_window_count(max_restarts: int, period: float, gaps: list[float]) -> None:
    clock = FakeClock()
    intensity = RestartIntensity(max_restarts, period, clock=clock)
    times: list[float] = []
    for gap in gaps:
        clock.advance(gap)
        times.append(clock())
        ok = intensity.record()
        in_window = [t for t in times if t > clock() - period]
        assert ok == (len(in_window) <= max_restarts)
        if not ok:
            break


@settings(max_examples=200, deadline=None)
@given(
    min_delay=st.floats(0.001, 1),
    factor=st.floats(1, 100),
    random_factor=st.floats(0, 1),
    uptimes=st.lists(st.floats(0, 30), min_size=1, max_size=30),
)
def test_backoff_bounds(min_delay: float, factor: float, random_factor: float, uptimes: list[float]) -> None:
    cfg = BackoffConfig(min_delay=min_delay, max_delay=min_delay * factor, random_factor=random_factor, reset_after=10)
    backoff = Backoff(cfg, rng=random.Random(7))
    quick = 0
    for uptime in uptimes:
        delay = backoff.next_delay(uptime)
        if uptime >= cfg.reset_after:
            quick = 0
        if quick == 0:
            assert delay == 0.0  # the first restart after a stable run is immediate
        else:
            base = min(cfg.max_delay, cfg.min_delay * 2 ** (quick - 1))
            assert base <= delay <= base * (1 + random_factor) + 1e-12
        quick += 1


def test_scheduler_runs_in_time_order_and_cancels() -> None:
    sched = Scheduler()
    sched.start()
    fired: list[str] = []
    done = threading.Event()
    try:
        sched.call_later(0.03, fired.append, "c")
        sched.call_later(0.01, fired.append, "a")
        cancelled = sched.call_later(0.02, fired.append, "x")
        sched.call_later(0.02, fired.append, "b")
        sched.call_later(0.04, done.set)
        cancelled.cancel()
        assert done.wait(5)
        assert fired == ["a", "b", "c"]
        assert sched.pending() == 0
    finally:
        sched.stop()


def test_scheduler_survives_a_failing_callback_and_stop_drops_pending() -> None:
    sched = Scheduler()
    sched.start()
    done = threading.Event()

    def boom() -> None:
        raise RuntimeError("callback bug")

    try:
        sched.call_later(0, boom)
        sched.call_later(0.01, done.set)
        assert done.wait(5)
        sched.call_later(60, done.clear)
        assert sched.pending() == 1
    finally:
        sched.stop()
    assert sched.pending() == 0
    late = sched.call_later(0, done.clear)
    assert late.cancelled and done.is_set()


def test_storage_survives_a_resume_query_from_a_series_that_died_meanwhile(tmp_path) -> None:
    """With thousands of series, a series can stop (or crash and restart) while its ResumeQuery
    still waits in the storage actor's mailbox: answering it must not crash the storage actor
    (its restart would make every series resync)."""
    import pykka

    from candlekeeper.actors.messages import SeriesKey
    from candlekeeper.actors.storage import ResumeQuery, StorageActor
    from candlekeeper.supervisors.child import Runtime
    from candlekeeper.supervisors.events import LifecycleEvent
    from candlekeeper.supervisors.supervisor import ChildSpec, start_root

    class Gone(pykka.ThreadingActor):
        pass

    runtime = Runtime()
    runtime.start()
    events: list[LifecycleEvent] = []
    runtime.events.subscribe(events.append)
    ref, _ = start_root(runtime, [ChildSpec("storage", StorageActor, args=(str(tmp_path / "c.db"),))])
    try:
        storage = ref.proxy().child_ref("storage").get()
        dead = Gone.start()
        dead.stop()
        storage.tell(ResumeQuery(SeriesKey("x", "BTC/USDT", "1m"), 60_000, 0, dead))
        assert storage.proxy().count("x", "BTC/USDT", "1m").get(timeout=5) == 0  # still the same, alive
        assert ref.proxy().child_ref("storage").get() == storage
        assert not [e for e in events if e.kind in ("crashed", "restarted")]
    finally:
        ref.stop()
        runtime.stop()


def test_series_poll_offsets_spread_over_the_window_and_are_stable() -> None:
    """Each series polls at a fixed offset in [0, poll_spread) after each close (a hash of its
    key, so a restart keeps it), so the series of an exchange do not all wake in the same
    instant; no spread means no offset."""
    from candlekeeper.actors.messages import SeriesKey
    from candlekeeper.actors.series import SeriesActor, SeriesSettings
    from candlekeeper.supervisors.child import Address, Runtime
    from candlekeeper.supervisors.supervisor import ChildSpec, start_root

    def offsets(spread: float, n: int) -> list[float]:
        runtime = Runtime()
        runtime.start()
        nowhere = Address("nowhere")  # no exchange nor storage: the series only start and wait
        specs = [ChildSpec(f"s{i}", SeriesActor,
                           args=(SeriesKey("ex", f"S{i:04d}/USDT", "1m"), SeriesSettings(poll_spread=spread)),
                           kwargs={"exchange": nowhere, "storage": nowhere})
                 for i in range(n)]
        ref, _ = start_root(runtime, specs)
        try:
            return [ref.proxy().child_ref(f"s{i}").get().proxy().poll_offset.get() for i in range(n)]
        finally:
            ref.stop()
            runtime.stop()

    spread = offsets(10.0, 300)
    assert all(0 <= o < 10.0 for o in spread)
    per_second = [sum(1 for o in spread if s <= o < s + 1) for s in range(10)]
    assert min(per_second) >= 10 and max(per_second) <= 60  # spread, not bunched (30 a second on average)
    assert offsets(10.0, 3) == spread[:3]  # stable across incarnations
    assert offsets(0.0, 3) == [0.0, 0.0, 0.0]


def test_wall_clock_timers_fire_when_the_wall_clock_gets_there_also_when_it_moves() -> None:
    """`call_at` timers are for wall instants (a candle's close): a moved clock (a test's
    `ShiftedClock`) brings them forward at once; the monotonic timers keep their delays."""
    wall = ShiftedClock()
    runtime = Runtime(wall=wall)
    runtime.start()
    fired: list[str] = []
    moved, late = threading.Event(), threading.Event()
    try:
        now = wall()
        runtime.scheduler.call_at(now + 60, fired.append, "close+60")
        runtime.scheduler.call_at(now + 30, fired.append, "close+30")
        cancelled = runtime.scheduler.call_at(now + 45, fired.append, "x")
        runtime.scheduler.call_at(now + 61, moved.set)
        runtime.scheduler.call_later(30, late.set)  # monotonic: a moved wall clock does not move it
        cancelled.cancel()
        assert runtime.scheduler.pending() == 4
        wall.offset += 61  # a minute passes in an instant
        assert moved.wait(5)
        assert fired == ["close+30", "close+60"]
        assert not late.is_set() and runtime.scheduler.pending() == 1
    finally:
        runtime.stop()


def test_a_running_series_polls_at_a_close_its_clock_jumped_to(tmp_path, running, clock) -> None:
    """A caught-up series waits for the next close on the wall clock: with the clock moved to a
    moment before that close, the candle is stored a moment after it, not a minute later."""
    from candlekeeper.simulator.server import BinanceSimulator
    from tests.test_ingest import make_config, wait_until

    start = (clock.ms() // 60_000) * 60_000 - 30 * 60_000
    with BinanceSimulator(["BTC/USDT"], history_start_ms=start, now_ms=clock.ms) as sim:
        cfg = make_config(tmp_path, sim, start, symbols=["BTC/USDT"])
        system = running(cfg)
        last = lambda: system.health()["series"][0]["last_ts"]  # noqa: E731
        wait_until(lambda: system.health()["series"][0]["status"] == "ok", timeout=30, what="caught up")
        stored = last()
        clock.offset += clock.until_boundary(60) + 30  # 30 s past the next close
        wait_until(lambda: last() > stored, timeout=10, what="the candle of the close the clock jumped past")
        assert last() == stored + 60_000
