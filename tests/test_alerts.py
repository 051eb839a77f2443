"""Alerts: the pure logic (transitions, dedup, rate limit, retries, payloads) with a fake clock,
the notifier actor against a real loopback HTTP receiver, and the whole system end to end."""

from __future__ import annotations

import json
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pykka
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import candlekeeper
from candlekeeper.actors.alerting import (
    DEFAULT_PAGERDUTY_URL,
    Alert,
    AlertState,
    AlertTracker,
    AlertTuning,
    Delivery,
    Outbox,
    Outcome,
    Sent,
    breaker_key,
    decide,
    delivery_policy,
    pagerduty_payload,
    quarantine_key,
    redact,
    slack_payload,
    storage_key,
)
from candlekeeper.actors.messages import ExchangeStatus, SeriesKey, SeriesStatus, StorageStatus
from candlekeeper.actors.notifier import NotifierActor, NotifierSettings
from candlekeeper.resilience.retry import GiveUp, Retry
from candlekeeper.simulator.faults import OutageMode, PoisonKind
from candlekeeper.simulator.server import BinanceSimulator
from candlekeeper.supervisors.child import Address, Crash, Exit, Runtime
from candlekeeper.supervisors.clock import FakeClock
from candlekeeper.supervisors.events import LifecycleEvent
from candlekeeper.supervisors.supervisor import ChildSpec, start_root
from tests.conftest import EventRecorder

ROUTING_KEY = "test-key"
SLACK_PATH = "/slack/T00000000/B00000000/XXXXsecretXXXX"


def ex(name: str, breaker: str, **detail: Any) -> ExchangeStatus:
    status = {"open": "down", "half_open": "recovering", "closed": "ok"}[breaker]
    return ExchangeStatus(name, breaker, status, dict(detail))


def series(status: str, symbol: str = "BTC/USDT", detail: str | None = None) -> SeriesStatus:
    key = SeriesKey("binance", symbol, "1m")
    return SeriesStatus(f"root/binance/series/{symbol}@1m", key, status, 1_700_000_000_000, 10, detail)


def lifecycle(kind: str, path: str = "root/binance", reason: str | None = "intensity exceeded") -> LifecycleEvent:
    return LifecycleEvent(kind=kind, path=path, child_id=path.rsplit("/", 1)[-1],  # type: ignore[arg-type]
                          supervisor=path, kind_of_actor="supervisor", reason=reason)


# -- transitions and dedup -----------------------------------------------------------------


def test_breaker_open_triggers_once_and_closed_resolves_same_key() -> None:
    t = AlertTracker(clock=FakeClock())
    assert t.observe(ex("binance", "closed")) == []  # nothing open: no resolve out of nowhere
    [trigger] = t.observe(ex("binance", "open", consecutive_failures=5))
    assert (trigger.action, trigger.severity, trigger.dedup_key) == ("trigger", "error", "candlekeeper/binance/breaker")
    assert "binance" in trigger.summary and "OPEN" in trigger.summary and "5 consecutive" in trigger.summary
    # half_open flapping back to open does not re-trigger an alert that is already open
    for state in ("open", "half_open", "open", "half_open", "open"):
        assert t.observe(ex("binance", state)) == []
    assert t.open_keys == [breaker_key("binance")]
    [resolve] = t.observe(ex("binance", "closed"))
    assert (resolve.action, resolve.dedup_key) == ("resolve", trigger.dedup_key)
    assert t.observe(ex("binance", "closed")) == [] and t.open_keys == []
    assert t.state.counts == {"triggered": 1, "resolved": 1, "deduplicated": 3}
    # a new outage is a new incident on the same key
    assert [a.action for a in t.observe(ex("binance", "open"))] == ["trigger"]


def test_exchanges_are_independent() -> None:
    t = AlertTracker()
    a = t.observe(ex("binance", "open"))
    b = t.observe(ex("kraken", "open"))
    assert a[0].dedup_key != b[0].dedup_key
    assert [x.dedup_key for x in t.observe(ex("kraken", "closed"))] == [breaker_key("kraken")]
    assert t.open_keys == [breaker_key("binance")]


