"""TOML configuration: the user's contract with the daemon.

Every key is declared once in a table below (name, parser, default), so adding
a key is one line and unknown keys can be rejected by name: a typo like
``lookbak`` must fail loudly, not silently fall back to a default. Errors are
``ConfigError`` with a single line naming the file, section and key.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import unquote, urlsplit

from ..actors.market.candles import TIMEFRAME_MS
from ..actors.market.symbols import check_symbol

__all__ = [
    "AlertsConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "ControlConfig",
    "ExchangeConfig",
    "IngestConfig",
    "MetricsConfig",
    "ResilienceConfig",
    "StorageConfig",
    "default",
    "from_dict",
    "load",
    "parse_duration",
    "parse_host_port",
    "to_dict",
]


class ConfigError(Exception):
    """The configuration is unusable; the message is one line saying where and why."""


# -- dataclasses -------------------------------------------------------------


@dataclass(frozen=True)
class StorageConfig:
    """`path`: a SQLite file (the default store); `url`: a PostgreSQL database instead
    (``postgresql://user[:password]@host[:port]/db``; the password may also come from
    PGPASSWORD or ~/.pgpass, and is never shown: see `display`). `timescale`: None tries to
    make candles a TimescaleDB hypertable where the server offers it, False never, True must."""

    path: str = "candlekeeper.db"
    url: str | None = field(default=None, repr=False)
    timescale: bool | None = None

    @property
    def location(self) -> str:
        """What the stores open: the URL (password included: never log it) or the path."""
        return self.url or self.path

    @property
    def display(self) -> str:
        """The database as it may be logged or shown: the path, or the URL without its password."""
        return _redact_url(self.url) if self.url else self.path

    def __repr__(self) -> str:
        return f"StorageConfig(path={self.path!r}, url={self.display if self.url else None!r}, " \
               f"timescale={self.timescale!r})"


def _default_node() -> str:
    """This host's name, as a node name (one daemon per host needs no `node` key)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()).strip("-.") or "node"
    return name[:63]


@dataclass(frozen=True)
class ClusterConfig:
    """`[cluster]`: several daemons share one PostgreSQL database and its series by leases.
    `node` names this daemon (unique among them; default: the host name); `lease` is how long
    a lease lasts without renewal (renewed every lease/3); `rate_budget` weighs this node's
    share of the series (default: the requests per second its exchanges allow, summed)."""

    enabled: bool = False
    node: str = field(default_factory=_default_node)
    lease: float = 15.0
    rate_budget: float | None = None


@dataclass(frozen=True)
class ControlConfig:
    socket: str = "candlekeeper.sock"
    tcp: str | None = None
    token: str | None = field(default=None, repr=False)
    chaos: bool = False  # tests and soaks only: accept the `crash` command


@dataclass(frozen=True)
class IngestConfig:
    """``since_ms`` (absolute start) wins over ``lookback`` (seconds back from now) when set."""

    lookback: float = 86400.0
    since_ms: int | None = None
    poll_interval: float = 10.0
    timeframes: tuple[str, ...] = ("1m",)


@dataclass(frozen=True)
class ResilienceConfig:
    """The `[resilience]` keys; `candlekeeper.app.settings` turns them into the state machines'
    configs (`RetryConfig`, `BreakerConfig`, `QuarantineConfig`)."""

    retry_attempts: int = 3
    retry_base_delay: float = 1.0
    retry_max_delay: float = 60.0
    breaker_mode: str = "consecutive"
    breaker_threshold: int = 5
    breaker_window: int = 100
    breaker_minimum_calls: int = 10
    breaker_failure_rate: float = 0.5
    breaker_slow_call: float | None = None
    breaker_recovery: float = 60.0
    breaker_max_recovery: float = 600.0
    breaker_half_open_calls: int = 1
    quarantine_after: int = 10
    quarantine_probe: float = 60.0
    stream_recovery: float = 5.0
    stream_max_recovery: float = 15.0


