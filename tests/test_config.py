"""The TOML config is the user's contract: every key, default and error message."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import textwrap

import pytest

from candlekeeper.app import config as cfg
from candlekeeper.app.config import ConfigError, from_dict, load, parse_duration, to_dict

MIN = {"exchanges": {"binance": {"symbols": ["BTC/USDT"]}}}


def write(tmp_path, text: str, name: str = "config.toml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def error_of(data, source: str = "config.toml") -> str:
    with pytest.raises(ConfigError) as info:
        from_dict(data, source=source)
    message = str(info.value)
    assert "\n" not in message
    return message


def with_section(section: str, **values):
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in MIN.items()}
    data[section] = values
    return data


def with_exchange(**values):
    return {"exchanges": {"binance": {"symbols": ["BTC/USDT"], **values}}}


# -- durations ------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, seconds",
    [
        (0, 0.0),
        (5, 5.0),
        (2.5, 2.5),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("10h", 36000.0),
        ("7d", 604800.0),
        ("0s", 0.0),
    ],
)
def test_parse_duration_accepts(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    ["5", "5 s", " 5s", "5S", "5sec", "1w", "-5s", "s", "", ".5s", "5.s", "1e3s",
     -1, float("nan"), float("inf"), True, None, [5], "5m30s"],
)
def test_parse_duration_rejects(value):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


# -- defaults and every key -------------------------------------------------------


def test_defaults():
    c = from_dict(MIN)
    assert c.storage == cfg.StorageConfig(path="candlekeeper.db")
    assert c.control == cfg.ControlConfig(socket="candlekeeper.sock", tcp=None, token=None)
    assert c.ingest == cfg.IngestConfig(
        lookback=86400.0, since_ms=None, poll_interval=10.0, timeframes=("1m",)
    )
    assert c.resilience == cfg.ResilienceConfig(
        retry_attempts=3,
        retry_base_delay=1.0,
        retry_max_delay=60.0,
        breaker_mode="consecutive",
        breaker_threshold=5,
        breaker_window=100,
        breaker_minimum_calls=10,
        breaker_failure_rate=0.5,
        breaker_slow_call=None,
        breaker_recovery=60.0,
        breaker_max_recovery=600.0,
        breaker_half_open_calls=1,
        quarantine_after=10,
        quarantine_probe=60.0,
    )
    assert c.metrics == cfg.MetricsConfig(listen=None)
    assert c.alerts == cfg.AlertsConfig(None, None, None)
    (ex,) = c.exchanges
    assert ex == cfg.ExchangeConfig(
        name="binance",
        exchange="binance",
        symbols=("BTC/USDT",),
        api_base=None,
        rate_limit=None,
        timeout=10.0,
        ingest=c.ingest,
        resilience=c.resilience,
    )
    assert c.source == "<dict>"


def test_default_config():
    c = cfg.default()
    assert [e.name for e in c.exchanges] == ["binance"]
    assert c.exchanges[0].symbols == ("BTC/USDT", "ETH/USDT")
    assert c.ingest.timeframes == ("1m",)
    assert c.storage.path == "candlekeeper.db"
    assert c.control.socket == "candlekeeper.sock"


FULL = """
[storage]
path = "data/candles.db"

[control]
socket = "run/ck.sock"
tcp = "127.0.0.1:7070"
token = "s3cret-token"

[ingest]
lookback = "2d"
poll_interval = "500ms"
timeframes = ["1m", "5m", "1h"]

[resilience]
retry_attempts = 5
retry_base_delay = "250ms"
retry_max_delay = "30s"
breaker_mode = "rate"
breaker_threshold = 7
breaker_window = 50
breaker_minimum_calls = 20
breaker_failure_rate = 0.6
breaker_slow_call = "5s"
breaker_recovery = "2m"
breaker_max_recovery = "15m"
breaker_half_open_calls = 2
quarantine_after = 20
quarantine_probe = "2m"

[metrics]
listen = "0.0.0.0:9100"

[alerts]
slack_webhook = "https://hooks.slack.example/T000/B000/XXX"
pagerduty_routing_key = "R0UTING"
pagerduty_url = "https://events.pagerduty.example/v2/enqueue"

[exchanges.binance]
symbols = ["BTC/USDT", "ETH/USDT"]