def test_series_quarantine_trigger_and_release() -> None:
    t = AlertTracker()
    assert t.observe(series("retrying")) == []
    [trig] = t.observe(series("quarantined", detail="BadResponse: garbage"))
    assert trig.dedup_key == "candlekeeper/binance/BTC/USDT@1m/quarantine"
    assert trig.dedup_key == quarantine_key("binance", "BTC/USDT", "1m")
    assert (trig.action, trig.severity, trig.group) == ("trigger", "warning", "series")
    assert "binance:BTC/USDT@1m" in trig.summary and "garbage" in trig.summary
    assert t.observe(series("quarantined", detail="other detail")) == []  # still quarantined: no repeat
    assert t.observe(series("quarantined", symbol="ETH/USDT"))[0].dedup_key.endswith("ETH/USDT@1m/quarantine")
    [res] = t.observe(series("ok"))
    assert (res.action, res.dedup_key) == ("resolve", trig.dedup_key)
    # a quarantined series removed at run time resolves its alert
    [res2] = t.observe(LifecycleEvent(kind="stopped", path="root/binance/series/ETH/USDT@1m", child_id="ETH/USDT@1m",
                                      supervisor="root/binance/series", kind_of_actor="series", reason="deleted"))
    assert res2.action == "resolve" and res2.dedup_key.endswith("ETH/USDT@1m/quarantine")
    assert t.open_keys == []


def test_storage_failing_is_critical_until_ok() -> None:
    t = AlertTracker()
    assert t.observe(StorageStatus(True)) == []
    [trig] = t.observe(StorageStatus(False, "disk I/O error"))
    assert (trig.action, trig.severity, trig.dedup_key) == ("trigger", "critical", storage_key())
    assert t.observe(StorageStatus(False, "database is locked")) == []  # only the detail changed
    assert [a.action for a in t.observe(StorageStatus(True))] == ["resolve"]


def test_supervisor_gave_up_is_critical_one_shot_with_cooldown() -> None:
    clock = FakeClock()
    t = AlertTracker(clock=clock, one_shot_cooldown=600)
    for kind in ("started", "crashed", "restarted", "stopped"):
        assert t.observe(lifecycle(kind)) == []
    [trig] = t.observe(lifecycle("gave_up"))
    assert (trig.action, trig.severity, trig.dedup_key) == ("trigger", "critical", "candlekeeper/root/binance/gave_up")
    assert t.observe(lifecycle("escalated")) == []  # the pair is one alert
    assert t.open_keys == []  # nothing to resolve, ever
    clock.advance(599)
    assert t.observe(lifecycle("gave_up")) == []
    clock.advance(2)
    assert [a.action for a in t.observe(lifecycle("gave_up"))] == ["trigger"]
    other = t.observe(lifecycle("gave_up", path="root/storage"))
    assert [a.dedup_key for a in other] == ["candlekeeper/root/storage/gave_up"]


def test_state_outlives_a_tracker_so_a_restarted_notifier_still_resolves() -> None:
    state = AlertState()
    AlertTracker(state).observe(ex("binance", "open"))
    again = AlertTracker(state)  # the next incarnation
    assert again.observe(ex("binance", "open")) == []
    assert [a.action for a in again.observe(ex("binance", "closed"))] == ["resolve"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["closed", "open", "half_open"]), max_size=40))