#: where an exchange's candles come from: ccxt (crypto exchanges), or OANDA's v20 REST API
SOURCES = ("ccxt", "oanda")
#: keys only a source of that kind understands
SOURCE_KEYS = {"oanda": ("token_env", "environment", "price", "account_id")}


@dataclass(frozen=True)
class ExchangeConfig:
    """One ``[exchanges.NAME]`` section with [ingest]/[resilience] overrides already merged.

    ``source`` says who speaks to the exchange: "ccxt" (``exchange`` is the ccxt id) or "oanda"
    (OANDA v20; ``exchange`` is "oanda"; ``token_env`` names the environment variable holding the
    token, never the token itself; ``environment``, ``price`` and ``account_id`` as in
    `candlekeeper.actors.sources.oanda.OandaSettings`)."""

    name: str
    exchange: str
    symbols: tuple[str, ...]
    source: str = "ccxt"
    token_env: str = "OANDA_TOKEN"
    environment: str = "practice"
    price: str = "M"
    account_id: str | None = None
    api_base: str | None = None
    rate_limit: float | None = None  # requests/s; None: the exchange's own budget (ccxt's metadata)
    timeout: float = 10.0
    page_limit: int | None = None  # None: the exchange's own maximum page
    heartbeat: float = 30.0
    markets_refresh: float = 300.0
    live: str = "auto"  # "auto", "websocket" or "rest": how caught-up series get new candles
    ws_url: str | None = None  # the exchange's WebSocket streams elsewhere (a proxy, a test server)
    ingest: IngestConfig = IngestConfig()
    resilience: ResilienceConfig = ResilienceConfig()


@dataclass(frozen=True)
class MetricsConfig:
    listen: str | None = None


@dataclass(frozen=True)
class AlertsConfig:
    slack_webhook: str | None = field(default=None, repr=False)
    pagerduty_routing_key: str | None = field(default=None, repr=False)
    pagerduty_url: str | None = None


@dataclass(frozen=True)
class Config:
    storage: StorageConfig
    control: ControlConfig
    ingest: IngestConfig
    resilience: ResilienceConfig
    exchanges: tuple[ExchangeConfig, ...]
    metrics: MetricsConfig = MetricsConfig()
    alerts: AlertsConfig = AlertsConfig()
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    source: str = "<dict>"


# -- value parsers -----------------------------------------------------------


class _Invalid(Exception):
    """A value is wrong: args[0] says what was expected, the caller adds where.

    ``whole=False`` means the message already names the culprit (an item of a
    list), so the caller does not append the whole value.
    """

    def __init__(self, message: str, whole: bool = True) -> None:
        super().__init__(message)
        self.whole = whole


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_HINT = "a duration (seconds, or a string like 500ms, 1.5s, 30s, 5m, 10h, 7d)"


def parse_duration(value: Any) -> float:
    """Seconds from a number or a ``500ms``/``30s``/``5m``/``10h``/``7d`` string.

    ValueError otherwise (negative, NaN, bool, other units, spaces).
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}: expected {_DURATION_HINT}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.fullmatch(value)):
        seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    else:
        raise ValueError(f"invalid duration {value!r}: expected {_DURATION_HINT}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"invalid duration {value!r}: must be a finite number >= 0")
    return seconds


def _duration(minimum: float = 0.0, strict: bool = True) -> Callable[[Any], float]:
    bound = f"> {minimum:g}s" if strict else f">= {minimum:g}s"

    def parse(value: Any) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError:
            raise _Invalid(f"expected {_DURATION_HINT}") from None
        if seconds < minimum or (strict and seconds == minimum):
            raise _Invalid(f"expected a duration {bound}")
        return seconds

    return parse


def _int(minimum: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if type(value) is bool or not isinstance(value, int) or value < minimum:
            raise _Invalid(f"expected an integer >= {minimum}")
        return int(value)

    return parse


def _positive_float(value: Any) -> float:
    if type(value) is bool or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise _Invalid("expected a number > 0")
    return float(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("expected true or false")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid("expected a non-empty string")
    return value


def parse_host_port(value: str) -> tuple[str, int]:
    """`HOST:PORT` (HOST a name, an IPv4 address or `[v6]`; empty means loopback) as (host, port);
    ValueError with a one-line reason otherwise. The one parser of addresses: config keys, the
    control client's `tcp://HOST:PORT` and the listeners all use it."""
    host, sep, port = value.rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not port.isascii() or not port.isdigit() or int(port) > 65535 or " " in host or "[" in bare:
        raise ValueError(f"expected HOST:PORT with PORT a number 0-65535, got {value!r}")
    return bare or "127.0.0.1", int(port)


