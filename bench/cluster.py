"""Cluster benchmark: several daemon processes share the series of one PostgreSQL database.

    python bench/cluster.py [--daemons 3] [--series 3000] [--lease 15] [--rate-limit 100]
                            [--lookback 30] [--url URL] [--results bench/RESULTS.md | --no-results]

Quick run: `python bench/cluster.py --series 300 --lease 3 --no-results`.

The daemons are real processes (`python run.py --config ...`, one config each, `[cluster]
enabled`, node n1..nN, the same `lease`), each against its own simulated Binance on loopback (in
this process; the same markets and candles, with Binance's request-weight budget of 6,000 a
minute each, as daemons on separate hosts have each their own IP's budget; each daemon paces
itself at `--rate-limit` requests/s), and one PostgreSQL database (a throwaway server from
tests/pg.py unless `--url`). Measured:

1. Placement: from launch until every series has a live lease held by the node weighted
   rendezvous puts it on, and runs there (the daemons' health, over their control sockets).
2. Backfill: until every series holds every candle from `--lookback` minutes ago to the last
   closed one.
3. Failover after `kill -9` of the node owning most series: until every one of its series is
   owned by a survivor (a live lease in the database), and until they all run there; also
   which series changed owner (only the dead node's may).
4. Stall: SIGSTOP of another node for longer than the lease, then SIGCONT: until its series are
   owned by the others, and the writes it attempts after waking that the database (or its own
   storage, once it knows) refuses.
5. Exactness: after the faults, every series holds every closed candle exactly once.

Target (the issue): failover after kill -9 within lease + 10 s. Last line on stdout: one JSON
object with every figure. The cluster section of bench/RESULTS.md (between
`<!-- cluster:begin -->` and `<!-- cluster:end -->`) is replaced unless `--no-results`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psycopg
from results import command_line, replace_section

from candlekeeper.actors.placement import rendezvous_owner
from candlekeeper.simulator.server import BinanceSimulator, synthetic_symbols
from candlekeeper.surfaces.control import request

TF = 60_000
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BEGIN, END = "<!-- cluster:begin -->", "<!-- cluster:end -->"
TARGET_MARGIN_S = 10.0  # failover within lease + this


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def wait(predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.1) -> float:
    """Seconds until `predicate` holds (polled); raises on timeout."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
    return time.monotonic() - t0


class Daemon:
    def __init__(self, workdir: str, node: str, url: str, sim: BinanceSimulator, symbols: list[str],
                 start_ms: int, args: argparse.Namespace) -> None:
        self.node = node
        self.socket = os.path.join(workdir, f"{node}.sock")
        self.config = os.path.join(workdir, f"{node}.toml")
        self.logpath = os.path.join(workdir, f"{node}.log")
        with open(self.config, "w") as fh:
            fh.write(f"""
[storage]
url = "{url}"

[cluster]
enabled = true
node = "{node}"
lease = "{args.lease}s"

[control]
socket = "{self.socket}"

[ingest]
since = "{time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start_ms / 1000))}"
poll_interval = "10s"

[exchanges.binance]
symbols = {json.dumps(symbols)}
api_base = "{sim.url}"
rate_limit = {args.rate_limit}
timeout = "10s"
""")
        self.log = open(self.logpath, "w")  # noqa: SIM115 - open for the daemon's life
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "run.py"), "--config", self.config,
                                      "--log-level", "warning"], cwd=workdir, stdout=self.log,
                                     stderr=subprocess.STDOUT, text=True)

    def health(self) -> dict[str, Any] | None:
        try:
            reply = request(self.socket, "health", timeout=30)
        except OSError:
            return None
        return reply.get("result") if reply.get("ok") else None

    def running(self) -> int:
        h = self.health()
        return len(h["series"]) if h else -1

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)

    def wait(self) -> int | None:
        try:
            self.proc.wait(180)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


def leases(url: str) -> dict[str, tuple[str | None, int, bool]]:
    try:
        with psycopg.connect(url) as conn:
            rows = conn.execute("SELECT symbol, owner, token, expires_at > clock_timestamp() FROM leases").fetchall()
    except psycopg.errors.UndefinedTable:
        return {}  # no daemon has created the schema yet
    return {s: (o.partition("#")[0] if o else None, t, live) for s, o, t, live in rows}


def live_owners(url: str) -> dict[str, str | None]:
    return {s: o for s, (o, _, live) in leases(url).items() if live}


