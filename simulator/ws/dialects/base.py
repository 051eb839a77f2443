"""What every WebSocket dialect provides, and the neutral types the server speaks in.

A dialect is pure: it parses client frames into `Request`s, names and resolves topics, and
renders acks, refusals, pongs and kline pushes. The session (`simulator.ws.session`) owns all
state and policy (limits, faults, which topics are live) and asks the dialect for the words.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ...history import INTERVALS, Candle, CandleHistory, Market


def dumps(obj: object) -> str:
    """Compact JSON, as the exchanges send it."""
    return json.dumps(obj, separators=(",", ":"))


def plain(num: str) -> str:
    """'123.45000000' -> '123.45', '5.00000000' -> '5': OKX and Bybit send no padding zeros."""
    if "." in num:
        num = num.rstrip("0").rstrip(".")
    return num or "0"


class Op(str, enum.Enum):
    """What a client frame asks for."""

    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"
    PING = "ping"
    LIST = "list"  # Binance LIST_SUBSCRIPTIONS
    SET_PROPERTY = "set_property"  # Binance SET_PROPERTY ["combined", bool]
    GET_PROPERTY = "get_property"
    INVALID = "invalid"  # unparseable or unknown op: answered with the dialect's error


@dataclass(frozen=True)
class Request:
    """One parsed client frame. `args` are the raw subscription arguments (stream names,
    OKX arg objects, Bybit topic strings); `error` explains an INVALID frame."""

    op: Op
    req_id: object = None
    args: tuple[object, ...] = ()
    error: str = ""


@dataclass(frozen=True)
class StreamKey:
    """A candle series in `CandleHistory` terms: market id ("BTCUSDT") and interval ("1m")."""

    symbol_id: str
    interval: str


@dataclass(frozen=True)
class Topic:
    """A subscribable stream as the exchange names it (`name`), with the raw argument echoed
    back in acks and pushes (`arg`: the OKX arg object, else the name)."""

    name: str
    key: StreamKey
    arg: object


class Refusal(str, enum.Enum):
    """Why a subscription argument is refused (each dialect words these its own way)."""

    BAD_ARG = "bad_arg"  # malformed stream/topic/channel
    UNKNOWN_SYMBOL = "unknown_symbol"
    INJECTED = "injected"  # StreamFaults.refuse / refuse_rate
    TOO_MANY_STREAMS = "too_many_streams"  # per-connection stream limit
    TOO_MANY_ARGS = "too_many_args"  # per-request argument limit


@dataclass(frozen=True)
class Resolved:
    """A subscription argument resolved to a topic, or refused (`topic` None)."""

    arg: object
    topic: Topic | None = None
    refusal: Refusal | None = None


@dataclass(frozen=True)
class Rules:
    """Per-exchange pacing, keepalive and limits (values from the exchange's docs; see
    simulator/ws/README.md). None disables a rule."""

    update_period_s: float  # in-progress kline push period per stream
    server_ping_s: float | None  # server-sent protocol ping frames (Binance)
    pong_timeout_s: float | None  # close if the client has not answered a ping for this long
    idle_close_s: float | None  # close if nothing was sent to the client for this long
    max_age_s: float | None  # close every connection after this long (Binance: 24 h)
    max_streams_per_connection: int | None
    max_args_per_request: int | None
    max_incoming_per_s: int | None  # client frames per second; over it: dialect's reaction
    max_connections_per_window: tuple[int, float] | None  # (count, window s) per server
    closed_flag: bool = True  # False: pushes carry no closed flag (a dialect of an exchange without one)


@dataclass
class SessionView:
    """What a dialect may read about the connection it answers for."""

    conn_id: str
    topics: dict[str, Topic] = field(default_factory=dict)
    combined: bool = False


class Dialect(Protocol):
    """One exchange's public kline WebSocket dialect."""

    name: str
    #: aiohttp route patterns that upgrade to this dialect's WebSocket.
    ws_routes: Sequence[str]
    rules: Rules
    #: True if one bad argument fails the whole SUBSCRIBE (Binance, Bybit); False if each
    #: argument is answered on its own (OKX).
    atomic_subscribe: bool

    def parse(self, text: str) -> Request:
        """Parse one client text frame."""
        ...

    def initial_topics(self, path: str, query: Mapping[str, str],
                       history: CandleHistory) -> tuple[list[Topic], bool]:
        """Topics named by the connection URL (Binance raw/combined streams) and whether
        pushes are wrapped as combined-stream events."""
        ...

    def resolve(self, arg: object, history: CandleHistory) -> Resolved:
        """Map one subscription argument to a topic, or say why it is refused."""
        ...

    def align(self, topic: Topic) -> tuple[int, int]:
        """(duration ms, alignment offset ms) of the topic's candles on this exchange."""
        ...

    def acks(self, req: Request, accepted: Sequence[Topic], refused: Sequence[Resolved],
             view: SessionView) -> list[str]:
        """Frames answering a (partly) processed SUBSCRIBE/UNSUBSCRIBE."""
        ...

    def reply(self, req: Request, view: SessionView) -> list[str]:
        """Frames answering PING/LIST/properties/INVALID requests."""
        ...

    def push(self, topic: Topic, market: Market, candle: Candle, closed: bool, now_ms: int,
             view: SessionView, flag: bool = True) -> str:
        """One kline/candle update frame (`flag`: with the closed flag, else without it)."""
        ...

    def expiry_notice(self, now_ms: int, view: SessionView) -> list[str]:
        """Frames sent just before the server closes an expired connection."""
        ...

    def over_rate(self, view: SessionView) -> tuple[list[str], int | None]:
        """Reaction to too many client frames per second: frames to send, then a close code
        (None = keep the connection)."""
        ...


def utc_align(interval: str) -> tuple[int, int]:
    """UTC-aligned candle boundaries, as `CandleHistory` uses them."""
    return INTERVALS[interval]