def test_breaker_alerts_alternate_and_end_in_the_right_state(states: list[str]) -> None:
    t = AlertTracker()
    actions = [a.action for s in states for a in t.observe(ex("binance", s))]
    assert actions == ["trigger", "resolve"] * (len(actions) // 2) + ["trigger"] * (len(actions) % 2)
    decided = [s for s in states if s != "half_open"]
    assert (t.open_keys == [breaker_key("binance")]) == (bool(decided) and decided[-1] == "open")


def test_long_keys_stay_stable_and_within_pagerduty_limit() -> None:
    long = "X" * 400
    assert len(breaker_key(long)) <= 255 and breaker_key(long) == breaker_key(long) != breaker_key(long + "Y")


# -- payloads ------------------------------------------------------------------------------

ALERTS = st.builds(
    Alert,
    action=st.sampled_from(["trigger", "resolve"]),
    dedup_key=st.text(min_size=1, max_size=80),
    severity=st.sampled_from(["critical", "error", "warning", "info"]),
    summary=st.text(max_size=2000),
    component=st.text(max_size=40),
    group=st.sampled_from(["exchange", "series", "storage", "supervisor"]),
    details=st.dictionaries(
        st.text(max_size=10), st.one_of(st.none(), st.integers(), st.floats(), st.text())
    ),
)


@settings(max_examples=200, deadline=None)
@given(ALERTS)
def test_pagerduty_payload_shape(alert: Alert) -> None:
    body = json.loads(json.dumps(pagerduty_payload(alert, "rk"), allow_nan=False))  # strict JSON, even with NaN
    assert body["routing_key"] == "rk" and body["event_action"] == alert.action and body["dedup_key"] == alert.dedup_key
    if alert.action == "resolve":
        assert set(body) == {"routing_key", "event_action", "dedup_key"}
    else:
        p = body["payload"]
        assert set(p) == {"summary", "source", "severity", "component", "group", "custom_details"}
        assert p["source"] == "candlekeeper" and p["severity"] in ("critical", "error", "warning", "info")
        assert p["summary"] == alert.summary[:1024] and isinstance(p["custom_details"], dict)


@settings(max_examples=200, deadline=None)
@given(ALERTS)
def test_slack_payload_shape(alert: Alert) -> None:
    body = json.loads(json.dumps(slack_payload(alert), allow_nan=False))
    assert isinstance(body["text"], str) and alert.summary in body["text"]
    assert body["blocks"][0]["text"]["text"] == body["text"]
    if alert.action == "resolve":
        assert body["text"].startswith(":large_green_circle: resolved")
    else:
        assert body["text"].startswith(":") and alert.severity.upper() in body["text"]


def test_readable_slack_text_for_a_breaker() -> None:
    t = AlertTracker()
    [trig] = t.observe(ex("binance", "open"))
    [res] = t.observe(ex("binance", "closed"))
    assert slack_payload(trig)["text"].startswith(":red_circle: ERROR: binance: circuit breaker OPEN")
    assert slack_payload(res)["text"] == (
        ":large_green_circle: resolved: binance: circuit breaker closed, exchange reachable again"
    )


# -- delivery decisions --------------------------------------------------------------------


def test_decisions_by_outcome() -> None:
    tuning = AlertTuning(attempts=4, base_delay=1.0, max_delay=8.0, max_retry_after=30.0)
    policy = delivery_policy(tuning, random.Random(1))
    assert isinstance(decide(policy, 1, Outcome(200)), Sent) and isinstance(decide(policy, 1, Outcome(202)), Sent)
    refused = Outcome(error="URLError: [Errno 111] Connection refused")
    for outcome in (Outcome(500), Outcome(503), refused, Outcome(429)):
        assert isinstance(decide(policy, 1, outcome), Retry)
        assert isinstance(decide(policy, 4, outcome), GiveUp)  # attempts exhausted
    for status in (400, 401, 403, 404, 410, 301):
        d = decide(policy, 1, Outcome(status))
        assert isinstance(d, GiveUp) and "not retryable" in d.reason
    assert decide(policy, 1, Outcome(429, retry_after=7.0)) == Retry(7.0)  # the server's word wins
    assert decide(policy, 1, Outcome(429, retry_after=3600.0), tuning.max_retry_after) == Retry(30.0)  # within reason
    assert isinstance(decide(policy, 1, Outcome(503, retry_after=7.0)), Retry)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5), st.integers(0, 2**32))
def test_retry_delays_are_bounded_exponential(attempt: int, seed: int) -> None:
    tuning = AlertTuning(attempts=6, base_delay=1.0, max_delay=10.0)
    d = decide(delivery_policy(tuning, random.Random(seed)), attempt, Outcome(500))
    assert isinstance(d, Retry) and 0.0 <= d.delay <= min(10.0, 2 ** (attempt - 1))


def delivery(seq: int, key: str = "k", action: str = "trigger", dest: str = "pd") -> Delivery:
    alert = Alert(action, key, "error", f"alert {seq}", "c", "exchange")  # type: ignore[arg-type]
    return Delivery(seq, dest, alert, b"{}")


def test_outbox_rate_limit_burst_then_paced() -> None:
    clock = FakeClock()
    box = Outbox("pd", AlertTuning(rate_per_minute=20, burst=10, max_in_flight=100), clock=clock)
    for i in range(15):
        box.add(delivery(i, key=f"k{i}"))
    ready, wait = box.take()
    assert [d.seq for d in ready] == list(range(10)) and all(d.attempt == 1 for d in ready)
    assert wait == pytest.approx(3.0)  # 20 per minute: one every 3 s
    for d in ready:
        box.finished(d, Outcome(200))
    assert box.take() == ([], pytest.approx(3.0))  # nothing before its time
    clock.advance(3.0)
    ready, wait = box.take()
    assert [d.seq for d in ready] == [10] and wait == pytest.approx(3.0)
    clock.advance(12.0)
    assert [d.seq for d in box.take()[0]] == [11, 12, 13, 14]
    assert box.stats()["sent"] == 10 and box.stats()["queued"] == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 20.0), min_size=1, max_size=60))
def test_outbox_never_exceeds_the_rate(steps: list[float]) -> None:
    clock = FakeClock()
    box = Outbox("pd", AlertTuning(rate_per_minute=20, burst=10, max_in_flight=1000, max_queue=1000), clock=clock)
    for i in range(300):
        box.add(delivery(i, key=f"k{i}"))
    sent = len(box.take()[0])
    for dt in steps:
        clock.advance(dt)
        sent += len(box.take()[0])
    assert sent <= 10 + clock.now * 20 / 60 + 1e-6


