"""The `candlekeeper` command (also `python run.py`, `python -m candlekeeper`): the daemon,
`--simulate`, and the `ctl` client. Exit codes: 0 ok, 1 refused command or the root supervisor
gave up, 2 usage or config error."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
from datetime import UTC
from typing import Any, NoReturn

import structlog

from ..app import config as config_mod
from ..app.config import Config, ConfigError, parse_host_port

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
    ctl.add_argument("-n", type=int, default=1, help="latest: how many candles (default 1)")
    ctl.add_argument("cmd", choices=CTL_COMMANDS)
    ctl.add_argument("target", nargs="?", help="EXCHANGE[:SYMBOL[@TIMEFRAME]] (reset, pause, resume, add, remove, "
                                               "latest) or an actor path (restart, crash)")
    return p


CTL_COMMANDS = ["health", "tree", "top", "reset", "pause", "resume", "restart", "add", "remove", "latest", "shutdown",
                "crash"]
NEEDS_SERIES = ("add", "remove", "latest")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "ctl":
            return run_ctl(args)
        cfg = config_mod.load(args.config) if args.config else config_mod.default()
    except ConfigError as exc:
        print(f"candlekeeper: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from .logging import configure

    configure(json=None if args.log_format is None else args.log_format == "json", level=args.log_level)
    return run_daemon(cfg, simulate=args.simulate)


# -- daemon ------------------------------------------------------------------------------


def run_daemon(cfg: Config, *, simulate: bool = False) -> int:
    from ..app.system import SocketInUse, StorageUnusable, System
    from .control import ControlSurface

    log = structlog.get_logger("candlekeeper")
    sims: list[Any] = []
    if simulate:
        cfg, sims = _simulated(cfg)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    system = System(cfg, surfaces=[ControlSurface(cfg.control)], on_shutdown=stop.set)
    try:
        system.start()
    except (SocketInUse, StorageUnusable) as exc:
        print(f"candlekeeper: {exc}", file=sys.stderr)
        return EXIT_USAGE
    log.info("candlekeeper_started", config=cfg.source, db=cfg.storage.path, socket=cfg.control.socket,
             exchanges=[e.name for e in cfg.exchanges])
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
    system.stop()
    for sim in sims:
        sim.stop()
    log.info("candlekeeper_stopped")
    return EXIT_FAILED if gave_up else EXIT_OK


def _simulated(cfg: Config) -> tuple[Config, list[Any]]:
    """Point every exchange at its own in-process simulated Binance, with light random faults,
    and keep the data apart from a real database (`<path>.simulate.db`)."""
    from ..simulator.faults import Faults
    from ..simulator.server import BinanceSimulator

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
        return request(path, cmd, **params, **extra)

    try:
        if args.cmd == "top":
            from .top import run_top

            return run_top(lambda cmd: _result(call(cmd)))
        reply = call(args.cmd)
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
    if cmd in ("health", "tree", "top", "shutdown"):
        if target:
            raise ValueError(f"{cmd} takes no target")
        return {}
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
    return {k: v for k, v in params.items() if v is not None}


def _human(cmd: str, result: Any) -> str:
    if cmd == "health" and isinstance(result, dict):
        lines = [f"status: {result.get('status')}", ""]
        lines.append(f"{'EXCHANGE':<16}{'BREAKER':<11}STATUS")
        for e in result.get("exchanges", []):
            lines.append(f"{e['name']:<16}{e.get('breaker', '?'):<11}{e.get('status', '?')}")
        lines.append("")
        lines.append(f"{'SERIES':<34}{'STATUS':<13}{'LAST CANDLE':<22}{'RESTARTS':>9}{'FAILURES':>9}")
        from datetime import datetime

        for s in result.get("series", []):
            last = s.get("last_ts")
            when = datetime.fromtimestamp(last / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC") if last else "-"
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
    if cmd == "latest" and isinstance(result, dict):
        from datetime import datetime

        stale = result.get("stale_seconds")
        head = (f"{result['exchange']}:{result['symbol']}@{result['timeframe']}  "
                f"stale {stale:.0f}s" if stale is not None else "no candles stored")
        if result.get("read_only"):
            head += "  (exchange down: read-only, from the store)"
        lines = [head, f"{'OPEN TIME (UTC)':<20}{'OPEN':>14}{'HIGH':>14}{'LOW':>14}{'CLOSE':>14}{'VOLUME':>16}"]
        for c in result.get("candles", []):
            when = datetime.fromtimestamp(c["ts"] / 1000, UTC).strftime("%Y-%m-%d %H:%M")
            lines.append(f"{when:<20}{c['open']:>14.8g}{c['high']:>14.8g}{c['low']:>14.8g}{c['close']:>14.8g}{c['volume']:>16.8g}")
        return "\n".join(lines)
    if isinstance(result, dict) and len(result) <= 6:
        return "  ".join(f"{k}={v}" for k, v in result.items())
    return json.dumps(result, indent=2, default=str)
