"""Every message between the ingestion actors, and the candles they carry to subscribers.

Immutable, so they are safe to share across threads. Timer messages an actor tells itself
(`_Tick`, `_Pump`...) stay private to its module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pykka

from .market.candles import Candle, Row
from .market.paging import Served

__all__ = [
    "AcceptedGaps", "AcceptedGapsQuery", "Candle", "ClusterStatus", "ExchangeStatus", "FetchRequest", "FetchResult",
    "ForgetSeries", "LeaseLost", "Pause", "Reset", "ResumePoint", "ResumeQuery", "Row", "SeriesKey", "SeriesStatus",
    "StorageStatus", "StoreChanged", "StoredCandle", "StreamJoin", "StreamLeave", "StreamState", "StreamStatus",
    "StreamedCandles", "Write", "Written",
]


@dataclass(frozen=True)
class SeriesKey:
    exchange: str
    symbol: str
    timeframe: str

    def __str__(self) -> str:
        return f"{self.exchange}:{self.symbol}@{self.timeframe}"


# -- series <-> exchange ---------------------------------------------------------------------


@dataclass(frozen=True)
class FetchRequest:
    """Fetch up to `limit` candles from `since` (and before `until`, when asking for a hole);
    one outstanding per series (a resend replaces it)."""

    key: SeriesKey
    since: int
    limit: int
    req_id: int
    reply_to: pykka.ActorRef[Any]
    priority: bool = False
    until: int | None = None
    # [from, to) stretches an operator accepted as lost: rows there are left out of the answer
    # before validation (the exchange keeps serving invalid candles there)
    skip: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class FetchResult:
    """Answer to a `FetchRequest`: closed, validated candles at or after `since`, what the answer
    proves (`served`: the stretch it covers completely, see `market.paging`), or the error and
    what the server said."""

    req_id: int
    candles: tuple[Candle, ...] = ()
    error: BaseException | None = None
    retry_after: float | None = None
    horizon_ms: int = 0  # open time of the first candle that is not closed yet
    served: Served | None = None
    settle_ms: int = 60_000  # a missing candle younger than this may still be published
    now_ms: int = 0  # the exchange's time when it answered, as best known
    market_reopens_ms: int | None = None  # the market is closed until then (forex weekends)
    listed_ms: int | None = None  # when the exchange says the market was listed, if it says
    closed_spans: tuple[tuple[int, int], ...] = ()  # [from, to) when the market was closed, in the answer's stretch


@dataclass(frozen=True)
class Reset:
    """Operator reset: breaker and bucket penalty (exchange), retry state and quarantine (series)."""


@dataclass(frozen=True)
class Pause:
    paused: bool


# -- series <-> stream ----------------------------------------------------------------------


@dataclass(frozen=True)
class StreamJoin:
    """A series asks its exchange's stream for its candles (told at start and again when it
    changes its mind). `live`: the series is caught up, so the stream stores its closed candles
    itself and tells it afterwards; before that the stream only subscribes and says when it is up."""

    key: SeriesKey
    reply_to: pykka.ActorRef[Any]
    live: bool = False


@dataclass(frozen=True)
class StreamLeave:
    """A series stops (removed, or its actor ends): the stream stores nothing more for it."""

    key: SeriesKey
    reply_to: pykka.ActorRef[Any]


@dataclass(frozen=True)
class StreamState:
    """The stream's word to one series: its subscription is `up` (the first message for it arrived
    since the stream last (re)subscribed), or not (the connection is down, the subscription was
    refused, or nothing came for it: `reason`). `now_ms` is the exchange's time when it was said,
    so the series can tell whether a candle closed while the stream was not serving it."""

    key: SeriesKey
    up: bool
    now_ms: int
    reason: str | None = None


@dataclass(frozen=True)
class StreamedCandles:
    """Closed candles of one series from the stream, oldest first. `stored`: already written by
    the stream (one `Write` per burst, the same idempotent write as REST) and acknowledged with
    `generation`; not stored when that write failed, and the series writes them itself."""

    key: SeriesKey
    candles: tuple[Candle, ...]
    stored: bool = True
    generation: str | None = None
    source: str = "stream"


# -- series <-> storage ----------------------------------------------------------------------


@dataclass(frozen=True)
class Write:
    """Candles to store, and confirmed gaps to record as (exchange, symbol, timeframe, from, to,
    reason); acknowledged with `Written` to `reply_to`."""

    rows: tuple[Row, ...]
    gaps: tuple[tuple[str, str, str, int, int, str], ...]
    token: int
    reply_to: pykka.ActorRef[Any] | None


@dataclass(frozen=True)
class Written:
    """The storage's answer to a `Write`: `error` when it could not be stored (the series keeps its
    place and retries), and the store's generation (see `StoreChanged`)."""

    token: int
    generation: str
    error: str | None = None