def _host_port(value: Any) -> str:
    if isinstance(value, str) and value.rpartition(":")[0]:
        try:
            parse_host_port(value)
            return value
        except ValueError:
            pass
    raise _Invalid('expected "host:port"')


def _rate(value: Any) -> float:
    if type(value) is bool or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise _Invalid("expected a number in (0, 1]")
    return float(value)


def _breaker_mode(value: Any) -> str:
    if value not in ("consecutive", "rate"):
        raise _Invalid('expected "consecutive" or "rate"')
    return str(value)


def _heartbeat(value: Any) -> float:
    return 0.0 if value == "off" else _duration(strict=False)(value)


def _off_or_duration(value: Any) -> float | None:
    if value == "off":
        return None
    return _duration()(value)


def _url(value: Any, *, bare: bool = False) -> str:
    expected = '"scheme://host[:port]"' if bare else "an http(s) URL"
    if not isinstance(value, str):
        raise _Invalid(f"expected {expected}")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise _Invalid(f"expected {expected}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Invalid(f"expected {expected}")
    if bare and (parts.path not in ("", "/") or parts.query or parts.fragment or parts.username):
        raise _Invalid(f"expected {expected} without path, query or credentials")
    return value.rstrip("/") if bare else value


_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


def _redact_url(url: str) -> str:
    """A URL with its password (if any) replaced by ***: safe to show."""
    return _URL_PASSWORD.sub(r"\1***@", url)


def _pg_url(value: Any) -> str:
    """A PostgreSQL URL; any error message shows it without its password."""
    expected = '"postgresql://user@host[:port]/database"'
    if not isinstance(value, str) or not value.startswith(("postgresql://", "postgres://")):
        shown = _show(_redact_url(value)) if isinstance(value, str) else _show(value)
        raise _Invalid(f"expected {expected}, got {shown}", whole=False)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise _Invalid(f"expected {expected}, got {_show(_redact_url(value))}", whole=False) from None
    database = unquote(parts.path.lstrip("/"))
    if not database or "/" in database:
        raise _Invalid(f"expected {expected} naming one database, got {_show(_redact_url(value))}", whole=False)
    return value


_NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def _node(value: Any) -> str:
    if not isinstance(value, str) or not _NODE_RE.fullmatch(value):
        raise _Invalid("expected a name of 1-63 letters, digits, '.', '-' or '_'")
    return value


def _api_base(value: Any) -> str:
    return _url(value, bare=True)


LIVE_MODES = ("auto", "websocket", "rest")


def _live(value: Any) -> str:
    if value not in LIVE_MODES:
        raise _Invalid('expected "auto", "websocket" or "rest"')
    return str(value)


def _ws_url(value: Any) -> str:
    expected = '"ws://host[:port]" or "wss://host[:port]" (a path is kept as a prefix)'
    if not isinstance(value, str):
        raise _Invalid(f"expected {expected}")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise _Invalid(f"expected {expected}") from None
    if parts.scheme not in ("ws", "wss") or not parts.hostname or parts.query or parts.fragment or parts.username:
        raise _Invalid(f"expected {expected}")
    return value.rstrip("/")


def _check_live(exchange_id: str, live: str) -> None:
    """`live = "websocket"` needs an exchange the daemon can stream (ccxt.pro and its closed flag)."""
    if live != "websocket":
        return
    from ..actors.sources.ccxt_stream import supports  # deferred: imports ccxt.pro

    if not supports(exchange_id):
        raise _Invalid(f'"websocket": no WebSocket candles with a closed flag for {exchange_id} '
                       '(streamed: binance, okx, bybit); use "auto" or "rest"', whole=False)


def _symbols(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise _Invalid('expected a non-empty list of "BASE/QUOTE" strings')
    seen: set[str] = set()
    for s in value:
        try:
            check_symbol(s)
        except ValueError:
            raise _Invalid(f'{_show(s)} is not a "BASE/QUOTE" symbol', whole=False) from None
        if s in seen:
            raise _Invalid(f"{_show(s)} is listed twice", whole=False)
        seen.add(s)
    return tuple(value)


def _timeframes(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise _Invalid("expected a non-empty list of timeframes")
    for tf in value:
        if tf == "1M":
            raise _Invalid(
                '"1M": monthly candles are not supported: months differ in length, and a series steps'
                " through time by one fixed length (use 1d or 1w and roll up)",
                whole=False,
            )
        if not isinstance(tf, str) or tf not in TIMEFRAME_MS:
            raise _Invalid(
                f"unknown timeframe {_show(tf)} (supported: {' '.join(TIMEFRAME_MS)})",
                whole=False,
            )
        if value.count(tf) > 1:
            raise _Invalid(f"{_show(tf)} is listed twice", whole=False)
    return tuple(value)


def _since(value: Any) -> int:
    """Epoch ms from an ISO 8601 date/datetime (string or TOML value); naive means UTC."""
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            raise _Invalid("expected an ISO 8601 date or datetime") from None
    if isinstance(value, dt.datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    elif isinstance(value, dt.date):
        moment = dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)
    else:
        raise _Invalid("expected an ISO 8601 date or datetime")
    ms = (moment - _EPOCH) // dt.timedelta(milliseconds=1)
    if ms < 0:
        raise _Invalid("expected a date after 1970-01-01")
    if moment > dt.datetime.now(dt.UTC):
        raise _Invalid("expected a date in the past")
    return ms


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _choice(*allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in allowed:
            raise _Invalid("expected " + " or ".join(json.dumps(a) for a in allowed))
        return str(value)

    return parse


_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env_name(value: Any) -> str:
    if not isinstance(value, str) or not _ENV_NAME_RE.fullmatch(value):
        # never shown: a token written here by mistake must not reach a log line
        raise _Invalid("expected the name of an environment variable (letters, digits, _), not its value",
                       whole=False)
    return value


def _oanda_exchange(value: Any) -> str:
    if value != "oanda":
        raise _Invalid('with source = "oanda" the exchange is "oanda" (leave the key out)')
    return "oanda"


def _oanda_symbols(value: Any) -> tuple[str, ...]:
    from ..actors.sources.oanda import instrument_of  # deferred: it imports aiohttp

    symbols = _symbols(value)
    for s in symbols:
        try:
            instrument_of(s)
        except ValueError:
            raise _Invalid(f'{_show(s)} is not an OANDA instrument ("EUR/USD", "XAU/USD", "SPX500/USD")',
                           whole=False) from None
        if "_" in s:
            raise _Invalid(f'{_show(s)}: write OANDA instruments as "BASE/QUOTE" ("EUR/USD", not "EUR_USD")',
                           whole=False)
    return symbols


def _ccxt_id(value: Any) -> str:
    import ccxt  # deferred: importing ccxt costs ~0.5 s and only this key needs it

    if not isinstance(value, str) or value not in ccxt.exchanges:
        raise _Invalid("expected a ccxt exchange id (see ccxt.exchanges)")
    if not _ccxt_has_candles(value):
        raise _Invalid(f"{value} has no candles in ccxt (fetchOHLCV is not supported): it cannot be collected",
                       whole=False)
    return value


@functools.cache
def ccxt_metadata(exchange: str) -> Any:
    """An instance of the exchange's ccxt class, made once, to read its metadata (`has`,
    `timeframes`, `features`, `rateLimit`): one costs tens of ms, and every config load, every
    `add` and every profile reads it. Never used to send a request, never changed."""
    import ccxt  # deferred: see _ccxt_id

    return getattr(ccxt, exchange)()


def _ccxt_has_candles(exchange: str) -> bool:
    return bool(ccxt_metadata(exchange).has.get("fetchOHLCV"))


# -- key tables ---------------------------------------------------------------

_Spec = dict[str, Callable[[Any], Any]]

_STORAGE: _Spec = {"path": _string, "url": _pg_url, "timescale": _bool}
_CLUSTER: _Spec = {"enabled": _bool, "node": _node, "lease": _duration(1.0, strict=False),
                   "rate_budget": _positive_float}
_CONTROL: _Spec = {"socket": _string, "tcp": _host_port, "token": _string, "chaos": _bool}
_INGEST: _Spec = {
    "lookback": _duration(),
    "since": _since,
    "poll_interval": _duration(),
    "timeframes": _timeframes,
}
_RESILIENCE: _Spec = {
    "retry_attempts": _int(1),
    "retry_base_delay": _duration(strict=False),
    "retry_max_delay": _duration(strict=False),
    "breaker_mode": _breaker_mode,
    "breaker_threshold": _int(1),
    "breaker_window": _int(1),
    "breaker_minimum_calls": _int(1),
    "breaker_failure_rate": _rate,
    "breaker_slow_call": _off_or_duration,
    "breaker_recovery": _duration(),
    "breaker_max_recovery": _duration(),
    "breaker_half_open_calls": _int(1),
    "quarantine_after": _int(1),
    "quarantine_probe": _duration(),
    "stream_recovery": _duration(),
    "stream_max_recovery": _duration(),
}
_EXCHANGE_OWN: _Spec = {
    "symbols": _symbols,
    "exchange": _ccxt_id,
    "api_base": _api_base,
    "rate_limit": _positive_float,
    "timeout": _duration(),
    "page_limit": _int(1),
    "heartbeat": _heartbeat,
    "markets_refresh": _duration(),
    "source": _choice(*SOURCES),
    "token_env": _env_name,
    "environment": _choice("practice", "live"),
    "price": _choice("M", "B", "A"),
    "account_id": _string,
    "live": _live,
    "ws_url": _ws_url,
}
_EXCHANGE: _Spec = {**_EXCHANGE_OWN, **_INGEST, **_RESILIENCE}
#: an OANDA section: the same keys, read as OANDA means them
_OANDA_EXCHANGE: _Spec = {**_EXCHANGE, "exchange": _oanda_exchange, "symbols": _oanda_symbols, "page_limit": _int(1)}
_METRICS: _Spec = {"listen": _host_port}
_ALERTS: _Spec = {
    "slack_webhook": _url,
    "pagerduty_routing_key": _string,
    "pagerduty_url": _url,
}
_SECTIONS: dict[str, _Spec] = {
    "storage": _STORAGE,
    "control": _CONTROL,
    "ingest": _INGEST,
    "resilience": _RESILIENCE,
    "metrics": _METRICS,
    "alerts": _ALERTS,
    "cluster": _CLUSTER,
}
# Sections whose keys map 1:1 onto their dataclass (no merging, no cross-checks).
_PLAIN_SECTIONS: dict[str, type] = {
    "storage": StorageConfig,
    "control": ControlConfig,
    "metrics": MetricsConfig,
    "alerts": AlertsConfig,
    "cluster": ClusterConfig,
}
_SECRETS = {("control", "token"), ("alerts", "slack_webhook"), ("alerts", "pagerduty_routing_key")}
_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")


# -- loading -----------------------------------------------------------------


def _show(value: Any) -> str:
    """A value as the user wrote it, on one short line."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, Mapping):
        return "a table"
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(_show(v) for v in value) + "]"
    else:
        text = repr(value).replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


class _Loader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {f'{where} ' if where else ''}{message}")

    def table(self, data: Any, where: str) -> Mapping[str, Any]:
        if data is None:
            return {}
        if not isinstance(data, Mapping):
            raise self.fail("", f"{where} must be a table, got {_show(data)}")
        return data

    def section(self, data: Any, where: str, spec: _Spec) -> dict[str, Any]:
        """Parse the keys present in a section (None counts as absent); defaults come later."""
        data = self.table(data, where)
        out: dict[str, Any] = {}
        for key, value in data.items():
            parse = spec.get(key)
            if parse is None:
                raise self.fail(where, f"unknown key {_show(key)}")
            if value is None:
                continue
            try:
                out[key] = parse(value)
            except _Invalid as exc:
                got = f", got {_show(value)}" if exc.whole else ""
                raise self.fail(where, f"{key}: {exc.args[0]}{got}") from None
        return out

    def ingest(self, values: dict[str, Any], where: str, base: IngestConfig) -> IngestConfig:
        if "since" in values and "lookback" in values:
            raise self.fail(where, "since and lookback are both given; use one")
        merged = {k: v for k, v in values.items() if k in _INGEST and k != "since"}
        if "since" in values:
            merged["since_ms"] = values["since"]
        elif "lookback" in values:
            merged["since_ms"] = None
        return replace(base, **merged)

    def resilience(
        self, values: dict[str, Any], where: str, base: ResilienceConfig
    ) -> ResilienceConfig:
        merged = replace(base, **{k: v for k, v in values.items() if k in _RESILIENCE})
        if merged.retry_max_delay < merged.retry_base_delay:
            raise self.fail(
                where,
                f"retry_max_delay: must be >= retry_base_delay ({merged.retry_base_delay:g}s),"
                f" got {merged.retry_max_delay:g}s",
            )
        if merged.breaker_minimum_calls > merged.breaker_window:
            raise self.fail(
                where,
                f"breaker_minimum_calls: must be <= breaker_window ({merged.breaker_window}),"
                f" got {merged.breaker_minimum_calls}",
            )
        return merged

    def config(self, data: Any) -> Config:
        data = self.table(data, "the configuration")
        for name in data:
            if name not in _SECTIONS and name != "exchanges":
                raise self.fail("", f"unknown section [{name}]")
        sec = {name: self.section(data.get(name), f"[{name}]", spec)
               for name, spec in _SECTIONS.items()}
        ingest = self.ingest(sec["ingest"], "[ingest]", IngestConfig())
        resilience = self.resilience(sec["resilience"], "[resilience]", ResilienceConfig())
        if sec["control"].get("tcp") and not sec["control"].get("token"):
            raise self.fail("[control]", "tcp: a TCP control listener is refused without a token; set token")
        self.storage_and_cluster(sec["storage"], sec["cluster"])
        exchanges = self.table(data.get("exchanges"), "[exchanges]")
        if not exchanges:
            raise self.fail(
                "", "no exchanges configured; add an [exchanges.NAME] section with symbols"
            )
        return Config(
            **{name: cls(**sec[name]) for name, cls in _PLAIN_SECTIONS.items()},
            ingest=ingest,
            resilience=resilience,
            exchanges=tuple(
                self.exchange(name, body, ingest, resilience) for name, body in exchanges.items()
            ),
            source=self.source,
        )

    def storage_and_cluster(self, storage: dict[str, Any], cluster: dict[str, Any]) -> None:
        if "path" in storage and "url" in storage:
            raise self.fail("[storage]", "path and url are both given; use one (path: SQLite, url: PostgreSQL)")
        if "timescale" in storage and "url" not in storage:
            raise self.fail("[storage]", "timescale: only with url (a PostgreSQL database)")
        if cluster.get("enabled") and "url" not in storage:
            raise self.fail("[cluster]", "enabled: several daemons share series through one PostgreSQL database;"
                                         " set [storage] url")

    def exchange(
        self, name: Any, body: Any, ingest: IngestConfig, resilience: ResilienceConfig
    ) -> ExchangeConfig:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise self.fail("[exchanges]", f"name {_show(name)}: expected letters, digits, - or _")
        where = f"[exchanges.{name}]"
        body = self.table(body, where)
        source = self.section({"source": body.get("source")}, where, {"source": _EXCHANGE_OWN["source"]})
        kind = source.get("source", "ccxt")
        if kind == "oanda":
            self.check_oanda_price(name, body.get("price"), where)
        values = self.section(body, where, _OANDA_EXCHANGE if kind == "oanda" else _EXCHANGE)
        for key in values:
            owner = next((k for k, keys in SOURCE_KEYS.items() if key in keys), None)
            if owner is not None and owner != kind:
                raise self.fail(where, f'{key}: only for source = "{owner}" (this section\'s source is "{kind}")')
        if "symbols" not in values:
            example = '"EUR/USD"' if kind == "oanda" else '"BTC/USDT"'
            raise self.fail(where, f"symbols: required, e.g. symbols = [{example}]")
        if kind == "oanda":
            values["exchange"] = "oanda"
        elif "exchange" not in values:
            try:
                values["exchange"] = _ccxt_id(name)
            except _Invalid:
                hint = ' (OANDA: set source = "oanda")' if name.lower() == "oanda" else ""
                raise self.fail(
                    where, f'"{name}" is not a ccxt exchange id; set exchange = "<ccxt id>"{hint}'
                ) from None
        own = {k: v for k, v in values.items() if k in _EXCHANGE_OWN}
        merged_ingest = self.ingest(values, where, ingest)
        if kind == "oanda":
            self.check_oanda(values, merged_ingest, where)
        for tf in merged_ingest.timeframes:
            refusal = timeframe_refusal(kind, values["exchange"], tf)
            if refusal is not None:
                inherited = "" if "timeframes" in values else " (inherited from [ingest]: set timeframes here)"
                raise self.fail(where, f"timeframes: {refusal}{inherited}")
        try:
            _check_live(values["exchange"], own.get("live", "auto"))
        except _Invalid as exc:
            raise self.fail(where, f"live: {exc.args[0]}") from None
        return ExchangeConfig(
            name=name,
            ingest=merged_ingest,
            resilience=self.resilience(values, where, resilience),
            **own,
        )

    def check_oanda_price(self, name: str, price: Any, where: str) -> None:
        """Several price components at once ("BA": bid and ask) is OANDA's, not ours: the candles
        table holds one price a row (key exchange, symbol, timeframe, ts), so each component is a
        section of its own, whose name keeps its rows apart. Say so, and how."""
        if not (isinstance(price, str) and len(price) > 1 and set(price) <= {"M", "B", "A"}):
            return
        raise self.fail(where, f"price: {_show(price)} asks for several price components at once, but a stored"
                               " candle holds one price (its OHLC); collect each in a section of its own for the"
                               f' same account, e.g. [exchanges.{name}_bid] source = "oanda", price = "B" and'
                               f' [exchanges.{name}_ask] source = "oanda", price = "A" (the section name keeps'
                               " their rows apart)")

    def check_oanda(self, values: dict[str, Any], ingest: IngestConfig, where: str) -> None:
        """What OANDA cannot serve is a config error now, not a series failing forever later."""
        from ..actors.sources.oanda import MAX_COUNT  # deferred: it imports aiohttp

        if values.get("page_limit", 0) > MAX_COUNT:
            raise self.fail(where, f"page_limit: OANDA serves at most {MAX_COUNT} candles a request,"
                                   f" got {values['page_limit']}")


def _ccxt_timeframes(exchange: str) -> tuple[str, ...]:
    """ccxt's `timeframes` table of an exchange (its metadata instance: `ccxt_metadata`)."""
    import ccxt  # deferred: see _ccxt_id

    if not hasattr(ccxt, exchange):
        return ()
    table = getattr(ccxt_metadata(exchange), "timeframes", None)
    return tuple(table) if isinstance(table, dict) else ()


def timeframe_refusal(source: str, exchange: str, timeframe: str) -> str | None:
    """Why this exchange cannot serve candles of this timeframe, or None when it can: a config
    error at start and a refused `add`, not a series failing forever later. ccxt's own
    `timeframes` table says what each exchange has (Kraken has no 3m, OKX no 3d)."""
    if source == "oanda":
        from ..actors.sources.oanda import GRANULARITIES  # deferred: it imports aiohttp

        has = tuple(GRANULARITIES)
        name = "OANDA"
    else:
        table = _ccxt_timeframes(exchange)
        if not table:
            return None  # ccxt does not say: the exchange's answer will
        has = tuple(tf for tf in table if tf in TIMEFRAME_MS)
        name = exchange
    if timeframe in has:
        return None
    return f"{name} has no {timeframe} candles (it has: {' '.join(has)})"


def from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Validate a dict shaped like the TOML file (for apps embedding the daemon)."""
    return _Loader(source).config(data)


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML file; every failure is a one-line ConfigError."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {str(exc).splitlines()[0]}") from None
    return from_dict(data, source=source)


def default() -> Config:
    """Built-in configuration: binance BTC/USDT and ETH/USDT, 1m candles, local files."""
    return from_dict(
        {"exchanges": {"binance": {"symbols": ["BTC/USDT", "ETH/USDT"]}}}, source="<default>"
    )


# -- dumping -----------------------------------------------------------------


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _ingest_dict(ic: IngestConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "poll_interval": ic.poll_interval,
        "timeframes": list(ic.timeframes),
    }
    if ic.since_ms is None:
        out["lookback"] = ic.lookback
    else:
        out["since"] = _iso(ic.since_ms)
    return out


def _iso(ms: int) -> str:
    return (_EPOCH + dt.timedelta(milliseconds=ms)).isoformat()


def to_dict(config: Config, *, secrets: bool = False) -> dict[str, Any]:
    """A dict that ``from_dict`` turns back into an equal Config.

    Secrets (control token, Slack webhook, PagerDuty routing key) are left
    out unless ``secrets=True``, so the result can be logged or shown; a
    storage URL's password is replaced by ``***``.
    Per-exchange sections list only what differs from the global sections.
    """
    out: dict[str, Any] = {}
    for name in _PLAIN_SECTIONS:
        section = {
            f.name: _plain(getattr(getattr(config, name), f.name))
            for f in fields(getattr(config, name))
            if secrets or (name, f.name) not in _SECRETS
        }
        section = {k: v for k, v in section.items() if v is not None}
        if section:
            out[name] = section
    if config.storage.url:  # path or url, never both; the URL's password only with secrets
        out["storage"] = {"url": config.storage.url if secrets else config.storage.display}
        if config.storage.timescale is not None:
            out["storage"]["timescale"] = config.storage.timescale
    out["ingest"] = _ingest_dict(config.ingest)
    out["resilience"] = {
        f.name: getattr(config.resilience, f.name) for f in fields(ResilienceConfig)
    }
    exchanges: dict[str, Any] = {}
    g_ingest = out["ingest"]
    for ex in config.exchanges:
        body: dict[str, Any] = {"exchange": ex.exchange, "symbols": list(ex.symbols)}
        if ex.source != "ccxt":
            body["source"] = ex.source
            for key in SOURCE_KEYS.get(ex.source, ()):
                if getattr(ex, key) is not None:
                    body[key] = getattr(ex, key)
        if ex.api_base is not None:
            body["api_base"] = ex.api_base
        for key in ("rate_limit", "timeout", "page_limit", "heartbeat", "markets_refresh", "ws_url"):
            value = getattr(ex, key)
            if value is not None:
                body[key] = value
        if ex.live != "auto":
            body["live"] = ex.live
        e_ingest = _ingest_dict(ex.ingest)
        body.update({k: v for k, v in e_ingest.items() if g_ingest.get(k) != v})
        body.update(
            {
                f.name: getattr(ex.resilience, f.name)
                for f in fields(ResilienceConfig)
                if getattr(ex.resilience, f.name) != getattr(config.resilience, f.name)
            }
        )
        exchanges[ex.name] = body
    out["exchanges"] = exchanges
    return out
