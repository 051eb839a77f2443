"""Supervision runtime benchmark, against raw pykka in the same run.

    python bench/actors.py [--tells 200000] [--restarts 1000] [--actors 10000]

Last line on stdout: one JSON object with tell_per_s_raw, tell_per_s_supervised,
restart_ms_p50, restart_ms_p99, actors_10k_start_s, actors_10k_rss_mb, actors_10k_stop_s.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import threading
import time
from typing import Any

import psutil
import pykka
import structlog

from candlekeeper.supervisors.child import Address, Child, Exit, Runtime
from candlekeeper.supervisors.events import LifecycleEvent
from candlekeeper.supervisors.supervisor import ChildSpec, start_root


class RawCounter(pykka.ThreadingActor):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def on_receive(self, message: Any) -> Any:
        if message == "count":
            return self.n
        if message == "crash":
            raise RuntimeError("crash for the benchmark")
        self.n += 1
        return None


class SupervisedCounter(Child):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    on_receive = RawCounter.on_receive


def tell_rate(ref: pykka.ActorRef[Any], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        ref.tell(1)
    ref.ask("count")
    return n / (time.perf_counter() - t0)


def bench_tells(runtime: Runtime, n: int, rounds: int = 5) -> tuple[float, float]:
    raw = RawCounter.start()
    ref, _ = start_root(runtime, [ChildSpec("counter", SupervisedCounter)])
    sup_child = ref.proxy().child_ref("counter").get()
    raw_rates, sup_rates = [], []
    try:
        for _ in range(rounds):  # interleaved, so noise on this shared machine hits both alike
            raw_rates.append(tell_rate(raw, n))
            sup_rates.append(tell_rate(sup_child, n))
    finally:
        raw.stop()
        ref.stop()
    return statistics.median(raw_rates), statistics.median(sup_rates)


def bench_restarts(runtime: Runtime, n: int) -> list[float]:
    """Crash in a tell -> replacement answering an ask, with the default backoff and intensity
    raised so the run is not cut short. Each child crashes once (a first crash restarts at once)."""
    addresses = [Address(f"c{i}") for i in range(n)]
    restarted: dict[str, threading.Event] = {a.name: threading.Event() for a in addresses}

    def on_event(ev: LifecycleEvent) -> None:
        if ev.kind == "restarted":
            restarted[ev.child_id].set()

    runtime.events.subscribe(on_event)
    specs = [ChildSpec(a.name, SupervisedCounter, address=a) for a in addresses]
    ref, _ = start_root(runtime, specs, max_restarts=10 * n, max_seconds=60)
    out = []
    try:
        for a in addresses:
            t0 = time.perf_counter()
            a.tell("crash")
            restarted[a.name].wait(10)
            a.ask("count")
            out.append((time.perf_counter() - t0) * 1000)
    finally:
        runtime.events.unsubscribe(on_event)
        ref.stop()
    return out


def bench_many(runtime: Runtime, n: int) -> tuple[float, float, float]:
    proc = psutil.Process()
    gc.collect()
    exited = threading.Event()

    def on_exit(_: Exit) -> None:
        exited.set()

    specs = [ChildSpec(f"a{i}", SupervisedCounter) for i in range(n)]
    t0 = time.perf_counter()
    ref, _ = start_root(runtime, specs, on_exit=on_exit, start_timeout=30)
    start_s = time.perf_counter() - t0
    rss_mb = proc.memory_info().rss / 2**20
    assert len(pykka.ActorRegistry.get_all()) >= n
    t0 = time.perf_counter()
    ref.stop(block=True, timeout=120)
    exited.wait(120)
    stop_s = time.perf_counter() - t0
    return start_s, rss_mb, stop_s


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tells", type=int, default=200_000)
    parser.add_argument("--restarts", type=int, default=1000)
    parser.add_argument("--actors", type=int, default=10_000)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(50))  # crashes are the point here

    runtime = Runtime()
    runtime.start()
    try:
        raw, supervised = bench_tells(runtime, args.tells)
        print(f"tells/s raw pykka {raw:,.0f}, supervised {supervised:,.0f} ({supervised / raw:.0%})")
        restarts = bench_restarts(runtime, args.restarts)
        p50, p99 = percentile(restarts, 0.5), percentile(restarts, 0.99)
        print(f"restart (crash -> replacement answers) p50 {p50:.3f} ms, p99 {p99:.3f} ms over {len(restarts)}")
        start_s, rss_mb, stop_s = bench_many(runtime, args.actors)
        print(f"{args.actors} supervised actors: start {start_s:.2f} s, RSS {rss_mb:.0f} MB, stop {stop_s:.2f} s")
    finally:
        runtime.stop()
    print(
        json.dumps(
            {
                "tell_per_s_raw": round(raw),
                "tell_per_s_supervised": round(supervised),
                "supervised_over_raw": round(supervised / raw, 3),
                "restart_ms_p50": round(p50, 3),
                "restart_ms_p99": round(p99, 3),
                "actors_10k_start_s": round(start_s, 3),
                "actors_10k_rss_mb": round(rss_mb, 1),
                "actors_10k_stop_s": round(stop_s, 3),
                "actors": args.actors,
            }
        )
    )


if __name__ == "__main__":
    main()