@dataclass(frozen=True)
class StoreChanged:
    """The storage actor had to recreate the database (file deleted or corrupt): every series it
    knows re-reads its resume point now, rather than at its next write, up to a candle later."""

    generation: str


@dataclass(frozen=True)
class ResumeQuery:
    """A series asks where to resume: answered with a `ResumePoint`."""

    key: SeriesKey
    timeframe_ms: int
    start_ms: int
    reply_to: pykka.ActorRef[Any]


@dataclass(frozen=True)
class ResumePoint:
    """What a series needs from the store to resume: last stored candle and holes to refetch."""

    last_ts: int | None
    missing: tuple[tuple[int, int], ...]
    generation: str
    # the series' confirmed gaps as (reason, stretches, candles): shown in its health `detail`
    gap_totals: tuple[tuple[str, int, int], ...] = ()


@dataclass(frozen=True)
class AcceptedGapsQuery:
    """A series whose candles fail validation asks which stretches an operator accepted as lost
    (`ctl accept-gap`) end after `after_ms`: answered with `AcceptedGaps`."""

    key: SeriesKey
    after_ms: int
    reply_to: pykka.ActorRef[Any]


@dataclass(frozen=True)
class AcceptedGaps:
    """[from, to) stretches an operator accepted as lost: left out of the series' requests."""

    gaps: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class StoredCandle:
    """One candle that was not in the store before: what `System.subscribe` delivers."""

    exchange: str
    symbol: str
    timeframe: str
    ts: int
    open: float
    high: float
    low: float
    close: float
    volume: float


# -- status to the health actor --------------------------------------------------------------


@dataclass(frozen=True)
class SeriesStatus:
    path: str
    key: SeriesKey
    status: str
    last_ts: int | None
    failures: int
    detail: str | None = None
    start_ms: int | None = None  # where its backfill starts: what backfill progress counts from
    # the market was closed (forex weekends) until then, or is: no candle is due between last_ts and it
    reopens_ms: int | None = None
    source: str | None = None  # "stream" or "rest": how its candles arrive now (None: no stream configured)


@dataclass(frozen=True)
class ExchangeStatus:
    name: str
    breaker: str
    status: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StreamStatus:
    """An exchange's live stream: `state` is "up" (every connection up), "partial", "connecting",
    "down" or "off"; `detail` counts connections, streams and reconnects, and says the last error."""

    name: str
    state: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StorageStatus:
    ok: bool
    detail: str | None = None


@dataclass(frozen=True)
class ForgetSeries:
    """A series was removed at run time: drop it from the health report."""

    path: str


# -- clustering (PostgreSQL, [cluster] enabled) ------------------------------------------------


@dataclass(frozen=True)
class LeaseLost:
    """Storage to the cluster actor: the database refused writes of these series (their lease
    moved to another node): stop them here and let them go."""

    keys: tuple[SeriesKey, ...]


@dataclass(frozen=True)
class ClusterStatus:
    """The cluster actor to health: this node, its state, the live nodes and what it owns."""

    node: str
    state: str  # joining | member | superseded | unreachable | stopped
    detail: str | None
    live_nodes: tuple[str, ...]
    owned: int  # series whose lease this node holds
    wanted: int  # series the cluster runs in all
    refused_writes: int
    lease_s: float
