"""What can go wrong, and the thread-safe decision of what goes wrong for each request.

`Faults` is an immutable description (swap it at run time with `ExchangeSimulator.set_faults`);
`FaultInjector` turns it into a per-request `Decision`. Random faults draw exactly one number
from a seeded `random.Random` per eligible request, so for a given seed the n-th eligible
request always gets the same fate: the schedule is deterministic, whatever the timing.
"""

from __future__ import annotations

import enum
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .ratelimit import SlidingWindowLimiter, retry_after_header


class FaultKind(str, enum.Enum):
    """Every way a request can be sabotaged (also the keys of `StatsSnapshot.by_fault`)."""

    HTTP_500 = "http_500"
    HTTP_502 = "http_502"
    HTTP_503 = "http_503"
    HTTP_504 = "http_504"
    HTTP_429 = "http_429"  # random rate-limit answer in the dialect's shape (Binance 429 -1003)
    HTTP_418 = "http_418"  # random ban answer in the dialect's shape (Binance 418)
    RESET = "reset"  # TCP RST instead of a response
    STALL = "stall"  # hold the request for `stall_s`, then close without a response
    TRUNCATED = "truncated"  # 200 with a well-framed body cut in the middle (invalid JSON)
    SHORT_READ = "short_read"  # Content-Length promises the full body, half is sent, then close
    TRICKLE = "trickle"  # full, valid response, body sent at `trickle_bytes_per_s`
    # not drawn at random; recorded when they happen:
    RATE_LIMIT = "rate_limit"  # server-side limiter said 429
    BAN = "ban"  # limiter escalated to 418 after the client ignored 429s
    OUTAGE = "outage"
    POISON = "poison"
    LISTING = "listing"  # a market-type listing failed on purpose (`Faults.fail_listing`)


#: The random kinds every soak and "all faults" test iterates.
RANDOM_KINDS: tuple[FaultKind, ...] = (
    FaultKind.HTTP_500, FaultKind.HTTP_502, FaultKind.HTTP_503, FaultKind.HTTP_504,
    FaultKind.HTTP_429, FaultKind.HTTP_418, FaultKind.RESET, FaultKind.STALL,
    FaultKind.TRUNCATED, FaultKind.SHORT_READ,
)
#: Random kinds that must be asked for by name: TRICKLE defeats per-read timeouts, so it stays
#: out of RANDOM_KINDS until the daemon has a whole-request deadline.
OPT_IN_KINDS: tuple[FaultKind, ...] = (FaultKind.TRICKLE,)
#: Kinds that `Faults.rates` may contain, in draw order (new kinds go last: seeded schedules
#: of the older kinds stay as they were).
DRAWABLE_KINDS: tuple[FaultKind, ...] = RANDOM_KINDS + OPT_IN_KINDS

#: Random kinds that hold a request for a long time; `Faults.uniform` leaves them out.
SLOW_KINDS: tuple[FaultKind, ...] = (FaultKind.STALL, FaultKind.TRICKLE)


class PoisonKind(str, enum.Enum):
    """How a poisoned symbol's klines are broken."""

    INVERTED = "inverted"  # high < low (high and low swapped)
    NULLS = "nulls"  # open/high/low/close/volume are JSON null
    BAD_SYMBOL = "bad_symbol"  # the dialect's unknown-symbol error (Binance: 400, -1121)
    BAD_SYMBOL_200 = "bad_symbol_200"  # that error body with HTTP 200 (Binance: -1121)
    EMPTY = "empty"  # HTTP 200 []


class OutageMode(str, enum.Enum):
    """How a full outage looks to clients."""

    REFUSE = "refuse"  # listener closed: connection refused; open connections are reset
    RESET = "reset"  # connections accepted, every request answered with a TCP RST
    HTTP_503 = "http_503"  # every request gets 503


def _frozen(m: Mapping) -> Mapping:
    return MappingProxyType(dict(m))