def test_outbox_queue_is_bounded_and_drops_oldest() -> None:
    box = Outbox("pd", AlertTuning(burst=1, rate_per_minute=1, max_queue=3), clock=FakeClock())
    assert box.add(delivery(0, "a")) == []
    assert [d.seq for d in box.take()[0]] == [0]
    dropped = []
    for i in range(1, 6):
        dropped += box.add(delivery(i, f"k{i}"))
    assert [d.seq for d in dropped] == [1, 2] and [d.seq for d in box.queue] == [3, 4, 5]
    assert box.stats()["dropped"] == 2


def test_outbox_keeps_order_per_key_through_retries() -> None:
    clock = FakeClock()
    box = Outbox("pd", AlertTuning(burst=10, max_in_flight=5), clock=clock, rng=random.Random(0))
    box.add(delivery(1, "a", "trigger"))
    box.add(delivery(2, "a", "resolve"))
    box.add(delivery(3, "b", "trigger"))
    ready, _ = box.take()
    assert [d.seq for d in ready] == [1, 3]  # the resolve of "a" waits for its trigger; "b" does not
    first = ready[0]
    decision = box.finished(first, Outcome(500))
    assert isinstance(decision, Retry)
    assert box.take()[0] == []  # while the trigger waits to be retried, its resolve must not go
    box.requeue(first)
    [again] = box.take()[0]
    assert (again.seq, again.attempt) == (1, 2)
    assert box.finished(again, Outcome(202)) == Sent()
    assert [d.seq for d in box.take()[0]] == [2]
    assert box.stats() == counts(sent=1, retried=1, in_flight=2)


def test_outbox_gives_up_on_4xx_and_releases_the_key() -> None:
    box = Outbox("pd", AlertTuning(), clock=FakeClock())
    box.add(delivery(1, "a", "trigger"))
    box.add(delivery(2, "a", "resolve"))
    [d] = box.take()[0]
    assert isinstance(box.finished(d, Outcome(400)), GiveUp)
    assert [x.seq for x in box.take()[0]] == [2]
    assert box.stats()["failed"] == 1


def test_outbox_429_holds_back_the_whole_destination() -> None:
    clock = FakeClock()
    box = Outbox("pd", AlertTuning(burst=10, max_in_flight=1), clock=clock)
    box.add(delivery(1, "a"))
    box.add(delivery(2, "b"))
    [d] = box.take()[0]
    assert box.finished(d, Outcome(429, retry_after=5.0)) == Retry(5.0)
    ready, wait = box.take()
    assert ready == [] and wait == pytest.approx(5.0)
    clock.advance(5.0)
    box.requeue(d)
    assert [x.seq for x in box.take()[0]] == [1]


def test_redact_hides_secrets_and_url_paths() -> None:
    url = "https://hooks.slack.com/services/T0/B0/secret"
    text = redact(f"ValueError: bad url {url} and /services/T0/B0/secret and key rk-123", [url, "rk-123", None])
    assert "secret" not in text and "rk-123" not in text and "hooks.slack.com" not in text


# -- a real loopback HTTP receiver ---------------------------------------------------------


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that timed out and left: expected
            super().handle_error(request, client_address)


class Receiver:
    """Records JSON bodies by path; can fail the next requests of a path or hold them."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.bodies: dict[str, list[dict[str, Any]]] = {}
        self.attempts: list[tuple[str, float]] = []
        self.failures: dict[str, list[tuple[int, dict[str, str]]]] = {}
        self.hold = threading.Event()
        self.hold.set()
        self.arrived = 0  # requests read, held or not
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.cond:
                    receiver.arrived += 1
                    receiver.cond.notify_all()
                receiver.hold.wait(10)
                path = self.path.split("?")[0]
                with receiver.cond:
                    receiver.attempts.append((path, time.monotonic()))
                    plan = receiver.failures.get(path)
                    failure = plan.pop(0) if plan else None
                    if failure is None:
                        receiver.bodies.setdefault(path, []).append(json.loads(body))
                    receiver.cond.notify_all()
                status, headers = failure or ((202, {}) if path == "/pd" else (200, {}))
                reply = b"ok" if status == 200 else b'{"status": "x"}'
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = False  # joined on close: nothing left behind
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="test-receiver", daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def fail(self, path: str, status: int, count: int = 1, headers: dict[str, str] | None = None) -> None:
        with self.cond:
            self.failures.setdefault(path, []).extend([(status, headers or {})] * count)

    def wait_arrived(self, n: int, timeout: float = 10.0) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.arrived >= n, timeout):
                raise AssertionError(f"{self.arrived} of {n} requests arrived")

    def wait_bodies(self, path: str, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.bodies.get(path, [])) >= n, timeout):
                raise AssertionError(f"{path}: {len(self.bodies.get(path, []))} of {n} bodies: {self.bodies}")
            return list(self.bodies[path])

    def wait_attempts(self, path: str, n: int, timeout: float = 10.0) -> list[float]:
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.times(path)) >= n, timeout):
                raise AssertionError(f"{path}: fewer than {n} attempts")
            return self.times(path)

    def times(self, path: str) -> list[float]:
        return [t for p, t in self.attempts if p == path]

    def close(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


class LogWatch:
    """A structlog processor that records every log line and lets a test wait for some."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.entries: list[dict[str, Any]] = []

    def __call__(self, _logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        with self.cond:
            self.entries.append(dict(event_dict, log_level=method))
            self.cond.notify_all()
        return event_dict

    def of(self, event: str, **match: Any) -> list[dict[str, Any]]:
        with self.cond:
            return [e for e in self.entries if e["event"] == event and all(e.get(k) == v for k, v in match.items())]

    def wait(self, event: str, n: int = 1, timeout: float = 10.0, **match: Any) -> list[dict[str, Any]]:
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.of(event, **match)) >= n, timeout):
                raise AssertionError(f"fewer than {n} {event} {match}: {[e['event'] for e in self.entries]}")
            return self.of(event, **match)


