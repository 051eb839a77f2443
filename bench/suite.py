"""The test suite's wall time and the whole machine's CPU, at several worker counts.

    python bench/suite.py [--workers 8 10 12] [--runs 1] [--results bench/RESULTS.md | --no-results]

Runs `python -m pytest -q -n N` from the checkout for each N (`--runs` times each) and reads the
machine's busy and idle CPU time from /proc/stat around each run: on a 2-core machine the suite
is bound by the CPU (daemons, PostgreSQL, simulators and sixteen test workers share it) as much as by
the real time its tests must wait out, and the two numbers say which. Run it on a quiet machine:
anything else running is counted as the suite's CPU.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

from results import command_line, replace_section

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BEGIN, END = "<!-- suite:begin -->", "<!-- suite:end -->"


def cpu_ticks() -> tuple[int, int]:
    """(busy, idle) jiffies of the whole machine since boot."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq + steal, idle + iowait


def one_run(workers: int) -> dict[str, float | str]:
    hz = os.sysconf("SC_CLK_TCK")
    busy0, idle0 = cpu_ticks()
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", str(workers)], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    wall = time.monotonic() - began
    busy1, idle1 = cpu_ticks()
    last = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    said = re.search(r"\sin ([\d.]+)s", last)  # pytest's own count: from its start to its last test's end
    return {"workers": workers, "wall": wall, "pytest": float(said.group(1)) if said else float("nan"),
            "busy": (busy1 - busy0) / hz, "idle": (idle1 - idle0) / hz,
            "outcome": "; ".join([re.sub(r"\s+in [\d.]+s.*$", "", last.strip("= ")),
                                  *(line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR")))])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 10, 12])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args()
    rows = []
    for workers in args.workers:
        for _ in range(args.runs):
            row = one_run(workers)
            rows.append(row)
            print(f"-n {workers}: {row['wall']:.1f} s (pytest: {row['pytest']:.1f} s), machine CPU busy"
                  f" {row['busy']:.1f} s, idle {row['idle']:.1f} s ({row['outcome']})", flush=True)
    if args.no_results:
        return 0
    lines = [BEGIN, f"## Test suite: `{command_line('suite.py')}` ({time.strftime('%Y-%m-%d')})", "",
             f"{os.cpu_count()} cores. Wall time of `python -m pytest -q -n N` (the process's, and pytest's own",
             "count, which leaves out the interpreter's start); the machine's busy and idle CPU seconds over",
             "the same time (/proc/stat).", "",
             "| workers | wall s | pytest s | CPU busy s | CPU idle s | outcome |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['workers']} | {r['wall']:.1f} | {r['pytest']:.1f} | {r['busy']:.1f} | {r['idle']:.1f} | {r['outcome']} |"
              for r in rows]
    for workers in args.workers:
        walls = sorted(float(r["wall"]) for r in rows if r["workers"] == workers)
        lines += ["", f"-n {workers}, {len(walls)} runs: wall {walls[0]:.1f} to {walls[-1]:.1f} s,"
                  f" median {statistics.median(walls):.1f} s."]
    lines += ["", END]
    replace_section(args.results, "\n".join(lines), BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
