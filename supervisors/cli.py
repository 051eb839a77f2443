"""`python run.py`: the daemon, `--simulate`, and the `ctl` client. Exit codes: 0 ok,
1 refused command or the root supervisor gave up, 2 usage or config error."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
from typing import Any

import structlog

from supervisors import config as config_mod
from supervisors.config import Config, ConfigError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, argparse's convention
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="run.py", description="candlekeeper: OHLCV ingestion that never loses a candle")
    p.add_argument("--config", help="TOML config file (default: built-in defaults)")
    p.add_argument("--simulate", action="store_true", help="run against a local simulated exchange, faults included")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["json", "console"], help="default: json unless stderr is a terminal")
    sub = p.add_subparsers(dest="command")
    ctl = sub.add_parser("ctl", help="talk to a running daemon")
    ctl.add_argument("--config", dest="ctl_config", help="find the socket in this config")
    ctl.add_argument("--socket", help="control socket path")
    ctl.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ctl.add_argument("cmd", choices=["health", "tree", "reset", "pause", "resume"])
    ctl.add_argument("target", nargs="?", help="EXCHANGE or EXCHANGE:SYMBOL[@TIMEFRAME] for reset/pause/resume")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "ctl":
            return run_ctl(args)
        cfg = config_mod.load(args.config) if args.config else config_mod.default()
    except ConfigError as exc:
        print(f"candlekeeper: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from supervisors.logging import configure

    configure(json=None if args.log_format is None else args.log_format == "json", level=args.log_level)
    return run_daemon(cfg, simulate=args.simulate)


# -- daemon ------------------------------------------------------------------------------


def run_daemon(cfg: Config, *, simulate: bool = False) -> int:
    from supervisors.control import SocketInUse
    from supervisors.system import System

    log = structlog.get_logger("candlekeeper")
    sims: list[Any] = []
    if simulate:
        cfg, sims = _simulated(cfg)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    system = System(cfg)
    try:
        system.start()
    except SocketInUse as exc:
        print(f"candlekeeper: {exc}", file=sys.stderr)
        return EXIT_USAGE
    log.info("candlekeeper_started", config=cfg.source, db=cfg.storage.path, socket=cfg.control.socket,
             exchanges=[e.name for e in cfg.exchanges])
    watcher = threading.Thread(target=lambda: (system.exited.wait(), stop.set()), daemon=True)
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
    system.stop()
    for sim in sims:
        sim.stop()
    log.info("candlekeeper_stopped")
    return EXIT_FAILED if gave_up else EXIT_OK


def _simulated(cfg: Config) -> tuple[Config, list[Any]]:
    """Point every exchange at its own in-process simulated Binance, with light random faults,
    and keep the data apart from a real database (`<path>.simulate.db`)."""
    from simulator.faults import Faults
    from simulator.server import BinanceSimulator

    sims, exchanges = [], []
    for i, ex in enumerate(cfg.exchanges):
        sim = BinanceSimulator(list(ex.symbols), name=ex.name, seed=i, faults=Faults.uniform(0.03, seed=i)).start()
        sims.append(sim)
        exchanges.append(dataclasses.replace(ex, exchange="binance", api_base=sim.url))
    root, _ = os.path.splitext(cfg.storage.path)
    storage = dataclasses.replace(cfg.storage, path=f"{root}.simulate.db")
    return dataclasses.replace(cfg, exchanges=tuple(exchanges), storage=storage), sims


# -- ctl ---------------------------------------------------------------------------------


def run_ctl(args: argparse.Namespace) -> int:
    from supervisors.control import request

    if args.socket:
        path = args.socket
    elif args.ctl_config:
        path = config_mod.load(args.ctl_config).control.socket
    else:
        path = config_mod.default().control.socket
    params: dict[str, Any] = {}
    if args.cmd in ("reset", "pause", "resume"):
        if not args.target:
            print(f"candlekeeper ctl: {args.cmd} needs a target: EXCHANGE or EXCHANGE:SYMBOL[@TIMEFRAME]", file=sys.stderr)
            return EXIT_USAGE
        exchange, _, rest = args.target.partition(":")
        symbol, _, timeframe = rest.partition("@")
        params = {"exchange": exchange, "symbol": symbol or None, "timeframe": timeframe or None}
    try:
        reply = request(path, args.cmd, **params)
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"candlekeeper ctl: the daemon is not running (no one listens on {path})", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"candlekeeper ctl: cannot reach the daemon on {path}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if not reply.get("ok"):
        print(f"candlekeeper ctl: refused: {reply.get('error')}", file=sys.stderr)
        return EXIT_FAILED
    result = reply.get("result")
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(_human(args.cmd, result))
    return EXIT_OK


def _human(cmd: str, result: Any) -> str:
    if cmd == "health" and isinstance(result, dict):
        lines = [f"status: {result.get('status')}", ""]
        lines.append(f"{'EXCHANGE':<16}{'BREAKER':<11}STATUS")
        for e in result.get("exchanges", []):
            lines.append(f"{e['name']:<16}{e.get('breaker', '?'):<11}{e.get('status', '?')}")
        lines.append("")
        lines.append(f"{'SERIES':<34}{'STATUS':<13}{'LAST CANDLE':<22}{'RESTARTS':>9}{'FAILURES':>9}")
        from datetime import datetime, timezone

        for s in result.get("series", []):
            last = s.get("last_ts")
            when = datetime.fromtimestamp(last / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if last else "-"
            name = f"{s['exchange']}:{s['symbol']}@{s['timeframe']}"
            lines.append(f"{name:<34}{s['status']:<13}{when:<22}{s.get('restarts', 0):>9}{s.get('failures', 0):>9}")
        return "\n".join(lines)
    if cmd == "tree" and isinstance(result, dict):
        out: list[str] = []

        def walk(node: dict[str, Any], depth: int) -> None:
            for c in node.get("children", []):
                extra = f" [{c['strategy']}]" if "strategy" in c else ""
                out.append(f"{'  ' * depth}{c['id']}{extra}  {c['state']}  restarts={c['restarts']}")
                walk(c, depth + 1)

        out.append(f"{result.get('path')} [{result.get('strategy')}]")
        walk(result, 1)
        return "\n".join(out)
    return json.dumps(result, indent=2, default=str)