FAST = AlertTuning(base_delay=0.02, max_delay=0.1, http_timeout=2.0)


class Notifier:
    """A NotifierActor under a real root supervisor, reached through its Address."""

    def __init__(self, runtime: Runtime, config: NotifierSettings, tuning: AlertTuning = FAST) -> None:
        self.address = Address("notifier")
        self.exited = threading.Event()
        self.state = AlertState()
        spec = ChildSpec("notifier", NotifierActor, args=(config, self.state), kwargs={"tuning": tuning},
                         address=self.address, kind="notifier", shutdown=10.0)
        self.ref, _ = start_root(runtime, [spec], on_exit=self._exit)

    def _exit(self, _: Exit) -> None:
        self.exited.set()

    def tell(self, *messages: Any) -> None:
        for m in messages:
            assert self.address.tell(m)

    def stats(self) -> dict[str, Any]:
        return self.address.proxy().stats().get(timeout=5)

    def stop(self) -> None:
        self.ref.stop(block=True, timeout=15)
        assert self.exited.wait(15)


@pytest.fixture
def notifier(runtime: Runtime, receiver: Receiver) -> Iterator[Callable[..., Notifier]]:
    started: list[Notifier] = []

    def make(tuning: AlertTuning = FAST, **config: Any) -> Notifier:
        cfg = NotifierSettings(**({"slack_webhook": receiver.url(SLACK_PATH), "pagerduty_routing_key": ROUTING_KEY,
                               "pagerduty_url": receiver.url("/pd")} | config))
        n = Notifier(runtime, cfg, tuning)
        started.append(n)
        return n

    yield make
    for n in started:
        if not n.exited.is_set():
            n.stop()


def counts(**nonzero: int) -> dict[str, int]:
    return {k: nonzero.get(k, 0) for k in ("sent", "failed", "retried", "dropped", "queued", "in_flight")}


def assert_no_secrets(logs: LogWatch, *secrets: str) -> None:
    text = repr(logs.entries)
    for secret in secrets:
        assert secret not in text
    assert "XXXXsecretXXXX" not in text


def test_breaker_open_then_closed_reaches_slack_and_pagerduty(notifier, receiver, logs) -> None:
    n = notifier()
    n.tell(ex("binance", "closed"), ex("binance", "open", consecutive_failures=2), ex("binance", "half_open"),
           ex("binance", "open"), ex("binance", "half_open"), ex("binance", "closed"))
    pd = receiver.wait_bodies("/pd", 2)
    slack = receiver.wait_bodies(SLACK_PATH, 2)
    logs.wait("alert_delivered", 4)
    s = n.stats()
    n.stop()
    assert [b["event_action"] for b in pd] == ["trigger", "resolve"]
    assert pd[0]["dedup_key"] == pd[1]["dedup_key"] == "candlekeeper/binance/breaker"
    assert pd[0]["routing_key"] == pd[1]["routing_key"] == ROUTING_KEY
    assert pd[0]["payload"]["severity"] == "error" and pd[0]["payload"]["source"] == "candlekeeper"
    assert pd[0]["payload"]["custom_details"]["consecutive_failures"] == 2
    assert set(pd[1]) == {"routing_key", "event_action", "dedup_key"}
    assert slack[0]["text"].startswith(":red_circle: ERROR: binance: circuit breaker OPEN")
    assert slack[1]["text"].startswith(":large_green_circle: resolved: binance")
    assert s["alerts"] == {"triggered": 1, "resolved": 1, "deduplicated": 1} and s["open"] == []
    assert s["destinations"]["pagerduty"] == counts(sent=2)
    assert s["destinations"]["slack"]["sent"] == 2
    alerts = logs.of("alert")
    assert [(e["action"], e["dedup_key"], e["severity"]) for e in alerts] == [
        ("trigger", "candlekeeper/binance/breaker", "error"), ("resolve", "candlekeeper/binance/breaker", "info")]
    assert all(e["summary"] for e in alerts)
    assert_no_secrets(logs, ROUTING_KEY, receiver.url(SLACK_PATH))