@dataclass(frozen=True)
class Faults:
    """Fault configuration of one simulated exchange. All defaults mean "behave perfectly".

    rates: probability per request of each random kind (sum <= 1).
    paths: restrict random faults to these request paths (e.g. {"/api/v3/klines"}); None = all.
    rate_limit_per_s: admit at most this many requests per sliding second, 429 for the rest.
    documented_limits: enforce the exchange's own documented limits (`Dialect.limits`, counted
        for every client of the server), answering the dialect's rate-limit reply beyond them.
    ban_after_violations: after this many requests that arrive while the client should still be
        backing off from a limiter 429 (either limiter), answer the dialect's ban for `ban_s`
        seconds (Binance's 418 IP ban).
    poisoned: symbol (unified or id) -> how its klines are broken.
    outage: if set, every request fails this way.
    trickle_bytes_per_s: body rate of TRICKLE responses (slow enough that the whole response
        outlasts any client timeout, fast enough that no single read waits long).
    clock_skew_ms: the exchange's clock runs this far ahead (+) or behind (-) the wall clock
        (its now, candles, `Date` header and server-time endpoint all follow it).
    date_header: False omits the `Date` header entirely.
    fail_listing: market-type listing (dialect's name, e.g. "option", "inverse") -> HTTP
        status it answers with, in the dialect's error shape; see `Dialect.listing_kind`.
    """

    rates: Mapping[FaultKind, float] = field(default_factory=dict)
    seed: int = 0
    paths: frozenset[str] | None = None
    retry_after_s: int = 1
    stall_s: float = 5.0
    rate_limit_per_s: int | None = None
    documented_limits: bool = False
    ban_after_violations: int | None = None
    ban_s: float = 10.0
    poisoned: Mapping[str, PoisonKind] = field(default_factory=dict)
    outage: OutageMode | None = None
    trickle_bytes_per_s: float = 1.0
    clock_skew_ms: int = 0
    date_header: bool = True
    fail_listing: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rates = {FaultKind(k): float(v) for k, v in self.rates.items()}
        for k, v in rates.items():
            if k not in DRAWABLE_KINDS:
                raise ValueError(f"{k.value} is not a random fault kind")
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"rate of {k.value} must be in [0, 1]")
        if sum(rates.values()) > 1.0 + 1e-9:
            raise ValueError("fault rates sum to more than 1")
        if self.rate_limit_per_s is not None and self.rate_limit_per_s < 1:
            raise ValueError("rate_limit_per_s must be >= 1")
        object.__setattr__(self, "rates", _frozen(rates))
        object.__setattr__(self, "poisoned", _frozen(
            {k.replace("/", "").upper(): PoisonKind(v) for k, v in self.poisoned.items()}))
        if self.paths is not None:
            object.__setattr__(self, "paths", frozenset(self.paths))
        if self.outage is not None:
            object.__setattr__(self, "outage", OutageMode(self.outage))
        if self.trickle_bytes_per_s <= 0:
            raise ValueError("trickle_bytes_per_s must be > 0")
        object.__setattr__(self, "fail_listing",
                           _frozen({str(k): int(v) for k, v in self.fail_listing.items()}))

    @classmethod
    def uniform(cls, total_rate: float, kinds: tuple[FaultKind, ...] | None = None,
                **kwargs: Any) -> Faults:
        """`total_rate` spread evenly over `kinds` (default: every random kind except the slow
        ones, STALL and TRICKLE)."""
        kinds = kinds or tuple(k for k in RANDOM_KINDS if k not in SLOW_KINDS)
        return cls(rates={k: total_rate / len(kinds) for k in kinds}, **kwargs)


@dataclass(frozen=True)
class Decision:
    """The fate of one request. `status` is None when no HTTP response is sent."""

    kind: FaultKind
    status: int | None
    retry_after_s: int | None = None


_RANDOM_STATUS = {
    FaultKind.HTTP_500: 500, FaultKind.HTTP_502: 502, FaultKind.HTTP_503: 503,
    FaultKind.HTTP_504: 504, FaultKind.HTTP_429: 429, FaultKind.HTTP_418: 418,
    FaultKind.RESET: None, FaultKind.STALL: None, FaultKind.TRUNCATED: 200,
    FaultKind.SHORT_READ: 200, FaultKind.TRICKLE: 200,
}