[exchanges.sim]
exchange = "kraken"
symbols = ["BTC/USD"]
api_base = "http://127.0.0.1:8080/"
rate_limit = 50
timeout = "3s"
page_limit = 500
heartbeat = "off"
markets_refresh = "10m"
since = 2024-01-02T03:04:05Z
poll_interval = 1
timeframes = ["1m"]
retry_attempts = 1
breaker_recovery = "5s"
quarantine_after = 3
"""


def test_every_key_from_toml(tmp_path):
    path = write(tmp_path, FULL)
    c = load(path)
    assert c.source == path
    assert c.storage.path == "data/candles.db"  # relative paths stay as given
    assert c.control == cfg.ControlConfig("run/ck.sock", "127.0.0.1:7070", "s3cret-token")
    assert c.ingest == cfg.IngestConfig(172800.0, None, 0.5, ("1m", "5m", "1h"))
    full = cfg.ResilienceConfig(
        retry_attempts=5, retry_base_delay=0.25, retry_max_delay=30.0, breaker_mode="rate", breaker_threshold=7,
        breaker_window=50, breaker_minimum_calls=20, breaker_failure_rate=0.6, breaker_slow_call=5.0,
        breaker_recovery=120.0, breaker_max_recovery=900.0, breaker_half_open_calls=2, quarantine_after=20,
        quarantine_probe=120.0,
    )
    assert c.resilience == full
    assert c.metrics.listen == "0.0.0.0:9100"
    assert c.alerts.slack_webhook == "https://hooks.slack.example/T000/B000/XXX"
    assert c.alerts.pagerduty_routing_key == "R0UTING"
    assert c.alerts.pagerduty_url == "https://events.pagerduty.example/v2/enqueue"

    binance, sim = c.exchanges
    assert binance.exchange == "binance" and binance.symbols == ("BTC/USDT", "ETH/USDT")
    assert binance.ingest == c.ingest and binance.resilience == c.resilience

    assert sim.name == "sim" and sim.exchange == "kraken"
    assert sim.api_base == "http://127.0.0.1:8080"
    assert sim.rate_limit == 50.0 and isinstance(sim.rate_limit, float)
    assert sim.page_limit == 500 and sim.heartbeat == 0.0 and sim.markets_refresh == 600.0
    assert binance.rate_limit is None and binance.page_limit is None and binance.heartbeat == 30.0
    assert sim.timeout == 3.0
    since = int(dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC).timestamp() * 1000)
    assert sim.ingest == cfg.IngestConfig(172800.0, since, 1.0, ("1m",))
    assert sim.resilience == dataclasses.replace(full, retry_attempts=1, breaker_recovery=5.0, quarantine_after=3)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("2024-01-01", dt.datetime(2024, 1, 1, tzinfo=dt.UTC)),
        ("2024-01-01T12:30:00", dt.datetime(2024, 1, 1, 12, 30, tzinfo=dt.UTC)),
        ("2024-01-01T12:30:00Z", dt.datetime(2024, 1, 1, 12, 30, tzinfo=dt.UTC)),
        ("2024-01-01T14:30:00+02:00", dt.datetime(2024, 1, 1, 12, 30, tzinfo=dt.UTC)),
        (dt.date(2024, 1, 1), dt.datetime(2024, 1, 1, tzinfo=dt.UTC)),
        (dt.datetime(2024, 1, 1, 12, 30), dt.datetime(2024, 1, 1, 12, 30, tzinfo=dt.UTC)),
    ],
)
def test_since_forms(value, expected):
    c = from_dict(with_section("ingest", since=value))
    assert c.ingest.since_ms == int(expected.timestamp() * 1000)


def test_since_toml_native_values(tmp_path):
    c = load(write(tmp_path, '[ingest]\nsince = 2024-01-01\n[exchanges.binance]\nsymbols = ["A/B"]\n'))
    assert c.ingest.since_ms == 1704067200000
    c = load(write(tmp_path, '[ingest]\nsince = 2024-01-01T00:00:00\n[exchanges.binance]\nsymbols = ["A/B"]\n'))
    assert c.ingest.since_ms == 1704067200000


def test_overrides_merge_per_exchange():
    data = {
        "ingest": {"since": "2024-01-01", "timeframes": ["1m", "1h"]},
        "resilience": {"retry_attempts": 4, "retry_max_delay": "10s"},
        "exchanges": {
            "binance": {"symbols": ["BTC/USDT"], "lookback": "3h"},
            "kraken": {"symbols": ["BTC/USD"], "retry_max_delay": "20s", "timeframes": ["1d"]},
            "okx": {"symbols": ["BTC/USDT"], "since": "2023-06-01"},
        },
    }
    c = from_dict(data)
    binance, kraken, okx = c.exchanges
    # an exchange's lookback replaces the global since window, other keys inherit
    assert binance.ingest.since_ms is None and binance.ingest.lookback == 10800.0
    assert binance.ingest.timeframes == ("1m", "1h")
    assert binance.resilience == c.resilience
    assert kraken.ingest.since_ms == c.ingest.since_ms
    assert kraken.ingest.timeframes == ("1d",)
    assert kraken.resilience.retry_max_delay == 20.0 and kraken.resilience.retry_attempts == 4
    assert okx.ingest.since_ms == 1685577600000


def test_alerts_and_metrics_optional():
    c = from_dict(with_section("alerts"))
    assert c.alerts == cfg.AlertsConfig()
    c = from_dict({**MIN, "metrics": {}})
    assert c.metrics.listen is None


def test_none_means_unset_for_embedding_apps():
    c = from_dict({**MIN, "control": {"tcp": None, "token": None}, "ingest": {"since": None}})
    assert c.control.tcp is None and c.ingest.since_ms is None


def test_symbol_with_settle_currency_is_accepted():
    c = from_dict(with_exchange(symbols=["BTC/USDT:USDT"]))
    assert c.exchanges[0].symbols == ("BTC/USDT:USDT",)


# -- round trip and secrets -----------------------------------------------------


def test_round_trip_full(tmp_path):
    c = load(write(tmp_path, FULL))
    d = to_dict(c)
    assert "token" not in d["control"]
    assert "slack_webhook" not in d.get("alerts", {})
    del d["control"]["tcp"]  # refused without its token, which to_dict leaves out
    back = from_dict(d, source=c.source)
    assert back == cfg.Config(
        **{**c.__dict__, "control": cfg.ControlConfig(c.control.socket, None, None),
           "alerts": cfg.AlertsConfig(None, None, c.alerts.pagerduty_url)}
    )
    assert from_dict(to_dict(c, secrets=True), source=c.source) == c


def test_round_trip_overrides():
    data = {
        "ingest": {"since": "2024-01-01"},
        "exchanges": {
            "a": {"exchange": "binance", "symbols": ["X/Y"], "lookback": "1d"},
            "b": {"exchange": "binance", "symbols": ["X/Y"], "since": "2020-01-01"},
            "c": {"exchange": "binance", "symbols": ["X/Y"], "breaker_threshold": 9},
        },
    }
    c = from_dict(data)
    assert from_dict(to_dict(c)) == c
    assert from_dict(to_dict(cfg.default()), source="<default>") == cfg.default()


def test_token_not_in_repr():
    c = from_dict({**MIN, "control": {"token": "hunter2-token"},
                   "alerts": {"pagerduty_routing_key": "hunter3-key",
                              "slack_webhook": "https://hooks.example/hunter4"}})
    assert c.control.token == "hunter2-token"
    for text in (repr(c), str(c), repr(c.control), repr(c.alerts)):
        assert "hunter" not in text


def test_config_is_frozen():
    c = cfg.default()
    with pytest.raises(AttributeError):
        c.storage.path = "x"  # type: ignore[misc]


# -- errors: one line, naming where --------------------------------------------------


@pytest.mark.parametrize(
    "data, message",
    [
        (with_exchange(rate_limit="fast"),
         'config.toml: [exchanges.binance] rate_limit: expected a number > 0, got "fast"'),
        (with_section("ingest", lookbak="1d"), 'config.toml: [ingest] unknown key "lookbak"'),
        ({**MIN, "storag": {}}, "config.toml: unknown section [storag]"),
        (with_exchange(symbol=["BTC/USDT"]), 'config.toml: [exchanges.binance] unknown key "symbol"'),
        (with_exchange(rate_limit=0), "config.toml: [exchanges.binance] rate_limit: expected a number > 0, got 0"),
        ({"exchanges": {"cc": {"exchange": "coincheck", "symbols": ["BTC/JPY"]}}},
         "config.toml: [exchanges.cc] exchange: coincheck has no candles in ccxt (fetchOHLCV is not supported): "
         "it cannot be collected"),
        (with_exchange(rate_limit=True), "config.toml: [exchanges.binance] rate_limit: expected a number > 0, got true"),
        (with_exchange(rate_limit=float("nan")), "config.toml: [exchanges.binance] rate_limit: expected a number > 0, got nan"),
        (with_section("resilience", retry_attempts=True),
         "config.toml: [resilience] retry_attempts: expected an integer >= 1, got true"),
        (with_section("resilience", retry_attempts=0),
         "config.toml: [resilience] retry_attempts: expected an integer >= 1, got 0"),
        (with_section("resilience", retry_attempts=2.0),
         "config.toml: [resilience] retry_attempts: expected an integer >= 1, got 2.0"),
        (with_section("resilience", breaker_threshold=0),
         "config.toml: [resilience] breaker_threshold: expected an integer >= 1, got 0"),
        (with_section("resilience", breaker_half_open_calls=0),
         "config.toml: [resilience] breaker_half_open_calls: expected an integer >= 1, got 0"),
        (with_section("resilience", quarantine_after="10"),
         'config.toml: [resilience] quarantine_after: expected an integer >= 1, got "10"'),
        (with_section("resilience", retry_base_delay="10s", retry_max_delay="5s"),
         "config.toml: [resilience] retry_max_delay: must be >= retry_base_delay (10s), got 5s"),
        (with_exchange(retry_base_delay="2m"),
         "config.toml: [exchanges.binance] retry_max_delay: must be >= retry_base_delay (120s), got 60s"),
        (with_section("ingest", poll_interval="5x"),
         'config.toml: [ingest] poll_interval: expected a duration (seconds, or a string like 500ms, 1.5s, 30s, 5m, 10h, 7d), got "5x"'),
        (with_section("ingest", poll_interval=0),
         "config.toml: [ingest] poll_interval: expected a duration > 0s, got 0"),
        (with_exchange(timeout="-1s"),
         'config.toml: [exchanges.binance] timeout: expected a duration (seconds, or a string like 500ms, 1.5s, 30s, 5m, 10h, 7d), got "-1s"'),
        (with_section("ingest", lookback="1d", since="2024-01-01"),
         "config.toml: [ingest] since and lookback are both given; use one"),
        (with_exchange(lookback="1d", since="2024-01-01"),
         "config.toml: [exchanges.binance] since and lookback are both given; use one"),
        (with_section("ingest", since="yesterday"),
         'config.toml: [ingest] since: expected an ISO 8601 date or datetime, got "yesterday"'),
        (with_section("ingest", since="2999-01-01"),
         'config.toml: [ingest] since: expected a date in the past, got "2999-01-01"'),
        (with_section("ingest", since=dt.time(12, 0)),
         "config.toml: [ingest] since: expected an ISO 8601 date or datetime, got datetime.time(12, 0)"),
        (with_section("ingest", timeframes=["1m", "7m"]),
         'config.toml: [ingest] timeframes: unknown timeframe "7m" (supported: 5s 10s 15s 30s 1m 2m 3m 4m 5m 10m 15m'
         ' 30m 1h 2h 3h 4h 6h 8h 12h 1d 3d 1w)'),
        (with_section("ingest", timeframes=["1d", "1M"]),
         'config.toml: [ingest] timeframes: "1M": monthly candles are not supported: months differ in length,'
         ' and a series steps through time by one fixed length (use 1d or 1w and roll up)'),
        (with_section("ingest", timeframes=[]),
         "config.toml: [ingest] timeframes: expected a non-empty list of timeframes, got []"),
        (with_section("ingest", timeframes="1m"),
         'config.toml: [ingest] timeframes: expected a non-empty list of timeframes, got "1m"'),
        (with_section("ingest", timeframes=["1m", "1m"]),
         'config.toml: [ingest] timeframes: "1m" is listed twice'),
        ({}, "config.toml: no exchanges configured; add an [exchanges.NAME] section with symbols"),
        ({"exchanges": {}}, "config.toml: no exchanges configured; add an [exchanges.NAME] section with symbols"),
        ({"exchanges": {"binance": {}}},
         'config.toml: [exchanges.binance] symbols: required, e.g. symbols = ["BTC/USDT"]'),
        (with_exchange(symbols=[]),
         'config.toml: [exchanges.binance] symbols: expected a non-empty list of "BASE/QUOTE" strings, got []'),
        (with_exchange(symbols=["BTCUSDT"]),
         'config.toml: [exchanges.binance] symbols: "BTCUSDT" is not a "BASE/QUOTE" symbol'),
        (with_exchange(symbols=["BTC/USDT", "BTC/USDT"]),
         'config.toml: [exchanges.binance] symbols: "BTC/USDT" is listed twice'),
        (with_exchange(symbols=[1]),
         'config.toml: [exchanges.binance] symbols: 1 is not a "BASE/QUOTE" symbol'),
        ({"exchanges": {"mysim": {"symbols": ["A/B"]}}},
         'config.toml: [exchanges.mysim] "mysim" is not a ccxt exchange id; set exchange = "<ccxt id>"'),
        (with_exchange(exchange="nope"),
         'config.toml: [exchanges.binance] exchange: expected a ccxt exchange id (see ccxt.exchanges), got "nope"'),
        (with_exchange(api_base="127.0.0.1:8080"),
         'config.toml: [exchanges.binance] api_base: expected "scheme://host[:port]", got "127.0.0.1:8080"'),
        (with_exchange(api_base="http://h:8080/api"),
         'config.toml: [exchanges.binance] api_base: expected "scheme://host[:port]" without path, query or credentials, got "http://h:8080/api"'),
        (with_exchange(api_base="http://h:99999"),
         'config.toml: [exchanges.binance] api_base: expected "scheme://host[:port]", got "http://h:99999"'),
        (with_section("metrics", listen="9100"), 'config.toml: [metrics] listen: expected "host:port", got "9100"'),
        (with_section("control", tcp="localhost:http"),
         'config.toml: [control] tcp: expected "host:port", got "localhost:http"'),
        (with_section("control", token=""), 'config.toml: [control] token: expected a non-empty string, got ""'),
        (with_section("storage", path=5), "config.toml: [storage] path: expected a non-empty string, got 5"),
        (with_section("alerts", slack_webhook="ftp://x"),
         'config.toml: [alerts] slack_webhook: expected an http(s) URL, got "ftp://x"'),
        ({**MIN, "storage": "x.db"}, 'config.toml: [storage] must be a table, got "x.db"'),
        ({"exchanges": {"binance": ["BTC/USDT"]}},
         'config.toml: [exchanges.binance] must be a table, got ["BTC/USDT"]'),
        ({"exchanges": {"bin ance": {"symbols": ["A/B"]}}},
         'config.toml: [exchanges] name "bin ance": expected letters, digits, - or _'),
    ],
)
def test_errors(data, message):
    assert error_of(data) == message


def test_token_never_in_error_message():
    message = error_of({**MIN, "control": {"token": 12345}})
    assert message == "config.toml: [control] token: expected a non-empty string, got 12345"


# -- load(): file problems are one-line ConfigErrors -------------------------------


def test_load_missing_file(tmp_path):
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"nope\.toml: no such file$"):
        load(path)


def test_load_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read anything")
def test_load_unreadable(tmp_path):
    path = write(tmp_path, "x = 1")
    os.chmod(path, 0)
    with pytest.raises(ConfigError, match="cannot read"):
        load(path)


def test_load_not_toml(tmp_path):
    path = write(tmp_path, "[storage\npath = 1\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value).startswith(f"{path}: not valid TOML: ")
    assert "\n" not in str(info.value)


def test_load_not_utf8(tmp_path):
    path = tmp_path / "bin.toml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_load_reports_file_name(tmp_path):
    path = write(tmp_path, '[exchanges.binance]\nsymbols = ["BTC/USDT"]\nrate_limit = "fast"\n')
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == (
        f'{path}: [exchanges.binance] rate_limit: expected a number > 0, got "fast"'
    )


def test_load_accepts_pathlike(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[exchanges.binance]\nsymbols = ["BTC/USDT"]\n')
    assert load(path).exchanges[0].symbols == ("BTC/USDT",)