def test_retries_after_500_and_resolve_never_overtakes_its_trigger(notifier, receiver, logs) -> None:
    receiver.fail("/pd", 500, count=3)
    receiver.fail(SLACK_PATH, 503, count=1)
    n = notifier()
    n.tell(StorageStatus(False, "disk full"), StorageStatus(True))  # the resolve is queued behind its trigger
    pd = receiver.wait_bodies("/pd", 2)
    slack = receiver.wait_bodies(SLACK_PATH, 2)
    logs.wait("alert_delivered", 4)
    s = n.stats()
    assert [b["event_action"] for b in pd] == ["trigger", "resolve"] and pd[0]["payload"]["severity"] == "critical"
    assert pd[0]["dedup_key"] == pd[1]["dedup_key"] == "candlekeeper/storage"
    assert slack[0]["text"].startswith(":rotating_light: CRITICAL: storage failing: disk full")
    assert "resolved" in slack[1]["text"]
    assert s["destinations"]["pagerduty"]["retried"] == 3 and s["destinations"]["slack"]["retried"] == 1
    assert len(receiver.times("/pd")) == 5  # 3 failures, then trigger, then resolve
    retries = logs.of("alert_delivery_retry")
    assert len(retries) == 4 and {e["error"] for e in retries} == {"HTTP 500", "HTTP 503"}
    assert [e["attempt"] for e in logs.of("alert_delivered", destination="pagerduty")] == [4, 1]
    assert_no_secrets(logs, ROUTING_KEY, receiver.url(SLACK_PATH))


def test_429_retry_after_is_honoured(notifier, receiver, logs) -> None:
    receiver.fail("/pd", 429, count=1, headers={"Retry-After": "1"})
    n = notifier(slack_webhook=None)
    n.tell(ex("binance", "open"))
    receiver.wait_bodies("/pd", 1)
    first, second = receiver.times("/pd")
    assert second - first >= 0.9  # not FAST's 20-100 ms backoff
    [retry] = logs.wait("alert_delivery_retry")
    assert retry["error"] == "HTTP 429" and retry["retry_in"] == 1.0
    logs.wait("alert_delivered")
    assert n.stats()["destinations"]["pagerduty"]["retried"] == 1


def test_4xx_gives_up_at_once_and_later_alerts_still_go(notifier, receiver, logs) -> None:
    receiver.fail(SLACK_PATH, 404, count=1)
    n = notifier(pagerduty_routing_key=None)
    n.tell(series("quarantined", detail="BadResponse: inverted candles"), series("ok"))
    [resolved] = receiver.wait_bodies(SLACK_PATH, 1)
    [failed] = logs.wait("alert_delivery_failed")
    logs.wait("alert_delivered")
    s = n.stats()
    assert "resolved" in resolved["text"] and "BTC/USDT@1m" in resolved["text"]
    assert len(receiver.times(SLACK_PATH)) == 2
    assert s["destinations"] == {"slack": counts(sent=1, failed=1)}
    assert failed["error"] == "HTTP 404" and failed["dedup_key"].endswith("BTC/USDT@1m/quarantine")
    assert failed["action"] == "trigger" and "not retryable" in failed["reason"]
    assert_no_secrets(logs, receiver.url(SLACK_PATH))


def test_unreachable_destination_gives_up_after_n_attempts(notifier, logs) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/pd"
    n = notifier(AlertTuning(attempts=3, base_delay=0.01, max_delay=0.02), slack_webhook=None, pagerduty_url=dead)
    n.tell(ex("binance", "open"))
    [failed] = logs.wait("alert_delivery_failed")
    assert "3 attempts failed" in failed["reason"] and "refused" in failed["error"].lower()
    assert n.stats()["destinations"]["pagerduty"] == counts(failed=1, retried=2)


def test_rate_limited_alerts_are_queued_then_sent_in_order(notifier, receiver, logs) -> None:
    n = notifier(AlertTuning(rate_per_minute=600, burst=1, max_in_flight=1), pagerduty_routing_key=None)
    n.tell(*(ex(f"ex{i}", "open") for i in range(4)))
    bodies = receiver.wait_bodies(SLACK_PATH, 4)
    assert [b["text"].split(": ")[2] for b in bodies] == ["ex0", "ex1", "ex2", "ex3"]
    times = receiver.times(SLACK_PATH)
    assert times[-1] - times[0] >= 3 * 0.1 * 0.9  # paced at 10 per second, not all at once
    logs.wait("alert_delivered", 4)


