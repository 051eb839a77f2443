"""Chaos soak: the real daemon process against five local exchanges, under a seeded storm.

    python bench/soak.py                      # 10 minutes, seed 1
    python bench/soak.py --minutes 3          # a quick check
    python bench/soak.py --seed 7 --no-write  # another schedule; do not touch RESULTS.md

What it does: starts 5 simulated Binance exchanges (20 symbols each) in this process, each with
a Binance WebSocket kline stream simulator sharing its candles (caught-up series take their
candles from the stream, `live = "websocket"`; `--no-stream` for REST polling only), writes a
config for them (with `[control] chaos = true`, the test-only switch that enables the `crash`
command), and runs `python run.py --config ...` as a child process. For `--minutes` it plays a
fault schedule drawn from `--seed` (same seed, same schedule, printed at the start): random
5xx / 429 with Retry-After / 418 bans / resets / stalls / truncated JSON / short reads / trickles at one
exchange, full outages of one exchange at a time, a poisoned symbol, crashes injected into
random actors, `kill -9` of the daemon and a restart, deletion of the SQLite file, its disk full
and its write lock held by another process; and on the streams: dropped connections (RST, close
frames), duplicated, reordered and missed pushes, missed finals, data and silent stalls, a refused
subscription, refused upgrades (503), and connections expiring every few seconds. (Not finals the
exchange revises afterwards: those are the periodic REST audit's, every 2 hours, longer than a
soak.) It then
lifts every fault, waits for the daemon to catch up (`--settle` seconds at most), stops it with
SIGTERM, and checks the store against the exchanges' own history.

The schedule first places one event of every required kind at a seeded random time: each random
fault kind of `candlekeeper.simulator.faults.RANDOM_KINDS` and TRICKLE (an answer sent at 1 byte/s:
only the daemon's whole-request deadline ends it), each `OutageMode` (in disjoint slots, so outages
never overlap), one poison, one crash, one `kill -9`, one deletion of the SQLite file, and two
storage faults from outside the process: the database's filesystem full (the database lives on a
small tmpfs the soak fills to the last byte; needs root) and another process holding `BEGIN
EXCLUSIVE` on it, each for 10-30 s, never near a `kill -9` or a deletion (a daemon started while
its database is full or locked refuses to start, exit 2); the rest is filled with random events
about every 12 s. Faults overlapping at one exchange add up. Before
the storm, a calm phase (`--calm` seconds, no faults) measures the baselines of the same run: the
initial backfill, the RSS after warm-up, the wait for `health`, 429s and restarts.

Figures: candles expected / stored / missing / duplicated / invalid; requests that reached an
exchange while its breaker was open (a request is counted when the two health samples around
its arrival both say "open" with the same opening count, i.e. the breaker provably stayed open
in between, so a probe is never counted; refused connections during a `refuse` outage never
reach the exchange and cannot be counted); 429s received; restarts by kind (summed over
daemon incarnations); peak RSS and its growth over the longest incarnation (leak check); the
longest wait for a `health` reply (a request that times out counts as a wait of at least its
timeout, and as unanswered; a request refused while the daemon is down or restarting counts only
as unanswered); crash commands the daemon refused. Events are reported by action and by kind
(`faults:http_418`, `outage:refuse`, `poison:nulls`, `crash:series`, `kill9`, ...). Its last
stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from candlekeeper.simulator.faults import RANDOM_KINDS, FaultKind, Faults, OutageMode, PoisonKind
from candlekeeper.simulator.server import BinanceSimulator, synthetic_symbols
from candlekeeper.simulator.ws import StallMode, StreamFault, StreamFaults, WsSimulator
from candlekeeper.surfaces.control import request

ROOT = Path(__file__).resolve().parent.parent
TF = 60_000
RESULTS = ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"  # the 10-minute soak; other lengths: `markers`
#: The per-request fault kinds the storm draws: every random kind, and TRICKLE (an answer at
#: 1 byte/s, which only a whole-request deadline ends; opt-in in the simulator).
SOAK_KINDS: tuple[FaultKind, ...] = (*RANDOM_KINDS, FaultKind.TRICKLE)
#: Storage faults from outside the process: the database's filesystem full, another process
#: holding the database's write lock. Never at the same time as a kill -9 or a deletion.
STORAGE_ACTIONS = ("disk_full", "db_lock")
DB_DIR = "db"  # the database's directory: a small tmpfs, so that it can be filled
DB = f"{DB_DIR}/candles.db"
TMPFS_SIZE = "64m"

#: Stream fault kinds (`stream:<kind>` events): the simulator's random kinds drawn per push, and
#: the ones that hold while they last.
STREAM_RATE_KINDS = ("drop_reset", "drop_close", "duplicate", "reorder", "miss", "miss_final")
STREAM_KINDS = (*STREAM_RATE_KINDS, "stall_data", "stall_silent", "refuse", "handshake_503", "expire")


# -- the schedule ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    at: float  # seconds from the start of the storm
    action: str  # faults, outage, poison, crash, kill9, delete_db, disk_full, db_lock
    exchange: str = ""
    detail: str = ""  # fault kind, outage mode, poison kind or symbol, crash target
    duration: float = 0.0
    rate: float = 0.0

    def __str__(self) -> str:
        extra = f" rate={self.rate:.2f}" if self.rate else ""
        span = f" for {self.duration:.0f}s" if self.duration else ""
        return f"t={self.at:6.1f}s {self.action:<9} {self.exchange:<4} {self.detail}{extra}{span}"

    @property
    def kind(self) -> str:
        """`faults:http_418`, `outage:refuse`, `stream:miss_final`, `poison:nulls`, `crash:series`, `kill9`, ..."""
        if self.action in ("faults", "outage"):
            return f"{self.action}:{self.detail}"
        if self.action == "stream":
            return f"stream:{self.detail.partition(':')[0]}"
        if self.action == "poison":
            return f"poison:{self.detail.rpartition(':')[2]}"
        if self.action == "crash":
            return f"crash:{crash_target_kind(self.detail)}"
        return self.action


def crash_target_kind(target: str) -> str:
    if target in ("storage", "health"):
        return target
    if "/series/" in target:
        return "series"
    if target.endswith("/exchange"):
        return "exchange"
    if target.endswith("/stream"):
        return "stream"
    if target.endswith("/series"):
        return "series_supervisor"
    return "exchange_supervisor"


#: Kinds of event every storm of at least `MIN_FULL_S` seconds plays at least once.
REQUIRED_KINDS: tuple[str, ...] = (
    *(f"faults:{k.value}" for k in SOAK_KINDS), *(f"outage:{m.value}" for m in OutageMode),
    "poison", "crash", "kill9", "delete_db", *STORAGE_ACTIONS,
)
STREAM_REQUIRED: tuple[str, ...] = (*(f"stream:{k}" for k in STREAM_KINDS), "crash:stream")
MIN_FULL_S = 180.0


def covers(kinds: set[str], required: str) -> bool:
    """Whether `required` (an exact kind, or a bare action for poison and crash) is among `kinds`."""
    return required in kinds or any(k.startswith(required + ":") for k in kinds)


def kind_counts(events: list[Event]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in events:
        counts[e.kind] = counts.get(e.kind, 0) + 1
    return dict(sorted(counts.items()))


def fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def spanning_a_close(events: list[Event], wall_at_zero: float, after_close: float = 8.0) -> list[Event]:
    """Storage faults moved later (by less than a minute) so that each spans a minute close and
    the writes after it: a caught-up daemon writes only then, so a disk-full or lock fault that
    falls between two closes does not bite (seen in a recorded run). Each stays after the one
    before it, so they never overlap."""
    out, free_at = [], 0.0
    for e in sorted(events, key=lambda e: e.at):
        if e.action in STORAGE_ACTIONS:
            at = max(e.at, free_at)
            close = (wall_at_zero + at) // 60 * 60 + 60  # the first close after it starts
            end = wall_at_zero + at + e.duration
            if end < close + after_close:
                at += close + after_close - end
            e = dataclasses.replace(e, at=at)
            free_at = at + e.duration + 1.0
        out.append(e)
    return out


def schedule(seed: int, seconds: float, exchanges: list[str], symbols: list[str], *,
             streams: bool = True) -> list[Event]:
    """The storm: first one event of every required kind (`REQUIRED_KINDS`, and with `streams`
    `STREAM_REQUIRED`) at a seeded random time, then random ones about every 12 s. Outages never
    overlap (one exchange down at a time; the required ones get disjoint slots, random ones are
    dropped where they would overlap); nothing starts in the first 15 s (let it backfill).
    Stream events are drawn from a generator of their own, so the rest of the schedule of a seed
    is the same with and without them."""
    rng = random.Random(seed)
    srng = random.Random(f"{seed}:stream")
    start, end = 15.0, max(30.0, seconds - 5.0)
    kills = max(1, int(seconds // 300))
    deletions = max(1, int(seconds // 300))

    def random_event(action: str, at: float, kind: str | None = None, duration: float | None = None,
                     rate: float | None = None) -> Event:
        ex = rng.choice(exchanges)
        if action == "faults":
            kind = kind or rng.choice(SOAK_KINDS).value
            drawn, length = rng.uniform(0.05, 0.15), rng.uniform(15, 40)
            return Event(at, action, ex, kind, duration=length if duration is None else duration,
                         rate=drawn if rate is None else rate)
        if action == "outage":
            kind = kind or rng.choice(list(OutageMode)).value
            return Event(at, action, ex, kind, duration=duration if duration is not None else rng.uniform(15, 35))
        if action == "poison":
            kind = rng.choice(list(PoisonKind)).value
            return Event(at, action, ex, f"{rng.choice(symbols)}:{kind}", duration=rng.uniform(20, 50))
        if action == "crash":
            sym = rng.choice(symbols)
            target = rng.choice([f"{ex}/series/{sym}@1m", f"{ex}/series/{sym}@1m", f"{ex}/exchange", ex,
                                 f"{ex}/series", "storage", "health"])
            return Event(at, action, ex, target)
        if action in STORAGE_ACTIONS:
            return Event(at, action, duration=duration if duration is not None else rng.uniform(10, 30))
        return Event(at, action)

    def stream_event(at: float, kind: str | None = None) -> Event:
        """A stream fault at one exchange's stream simulator (a refusal names its symbol)."""
        ex = srng.choice(exchanges)
        kind = kind or srng.choice(STREAM_KINDS)
        detail = f"{kind}:{srng.choice(symbols)}" if kind == "refuse" else kind
        rate = srng.uniform(0.05, 0.3) if kind in STREAM_RATE_KINDS else 0.0
        return Event(at, "stream", ex, detail, duration=srng.uniform(20, 60), rate=rate)

    # 1. required events. Outages: one per mode, each in its own slot of the storm, ending at
    # least 5 s before the next slot starts.
    required: list[Event] = []
    modes = list(OutageMode)
    rng.shuffle(modes)
    slot = (end - start) / len(modes)
    for i, mode in enumerate(modes):
        lo = start + i * slot
        duration = min(rng.uniform(15, 35), max(5.0, slot - 10.0))
        required.append(random_event("outage", rng.uniform(lo, max(lo, lo + slot - duration - 5.0)),
                                     mode.value, duration))
    # random fault kinds. A caught-up exchange polls its series in one burst a second after each
    # minute closes and is silent in between, so a shorter fault can miss every request: these
    # last 65-80 s (spanning a burst) inside the storm, at a high rate (50 %), so each kind is
    # injected, not only scheduled (the report lists any that never was)
    for kind in SOAK_KINDS:
        length = rng.uniform(65, 80)
        required.append(random_event("faults", rng.uniform(start, max(start, end - length)), kind.value,
                                     duration=length, rate=0.5))
    for action in ("poison", "crash"):
        required.append(random_event(action, rng.uniform(start, end)))
    # process-level events in the first 60 % of the run, so the last incarnation is long enough
    # for the leak check
    for _ in range(kills):
        required.append(random_event("kill9", rng.uniform(start, start + (end - start) * 0.6)))
    for _ in range(deletions):
        required.append(random_event("delete_db", rng.uniform(start, start + (end - start) * 0.6)))
    # storage faults after them (each in its own slot of the last 40 %): a daemon started while its
    # database is full or locked refuses to start (exit 2), and a lock taken on a deleted file
    # would create an empty one, so these never meet a kill -9 or a deletion
    slot = (end - start) * 0.4 / len(STORAGE_ACTIONS)
    for i, action in enumerate(STORAGE_ACTIONS):
        lo = start + (end - start) * 0.6 + 15.0 + i * slot
        duration = min(rng.uniform(10, 30), max(5.0, slot - 20.0))
        required.append(random_event(action, rng.uniform(lo, max(lo, lo + slot - duration - 20.0)),
                                     duration=duration))
    if streams:
        for kind in STREAM_KINDS:
            required.append(stream_event(srng.uniform(start, max(start, end - 60.0)), kind))
        ex = srng.choice(exchanges)
        required.append(Event(srng.uniform(start, end), "crash", ex, f"{ex}/stream"))

    # 2. fill the rest at random, as before
    extra: list[Event] = []
    t = start
    while True:
        t += rng.expovariate(1 / 12.0)
        if t >= end:
            break
        extra.append(random_event(rng.choices(["faults", "outage", "poison", "crash", *STORAGE_ACTIONS],
                                              [5, 2, 1, 3, 0.5, 0.5])[0], t))

    if streams:
        t = start
        while True:
            t += srng.expovariate(1 / 30.0)
            if t >= end:
                break
            extra.append(stream_event(t))

    outages = [(e.at, e.at + e.duration + 5.0) for e in required if e.action == "outage"]
    # storage faults: none at once, and none within 20 s of a process event
    stored_windows = [(e.at - 20.0, e.at + e.duration + 20.0) for e in required if e.action in STORAGE_ACTIONS]
    process = [e.at for e in required if e.action in ("kill9", "delete_db")]
    out = list(required)
    for e in sorted(extra, key=lambda e: e.at):
        if e.action == "outage":
            lo, hi = e.at, e.at + e.duration + 5.0
            if any(lo < b and a < hi for a, b in outages):
                continue
            outages.append((lo, hi))
        if e.action in STORAGE_ACTIONS:
            lo, hi = e.at - 20.0, e.at + e.duration + 20.0
            if e.at + e.duration > end or any(lo < b and a < hi for a, b in stored_windows) \
                    or any(lo < t < hi for t in process):
                continue
            stored_windows.append((lo, hi))
        out.append(e)
    out.sort(key=lambda e: e.at)
    if seconds >= MIN_FULL_S:
        kinds = {e.kind for e in out}
        missing = [k for k in (*REQUIRED_KINDS, *(STREAM_REQUIRED if streams else ())) if not covers(kinds, k)]
        assert not missing, f"schedule misses {missing}"
    return out


