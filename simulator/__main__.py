"""Manual use: `python -m simulator --dialect okx --port 8080 --fault-rate 0.05`."""

from __future__ import annotations

import argparse
import signal
import threading
import time

from .dialects import DIALECTS
from .faults import FaultKind, Faults, PoisonKind
from .server import DEFAULT_SYMBOLS, ExchangeSimulator, synthetic_symbols


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m simulator",
                                description="Simulated exchange public REST API on loopback.")
    p.add_argument("--dialect", default="binance", choices=sorted(DIALECTS))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0 lets the OS choose")
    p.add_argument("--symbols", default=None,
                   help="comma-separated unified symbols, or a count for synthetic ones "
                        f"(default for binance: {','.join(DEFAULT_SYMBOLS)})")
    p.add_argument("--no-catalogue", action="store_true",
                   help="list only --symbols, not the dialect's ~40 default markets")
    p.add_argument("--seed", type=int, default=0, help="price-history seed")
    p.add_argument("--fault-seed", type=int, default=0)
    p.add_argument("--fault-rate", type=float, default=0.0,
                   help="probability a request fails, spread over all fault kinds but the "
                        "slow ones (stall, trickle)")
    p.add_argument("--stall-rate", type=float, default=0.0)
    p.add_argument("--stall-s", type=float, default=5.0)
    p.add_argument("--trickle-rate", type=float, default=0.0)
    p.add_argument("--trickle-bytes-per-s", type=float, default=1.0)
    p.add_argument("--clock-skew-ms", type=int, default=0)
    p.add_argument("--rate-limit", type=int, default=None, help="max requests per second")
    p.add_argument("--documented-limits", action="store_true",
                   help="enforce the exchange's own documented rate limits (shared by all clients)")
    p.add_argument("--poison", default=None, help="SYMBOL[:kind], kind in "
                   + ", ".join(k.value for k in PoisonKind))
    p.add_argument("--fail-listing", default=None,
                   help="KIND:STATUS, e.g. option:500 (a market-type listing that fails)")
    p.add_argument("--token", default=None,
                   help="oanda: the Bearer token accepted (default: any non-empty one)")
    p.add_argument("--history-days", type=float, default=None,
                   help="history starts this many days ago (default: start of yesterday)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = _parse(argv)
    if a.symbols is None:
        symbols = list(DEFAULT_SYMBOLS) if a.dialect == "binance" else []
    elif a.symbols.isdigit():
        symbols = synthetic_symbols(int(a.symbols))
    else:
        symbols = [s.strip() for s in a.symbols.split(",") if s.strip()]
    rates = dict(Faults.uniform(a.fault_rate).rates) if a.fault_rate else {}
    if a.stall_rate:
        rates[FaultKind.STALL] = a.stall_rate
    if a.trickle_rate:
        rates[FaultKind.TRICKLE] = a.trickle_rate
    poisoned = {}
    if a.poison:
        sym, _, kind = a.poison.partition(":")
        poisoned[sym] = PoisonKind(kind or PoisonKind.INVERTED.value)
    fail_listing = {}
    if a.fail_listing:
        kind, _, status = a.fail_listing.partition(":")
        fail_listing[kind] = int(status or 500)
    faults = Faults(rates=rates, seed=a.fault_seed, stall_s=a.stall_s,
                    rate_limit_per_s=a.rate_limit, documented_limits=a.documented_limits,
                    poisoned=poisoned,
                    trickle_bytes_per_s=a.trickle_bytes_per_s, clock_skew_ms=a.clock_skew_ms,
                    fail_listing=fail_listing)
    start = None
    if a.history_days is not None:
        start = int((time.time() - a.history_days * 86400) * 1000)
    options = {"token": a.token} if a.dialect == "oanda" else {}
    sim = ExchangeSimulator(symbols, dialect=a.dialect, catalogue=not a.no_catalogue,
                            host=a.host, port=a.port, seed=a.seed, faults=faults,
                            history_start_ms=start, dialect_options=options)
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