def test_queue_overflow_drops_oldest_with_a_log_line(notifier, receiver, logs) -> None:
    receiver.hold.clear()  # the first post hangs, so the rest queue up behind max_in_flight
    n = notifier(AlertTuning(max_queue=2, max_in_flight=1), pagerduty_routing_key=None)
    n.tell(*(ex(f"ex{i}", "open") for i in range(5)))
    dropped = logs.wait("alert_dropped", 2)
    assert [e["dedup_key"] for e in dropped] == ["candlekeeper/ex1/breaker", "candlekeeper/ex2/breaker"]
    assert [e["dropped_total"] for e in dropped] == [1, 2]
    receiver.hold.set()
    bodies = receiver.wait_bodies(SLACK_PATH, 3)
    assert [b["text"].split(": ")[2] for b in bodies] == ["ex0", "ex3", "ex4"]
    logs.wait("alert_delivered", 3)
    assert n.stats()["destinations"]["slack"]["dropped"] == 2


def test_a_hanging_webhook_blocks_neither_the_actor_nor_stop(notifier, receiver, logs) -> None:
    receiver.hold.clear()  # the receiver reads each request and then hangs
    n = notifier(AlertTuning(http_timeout=5.0), pagerduty_routing_key=None)
    n.tell(ex("binance", "open"), ex("binance", "closed"), StorageStatus(False, "x"))
    receiver.wait_arrived(1)  # the first post is in flight, and hangs
    assert n.stats()["alerts"]["triggered"] == 2  # answered while the post hangs:
    assert not logs.of("alert_delivered") and not logs.of("alert_delivery_failed")  # it has not ended
    stopped = threading.Thread(target=n.stop)
    stopped.start()
    stopped.join(30.0)  # a "never" check: stop waits at most one HTTP timeout, not for the receiver
    assert not stopped.is_alive(), "stop waited for a hanging webhook"
    assert logs.of("alerts_dropped_at_stop")  # the queued resolve and storage alert were not sent


def test_no_destination_still_logs_every_transition(runtime, logs) -> None:
    n = Notifier(runtime, NotifierSettings())
    n.tell(ex("binance", "open"), lifecycle("gave_up"), lifecycle("escalated"), ex("binance", "closed"))
    logs.wait("alert", 3)
    s = n.stats()
    n.stop()
    assert s["destinations"] == {} and s["alerts"] == {"triggered": 2, "resolved": 1, "deduplicated": 1}
    alerts = [(e["action"], e["dedup_key"], e["severity"], e["log_level"]) for e in logs.of("alert")]
    assert alerts == [("trigger", "candlekeeper/binance/breaker", "error", "error"),
                      ("trigger", "candlekeeper/root/binance/gave_up", "critical", "error"),
                      ("resolve", "candlekeeper/binance/breaker", "info", "info")]
    assert not [t for t in threading.enumerate() if "/post" in t.name]  # no pool without destinations


def test_a_crashed_notifier_is_restarted_and_still_resolves(receiver, logs) -> None:
    runtime = Runtime(allow_crash_injection=True)
    runtime.start()
    recorder = EventRecorder()
    runtime.events.subscribe(recorder)
    try:
        cfg = NotifierSettings(pagerduty_routing_key=ROUTING_KEY, pagerduty_url=receiver.url("/pd"))
        n = Notifier(runtime, cfg)
        n.tell(ex("binance", "open"))
        receiver.wait_bodies("/pd", 1)
        logs.wait("alert_delivered")
        n.tell(Crash("test"))
        recorder.wait_for(lambda evs: any(e.kind == "restarted" and e.path == "root/notifier" for e in evs))
        n.tell(ex("binance", "open"), ex("binance", "closed"))  # the new incarnation knows it is open
        pd = receiver.wait_bodies("/pd", 2)
        logs.wait("alert_delivered", 2)
        s = n.stats()
        n.stop()
    finally:
        runtime.stop()
    assert [b["event_action"] for b in pd] == ["trigger", "resolve"]
    assert s["destinations"]["pagerduty"]["sent"] == 2 and s["alerts"]["deduplicated"] == 1  # counters survive too


def test_default_pagerduty_url(runtime) -> None:
    n = Notifier(runtime, NotifierSettings(pagerduty_routing_key="rk"))
    try:
        destinations = n.address.proxy().destinations.get(timeout=5)
    finally:
        n.stop()
    assert destinations["pagerduty"].url == DEFAULT_PAGERDUTY_URL and "slack" not in destinations


# -- end to end through the real system ----------------------------------------------------