# -- the daemon ------------------------------------------------------------------------------


class Daemon:
    """`python run.py --config ...` as a child process, restarted like a service manager would."""

    def __init__(self, workdir: Path, config: Path) -> None:
        self.workdir, self.config = workdir, config
        self.socket = str(workdir / "ctl.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        self.incarnation = 0
        self.log = open(workdir / "daemon.log", "ab")  # noqa: SIM115
        self.unexpected_exits: list[int] = []
        self.lock = threading.Lock()

    def start(self) -> None:
        with self.lock:
            self.incarnation += 1
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "run.py"), "--config", str(self.config), "--log-format", "json"],
                cwd=self.workdir, stdout=self.log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.ping():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode} at start; see {self.workdir}/daemon.log")
            time.sleep(0.1)
        raise RuntimeError("daemon did not answer within 60 s")

    def ping(self) -> bool:
        try:
            return bool(request(self.socket, "health", timeout=5).get("ok"))
        except OSError:
            return False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def kill9(self) -> None:
        with self.lock:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def check_alive(self) -> None:
        """A daemon that exited on its own (its root supervisor gave up) is restarted and counted."""
        with self.lock:
            code = self.proc.poll() if self.proc is not None else None
        if code is not None:
            self.unexpected_exits.append(code)
            self.start()

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return -9
        self.log.close()
        return self.proc.returncode


