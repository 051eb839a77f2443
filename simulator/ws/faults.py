"""What can go wrong on a kline stream, decided per push, seeded and deterministic.

`StreamFaults` is immutable (swap it at run time with `WsSimulator.set_faults`). Random faults
draw exactly one number per kline push from a `random.Random` owned by the connection and
seeded with (seed, connection number): the n-th push on the k-th connection always meets the
same fate, whatever the timing. Refusals draw from a second generator per connection, so
turning them on does not shift the push schedule.
"""

from __future__ import annotations

import enum
import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


class StreamFault(str, enum.Enum):
    """Every way a stream misbehaves (also the keys of `WsStats.faults`)."""

    DROP_RESET = "drop_reset"  # TCP RST instead of the push
    DROP_CLOSE = "drop_close"  # a close frame (1011) instead of the push
    DUPLICATE = "duplicate"  # the push is sent twice
    REORDER = "reorder"  # the push is held back and sent after the next one
    MISS = "miss"  # an in-progress update is not sent
    MISS_FINAL = "miss_final"  # a candle's closed (final) update is not sent
    # not drawn per push; counted when they happen:
    STALL = "stall"  # a push swallowed by a stall
    REFUSE = "refuse"  # a subscription argument refused (injected)
    EXPIRE = "expire"  # connection closed for reaching its maximum age
    OVER_RATE = "over_rate"  # client sent too many frames per second
    IDLE = "idle"  # closed after nothing was sent for idle_close_s
    PONG_TIMEOUT = "pong_timeout"  # closed because the client stopped answering pings
    STALE_FINAL = "stale_final"  # a final pushed with values the exchange revises afterwards


#: Kinds `StreamFaults.rates` may hold; the order fixes the schedule.
RANDOM_KINDS: tuple[StreamFault, ...] = (
    StreamFault.DROP_RESET, StreamFault.DROP_CLOSE, StreamFault.DUPLICATE,
    StreamFault.REORDER, StreamFault.MISS, StreamFault.MISS_FINAL,
)
_NOT_FOR_FINAL = frozenset({StreamFault.MISS})
_NOT_FOR_UPDATE = frozenset({StreamFault.MISS_FINAL})


class StallMode(str, enum.Enum):
    """A connection that stays open but goes quiet."""

    DATA = "data"  # no pushes; acks, pongs and server pings continue (a stuck feed)
    SILENT = "silent"  # nothing at all is sent or answered (a dead peer behind a live TCP)


def _norm_symbol(s: str) -> str:
    return s.replace("/", "").replace("-", "").upper()


@dataclass(frozen=True)
class StreamFaults:
    """Fault configuration of one simulated stream server. Defaults mean "behave perfectly".

    rates: probability per kline push of each random kind. MISS applies to in-progress
        updates only, MISS_FINAL to closed ones only; the rates eligible for either kind of
        push must sum to <= 1.
    stall: while set, every connection is quiet in that way (pushes computed meanwhile are
        lost, not queued: a real stalled feed does not replay).
    refuse: symbols (unified or id) whose subscriptions are refused in the dialect's words.
    refuse_rate: probability per subscription argument of an injected refusal.
    handshake_status: while set, every WebSocket upgrade is answered with this HTTP status
        (e.g. 503 during an outage) and no connection is made.
    stale_final_rate: probability per final push that it carries values the exchange revises
        afterwards (its volume short by a tenth: late trades counted later), so REST serves
        the revised candle and the stream's is wrong. Drawn from a third generator per
        connection (the push schedule does not move).
    """

    rates: Mapping[StreamFault, float] = field(default_factory=dict)
    seed: int = 0
    stall: StallMode | None = None
    refuse: frozenset[str] = frozenset()
    refuse_rate: float = 0.0
    handshake_status: int | None = None
    stale_final_rate: float = 0.0

    def __post_init__(self) -> None:
        rates = {StreamFault(k): float(v) for k, v in self.rates.items()}
        for k, v in rates.items():
            if k not in RANDOM_KINDS:
                raise ValueError(f"{k.value} is not a random stream fault")
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"rate of {k.value} must be in [0, 1]")
        for excluded in (_NOT_FOR_FINAL, _NOT_FOR_UPDATE):
            if sum(v for k, v in rates.items() if k not in excluded) > 1.0 + 1e-9:
                raise ValueError("stream fault rates sum to more than 1 for one kind of push")
        if not 0.0 <= self.refuse_rate <= 1.0:
            raise ValueError("refuse_rate must be in [0, 1]")
        if not 0.0 <= self.stale_final_rate <= 1.0:
            raise ValueError("stale_final_rate must be in [0, 1]")
        object.__setattr__(self, "rates", MappingProxyType(rates))
        object.__setattr__(self, "refuse", frozenset(_norm_symbol(s) for s in self.refuse))
        if self.stall is not None:
            object.__setattr__(self, "stall", StallMode(self.stall))