def caught_up(url: str, symbols: list[str], start: int) -> bool:
    last_closed = (now_ms() // TF) * TF - TF
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT symbol, min(ts), max(ts), count(*) FROM candles GROUP BY symbol").fetchall()
    got = {s: (lo, hi, n) for s, lo, hi, n in rows}
    return all(s in got and got[s][0] <= start and got[s][1] >= last_closed - TF
               and got[s][2] == (got[s][1] - got[s][0]) // TF + 1 for s in symbols)


def exact(url: str, sim: BinanceSimulator, symbols: list[str], start: int) -> tuple[int, int]:
    """(series exact, candles checked): stored candles from `start` on equal the exchange's."""
    good = checked = 0
    with psycopg.connect(url) as conn:
        for s in symbols:
            rows = conn.execute("SELECT ts, open, high, low, close, volume FROM candles WHERE exchange = 'binance'"
                                " AND symbol = %s AND timeframe = '1m' AND ts >= %s ORDER BY ts", (s, start)).fetchall()
            checked += len(rows)
            if rows and rows == [tuple(c) for c in sim.expected_candles(s, "1m", start, rows[-1][0] + TF)]:
                good += 1
    return good, checked


def run(args: argparse.Namespace) -> dict[str, Any]:
    symbols = synthetic_symbols(args.series)
    nodes = [f"n{i + 1}" for i in range(args.daemons)]
    out: dict[str, Any] = {"daemons": args.daemons, "series": args.series, "lease_s": args.lease,
                           "poll_s": round(args.lease / 3, 3), "rate_limit": args.rate_limit}
    cluster = None
    url = args.url
    if url is None:
        from tests.pg import PgCluster

        cluster = PgCluster()
        cluster.start()
        url = cluster.create_database("ck_cluster_bench")
    workdir = tempfile.mkdtemp(prefix="ckb-", dir="/tmp")
    start = (now_ms() // TF) * TF - args.lookback * TF
    sims = [BinanceSimulator(symbols, history_start_ms=start - 3600_000).start() for _ in nodes]
    sim = sims[0]  # every one serves the same candles
    daemons: dict[str, Daemon] = {}
    try:
        t0 = time.monotonic()
        daemons = {n: Daemon(workdir, n, url, sims[i], symbols, start, args) for i, n in enumerate(nodes)}
        wait(lambda: all(os.path.exists(d.socket) for d in daemons.values()), 300, "daemons up", every=0.1)
        out["up_s"] = round(time.monotonic() - t0, 2)
        placed = {s: rendezvous_owner(("binance", s, "1m"), {n: 1.0 for n in nodes}) for s in symbols}
        wait(lambda: live_owners(url) == placed, 300, "placement", every=0.5)
        out["placement_owned_s"] = round(time.monotonic() - t0, 2)
        wait(lambda: sum(max(0, d.running()) for d in daemons.values()) == len(symbols), 300, "all running", 0.5)
        out["placement_running_s"] = round(time.monotonic() - t0, 2)
        out["shares"] = {n: sum(1 for o in placed.values() if o == n) for n in nodes}
        wait(lambda: caught_up(url, symbols, start), 600, "backfill", every=1.0)
        out["backfill_s"] = round(time.monotonic() - t0, 2)

        # kill -9 the node owning most series
        victim = max(nodes, key=lambda n: out["shares"][n])
        survivors = [n for n in nodes if n != victim]
        placed2 = {s: rendezvous_owner(("binance", s, "1m"), {n: 1.0 for n in survivors}) for s in symbols}
        before = leases(url)
        daemons[victim].proc.send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        daemons[victim].proc.wait(30)
        wait(lambda: live_owners(url) == placed2, 300, "failover: owned", every=0.05)
        out["failover_owned_s"] = round(time.monotonic() - t_kill, 2)
        wait(lambda: sum(max(0, daemons[n].running()) for n in survivors) == len(symbols), 300,
             "failover: running", every=0.2)
        out["failover_running_s"] = round(time.monotonic() - t_kill, 2)
        after = leases(url)
        moved = {s for s in symbols if after[s][1] != before[s][1]}
        out["killed"] = victim
        out["moved"] = len(moved)
        out["moved_only_the_dead_nodes"] = moved == {s for s in symbols if placed[s] == victim}

        # SIGSTOP past the lease, then SIGCONT
        if len(survivors) >= 2:
            stalled = survivors[0]
            rest = survivors[1:]
            placed3 = {s: rendezvous_owner(("binance", s, "1m"), {n: 1.0 for n in rest}) for s in symbols}
            # stopped 1 s before a candle closes: when it wakes, its series have that candle to
            # fetch and write, with the tokens of leases it no longer holds
            time.sleep(max(0.0, (TF - now_ms() % TF) / 1000 - 1.0))
            daemons[stalled].proc.send_signal(signal.SIGSTOP)
            t_stop = time.monotonic()
            wait(lambda: live_owners(url) == placed3, 300, "stall: owned by the others", every=0.05)
            out["stall_owned_s"] = round(time.monotonic() - t_stop, 2)
            daemons[stalled].proc.send_signal(signal.SIGCONT)
            out["stalled"] = stalled
            out["stopped_for_s"] = round(time.monotonic() - t_stop, 2)
            wait(lambda: live_owners(url) == placed2, 300, "stalled node rejoined", every=0.2)
            out["stall_rejoined_s"] = round(time.monotonic() - t_stop, 2)
            h = daemons[stalled].health() or {}
            out["stalled_refused_writes"] = (h.get("cluster") or {}).get("refused_writes")
            out["others_refused_writes"] = sum(((daemons[n].health() or {}).get("cluster") or {})
                                               .get("refused_writes", 0) for n in rest)

        wait(lambda: caught_up(url, symbols, start), 600, "caught up after the faults", every=1.0)
        good, checked = exact(url, sim, symbols, start)
        out["exact_series"] = good
        out["candles_checked"] = checked
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT count(*), count(DISTINCT (symbol, ts)) FROM candles").fetchone()
            assert row is not None
            out["duplicates"] = int(row[0]) - int(row[1])
            version = conn.execute("SHOW server_version").fetchone()
            out["postgresql"] = str(version[0]).split()[0] if version else "?"
    finally:
        for d in daemons.values():
            d.stop()
        out["exit_codes"] = {n: d.wait() for n, d in daemons.items()}
        for one in sims:
            one.stop()
        if cluster is not None:
            cluster.destroy()
    out["target_failover_s"] = args.lease + TARGET_MARGIN_S
    out["failover_met"] = out["failover_owned_s"] <= out["target_failover_s"]
    return out


def section(r: dict[str, Any], command: str) -> str:
    today = dt.date.today().isoformat()
    yes = lambda ok: "yes" if ok else "no"  # noqa: E731
    lines = [
        BEGIN,
        f"## Cluster: `{command}` ({today})",
        "",
        f"{r['daemons']} daemon processes x {r['series']:,} series (1m), each against its own simulated Binance on"
        " loopback (the same candles; each its own",
        f"weight budget, as separate hosts have; each daemon paces itself at {r['rate_limit']} requests/s), one"
        f" PostgreSQL {r.get('postgresql', '?')} (a throwaway server, fsync off),",
        f"`lease = \"{r['lease_s']:g}s\"` (renewed every {r['poll_s']:g} s). Shares placed by weighted rendezvous:"
        f" {', '.join(f'{n} {k:,}' for n, k in r['shares'].items())}.",
        "",
        "| figure | result | target | met |",
        "|---|---|---|---|",
        f"| launch to every daemon's control socket up (3 Python processes starting at once) | {r['up_s']} s | | |",
        f"| launch to every series owned where placed / running there | {r['placement_owned_s']} s / "
        f"{r['placement_running_s']} s | | |",
        f"| launch to backfill complete ({r['series']:,} series) | {r['backfill_s']} s | | |",
        f"| failover after `kill -9` of {r['killed']} ({r['shares'][r['killed']]:,} series): every one owned by a"
        f" survivor | {r['failover_owned_s']} s | <= lease + 10 s = {r['target_failover_s']:g} s |"
        f" {yes(r['failover_met'])} |",
        f"| ... and running there | {r['failover_running_s']} s | | |",
        f"| series that changed owner | {r['moved']:,} (only the dead node's: {yes(r['moved_only_the_dead_nodes'])})"
        " | only the dead node's | " + yes(r["moved_only_the_dead_nodes"]) + " |",
    ]
    if "stall_owned_s" in r:
        lines += [
            f"| SIGSTOP of {r['stalled']}: its series owned by the others | {r['stall_owned_s']} s"
            f" | <= lease + 10 s | {yes(r['stall_owned_s'] <= r['target_failover_s'])} |",
            f"| ... writes it attempted after SIGCONT (a candle closed meanwhile), refused |"
            f" {r['stalled_refused_writes']}"
            f" (the others: {r['others_refused_writes']}) | > 0 | {yes((r['stalled_refused_writes'] or 0) > 0)} |",
            f"| ... rejoined with its share, from the SIGSTOP | {r['stall_rejoined_s']} s | | |",
        ]
    lines += [
        f"| series exact after the faults / candles checked / duplicates | {r['exact_series']:,} of {r['series']:,} /"
        f" {r['candles_checked']:,} / {r['duplicates']} | all / - / 0 |"
        f" {yes(r['exact_series'] == r['series'] and r['duplicates'] == 0)} |",
        "",
        "Failover is bounded by the lease: the dead node's heartbeat and leases expire one lease after its last"
        " renewal (at most a poll before the kill), and each survivor's next round (within one poll, or as soon as"
        " a lease it waits for expires) takes them. Exit codes: "
        + ", ".join(f"{n} {c}" for n, c in r["exit_codes"].items()) + " (the killed one: -9).",
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--daemons", type=int, default=3)
    parser.add_argument("--series", type=int, default=3000)
    parser.add_argument("--lease", type=float, default=15.0, help="seconds ([cluster] lease)")
    parser.add_argument("--rate-limit", type=int, default=100, help="requests/s per daemon")
    parser.add_argument("--lookback", type=int, default=30, help="minutes of backfill")
    parser.add_argument("--url", help="an existing, empty database (default: a throwaway server)")
    parser.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the daemons and the server on the way out
    command = command_line("cluster.py")
    result = run(args)
    text = section(result, command)
    print(text)
    if not args.no_results:
        replace_section(args.results, text, BEGIN, END)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