# -- observers -------------------------------------------------------------------------------


@dataclass
class Sample:
    at: float  # wall clock, when the answer came
    sent: float  # wall clock, when it was asked (the state it shows is from in between)
    incarnation: int
    breakers: dict[str, tuple[str, int]]  # exchange -> (state, openings)
    storage_ok: bool = True  # health's storage status


HEALTH_TIMEOUT_S = 10.0


@dataclass
class HealthRequest:
    at: float  # monotonic, when sent
    wait_ms: float | None  # answered: time to the reply; timed out: at least the timeout; else None
    outcome: str  # "answered", "timeout" (no reply in HEALTH_TIMEOUT_S), "down" (refused or closed)


@dataclass
class Observations:
    samples: list[Sample] = field(default_factory=list)
    health: list[HealthRequest] = field(default_factory=list)
    restarts: dict[int, dict[str, int]] = field(default_factory=dict)  # incarnation -> by kind
    rss: dict[int, list[tuple[float, float]]] = field(default_factory=dict)  # incarnation -> [(t, MB)]
    requests: dict[str, list[tuple[float, str]]] = field(default_factory=dict)  # exchange -> (arrival, path)
    last_health: dict[str, Any] = field(default_factory=dict)


def observe(daemon: Daemon, obs: Observations, stop: threading.Event, interval: float = 0.5) -> None:
    """Sample health (and how long it took to answer) and the daemon's RSS."""
    proc: psutil.Process | None = None
    while not stop.wait(interval):
        inc, pid = daemon.incarnation, daemon.pid
        if pid is None:
            continue
        if proc is None or proc.pid != pid:
            try:
                proc = psutil.Process(pid)
            except psutil.NoSuchProcess:
                continue
        try:
            obs.rss.setdefault(inc, []).append((time.monotonic(), proc.memory_info().rss / 2**20))
        except psutil.NoSuchProcess:
            continue
        t0, sent = time.monotonic(), time.time()
        try:
            reply = request(daemon.socket, "health", timeout=HEALTH_TIMEOUT_S)
        except TimeoutError:
            # no answer in its timeout: a wait of at least the timeout (a stall), and unanswered
            waited = max(time.monotonic() - t0, HEALTH_TIMEOUT_S) * 1000
            obs.health.append(HealthRequest(t0, waited, "timeout"))
            continue
        except OSError:
            obs.health.append(HealthRequest(t0, None, "down"))  # daemon down or restarting
            continue
        obs.health.append(HealthRequest(t0, (time.monotonic() - t0) * 1000, "answered"))
        if not reply.get("ok"):
            continue
        health = reply["result"]
        obs.last_health = health
        obs.samples.append(Sample(time.time(), sent, inc, {
            e["name"]: (e.get("breaker", "?"), int(e.get("openings") or 0)) for e in health["exchanges"]
        }, storage_ok=bool((health.get("storage") or {}).get("ok", True))))
        obs.restarts[inc] = dict(health.get("restarts_by_kind", {}))


#: The exchange's heartbeat (its server time): also the probe of a half-open breaker.
HEARTBEAT_PATHS = frozenset({"/api/v3/time", "/api/v3/ping"})