class FaultInjector:
    """Thread-safe per-request fault decisions for one server.

    Order: outage, active ban, server-side rate limit, random draw. Poison is looked up
    separately by the klines route (`poison_for`), since it depends on the symbol.
    `monotonic` is injectable so limiter tests need no sleeping.
    """

    def __init__(self, faults: Faults | None = None, *,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._monotonic = monotonic
        self._faults = Faults()
        self._rng = random.Random(0)
        self._limiter: SlidingWindowLimiter | None = None
        self._backoff_until = 0.0
        self._violations = 0
        self._ban_until = 0.0
        self.configure(faults or Faults())

    @property
    def faults(self) -> Faults:
        return self._faults

    def configure(self, faults: Faults) -> Faults:
        """Install `faults`; returns the previous config.

        The RNG is re-seeded when `seed` or `rates` change (so the schedule restarts), and
        kept otherwise (toggling an outage or poison does not disturb it). The limiter and
        ban state are reset when a rate limit (`rate_limit_per_s`, `documented_limits`) changes.
        """
        with self._lock:
            old = self._faults
            if faults.seed != old.seed or dict(faults.rates) != dict(old.rates):
                self._rng = random.Random(faults.seed)
            limits_changed = (faults.rate_limit_per_s != old.rate_limit_per_s
                              or faults.documented_limits != old.documented_limits)
            if limits_changed or (self._limiter is None and faults.rate_limit_per_s):
                self._limiter = (SlidingWindowLimiter(faults.rate_limit_per_s)
                                 if faults.rate_limit_per_s else None)
                self._backoff_until = self._ban_until = 0.0
                self._violations = 0
            self._faults = faults
            return old

    def decide(self, path: str, fits: Callable[[], float | None] | None = None) -> Decision | None:
        """The fault for this request, or None to serve it normally. `fits` counts the request
        against the exchange's documented limits if it fits them (None) or says how long until
        it would (seconds); asked only with `Faults.documented_limits`."""
        with self._lock:
            f = self._faults
            if f.outage is not None:
                status = 503 if f.outage is OutageMode.HTTP_503 else None
                return Decision(FaultKind.OUTAGE, status)
            documented = fits if f.documented_limits else None
            if self._limiter is not None or documented is not None or self._ban_until > 0:
                d = self._limit(f, documented)
                if d is not None:
                    return d
            if f.rates and (f.paths is None or path in f.paths):
                return self._draw(f)
            return None

    def ban(self, seconds: float) -> None:
        """Ban every client now, for `seconds` (the exchange's IP ban, however it was earned)."""
        with self._lock:
            self._ban_until = max(self._ban_until, self._monotonic() + seconds)

    def _limit(self, f: Faults, fits: Callable[[], float | None] | None) -> Decision | None:
        now = self._monotonic()
        if now < self._ban_until:
            return Decision(FaultKind.BAN, 418, retry_after_header(self._ban_until - now))
        if f.ban_after_violations is not None:
            if now < self._backoff_until:
                self._violations += 1
                if self._violations >= f.ban_after_violations:
                    self._violations = 0
                    self._ban_until = now + f.ban_s
                    return Decision(FaultKind.BAN, 418, retry_after_header(f.ban_s))
            else:
                self._violations = 0
        wait = self._limiter.try_acquire(now) if self._limiter is not None else None
        if wait is None and fits is not None:
            wait = fits()
        if wait is None:
            return None
        retry = retry_after_header(wait)
        self._backoff_until = max(self._backoff_until, now + wait)
        return Decision(FaultKind.RATE_LIMIT, 429, retry)

    def _draw(self, f: Faults) -> Decision | None:
        x = self._rng.random()
        acc = 0.0
        for kind in DRAWABLE_KINDS:  # fixed order keeps the schedule stable
            rate = f.rates.get(kind, 0.0)
            if rate <= 0.0:
                continue
            acc += rate
            if x < acc:
                retry = f.retry_after_s if kind in (FaultKind.HTTP_429, FaultKind.HTTP_418) else None
                return Decision(kind, _RANDOM_STATUS[kind], retry)
        return None

    def poison_for(self, symbol_id: str) -> PoisonKind | None:
        """How `symbol_id`'s klines are poisoned, if at all (key: unified symbol without "/",
        upper case, e.g. "BTCUSDT", whatever the dialect's own market id)."""
        return self._faults.poisoned.get(symbol_id.replace("/", "").upper())
