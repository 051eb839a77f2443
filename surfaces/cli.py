"""The `candlekeeper` command (also `python run.py`, `python -m candlekeeper`): the daemon,
`--simulate`, the `ctl` client, `export` (data out of the store) and `backfill` (one shot).
Exit codes: 0 ok, 1 refused command, an incomplete backfill or the root supervisor gave up, 2
usage, config or start-up error (one line on stderr)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from datetime import UTC
from typing import Any, NoReturn

import structlog

from ..app import config as config_mod
from ..app.config import Config, ConfigError, parse_host_port
from ..supervisors.heap import HeapKeeper

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line and exit 2, argparse's convention
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="candlekeeper", description="candlekeeper: OHLCV ingestion that never loses a candle")
    p.add_argument("--config", help="TOML config file (default: built-in defaults)")
    p.add_argument("--simulate", action="store_true", help="run against a local simulated exchange, faults included")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["json", "console"], help="default: json unless stderr is a terminal")
    sub = p.add_subparsers(dest="command")
    ctl = sub.add_parser("ctl", help="talk to a running daemon")
    ctl.add_argument("--config", dest="ctl_config",
                     help="find the socket in this config (default: the --config given before ctl)")
    ctl.add_argument("--socket", help="control socket path, or tcp://HOST:PORT for the TCP listener")
    ctl.add_argument("--token", default=os.environ.get("CANDLEKEEPER_TOKEN"),
                     help="token for a TCP control listener (--socket tcp://HOST:PORT); default $CANDLEKEEPER_TOKEN")
    ctl.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ctl.add_argument("-n", type=int, default=1, help="latest: how many candles, 1-1000 (default 1)")
    ctl.add_argument("--reason", help="accept-gap: why, for the log line (default: operator)")
    ctl.add_argument("cmd", choices=CTL_COMMANDS)
    ctl.add_argument("target", nargs="?", help="EXCHANGE[:SYMBOL[@TIMEFRAME]] (reset, pause, resume, add, remove, "
                                               "latest, coverage, accept-gap) or an actor path (restart, crash)")
    ctl.add_argument("times", nargs="*", metavar="FROM TO",
                     help="accept-gap: the stretch, ISO 8601 (UTC unless stated) or epoch ms; TO exclusive")

    ex = sub.add_parser("export", help="write stored candles to CSV, JSON lines, Parquet or freqtrade's files",
                        description="Read candles straight from the database (read-only: the daemon may run "
                                    "or not) and write them out, streaming: memory stays constant.")
    ex.add_argument("target", help="EXCHANGE:SYMBOL[@TIMEFRAME] (TF default 1m); with --layout freqtrade also "
                                   "EXCHANGE or EXCHANGE:SYMBOL (every matching series, one file each)")
    ex.add_argument("--config", dest="sub_config", help="read the database this config names")
    ex.add_argument("--db", help="the database file (default: [storage] path of the config)")
    ex.add_argument("--since", help="first open time: ISO 8601 (UTC unless stated), epoch ms, or a duration "
                                    "ago such as 30d (default: the first stored candle)")
    ex.add_argument("--until", help="end, exclusive, same forms (default: everything stored)")
    ex.add_argument("--format", choices=["csv", "json", "parquet", "feather"],
                    help="csv, json (JSON lines), parquet; feather only with --layout freqtrade "
                         "(default: csv, or feather for freqtrade)")
    ex.add_argument("--layout", choices=["plain", "freqtrade"], default="plain",
                    help="freqtrade: <PAIR>-<tf>.feather/.parquet with date,open,high,low,close,volume in "
                         "the directory -o (freqtrade's user_data/data/<exchange>)")
    ex.add_argument("-o", "--output", help="output file (default: stdout; parquet needs a file), or the "
                                           "directory for --layout freqtrade")

    bf = sub.add_parser("backfill", help="fetch everything up to --until (or now), then exit",
                        description="Run the same tree until every series holds every closed candle the "
                                    "exchange serves up to --until (or now), then exit 0; 1 when some series "
                                    "could not be completed (listed).")
    bf.add_argument("--config", dest="sub_config", help="TOML config file (default: the one before backfill)")
    bf.add_argument("--since", help="backfill from here (ISO 8601, epoch ms, or a duration ago such as 30d); "
                                    "default: the config's since/lookback")
    bf.add_argument("--until", help="complete up to here, exclusive (same forms; default: now)")
    bf.add_argument("--stall", default="10m",
                    help="give up on a series that makes no progress for this long (default 10m)")
    bf.add_argument("--progress", choices=["auto", "bars", "lines"], default="auto",
                    help="bars on a terminal, else one line per exchange every 10 s (auto)")
    return p


CTL_COMMANDS = ["health", "tree", "top", "coverage", "reset", "pause", "resume", "restart", "add", "remove", "latest",
                "accept-gap", "shutdown", "crash", "cluster"]
NEEDS_SERIES = ("add", "remove", "latest", "accept-gap")


def main(argv: list[str] | None = None) -> int:
    """The command line; a closed stdout (`| head`) ends it quietly."""
    try:
        return _main(argv)
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_OK


def _quiet_stdout() -> None:
    """The reader went away: point stdout at /dev/null so the interpreter's final flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "ctl":
            return run_ctl(args)
        if args.command == "export":
            from .export import run_export

            return run_export(args)
        path = getattr(args, "sub_config", None) or args.config
        cfg = config_mod.load(path) if path else config_mod.default()
    except ConfigError as exc:
        print(f"candlekeeper: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from .logging import configure

    json_logs = None if args.log_format is None else args.log_format == "json"
    if args.command == "backfill":
        from .backfill import DAEMON_PROGRESS, bars_wanted, run_backfill

        bars = bars_wanted(args)
        level = "warning" if bars and args.log_level in ("debug", "info") else args.log_level
        configure(json=json_logs, level=level, drop=DAEMON_PROGRESS)
        return run_backfill(cfg, args)
    configure(json=json_logs, level=args.log_level)
    return run_daemon(cfg, simulate=args.simulate)


# -- daemon ------------------------------------------------------------------------------


def run_daemon(cfg: Config, *, simulate: bool = False) -> int:
    from ..app.system import StartupError, System
    from .control import ControlSurface
    from .simulate import simulated
    log = structlog.get_logger("candlekeeper")
    sims: list[Any] = []
    if simulate:
        cfg, sims = simulated(cfg)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    system = System(cfg, surfaces=[ControlSurface(cfg.control)], on_shutdown=stop.set)
    try:
        system.start()
    except StartupError as exc:
        print(f"candlekeeper: {exc}", file=sys.stderr)
        for sim in sims:
            sim.stop()
        return EXIT_USAGE
    log.info("candlekeeper_started", config=cfg.source, db=cfg.storage.display, socket=cfg.control.socket,
             exchanges=[e.name for e in cfg.exchanges])
    heap = HeapKeeper(system.runtime.scheduler, system.runtime.wall).start()  # full collections at quiet instants
    def watch() -> None:
        system.exited.wait()
        stop.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    while not stop.wait(0.5):  # a short wait keeps the main thread responsive to signals
        pass
    gave_up = system.exit is not None and not system.exit.normal
    if gave_up:
        assert system.exit is not None
        log.critical("candlekeeper_gave_up", reason=system.exit.reason)
        print(f"candlekeeper: stopping, the root supervisor gave up: {system.exit.reason}", file=sys.stderr)
    else:
        log.info("candlekeeper_stopping")
    heap.stop()
    system.stop()
    for sim in sims:
        sim.stop()
    log.info("candlekeeper_stopped")
    return EXIT_FAILED if gave_up else EXIT_OK


# -- ctl ---------------------------------------------------------------------------------


def run_ctl(args: argparse.Namespace) -> int:
    from .control import request

    try:
        path = _ctl_socket(args)
        params = _ctl_params(args)
    except ValueError as exc:
        print(f"candlekeeper ctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.token and path.startswith("tcp://"):
        params["token"] = args.token

    def call(cmd: str, **extra: Any) -> dict[str, Any]:
        return request(path, cmd.replace("-", "_"), **{**params, **extra})  # accept-gap is accept_gap

    try:
        if args.cmd == "top":
            return _ctl_top(args, lambda cmd: _result(call(cmd)))
        reply = call(args.cmd, **({"counts": True} if args.cmd == "health" and not args.json else {}))
    except (FileNotFoundError, ConnectionRefusedError):
        if args.cmd == "coverage" and not path.startswith("tcp://"):
            return _coverage_offline(args, params)
        print(f"candlekeeper ctl: the daemon is not running (no one listens on {path})", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"candlekeeper ctl: cannot reach the daemon on {path}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if not reply.get("ok"):
        print(f"candlekeeper ctl: refused: {reply.get('error')}", file=sys.stderr)
        return EXIT_FAILED
    _print_result(args, reply.get("result"))
    return EXIT_OK


def _print_result(args: argparse.Namespace, result: Any) -> None:
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(_human(args.cmd, result))


def _ctl_top(args: argparse.Namespace, fetch: Any) -> int:
    """The live view on a terminal; otherwise (a pipe, a file, `--json`) one snapshot, printed once."""
    if args.json:
        print(json.dumps({"health": fetch("health"), "tree": fetch("tree")}, indent=2, default=str))
        return EXIT_OK
    from .top import print_frame, run_top

    if not sys.stdout.isatty():
        print_frame(fetch)
        return EXIT_OK
    return run_top(fetch)


def _coverage_offline(args: argparse.Namespace, params: dict[str, Any]) -> int:
    """`ctl coverage` with no daemon running: read the config's database directly (read-only)."""

    from ..app import data
    from ..app.errors import CommandError, StorageUnusable

    try:
        cfg = _ctl_config(args)
    except ConfigError as exc:
        print(f"candlekeeper ctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    target = data.Target(params.get("exchange"), params.get("symbol"), params.get("timeframe"))
    try:
        result = data.coverage_report(cfg.storage.location, target, config=cfg, now_ms=int(time.time() * 1000))
    except (CommandError, StorageUnusable) as exc:
        print(f"candlekeeper ctl: refused: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if not args.json:
        print(f"(the daemon is not running: read from {cfg.storage.display})", file=sys.stderr)
    _print_result(args, result)
    return EXIT_OK


def _ctl_config(args: argparse.Namespace) -> Config:
    path = args.ctl_config or args.config
    return config_mod.load(path) if path else config_mod.default()


def _ctl_socket(args: argparse.Namespace) -> str:
    """Where to reach the daemon: `ctl --socket`, else the socket of `ctl --config`, else of the
    top-level `--config` (`run.py --config F ctl ...` means the daemon that F runs), else the
    default. ValueError for a malformed `tcp://HOST:PORT`; ConfigError for a bad config."""

    if args.socket:
        path: str = args.socket
    elif args.ctl_config or args.config:
        path = config_mod.load(args.ctl_config or args.config).control.socket
    else:
        path = config_mod.default().control.socket
    if path.startswith("tcp://"):
        try:
            parse_host_port(path.removeprefix("tcp://"))
        except ValueError:
            raise ValueError(f"bad socket {path!r}: expected tcp://HOST:PORT with PORT a number 0-65535") from None
    return path


def _result(reply: dict[str, Any]) -> Any:
    if not reply.get("ok"):
        raise ConnectionError(reply.get("error"))
    return reply.get("result")


def _ctl_params(args: argparse.Namespace) -> dict[str, Any]:
    """Request arguments from the command line's TARGET; ValueError for a usage error."""
    cmd, target = args.cmd, args.target
    if cmd == "latest" and not 1 <= args.n <= 1000:
        raise ValueError(f"-n must be 1-1000, got {args.n}")
    times = getattr(args, "times", None) or []
    if cmd == "accept-gap" and len(times) != 2:
        raise ValueError("accept-gap needs EXCHANGE:SYMBOL[@TIMEFRAME] FROM TO, e.g. binance:BTC/USDT "
                         "2024-03-01T10:00 2024-03-01T10:30")
    if cmd != "accept-gap" and times:
        raise ValueError(f"{cmd} takes one target at most, got also {' '.join(times)!r}")
    if getattr(args, "reason", None) is not None and cmd != "accept-gap":
        raise ValueError("--reason is for accept-gap")
    if cmd in ("health", "tree", "top", "shutdown", "cluster"):
        if target:
            raise ValueError(f"{cmd} takes no target")
        return {}
    if cmd == "coverage":
        from ..app.data import parse_target

        t = parse_target(target)
        return {k: v for k, v in (("exchange", t.exchange), ("symbol", t.symbol), ("timeframe", t.timeframe)) if v}
    if not target:
        what = ("an actor path, e.g. binance/series/BTC/USDT@1m" if cmd in ("restart", "crash")
                else "EXCHANGE[:SYMBOL[@TIMEFRAME]]")
        raise ValueError(f"{cmd} needs a target: {what}")
    if cmd in ("restart", "crash"):
        return {"target": target}
    exchange, _, rest = target.partition(":")
    symbol, _, timeframe = rest.partition("@")
    if not exchange:
        raise ValueError(f"bad target {target!r}: expected EXCHANGE[:SYMBOL[@TIMEFRAME]]")
    if cmd in NEEDS_SERIES and not symbol:
        raise ValueError(f"{cmd} needs EXCHANGE:SYMBOL[@TIMEFRAME], got {target!r}")
    params: dict[str, Any] = {"exchange": exchange, "symbol": symbol or None, "timeframe": timeframe or None}
    if cmd in NEEDS_SERIES:
        params["timeframe"] = timeframe or "1m"
    if cmd == "latest":
        params["n"] = args.n
    if cmd == "accept-gap":
        params["from"], params["to"] = (int(t) if t.isdigit() else t for t in times)
        params["reason"] = args.reason
    return {k: v for k, v in params.items() if v is not None}


def _series_name(r: dict[str, Any]) -> str:
    text = str(r.get("exchange"))
    if r.get("symbol"):
        text += f":{r['symbol']}"
    if r.get("timeframe"):
        text += f"@{r['timeframe']}"
    return text


def _when(ms: Any, fmt: str = "%Y-%m-%d %H:%M") -> str:
    from datetime import datetime

    if not isinstance(ms, int) or isinstance(ms, bool):
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime(fmt)


def _health_table(result: dict[str, Any]) -> str:

    from .top import _duration, lag_seconds

    lines = [f"status: {result.get('status')}"]
    lines += [f"  {r}" for r in result.get("reasons") or []]
    lines += [f"  {e}" for e in result.get("errors") or []]
    cluster = result.get("cluster")
    if cluster:
        live = ", ".join(cluster.get("live_nodes") or []) or "-"
        lines += ["", f"node {cluster.get('node')}: {cluster.get('state')}, owns {cluster.get('owned')} of "
                      f"{cluster.get('wanted')} series, {cluster.get('refused_writes', 0)} writes refused; "
                      f"live nodes: {live}"]
    lines += ["", f"{'EXCHANGE':<16}{'BREAKER':<11}{'STATUS':<12}NEXT PROBE"]
    for e in result.get("exchanges", []):
        probe = e.get("next_probe_in")
        lines.append(f"{e['name']:<16}{e.get('breaker', '?'):<11}{e.get('status', '?'):<12}"
                     f"{_duration(probe) if isinstance(probe, (int, float)) else '-'}")
    lines.append("")
    owner = any("owner" in s for s in result.get("series", []))
    lines.append(f"{'SERIES':<30}{'STATUS':<13}{'LAG':>7}  {'LAST CANDLE (UTC)':<18}{'CANDLES':>9}{'RESTARTS':>9}"
                 f"{'FAILURES':>9}  {'OWNER  ' if owner else ''}DETAIL")
    now = time.time()
    for s in result.get("series", []):
        lag = lag_seconds(s, now)
        detail = " ".join(str(s.get("detail") or "").split())
        if s.get("exchange_down"):
            detail = "exchange down, read-only" + (f"; {detail}" if detail else "")
        candles = s.get("candles")
        lines.append(f"{_series_name(s):<30}{s['status']:<13}{_duration(lag) if lag is not None else '-':>7}  "
                     f"{_when(s.get('last_ts')):<18}{candles if candles is not None else '-':>9}"
                     f"{s.get('restarts', 0):>9}{s.get('failures', 0):>9}  "
                     f"{str(s.get('owner')) + '  ' if owner else ''}{detail[:120]}".rstrip())
    return "\n".join(lines)


def _cluster_text(result: dict[str, Any]) -> str:
    lines = [f"this node: {result.get('node')} ({result.get('state')}), lease {result.get('lease_s')} s",
             "", f"{'NODE':<20}{'LIVE':<6}{'BUDGET':>10}{'HEARTBEAT':>11}{'EXPIRES IN':>12}{'OWNS':>7}"]
    for n in result.get("nodes", []):
        lines.append(f"{n['node']:<20}{'yes' if n.get('live') else 'no':<6}{n.get('rate_budget', 0):>10.4g}"
                     f"{n.get('last_heartbeat_s', 0):>9.1f} s{n.get('expires_in_s', 0):>10.1f} s{n.get('owned', 0):>7}")
    lines += ["", f"{'SERIES':<34}{'OWNER':<20}{'TOKEN':>7}{'EXPIRES IN':>12}"]
    for lease in result.get("leases", []):
        owner = lease.get("owner") or "(released)"
        left = f"{lease.get('expires_in_s', 0):.1f} s" if lease.get("live") else "expired"
        lines.append(f"{lease['series']:<34}{owner:<20}{lease.get('token', 0):>7}{left:>12}")
    return "\n".join(lines)


def _coverage_text(rows: list[dict[str, Any]]) -> str:
    out: list[str] = []
    for r in rows:
        state = "complete" if r.get("complete") else f"MISSING {r.get('missing_candles')} candles"
        out.append(f"{_series_name(r)}  {r.get('count')} candles  {_when(r.get('first_ts'))} .. "
                   f"{_when(r.get('last_ts'))} UTC  {state}")
        if r.get("checked_from") is not None:
            out.append(f"  checked {_when(r['checked_from'])} .. {_when(r['checked_to'])} UTC (up to the last "
                       "closed candle)")
        for m in r.get("missing", []):
            out.append(f"  missing  {m['from_iso']} .. {m['to_iso']}  ({m['candles']} candles)")
        if r.get("missing_stretches", 0) > len(r.get("missing", [])):
            out.append(f"  ... {r['missing_stretches'] - len(r['missing'])} more missing stretches (--json)")
        for reason, g in sorted((r.get("gaps_by_reason") or {}).items()):
            out.append(f"  exchange gaps, {reason}: {g['stretches']} stretches, {g['candles']} candles")
        for g in r.get("gaps", [])[:5]:
            out.append(f"    {g['from_iso']} .. {g['to_iso']}  ({g['candles']} candles, {g['reason']})")
        if len(r.get("gaps", [])) > 5 or sum(g["stretches"] for g in (r.get("gaps_by_reason") or {}).values()) > 5:
            out.append("    ... (every gap: --json)")
    return "\n".join(out)


def _human(cmd: str, result: Any) -> str:
    if cmd == "health" and isinstance(result, dict):
        return _health_table(result)
    if cmd == "coverage" and isinstance(result, list):
        return _coverage_text(result)
    if cmd == "cluster" and isinstance(result, dict):
        return _cluster_text(result)
    if cmd == "tree" and isinstance(result, dict):
        out: list[str] = []

        def walk(node: dict[str, Any], depth: int) -> None:
            for c in node.get("children", []):
                extra = f" [{c['strategy']}]" if "strategy" in c else ""
                owner = f"  owner={c['owner']} token={c.get('token')}" if "owner" in c else ""
                out.append(f"{'  ' * depth}{c['id']}{extra}  {c['state']}  restarts={c['restarts']}{owner}")
                walk(c, depth + 1)

        node = f"  node={result['node']}" if "node" in result else ""
        out.append(f"{result.get('path')} [{result.get('strategy')}]{node}")
        walk(result, 1)
        return "\n".join(out)
    if cmd == "latest" and isinstance(result, dict):
        stale = result.get("stale_seconds")
        head = (f"{_series_name(result)}  stale {stale:.0f}s" if stale is not None
                else f"{_series_name(result)}  no candles stored")
        if result.get("read_only"):
            head += "  (exchange down: read-only, from the store)"
        lines = [head, f"{'OPEN TIME (UTC)':<20}{'OPEN':>14}{'HIGH':>14}{'LOW':>14}{'CLOSE':>14}{'VOLUME':>16}"]
        for c in result.get("candles", []):
            lines.append(f"{_when(c['ts']):<20}{c['open']:>14.8g}{c['high']:>14.8g}{c['low']:>14.8g}"
                         f"{c['close']:>14.8g}{c['volume']:>16.8g}")
        return "\n".join(lines)
    if isinstance(result, dict):
        n = result.get("series", result.get("series_reset"))
        count = f" ({n} series)" if isinstance(n, int) else ""
        if cmd in ("pause", "resume"):
            return f"{'paused' if result.get('paused') else 'resumed'} {_series_name(result)}{count}"
        if cmd == "reset":
            what = "breaker closed, rate-limit penalty lifted, " if not result.get("symbol") else ""
            return f"reset {_series_name(result)}: {what}{n} series' retry state and quarantine reset"
        if cmd == "add":
            return f"added {_series_name(result)} (kept across restarts)"
        if cmd == "remove":
            return f"removed {_series_name(result)} (its stored candles stay)"
        if cmd == "accept-gap":
            return (f"accepted {_series_name(result)} {result.get('from_iso')} .. {result.get('to_iso')} "
                    f"({result.get('candles')} candles) as a confirmed gap ({result.get('gap')}); "
                    f"the series moves past it (now {result.get('series_status') or 'not running'})")
        if cmd == "restart":
            return f"restarted {result.get('restarted')}"
        if cmd == "crash":
            return f"crashed {result.get('crashed')} (its supervisor restarts it)"
        if cmd == "shutdown":
            return "stopping"
    if isinstance(result, dict) and len(result) <= 6:
        return "  ".join(f"{k}={v}" for k, v in result.items())
    return json.dumps(result, indent=2, default=str)