def requests_while_open(obs: Observations, exchange: str, *, heartbeats: bool = False,
                        found: list[str] | None = None) -> int:
    """Requests that arrived after one sample was answered and before the next was asked (< 2 s
    apart, same incarnation), both showing this exchange's breaker open with the same opening
    count: the breaker provably stayed open in between. Candle and market requests, or with
    `heartbeats` only the heartbeats (a half-open breaker's probe is one: its report may reach
    health a moment after it is sent, so these are shown apart, not counted as violations)."""
    samples = obs.samples
    times = [s.at for s in samples]
    count = 0
    for t, path in obs.requests.get(exchange, []):
        if (path in HEARTBEAT_PATHS) != heartbeats:
            continue
        i = bisect.bisect_right(times, t) - 1
        if i < 0 or i + 1 >= len(samples):
            continue
        a, b = samples[i], samples[i + 1]
        if a.incarnation != b.incarnation or b.at - a.at > 2.0 or t >= b.sent:
            continue
        sa, sb = a.breakers.get(exchange), b.breakers.get(exchange)
        if sa and sb and sa[0] == sb[0] == "open" and sa[1] == sb[1]:
            count += 1
            if found is not None:
                found.append(f"{exchange} {path} at {time.strftime('%H:%M:%S', time.gmtime(t))}.{int(t * 1000) % 1000:03d}"
                             f" (open from {a.at - a.sent:.3f}-s-wide sample answered at +{t - a.at:.3f} s"
                             f" to the next asked at +{b.sent - t:.3f} s, openings {sa[1]})")
    return count


# -- checking the store ----------------------------------------------------------------------