def test_system_outage_triggers_and_recovery_resolves(receiver, logs) -> None:
    start = (int(time.time() * 1000) // 60_000) * 60_000 - 3600_000
    workdir = tempfile.mkdtemp(dir="/tmp")
    slack_url = receiver.url(SLACK_PATH)
    cfg: dict[str, Any] = {
        "storage": {"path": f"{workdir}/candles.db"},
        "ingest": {"lookback": "30m", "poll_interval": "2s"},
        "resilience": {"breaker_threshold": 2, "breaker_recovery": "1s", "retry_base_delay": "50ms",
                       "retry_max_delay": "500ms"},
        "exchanges": {"binance": {"symbols": ["BTC/USDT"], "rate_limit": 100, "timeout": "2s"}},
        "alerts": {"slack_webhook": slack_url, "pagerduty_routing_key": ROUTING_KEY,
                   "pagerduty_url": receiver.url("/pd")},
    }
    with BinanceSimulator(["BTC/USDT"], history_start_ms=start) as sim:
        cfg["exchanges"]["binance"]["api_base"] = sim.url
        sim.set_outage(OutageMode.HTTP_503)  # down from the start: loading markets fails
        system = candlekeeper.start(cfg, control=False)
        try:
            [trigger] = receiver.wait_bodies("/pd", 1, timeout=20)
            assert trigger["event_action"] == "trigger" and trigger["dedup_key"] == "candlekeeper/binance/breaker"
            assert trigger["payload"]["component"] == "binance" and trigger["routing_key"] == ROUTING_KEY
            assert system.health()["exchanges"][0]["breaker"] in ("open", "half_open")
            sim.set_outage(None)
            pd = receiver.wait_bodies("/pd", 2, timeout=30)
            assert pd[1] == {"routing_key": ROUTING_KEY, "event_action": "resolve", "dedup_key": trigger["dedup_key"]}
            slack = receiver.wait_bodies(SLACK_PATH, 2)
            assert "OPEN" in slack[0]["text"] and "resolved" in slack[1]["text"]
            logs.wait("alert_delivered", 4)
            stats = system.blueprint.notifier.proxy().stats().get(timeout=5)
            assert stats["open"] == [] and stats["destinations"]["pagerduty"]["sent"] == 2
        finally:
            system.stop()
    assert [(e["action"], e["dedup_key"]) for e in logs.of("alert")] == [
        ("trigger", "candlekeeper/binance/breaker"), ("resolve", "candlekeeper/binance/breaker")]
    assert_no_secrets(logs, ROUTING_KEY, slack_url)
    assert not pykka.ActorRegistry.get_all()


def test_system_quarantine_triggers_once_and_reset_resolves(receiver, logs) -> None:
    """Series report every poll's new candle to health, but only status changes to the notifier:
    a quarantined series triggers one alert, and releasing it resolves that alert."""
    start = (int(time.time() * 1000) // 60_000) * 60_000 - 3600_000
    workdir = tempfile.mkdtemp(dir="/tmp")
    cfg: dict[str, Any] = {
        "storage": {"path": f"{workdir}/candles.db"},
        "ingest": {"lookback": "30m", "poll_interval": "1s"},
        "resilience": {"retry_attempts": 2, "quarantine_after": 2, "retry_base_delay": "50ms",
                       "retry_max_delay": "200ms"},
        "exchanges": {"binance": {"symbols": ["BTC/USDT", "SOL/USDT"], "rate_limit": 100, "timeout": "2s"}},
        "alerts": {"pagerduty_routing_key": ROUTING_KEY, "pagerduty_url": receiver.url("/pd")},
    }
    with BinanceSimulator(["BTC/USDT", "SOL/USDT"], history_start_ms=start) as sim:
        cfg["exchanges"]["binance"]["api_base"] = sim.url
        sim.poison("SOL/USDT", PoisonKind.INVERTED)
        system = candlekeeper.start(cfg, control=False)
        try:
            [trigger] = receiver.wait_bodies("/pd", 1, timeout=30)
            assert trigger["event_action"] == "trigger"
            assert trigger["dedup_key"] == "candlekeeper/binance/SOL/USDT@1m/quarantine"
            assert trigger["payload"]["severity"] == "warning"
            sim.unpoison("SOL/USDT")
            system.reset("binance", "SOL/USDT")
            pd = receiver.wait_bodies("/pd", 2, timeout=30)
            assert pd[1] == {"routing_key": ROUTING_KEY, "event_action": "resolve", "dedup_key": trigger["dedup_key"]}
        finally:
            system.stop()
    assert [(e["action"], e["dedup_key"]) for e in logs.of("alert")] == [
        ("trigger", "candlekeeper/binance/SOL/USDT@1m/quarantine"),
        ("resolve", "candlekeeper/binance/SOL/USDT@1m/quarantine")]
