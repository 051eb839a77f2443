"""Manual use: `python -m simulator --port 8080 --symbols BTC/USDT,ETH/USDT --fault-rate 0.05`."""

from __future__ import annotations

import argparse
import signal
import threading
import time

from .faults import FaultKind, Faults, PoisonKind
from .server import DEFAULT_SYMBOLS, BinanceSimulator, synthetic_symbols


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m simulator",
                                description="Simulated Binance spot REST API on loopback.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0 lets the OS choose")
    p.add_argument("--symbols", default=",".join(DEFAULT_SYMBOLS),
                   help="comma-separated unified symbols, or a count for synthetic ones")
    p.add_argument("--seed", type=int, default=0, help="price-history seed")
    p.add_argument("--fault-seed", type=int, default=0)
    p.add_argument("--fault-rate", type=float, default=0.0,
                   help="probability a request fails, spread over all fault kinds but stalls")
    p.add_argument("--stall-rate", type=float, default=0.0)
    p.add_argument("--stall-s", type=float, default=5.0)
    p.add_argument("--rate-limit", type=int, default=None, help="max requests per second")
    p.add_argument("--poison", default=None, help="SYMBOL[:kind], kind in "
                   + ", ".join(k.value for k in PoisonKind))
    p.add_argument("--history-days", type=float, default=None,
                   help="history starts this many days ago (default: start of yesterday)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = _parse(argv)
    symbols = (synthetic_symbols(int(a.symbols)) if a.symbols.isdigit()
               else [s.strip() for s in a.symbols.split(",") if s.strip()])
    rates = dict(Faults.uniform(a.fault_rate).rates) if a.fault_rate else {}
    if a.stall_rate:
        rates[FaultKind.STALL] = a.stall_rate
    poisoned = {}
    if a.poison:
        sym, _, kind = a.poison.partition(":")
        poisoned[sym] = PoisonKind(kind or PoisonKind.INVERTED.value)
    faults = Faults(rates=rates, seed=a.fault_seed, stall_s=a.stall_s,
                    rate_limit_per_s=a.rate_limit, poisoned=poisoned)
    start = None
    if a.history_days is not None:
        start = int((time.time() - a.history_days * 86400) * 1000)
    sim = BinanceSimulator(symbols, host=a.host, port=a.port, seed=a.seed, faults=faults,
                           history_start_ms=start)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with sim:
        print(sim.url, flush=True)
        try:
            done.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