def check_store(db: Path, sims: dict[str, BinanceSimulator], symbols: list[str], since: int, cutoff: int,
                stopped_ms: int) -> dict[str, int]:
    """Expected = every candle of every series in [since, cutoff) by the exchange's own history."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        duplicated = conn.execute(
            "SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM candles "
            "GROUP BY exchange, symbol, timeframe, ts HAVING n > 1)"
        ).fetchone()[0]
        expected_n = stored_n = missing = invalid = 0
        for name, sim in sims.items():
            for sym in symbols:
                want = {c[0]: tuple(c[1:]) for c in sim.expected_candles(sym, "1m", since, cutoff)}
                rows = conn.execute(
                    "SELECT ts, open, high, low, close, volume FROM candles "
                    "WHERE exchange = ? AND symbol = ? AND timeframe = '1m'", (name, sym),
                ).fetchall()
                have = {r[0]: tuple(r[1:]) for r in rows if since <= r[0] < cutoff}
                expected_n += len(want)
                stored_n += len(have)
                missing += len(want.keys() - have.keys())
                invalid += sum(1 for ts, v in have.items() if want.get(ts) != v)
                # outside the checked range: only closed candles may be stored
                invalid += sum(1 for r in rows if r[0] >= cutoff and r[0] + TF > stopped_ms)
        known = {(n, s) for n in sims for s in symbols}
        for ex, sym, n in conn.execute("SELECT exchange, symbol, count(*) FROM candles GROUP BY exchange, symbol"):
            if (ex, sym) not in known:
                invalid += n
    finally:
        conn.close()
    return {"expected": expected_n, "stored": stored_n, "missing": missing, "duplicated": duplicated,
            "invalid": invalid}


# -- storage faults from outside the process -------------------------------------------------


class Tmpfs:
    """A small tmpfs mounted where the database lives, so that it can be filled (needs root);
    without it the disk-full events are skipped, and the report says so."""

    def __init__(self, where: Path, size: str = TMPFS_SIZE) -> None:
        self.where = where
        where.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                             check=False, capture_output=True, text=True)
        self.mounted = res.returncode == 0
        self.why = res.stderr.strip()

    def unmount(self) -> None:
        if self.mounted and subprocess.run(["umount", str(self.where)], check=False, capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(self.where)], check=False, capture_output=True)
        self.mounted = False


class Filler:
    """Fills the database's filesystem to the last byte with one file; `release` frees it."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "filler"
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        chunk = b"\0" * 65536
        while chunk:
            try:
                os.write(self.fd, chunk)
            except OSError:  # ENOSPC: smaller pieces until not one byte fits
                chunk = chunk[: len(chunk) // 2]
        os.fsync(self.fd)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            os.remove(self.path)


LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
conn.execute("ROLLBACK")
conn.close()
"""


class Locker:
    """Another process holding ``BEGIN EXCLUSIVE`` on the database until `release`."""

    def __init__(self, db: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", LOCKER, str(db)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.held = self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the run ---------------------------------------------------------------------------------


def write_config(workdir: Path, sims: dict[str, BinanceSimulator], symbols: list[str], since: int,
                 rate: int, streams: dict[str, WsSimulator]) -> Path:
    lines = [
        "[storage]", f'path = "{DB}"', "",
        "[control]", 'socket = "ctl.sock"', "chaos = true  # test-only: enables the crash command", "",
        "[ingest]", f'since = "{time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since / 1000))}"',
        'poll_interval = "5s"', "",
        "[resilience]", "retry_attempts = 3", 'retry_base_delay = "200ms"', 'retry_max_delay = "5s"',
        "breaker_threshold = 5", 'breaker_recovery = "3s"', "quarantine_after = 3", "",
    ]
    for name, sim in sims.items():
        lines += [f"[exchanges.{name}]", 'exchange = "binance"', f'api_base = "{sim.url}"',
                  f"symbols = {json.dumps(symbols)}", f"rate_limit = {rate}", 'timeout = "2s"']
        if name in streams:
            lines += ['live = "websocket"', f'ws_url = "{streams[name].ws_base}"']
        lines += [""]
    path = workdir / "soak.toml"
    path.write_text("\n".join(lines))
    return path


def caught_up(health: dict[str, Any], newest_closed: int, n_series: int) -> bool:
    series = health.get("series", [])
    return (
        len(series) == n_series
        and all(e.get("breaker") == "closed" for e in health.get("exchanges", []))
        and all(s["status"] == "ok" and (s.get("last_ts") or 0) >= newest_closed for s in series)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="length of the storm (default 10)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--exchanges", type=int, default=5)
    p.add_argument("--symbols", type=int, default=20)
    p.add_argument("--lookback-hours", type=float, default=6.0, help="history to backfill (default 6 h)")
    p.add_argument("--rate", type=int, default=50, help="requests/s each exchange admits (and the daemon's rate_limit)")
    p.add_argument("--settle", type=float, default=240.0, help="max seconds to catch up after the storm")
    p.add_argument("--calm", type=float, default=20.0,
                   help="seconds without faults before the storm, for the same-run baselines (default 20)")
    p.add_argument("--workdir", help="keep files here (default: a temporary directory)")
    p.add_argument("--no-stream", action="store_true", help="REST polling only: no WebSocket streams, no stream faults")
    p.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = p.parse_args()
    if args.minutes <= 0 or args.exchanges < 1 or args.symbols < 1 or args.calm < 0:
        p.error("--minutes, --exchanges and --symbols must be positive, --calm not negative")

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ck-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tmpfs = Tmpfs(workdir / DB_DIR)
    if not tmpfs.mounted:
        print(f"no tmpfs for the database ({tmpfs.why or 'mount failed'}; needs root): disk-full events skipped")
    seconds = args.minutes * 60
    names = [f"ex{i}" for i in range(args.exchanges)]
    symbols = synthetic_symbols(args.symbols)
    since = (int(time.time() * 1000) // TF) * TF - int(args.lookback_hours * 3600_000)
    streaming = not args.no_stream
    events = schedule(args.seed, seconds, names, symbols, streams=streaming)
    print(f"soak: {args.minutes:g} min, seed {args.seed}, {len(names)} exchanges x {len(symbols)} symbols, "
          f"workdir {workdir}")
    print(f"schedule ({len(events)} events):")
    for e in events:
        print("  ", e)
    print(f"schedule by kind: {fmt_counts(kind_counts(events))}")
    sys.stdout.flush()

    obs = Observations()
    base = {name: Faults(seed=args.seed * 100 + i, rate_limit_per_s=args.rate) for i, name in enumerate(names)}
    sims: dict[str, BinanceSimulator] = {}
    for i, name in enumerate(names):
        arrivals = obs.requests.setdefault(name, [])
        sims[name] = BinanceSimulator(symbols, name=name, seed=i, history_start_ms=since - 3600_000,
                                      faults=base[name],
                                      on_request=lambda path, *_, a=arrivals: a.append((time.time(), path))).start()
    wss: dict[str, WsSimulator] = {}
    if streaming:
        for name, sim in sims.items():
            wss[name] = WsSimulator.sharing(sim, "binance", serve_markets=False, update_period_s=2.0,
                                            prompt_finals=True).start()
    config = write_config(workdir, sims, symbols, since, args.rate, wss)
    daemon = Daemon(workdir, config)
    stop_observing = threading.Event()
    started = time.monotonic()
    daemon.start()
    observer = threading.Thread(target=observe, args=(daemon, obs, stop_observing), daemon=True)
    observer.start()

    # the calm phase: no faults, the same-run baselines (initial backfill, RSS after warm-up,
    # health waits, 429s, restarts)
    print(f"calm phase: {args.calm:g} s without faults (baselines)", flush=True)
    calm_start = time.monotonic()
    backfill_s: float | None = None
    while (left := calm_start + args.calm - time.monotonic()) > 0:
        time.sleep(min(0.5, left))
        daemon.check_alive()
        newest_closed = (int(time.time() * 1000) // TF) * TF - TF
        if backfill_s is None and caught_up(obs.last_health, newest_closed, len(names) * len(symbols)):
            backfill_s = time.monotonic() - started
    calm_end = time.monotonic()
    calm_rss = [mb for _, mb in obs.rss.get(1, [])][-5:]
    calm_stats = [sim.stats() for sim in sims.values()]
    calm_restarts = dict(obs.restarts.get(1, {}))

    events = spanning_a_close(events, time.time())
    timeline: list[tuple[float, str, Any]] = []  # (when, "start"|"end", event)
    for e in events:
        timeline.append((e.at, "start", e))
        if e.duration:
            timeline.append((e.at + e.duration, "end", e))
    timeline.sort(key=lambda x: x[0])
    # what is active at each exchange, by the event that started it: overlapping faults add up
    # (scaled down if they would sum above 1), so one event never cuts another short
    active: dict[str, dict[str, Any]] = {n: {"rates": {}, "outage": None, "poisoned": {}, "stream": {}} for n in names}
    counts: dict[str, int] = {}
    counts_by_kind: dict[str, int] = {}
    crash_refusals: list[str] = []
    crash_commands = 0

    def apply(name: str) -> None:
        a = active[name]
        rates: dict[FaultKind, float] = {}
        for kind, rate in a["rates"].values():
            rates[FaultKind(kind)] = rates.get(FaultKind(kind), 0.0) + rate
        total = sum(rates.values())
        if total > 0.9:
            rates = {k: v * 0.9 / total for k, v in rates.items()}
        poisoned = dict(a["poisoned"].values())
        f = dataclasses.replace(base[name], rates=rates, outage=a["outage"], poisoned=poisoned)
        sims[name].set_faults(f)
        if name in wss:
            apply_stream(name)

    def apply_stream(name: str) -> None:
        """The stream faults active at one exchange, added up as `apply` does."""
        kinds = list(active[name]["stream"].values())
        srates: dict[StreamFault, float] = {}
        for kind, rate in kinds:
            if kind in STREAM_RATE_KINDS:
                srates[StreamFault(kind)] = srates.get(StreamFault(kind), 0.0) + rate
        total = sum(srates.values())
        if total > 0.9:
            srates = {k: v * 0.9 / total for k, v in srates.items()}
        stall = next((StallMode.SILENT for k, _ in kinds if k == "stall_silent"),
                     next((StallMode.DATA for k, _ in kinds if k == "stall_data"), None))
        refuse = frozenset(k.partition(":")[2] for k, _ in kinds if k.startswith("refuse:"))
        handshake = 503 if any(k == "handshake_503" for k, _ in kinds) else None
        wss[name].set_faults(StreamFaults(srates, seed=args.seed * 100 + names.index(name), stall=stall,
                                          refuse=refuse, handshake_status=handshake))
        wss[name].update_rules(max_age_s=5.0 if any(k == "expire" for k, _ in kinds) else None)

    fillers: dict[int, Filler] = {}
    lockers: dict[int, Locker] = {}
    storage_skipped: list[str] = []

    def release_storage() -> None:
        for held in fillers.values():
            held.release()
        for lock in lockers.values():
            lock.release()
        fillers.clear()
        lockers.clear()

    t0 = time.monotonic()
    try:
        for at, phase, e in timeline:
            while (wait := t0 + min(at, seconds) - time.monotonic()) > 0:
                time.sleep(min(wait, 1.0))
                daemon.check_alive()
            if at > seconds:
                break
            if phase == "start":
                counts[e.action] = counts.get(e.action, 0) + 1
                counts_by_kind[e.kind] = counts_by_kind.get(e.kind, 0) + 1
                print(f"[{time.monotonic() - t0:6.1f}s] {e}", flush=True)
            if e.action == "faults":
                if phase == "start":
                    active[e.exchange]["rates"][id(e)] = (e.detail, e.rate)
                else:
                    active[e.exchange]["rates"].pop(id(e), None)
                apply(e.exchange)
            elif e.action == "outage":
                active[e.exchange]["outage"] = OutageMode(e.detail) if phase == "start" else None
                apply(e.exchange)
            elif e.action == "stream":
                if phase == "start":
                    active[e.exchange]["stream"][id(e)] = (e.detail, e.rate)
                else:
                    active[e.exchange]["stream"].pop(id(e), None)
                apply_stream(e.exchange)
            elif e.action == "poison":
                sym, _, kind = e.detail.rpartition(":")
                sym_id = sym.replace("/", "").upper()
                if phase == "start":
                    active[e.exchange]["poisoned"][id(e)] = (sym_id, PoisonKind(kind))
                else:
                    active[e.exchange]["poisoned"].pop(id(e), None)
                apply(e.exchange)
            elif e.action == "crash":
                crash_commands += 1
                try:
                    reply = request(daemon.socket, "crash", target=e.detail, timeout=10)
                    if not reply.get("ok"):
                        crash_refusals.append(f"{e.detail}: {reply.get('error')}")
                except OSError as exc:
                    crash_refusals.append(f"{e.detail}: {exc}")
            elif e.action == "kill9":
                daemon.kill9()
                daemon.start()
            elif e.action == "delete_db":
                for suffix in ("", "-wal", "-shm"):
                    try:
                        os.unlink(workdir / f"{DB}{suffix}")
                    except FileNotFoundError:
                        pass
            elif e.action == "disk_full":
                if phase == "end":
                    held = fillers.pop(id(e), None)
                    if held is not None:
                        held.release()
                elif tmpfs.mounted:
                    fillers[id(e)] = Filler(workdir / DB_DIR)
                else:
                    storage_skipped.append(e.kind)
            elif e.action == "db_lock":
                if phase == "end":
                    lock = lockers.pop(id(e), None)
                    if lock is not None:
                        lock.release()
                else:
                    lock = Locker(workdir / DB)
                    lockers[id(e)] = lock
                    if not lock.held:
                        storage_skipped.append(e.kind)
        while time.monotonic() < t0 + seconds:
            time.sleep(min(1.0, t0 + seconds - time.monotonic()))
            daemon.check_alive()

        # the storm is over: lift every fault, let the daemon catch up, stop it
        for name in names:
            sims[name].set_faults(base[name])
            if name in wss:
                wss[name].set_faults(StreamFaults())
                wss[name].update_rules(max_age_s=None)
        release_storage()
        storm_end = time.monotonic()
        settled = False
        cutoff = 0
        while time.monotonic() - storm_end < args.settle:
            daemon.check_alive()
            newest_closed = (int(time.time() * 1000) // TF) * TF - TF
            try:
                health = request(daemon.socket, "health", timeout=10)["result"]
            except (OSError, KeyError):
                time.sleep(1)
                continue
            if caught_up(health, newest_closed, len(names) * len(symbols)):
                # health says caught up; the store must agree (a recreated store refills later)
                try:
                    done = check_store(workdir / DB, sims, symbols, since, newest_closed + TF,
                                       int(time.time() * 1000))["missing"] == 0
                except sqlite3.Error:
                    done = False
                if done:
                    settled, cutoff = True, newest_closed + TF
                    break
            time.sleep(1)
        settle_s = time.monotonic() - storm_end
        if not settled:
            cutoff = (int(time.time() * 1000) // TF) * TF - TF  # check what should be there by now
        stop_observing.set()
        observer.join(15)
        exit_code = daemon.stop()
        stopped_ms = int(time.time() * 1000)
        store = check_store(workdir / DB, sims, symbols, since, cutoff, stopped_ms)
    finally:
        stop_observing.set()
        release_storage()
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
        for ws in wss.values():
            ws.stop()
        for sim in sims.values():
            sim.stop()
        if (workdir / DB).exists():
            shutil.copy2(workdir / DB, workdir / "candles-final.db")  # the tmpfs goes with the unmount
        tmpfs.unmount()

    stats = [sim.stats() for sim in sims.values()]
    injected_429 = sum(s.by_fault.get(FaultKind.HTTP_429, 0) for s in stats)
    limiter_429 = sum(s.by_fault.get(FaultKind.RATE_LIMIT, 0) for s in stats)
    restarts: dict[str, int] = {}
    for by_kind in obs.restarts.values():
        for kind, n in by_kind.items():
            restarts[kind] = restarts.get(kind, 0) + n
    peak_rss = max((mb for series in obs.rss.values() for _, mb in series), default=0.0)
    longest = max(obs.rss.values(), key=len, default=[])
    growth = leak_growth(longest)
    health_ms = sorted(h.wait_ms for h in obs.health if h.wait_ms is not None)
    calm_health = [h for h in obs.health if h.at < calm_end]
    calm_ms = sorted(h.wait_ms for h in calm_health if h.wait_ms is not None)
    while_open: list[str] = []
    injected: dict[str, int] = {}
    for st in stats:
        for kind, n in st.by_fault.items():
            if kind in SOAK_KINDS:
                injected[kind.value] = injected.get(kind.value, 0) + n
    stream_injected: dict[str, int] = {}
    for ws in wss.values():
        for kind, n in ws.stats().faults.items():
            stream_injected[kind.value] = stream_injected.get(kind.value, 0) + n
    calm_injected_429 = sum(s.by_fault.get(FaultKind.HTTP_429, 0) for s in calm_stats)
    calm_limiter_429 = sum(s.by_fault.get(FaultKind.RATE_LIMIT, 0) for s in calm_stats)
    result = {
        **store,
        "seed": args.seed,
        "minutes": args.minutes,
        "events": counts,
        "events_by_kind": dict(sorted(counts_by_kind.items())),
        "faults_injected": dict(sorted(injected.items())),
        "faults_never_injected": sorted({k.partition(":")[2] for k in counts_by_kind if k.startswith("faults:")}
                                        - set(injected)),
        "streams": streaming,
        "stream_faults_injected": dict(sorted(stream_injected.items())),
        "stream_reconnects": sum((e.get("stream") or {}).get("reconnects", 0)
                                 for e in obs.last_health.get("exchanges", [])),
        "crash_commands": crash_commands,
        "crash_refusals": len(crash_refusals),
        "settled": settled,
        "settle_s": round(settle_s, 1),
        "daemon_exit_code": exit_code,
        "unexpected_exits": daemon.unexpected_exits,
        "incarnations": daemon.incarnation,
        "requests_total": sum(s.total for s in stats),
        "requests_while_open": {n: requests_while_open(obs, n, found=while_open) for n in names},
        "requests_while_open_seen": while_open[:20],
        "heartbeats_while_open": {n: requests_while_open(obs, n, heartbeats=True) for n in names},
        "breaker_openings_seen": sum(
            max((s.breakers.get(n, ("", 0))[1] for s in obs.samples if s.incarnation == inc), default=0)
            for n in names for inc in {s.incarnation for s in obs.samples}
        ),
        "http_429_received": injected_429 + limiter_429,
        "http_429_injected": injected_429,
        "http_429_rate_limiter": limiter_429,
        "http_418_received": sum(s.http_418 for s in stats),
        "storage_failing_samples": sum(1 for smp in obs.samples if not smp.storage_ok),
        "storage_faults_skipped": storage_skipped,
        "storage_log": log_counts(workdir / "daemon.log", ("storage_failing", "storage_recovered",
                                                           "store_write_failed", "candles_corrected")),
        "restarts_by_kind": restarts,
        "peak_rss_mb": round(peak_rss, 1),
        "rss_growth_pct_longest_incarnation": growth,
        "health_requests": len(health_ms),  # waits measured: answered, or timed out (as >= the timeout)
        "health_max_ms": round(health_ms[-1], 1) if health_ms else None,
        "health_p99_ms": quantile(health_ms, 0.99),
        "health_p50_ms": quantile(health_ms, 0.50),
        "health_failures": sum(1 for h in obs.health if h.outcome != "answered"),  # unanswered
        "health_timeouts": sum(1 for h in obs.health if h.outcome == "timeout"),
        "health_timeout_s": HEALTH_TIMEOUT_S,
        "baseline": {  # the calm phase before the storm, same run
            "calm_s": args.calm,
            "backfill_caught_up_s": round(backfill_s, 1) if backfill_s is not None else None,
            "rss_mb": round(sorted(calm_rss)[len(calm_rss) // 2], 1) if calm_rss else None,
            "health_requests": len(calm_ms),
            "health_max_ms": round(calm_ms[-1], 1) if calm_ms else None,
            "health_p99_ms": quantile(calm_ms, 0.99),
            "health_p50_ms": quantile(calm_ms, 0.50),
            "health_failures": sum(1 for h in calm_health if h.outcome != "answered"),
            "http_429_received": calm_injected_429 + calm_limiter_429,
            "http_429_rate_limiter": calm_limiter_429,
            "restarts_by_kind": calm_restarts,
        },
        "workdir": str(workdir),
    }
    report(result, crash_refusals, args)
    section = write_results(result, crash_refusals, args)
    if args.no_write:
        (workdir / "RESULTS-section.md").write_text(section + "\n")
        print(f"RESULTS.md section (not written, --no-write): {workdir / 'RESULTS-section.md'}")
    else:
        update_results(section, args.minutes)
    print(json.dumps(result))


def log_counts(log: Path, events: tuple[str, ...]) -> dict[str, int]:
    """How many log lines of each event the daemon wrote (its JSON lines, every incarnation)."""
    counts = dict.fromkeys(events, 0)
    try:
        with open(log, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if '"event"' not in line:
                    continue
                try:
                    event = json.loads(line).get("event")
                except ValueError:
                    continue
                if event in counts:
                    counts[event] += 1
    except OSError:
        pass
    return counts


def quantile(sorted_ms: list[float], q: float) -> float | None:
    if not sorted_ms:
        return None
    return round(sorted_ms[min(len(sorted_ms) - 1, max(0, math.ceil(q * len(sorted_ms)) - 1))], 1)


def leak_growth(samples: list[tuple[float, float]]) -> float | None:
    """RSS growth (%) from the first to the last third of an incarnation, after a warm-up third."""
    if len(samples) < 60:
        return None
    body = samples[len(samples) // 3 :]
    k = max(1, len(body) // 3)
    first = sorted(mb for _, mb in body[:k])[k // 2]
    last = sorted(mb for _, mb in body[-k:])[k // 2]
    return round(100.0 * (last - first) / first, 1)


def health_figure(max_ms: float | None, p99: float | None, p50: float | None) -> str:
    if max_ms is None:
        return "n/a"
    return f"{max_ms} ms (p99 {p99} ms, p50 {p50} ms)"


def unanswered_figure(r: dict[str, Any]) -> str:
    n, timeouts = r["health_failures"], r["health_timeouts"]
    return (f"{n} ({timeouts} timed out after {r['health_timeout_s']:g} s, counted as waits; "
            f"{n - timeouts} while the daemon was down or restarting)")


def report(r: dict[str, Any], crash_refusals: list[str], args: argparse.Namespace) -> None:
    b = r["baseline"]
    print()
    print(f"candles: expected {r['expected']}, stored {r['stored']}, missing {r['missing']}, "
          f"duplicated {r['duplicated']}, invalid {r['invalid']}")
    print(f"settled: {r['settled']} in {r['settle_s']} s; daemon exit code {r['daemon_exit_code']}; "
          f"incarnations {r['incarnations']}; unexpected exits {r['unexpected_exits']}")
    print(f"requests: {r['requests_total']}; while breaker open: {r['requests_while_open']} (heartbeats, the "
          f"probes among them: {r['heartbeats_while_open']}); breaker openings seen: {r['breaker_openings_seen']}")
    print(f"429s: {r['http_429_received']} (injected {r['http_429_injected']}, "
          f"server rate limiter {r['http_429_rate_limiter']}); 418s: {r['http_418_received']}")
    print(f"restarts by kind: {r['restarts_by_kind']}; events: {r['events']}")
    print(f"events played by kind: {fmt_counts(r['events_by_kind'])}")
    print(f"storage: failing in {r['storage_failing_samples']} health samples; daemon log: "
          f"{fmt_counts(r['storage_log'])}" + (f"; skipped: {', '.join(r['storage_faults_skipped'])}"
                                               if r["storage_faults_skipped"] else ""))
    print(f"random faults injected by the exchanges (requests): {fmt_counts(r['faults_injected'])}")
    if r["streams"]:
        print(f"stream faults the stream simulators counted: {fmt_counts(r['stream_faults_injected'])}; "
              f"stream reconnects (last incarnation): {r['stream_reconnects']}")
    if r["faults_never_injected"]:
        print(f"scheduled but never injected (no request drew them): {', '.join(r['faults_never_injected'])}")
    print(f"RSS peak {r['peak_rss_mb']} MB, growth over the longest incarnation {r['rss_growth_pct_longest_incarnation']} %")
    print(f"health: {r['health_requests']} waits, max {health_figure(r['health_max_ms'], r['health_p99_ms'], r['health_p50_ms'])}; "
          f"unanswered {unanswered_figure(r)}")
    print(f"crash commands: {r['crash_commands']}, refused {r['crash_refusals']}")
    for line in crash_refusals:
        print("crash refused:", line)
    print(f"baseline (calm phase, {b['calm_s']:g} s before the storm): initial backfill caught up in "
          f"{b['backfill_caught_up_s']} s; RSS after warm-up {b['rss_mb']} MB; health {b['health_requests']} waits, "
          f"max {health_figure(b['health_max_ms'], b['health_p99_ms'], b['health_p50_ms'])}, unanswered "
          f"{b['health_failures']}; 429s {b['http_429_received']} (limiter {b['http_429_rate_limiter']}); "
          f"restarts {b['restarts_by_kind'] or 'none'}")


def write_results(r: dict[str, Any], crash_refusals: list[str], args: argparse.Namespace) -> str:
    """The RESULTS.md section for this run."""
    exact = r["missing"] == 0 and r["duplicated"] == 0 and r["invalid"] == 0
    open_reqs = sum(r["requests_while_open"].values())
    growth = r["rss_growth_pct_longest_incarnation"]
    b = r["baseline"]
    calm = "calm phase"
    backfill = (f"initial backfill: caught up {b['backfill_caught_up_s']} s after start" if b["backfill_caught_up_s"]
                is not None else f"initial backfill: not caught up within the {calm}")
    refused = f"{r['crash_refusals']} of {r['crash_commands']}"
    if crash_refusals:
        refused += " (" + "; ".join(x.replace("|", "/") for x in crash_refusals) + ")"
    cmd = f"python bench/soak.py --minutes {args.minutes:g} --seed {args.seed}"
    begin, end = markers(args.minutes)
    section = f"""{begin}
## Chaos soak: `{cmd}` ({time.strftime("%Y-%m-%d")})

{args.exchanges} exchanges × {args.symbols} symbols, 1m candles, {args.lookback_hours:g} h of history, the daemon as a
real process with `rate_limit = {args.rate}` against exchanges admitting {args.rate} requests/s. Baselines come
from a {args.calm:g} s calm phase (no faults) before the storm, in the same run. Events played:
{fmt_counts(r["events"])}.
By kind: {fmt_counts(r["events_by_kind"])}.
Random faults injected by the exchanges (requests): {fmt_counts(r["faults_injected"])}{
"; scheduled but never drawn by a request: " + ", ".join(r["faults_never_injected"]) if r["faults_never_injected"] else ""}.
{stream_line(r)}

| figure | result | baseline (same run) | target | met |
|---|---|---|---|---|
| candles expected / stored | {r["expected"]} / {r["stored"]} | – | equal | {"yes" if r["expected"] == r["stored"] else "**no**"} |
| missing / duplicated / invalid | {r["missing"]} / {r["duplicated"]} / {r["invalid"]} | – | 0 / 0 / 0 | {"yes" if exact else "**no**"} |
| caught up after the storm | {"yes" if r["settled"] else "no"}, in {r["settle_s"]} s | {backfill} | yes | {"yes" if r["settled"] else "**no**"} |
| candle and market requests reaching an exchange while its breaker was open | {open_reqs} (openings seen: {r["breaker_openings_seen"]}; heartbeats, a half-open breaker's probe among them, seen while health still said open: {sum(r["heartbeats_while_open"].values())}) | – | 0 | {"yes" if open_reqs == 0 else "**no**"} |
| 429s received | {r["http_429_received"]}: {r["http_429_injected"]} injected, {r["http_429_rate_limiter"]} from the server's limiter | {calm}: {b["http_429_received"]}, {b["http_429_rate_limiter"]} from the limiter | limiter: 0 | {"yes" if r["http_429_rate_limiter"] == 0 else "**no**"} |
| restarts by kind | {fmt_counts(r["restarts_by_kind"])} | {calm}: {fmt_counts(b["restarts_by_kind"])} | | |
| storage faults (disk full, database locked by another process) | storage failing in {r["storage_failing_samples"]} health samples (every 0.5 s); log lines: {fmt_counts(r["storage_log"])}{"; skipped: " + ", ".join(r["storage_faults_skipped"]) if r["storage_faults_skipped"] else ""} | – | recovered by itself, store exact | {"yes" if exact and r["settled"] and not r["storage_faults_skipped"] else "**no**"} |
| daemon incarnations (kill -9 restarts) / unexpected exits | {r["incarnations"]} / {len(r["unexpected_exits"])} | – | – / 0 | {"yes" if not r["unexpected_exits"] else "**no**"} |
| peak RSS | {r["peak_rss_mb"]} MB | after warm-up (end of the {calm}): {b["rss_mb"]} MB | | |
| RSS growth, longest incarnation (after warm-up) | {growth if growth is not None else "n/a (too short)"} % | – | < 10 % | {"n/a" if growth is None else ("yes" if growth < 10 else "**no**")} |
| longest wait for `health` (a timeout counts as ≥ {r["health_timeout_s"]:g} s) | {health_figure(r["health_max_ms"], r["health_p99_ms"], r["health_p50_ms"])} | {calm}: {health_figure(b["health_max_ms"], b["health_p99_ms"], b["health_p50_ms"])} | < 1000 ms | {"yes" if (r["health_max_ms"] or 0) < 1000 else "**no**"} |
| `health` requests unanswered | {unanswered_figure(r)} | {calm}: {b["health_failures"]} | | |
| crash commands refused | {refused} | – | | |
| clean exit on SIGTERM | exit code {r["daemon_exit_code"]} | – | 0 | {"yes" if r["daemon_exit_code"] == 0 else "**no**"} |

Last line of its output: `{json.dumps({k: r[k] for k in ("expected", "stored", "missing", "duplicated", "invalid")})}`
{end}"""
    return section


def stream_line(r: dict[str, Any]) -> str:
    if not r["streams"]:
        return "REST polling only (`--no-stream`): no WebSocket streams."
    return (f"Caught-up series take their candles from a WebSocket stream per exchange (`live = \"websocket\"`); "
            f"stream faults counted by the stream simulators: {fmt_counts(r['stream_faults_injected'])}; "
            f"stream reconnects in the last daemon incarnation: {r['stream_reconnects']}.")


def markers(minutes: float) -> tuple[str, str]:
    """The RESULTS.md markers of a soak of this length: each length keeps its own section."""
    if minutes == 10:
        return BEGIN, END
    return f"<!-- soak-{minutes:g}m:begin -->", f"<!-- soak-{minutes:g}m:end -->"


def update_results(section: str, minutes: float = 10) -> None:
    begin, end = markers(minutes)
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