class StreamFaultInjector:
    """Thread-safe fault decisions; the server thread draws, any thread may reconfigure."""

    def __init__(self, faults: StreamFaults | None = None) -> None:
        self._lock = threading.Lock()
        self._faults = faults or StreamFaults()
        self._push_rngs: dict[int, random.Random] = {}
        self._refuse_rngs: dict[int, random.Random] = {}
        self._stale_rngs: dict[int, random.Random] = {}

    @property
    def faults(self) -> StreamFaults:
        return self._faults

    def configure(self, faults: StreamFaults) -> StreamFaults:
        """Install `faults`, returning the previous config. Schedules restart (per connection)
        only when `seed`, `rates` or `refuse_rate` change."""
        with self._lock:
            old = self._faults
            if faults.seed != old.seed or dict(faults.rates) != dict(old.rates):
                self._push_rngs.clear()
            if faults.seed != old.seed or faults.refuse_rate != old.refuse_rate:
                self._refuse_rngs.clear()
            if faults.seed != old.seed or faults.stale_final_rate != old.stale_final_rate:
                self._stale_rngs.clear()
            self._faults = faults
            return old

    def draw(self, conn_no: int, closed: bool) -> StreamFault | None:
        """The fate of the next kline push on connection `conn_no`."""
        with self._lock:
            f = self._faults
            if not f.rates:
                return None
            rng = self._push_rngs.get(conn_no)
            if rng is None:
                rng = self._push_rngs[conn_no] = random.Random(f"{f.seed}:{conn_no}:push")
            x = rng.random()
            excluded = _NOT_FOR_FINAL if closed else _NOT_FOR_UPDATE
            acc = 0.0
            for kind in RANDOM_KINDS:
                rate = f.rates.get(kind, 0.0)
                if rate <= 0.0 or kind in excluded:
                    continue
                acc += rate
                if x < acc:
                    return kind
            return None

    def stale(self, conn_no: int) -> bool:
        """Whether the next final push on connection `conn_no` carries pre-revision values."""
        with self._lock:
            f = self._faults
            if f.stale_final_rate <= 0.0:
                return False
            rng = self._stale_rngs.get(conn_no)
            if rng is None:
                rng = self._stale_rngs[conn_no] = random.Random(f"{f.seed}:{conn_no}:stale")
            return rng.random() < f.stale_final_rate

    def refuses(self, conn_no: int, symbol_id: str) -> bool:
        """Whether one subscription argument for `symbol_id` is refused."""
        with self._lock:
            f = self._faults
            if symbol_id.upper() in f.refuse:
                return True
            if f.refuse_rate <= 0.0:
                return False
            rng = self._refuse_rngs.get(conn_no)
            if rng is None:
                rng = self._refuse_rngs[conn_no] = random.Random(f"{f.seed}:{conn_no}:refuse")
            return rng.random() < f.refuse_rate

