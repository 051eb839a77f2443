"""Fuzzing the control protocol: bad input never hurts the daemon.

One real system (`candlekeeper.start` against a simulated Binance) serves the whole module on its
real Unix socket. Hypothesis throws at it random bytes, valid msgpack of every shape, known
commands with wrong arguments, pipelined batches, oversized and half-sent messages, clients that
vanish and more clients than it serves at once. Each request must get exactly one well-formed
reply, in order, its id echoed; bad framing must get an error reply or a closed connection; and
after every case a fresh client's `health` is answered ok and the daemon's threads have not grown.

Mutations are kept harmless: `shutdown` and `crash` are never sent, `restart`/`add`/`remove`/
`accept_gap` only name things that do not exist, and `pause` is undone (`resume`) after each test.

`CANDLEKEEPER_FUZZ_EXAMPLES=1000 HYPOTHESIS_PROFILE=explore python -m pytest tests/test_control_fuzz.py`
fuzzes longer, on new examples (the suite draws 100 of each, the same ones every run);
`CANDLEKEEPER_FUZZ_SHRINK=1` shrinks a failing example (slow when the failure is a hang).
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import pykka
import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

import candlekeeper
from candlekeeper.app.system import System
from candlekeeper.simulator.server import BinanceSimulator
from candlekeeper.surfaces.control import MAX_CONNECTIONS, MAX_MESSAGE, request
from candlekeeper.surfaces.control import commands as command_table
from tests.conftest import wait_threads_gone
from tests.test_ingest import wait_until

EXAMPLES = int(os.environ.get("CANDLEKEEPER_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # no .hypothesis/ in a shared checkout
    # a hang costs a client timeout per shrinking step: shrink only when asked to
    phases=list(Phase) if os.environ.get("CANDLEKEEPER_FUZZ_SHRINK") else [Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)
FEW = settings(FUZZ, max_examples=max(3, EXAMPLES // 15))  # the costly ones

SYMBOL = "BTC/USDT"  # the simulator lists only this one, and the system runs it
REAL_PATHS = {"storage", "health", "control", "binance", "binance/exchange", "binance/series",
              f"binance/series/{SYMBOL}@1m"}
KNOWN = frozenset(command_table(None))  # type: ignore[arg-type]  # the server's own table: no list to drift
CONN_THREAD = "root/control/conn"
THREAD_SLACK = 8  # simulator keep-alive threads and timers come and go


# -- the daemon under test -----------------------------------------------------------------


@dataclass
class Daemon:
    path: str
    system: System
    baseline: int  # threads once settled, with no control client connected

    def served(self) -> None:
        """A fresh client is answered, and the threads have not grown without bound."""
        reply = request(self.path, "health", timeout=30)
        assert reply["ok"] is True and reply["result"]["status"] in ("ok", "degraded", "down"), reply
        assert _conn_threads() <= MAX_CONNECTIONS
        assert threading.active_count() <= self.baseline + MAX_CONNECTIONS + THREAD_SLACK

    def settle(self) -> None:
        """The series is as configured again (a fuzzed `pause` is undone), then every connection
        thread has ended (these two requests' too: a test that fills every connection slot must
        find them all free) and threads are back to the baseline."""
        assert request(self.path, "resume", exchange="binance")["ok"] is True
        series = request(self.path, "health")["result"]["series"]
        assert [(s["exchange"], s["symbol"], s["timeframe"]) for s in series] == [("binance", SYMBOL, "1m")]
        wait_until(lambda: _conn_threads() == 0, timeout=30, what="connection threads to end")
        wait_until(lambda: threading.active_count() <= self.baseline + THREAD_SLACK, timeout=30,
                   what=f"threads back to {self.baseline} (now {threading.active_count()})")


def _conn_threads() -> int:
    return sum(t.name == CONN_THREAD for t in threading.enumerate())


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Overrides conftest's per-test check: this module's one system outlives each test, so the
    `daemon` fixture makes the same check (no thread, no actor left) when it stops."""
    yield


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    before = set(threading.enumerate())
    d = tempfile.mkdtemp(dir="/tmp")  # short: a Unix socket path is limited to ~100 bytes
    sim = BinanceSimulator([SYMBOL]).start()
    system = candlekeeper.start({
        "storage": {"path": f"{d}/candles.db"},
        "control": {"socket": f"{d}/ctl.sock"},
        "ingest": {"lookback": "10m", "poll_interval": "2s"},
        "exchanges": {"binance": {"symbols": [SYMBOL], "api_base": sim.url, "rate_limit": 100, "timeout": "2s"}},
    })
    try:
        path = f"{d}/ctl.sock"

        def ready() -> bool:
            h = request(path, "health")["result"]
            return h["status"] == "ok" and [s["status"] for s in h["series"]] == ["ok"]

        wait_until(ready, timeout=30, what="the system to be up and caught up")
        # markets loaded: a fuzzed `add` of an unlisted symbol is refused, never started
        assert system.blueprint.exchanges["binance"].proxy().lists(SYMBOL).get(timeout=10) is True
        time.sleep(0.2)
        yield Daemon(path, system, baseline=threading.active_count())
    finally:
        system.stop()
        sim.stop()
        shutil.rmtree(d, ignore_errors=True)
    left = wait_threads_gone(before)
    actors = pykka.ActorRegistry.get_all()
    pykka.ActorRegistry.stop_all(block=True, timeout=5)
    assert not actors, f"actors left registered: {actors}"
    assert not left, f"threads left running: {[t.name for t in left]}"


# -- a raw client ----------------------------------------------------------------------------


class Client:
    def __init__(self, path: str, timeout: float = 15.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)  # blocking: waits for the listen backlog instead of EAGAIN
        self.sock.settimeout(timeout)
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=64 * MAX_MESSAGE)
        self.eof = False

    def send(self, data: bytes) -> bool:
        """False when the daemon has closed the connection meanwhile (that is allowed)."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def _recv(self) -> list[Any]:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        except TimeoutError:
            raise AssertionError("the daemon neither replied nor closed the connection") from None
        if not data:
            self.eof = True
            return []
        self.unpacker.feed(data)
        return list(self.unpacker)

    def replies(self, n: int) -> list[Any]:
        """The next `n` replies (fewer only if the daemon closes the connection)."""
        out: list[Any] = []
        while len(out) < n and not self.eof:
            out.extend(self._recv())
        return out

    def until_closed(self) -> list[Any]:
        out: list[Any] = []
        while not self.eof:
            out.extend(self._recv())
        return out

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# -- the oracle --------------------------------------------------------------------------------


def check_shape(reply: Any) -> None:
    assert isinstance(reply, dict), reply
    assert "id" in reply and isinstance(reply.get("ok"), bool), reply
    if reply["ok"]:
        assert set(reply) == {"id", "ok", "result"}, reply
    else:
        assert set(reply) == {"id", "ok", "error"}, reply
        assert isinstance(reply["error"], str) and reply["error"], reply
        assert len(reply["error"]) < 4096, "an error names the problem; it does not echo the input"


def expected_id(obj: Any) -> Any:
    """The server echoes a scalar id (nil, bool, int, float, str, bin); anything else is nil."""
    req_id = obj.get("id") if isinstance(obj, dict) else None
    return req_id if isinstance(req_id, (str, bytes, int, float, bool, type(None))) else None


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def check_reply(obj: Any, reply: Any) -> None:
    """`reply` answers the decoded request `obj`."""
    check_shape(reply)
    assert same(reply["id"], expected_id(obj)), (obj, reply)
    if not isinstance(obj, dict):
        assert reply["ok"] is False and "must be a map" in reply["error"], reply
        return
    cmd = obj.get("cmd")
    if not isinstance(cmd, str):
        assert reply["ok"] is False and "'cmd' must be a string" in reply["error"], reply
    elif cmd not in KNOWN:
        assert reply["ok"] is False and "unknown command" in reply["error"], reply
    elif cmd in ("health", "tree"):
        assert reply["ok"] is True, reply
    elif cmd == "cluster":  # this daemon runs alone
        assert reply["ok"] is False and "clustering is off" in reply["error"], reply


def decode_like_the_server(data: bytes) -> tuple[list[Any], bool]:
    """The objects the server decodes from `data`, and whether it then meets undecodable input."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_MESSAGE, strict_map_key=False)
    unpacker.feed(data)
    out: list[Any] = []
    while True:
        try:
            out.append(next(unpacker))
        except StopIteration:
            return out, False
        except Exception:  # noqa: BLE001 - whatever msgpack refuses
            return out, True


def harmless(obj: Any) -> bool:
    """Never stop or crash the daemon, nor restart, add or remove anything real."""
    if not isinstance(obj, dict):
        return True
    cmd = obj.get("cmd")
    if cmd in ("shutdown", "crash"):
        return False
    if cmd == "restart":
        target = obj.get("target")
        return not (isinstance(target, str) and target.strip("/").removeprefix("root/") in REAL_PATHS)
    if cmd == "add":
        return not (obj.get("exchange") == "binance" and obj.get("symbol") == SYMBOL)
    if cmd in ("remove", "accept_gap"):
        return not (obj.get("exchange") == "binance" and obj.get("symbol") == SYMBOL
                    and obj.get("timeframe", "1m") == "1m")
    return True


# -- strategies --------------------------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)  # packable: no lone surrogates
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), text, st.binary(max_size=40),
)
extensions = st.one_of(
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=16)),
    st.builds(msgpack.Timestamp, st.integers(0, 2**34 - 1), st.integers(0, 999_999_999)),
)
values = st.recursive(
    st.one_of(scalars, extensions),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(scalars, inner, max_size=4)),
    max_leaves=12,
)
ids = st.one_of(scalars, extensions, st.lists(scalars, max_size=3), st.dictionaries(text, scalars, max_size=2))
# an argument of any wrong type: a command checks its arguments' types at the top, so `values`
# nested deep (what the decoding fuzzers draw) finds nothing more here and costs twice the CPU
wrong = ids
commands = sorted(KNOWN - {"shutdown", "crash"})
args = {
    "exchange": st.one_of(st.sampled_from(["binance", "", "BINANCE", "kraken", "binance "]), text, wrong),
    "symbol": st.one_of(st.sampled_from([SYMBOL, "ETH/USDT", "btc/usdt", "BTC", "/", "BTC/USDT:USDT", ""]), text,
                        wrong),
    "timeframe": st.one_of(st.sampled_from(["1m", "5m", "1w", "0m", "1M", "", "1m "]), text, wrong),
    "n": st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from([0, 1, 1000, 1001, -1]), st.floats(),
                   st.booleans(), st.none(), text),
    "target": st.one_of(
        st.sampled_from(["", "/", "root", "root/", "nope", "binance/nope", "binance/series/NOPE/USDT@1m",
                         "storage/x", "binance/exchange/x", "root/root/storage", "../storage"]),
        text, wrong),
    "reason": wrong,
    "from": st.one_of(st.sampled_from(["2024-01-01", "2024-01-01T00:00:00Z", "now", "30d", "", "x"]),
                      st.integers(-(2**63), 2**64 - 1), wrong),
    "to": st.one_of(st.sampled_from(["2024-01-02", "now", "1h", "2100-01-01", ""]), st.integers(-(2**63), 2**64 - 1),
                    wrong),
}


@st.composite
def command_requests(draw: st.DrawFn) -> dict[Any, Any]:
    """A known command with arguments of any type, present or not, plus stray keys."""
    req: dict[Any, Any] = dict(draw(st.dictionaries(text, wrong, max_size=2)))
    req.update(draw(st.fixed_dictionaries({}, optional=args)))
    req["cmd"] = draw(st.sampled_from(commands))
    if draw(st.booleans()):
        req["id"] = draw(ids)
    return req


requests_of_any_shape = st.one_of(
    values,  # not a map at all, most of the time
    st.dictionaries(scalars, values, max_size=4),  # maps without id or cmd, mostly
    st.fixed_dictionaries({"id": ids, "cmd": values}),  # cmd of any type
    st.fixed_dictionaries({"id": ids, "cmd": text}),  # unknown commands
    command_requests(),
).filter(harmless)


# -- the fuzzers -------------------------------------------------------------------------------


@FUZZ
@given(data=st.one_of(
    st.binary(max_size=600),
    st.builds(lambda objs, tail: b"".join(map(pack, objs)) + tail,  # valid requests, then garbage
              st.lists(requests_of_any_shape, max_size=3), st.binary(max_size=64)),
    st.builds(lambda head, body: head + body,  # plausible headers (big lengths, ext types) + noise
              st.sampled_from([b"\x81", b"\xdf\xff\xff\xff\xff", b"\xdd\x7f\xff\xff\xff", b"\xdb\x00\x10\x00\x01",
                               b"\xc7\x05\xff", b"\xd6\xff", b"\xc1", b"\x91" * 1100, b"\x81\x90"]),
              st.binary(max_size=64)),
))
def test_random_bytes(daemon: Daemon, data: bytes) -> None:
    """One reply per decodable request, then an `invalid msgpack` reply and a close if the rest is
    undecodable; an incomplete tail is simply waited for (until the client hangs up)."""
    objs, invalid = decode_like_the_server(data)
    assume(all(harmless(o) for o in objs))
    with Client(daemon.path) as c:
        c.send(data)
        c.sock.shutdown(socket.SHUT_WR)
        replies = c.until_closed()
    assert len(replies) == len(objs) + invalid, (objs, invalid, replies)
    for obj, reply in zip(objs, replies, strict=False):
        check_reply(obj, reply)
    if invalid:
        assert replies[-1]["id"] is None and replies[-1]["ok"] is False
        assert replies[-1]["error"].startswith("invalid msgpack"), replies[-1]
    daemon.served()


@FUZZ
@given(batch=st.lists(requests_of_any_shape, min_size=1, max_size=6))
def test_any_request_pipelined_gets_one_reply_each_in_order(daemon: Daemon, batch: list[Any]) -> None:
    """Valid msgpack of every shape, pipelined in one write: exactly one reply per request, in
    order, ids echoed; refusals keep the connection open."""
    with Client(daemon.path) as c:
        c.send(b"".join(map(pack, batch)))
        replies = c.replies(len(batch))
        assert len(replies) == len(batch), replies
        for obj, reply in zip(batch, replies, strict=True):
            check_reply(msgpack.unpackb(pack(obj), raw=False, strict_map_key=False), reply)
        c.send(pack({"id": "after", "cmd": "health"}))  # still open, still served
        (after,) = c.replies(1)
        assert after["id"] == "after" and after["ok"] is True, after
    daemon.served()


@FUZZ
@given(batch=st.lists(command_requests().filter(harmless), min_size=2, max_size=12))
def test_known_commands_with_bad_arguments_in_order(daemon: Daemon, batch: list[dict[Any, Any]]) -> None:
    """Known commands with arguments of wrong types, unknown exchanges, symbols, timeframes,
    absurd n: each answered, in order (unique ids), none kills the connection."""
    for i, req in enumerate(batch):
        req["id"] = i
    with Client(daemon.path) as c:
        c.send(b"".join(map(pack, batch)))
        replies = c.replies(len(batch))
        assert [r.get("id") for r in replies] == list(range(len(batch))), replies
        for req, reply in zip(batch, replies, strict=True):
            check_reply(req, reply)
            if req["cmd"] == "latest" and not (isinstance(req.get("n", 1), int) and 1 <= req.get("n", 1) <= 1000):
                assert reply["ok"] is False, (req, reply)
            if req["cmd"] in ("add", "remove", "restart"):  # nothing real named: refused
                assert reply["ok"] is False, (req, reply)
        c.send(pack({"id": "after", "cmd": "tree"}))
        assert c.replies(1)[0]["ok"] is True
    daemon.served()


@FEW
@given(size=st.integers(MAX_MESSAGE + 1, MAX_MESSAGE + 300_000),
       form=st.sampled_from(["str_arg", "bin_id", "array", "map", "bare_str"]),
       before=st.integers(0, 3))
def test_oversized_message_gets_an_error_or_a_close(daemon: Daemon, size: int, form: str, before: int) -> None:
    """A message over MAX_MESSAGE: the requests before it are answered, then an error reply
    and/or a closed connection; the daemon keeps serving."""
    if form == "str_arg":
        big = pack({"id": 1, "cmd": "latest", "symbol": "x" * size})
    elif form == "bin_id":
        big = pack({"id": b"\0" * size, "cmd": "health"})
    elif form == "array":  # many small items: the buffer limit, not a length limit, stops it
        big = pack([0x10000] * (size // 5 + 1))  # 5 bytes each
    elif form == "map":
        big = pack({0x10000 + i: None for i in range(size // 6 + 1)})  # 6 bytes an entry
    else:  # a bare string, not even a map
        big = b"\xdb" + size.to_bytes(4, "big") + b"y" * size
    assert len(big) > MAX_MESSAGE
    with Client(daemon.path) as c:
        head = b"".join(pack({"id": f"pre{i}", "cmd": "health"}) for i in range(before))
        writer = threading.Thread(target=c.send, args=(head + big,))
        writer.start()
        replies = c.until_closed()
        writer.join(10)
        assert not writer.is_alive()
    answered = [r for r in replies if isinstance(r.get("id"), str)]
    assert [r["id"] for r in answered] == [f"pre{i}" for i in range(before)][: len(answered)]
    rest = replies[len(answered):]
    assert len(rest) <= 1, rest
    for r in rest:
        check_shape(r)
        assert r["ok"] is False and ("larger than" in r["error"] or "exceeds" in r["error"]), r
    daemon.served()


@FUZZ
@given(batch=st.lists(requests_of_any_shape, max_size=4), last=command_requests().filter(harmless),
       cut=st.floats(0.0, 1.0, exclude_max=True), read_first=st.booleans())
def test_half_sent_message_then_the_client_vanishes(daemon: Daemon, batch: list[Any], last: dict[Any, Any],
                                                    cut: float, read_first: bool) -> None:
    """Complete requests, then part of one, then the client closes (maybe without reading a
    single reply, so the daemon writes into a dead socket)."""
    whole = b"".join(map(pack, batch))
    partial = pack(last)
    with Client(daemon.path) as c:
        c.send(whole + partial[: max(1, int(len(partial) * cut))])
        if read_first:
            assert len(c.replies(len(batch))) == len(batch)
    daemon.served()


def test_client_vanishes_while_replies_are_written(daemon: Daemon) -> None:
    """Many replies queued for a client that is gone: the daemon's writes fail, nothing else."""
    for _ in range(3):
        with Client(daemon.path) as c:
            c.send(b"".join(pack({"id": i, "cmd": "tree"}) for i in range(300)))
        daemon.served()
    daemon.settle()


def test_long_pipeline_over_max_message_in_total(daemon: Daemon) -> None:
    """Pipelining is bounded per message, not per connection: 1.3 MiB of small requests in one
    write are all answered, in order (a reader thread drains the replies as they come)."""
    n = 6000
    reqs = [pack({"id": i, "cmd": "nope", "pad": "p" * 200}) for i in range(n)]
    assert sum(map(len, reqs)) > MAX_MESSAGE
    with Client(daemon.path, timeout=30) as c:
        writer = threading.Thread(target=c.send, args=(b"".join(reqs),))
        writer.start()
        replies = c.replies(n)
        writer.join(10)
    assert [r["id"] for r in replies] == list(range(n))
    assert all(r["ok"] is False and "unknown command 'nope'" in r["error"] for r in replies)
    daemon.served()
    daemon.settle()


def test_message_just_under_the_limit_is_served(daemon: Daemon) -> None:
    with Client(daemon.path) as c:
        c.send(pack({"id": 7, "cmd": "u" * (MAX_MESSAGE - 100)}))
        (reply,) = c.replies(1)
        assert reply["id"] == 7 and reply["ok"] is False and "unknown command" in reply["error"]
        assert len(reply["error"]) < 300  # the 1 MiB command name is not echoed back
        c.send(pack({"id": 8, "cmd": "health"}))
        assert c.replies(1)[0]["ok"] is True
    daemon.settle()


@FEW
@given(extra=st.lists(st.sampled_from(["read", "vanish", "half"]), min_size=1, max_size=8))
def test_more_clients_than_max_connections(daemon: Daemon, extra: list[str]) -> None:
    """MAX_CONNECTIONS clients held open; the ones beyond get `too many connections` and a close
    (whether they read it, leave at once, or leave half-way through a request); the held ones
    and, once they leave, new ones are served."""
    daemon.settle()
    held = [Client(daemon.path) for _ in range(MAX_CONNECTIONS)]
    try:
        for i, c in enumerate(held):  # each one admitted and served before the extras come
            c.send(pack({"id": i, "cmd": "health"}))
            assert c.replies(1)[0]["ok"] is True
        for how in extra:
            with Client(daemon.path) as c:
                if how == "read":
                    replies = c.until_closed()
                    assert len(replies) == 1 and replies[0]["ok"] is False, replies
                    assert "too many connections" in replies[0]["error"]
                elif how == "half":
                    c.send(pack({"id": 1, "cmd": "health"})[:3])
        for i, c in enumerate(held):
            c.send(pack({"id": i, "cmd": "health"}))
            assert c.replies(1)[0]["id"] == i
    finally:
        for c in held:
            c.close()
    wait_until(lambda: _conn_threads() == 0, timeout=30, what="held connections to end")
    daemon.served()


# -- regressions: bugs the fuzzer found ----------------------------------------------------------


def test_regression_refused_client_that_leaves_does_not_kill_the_listener(daemon: Daemon) -> None:
    """The error reply to a client beyond MAX_CONNECTIONS was written on the accept thread,
    unguarded: a client that had already left (EPIPE) killed that thread, and the daemon, still
    running, never accepted another connection."""
    daemon.settle()
    held = [Client(daemon.path) for _ in range(MAX_CONNECTIONS)]
    try:
        for c in held:
            c.send(pack({"id": 0, "cmd": "health"}))
            assert c.replies(1)[0]["ok"] is True
        for _ in range(5):
            Client(daemon.path).close()  # connect and leave before the refusal is written
        time.sleep(0.2)
    finally:
        for c in held:
            c.close()
    wait_until(lambda: _conn_threads() == 0, timeout=30, what="held connections to end")
    daemon.served()
    assert any(t.name == "root/control/accept" for t in threading.enumerate())


@pytest.mark.parametrize("message", [
    pytest.param(lambda: pack([0x10000] * (MAX_MESSAGE // 5 + 10)), id="flat-array"),
    pytest.param(lambda: pack([[0x10000] * 1000] * (MAX_MESSAGE // 5000 + 10)), id="nested-arrays"),
    pytest.param(lambda: pack({"id": 1, "cmd": "health", "pad": {i: i for i in range(0x10000, 0x10000 + 200_000)}}),
                 id="map-in-a-request"),
])
def test_regression_oversized_container_is_refused(daemon: Daemon, message: Any) -> None:
    """The unpacker parses arrays and maps as they arrive and drops the parsed bytes, so its
    buffer limit never tripped: a request of any size (nested arrays: unbounded memory) was
    decoded and served. Now a message over MAX_MESSAGE gets the error reply and a close."""
    data = message()
    assert len(data) > MAX_MESSAGE
    with Client(daemon.path) as c:
        writer = threading.Thread(target=c.send, args=(data,))
        writer.start()
        replies = c.until_closed()
        writer.join(10)
    assert replies == [{"id": None, "ok": False, "error": f"message larger than {MAX_MESSAGE} bytes"}]
    daemon.served()


@pytest.mark.parametrize("data", [
    pytest.param(b"\x81\x90\xc0", id="map-keyed-by-an-array"),  # {[]: nil}: valid msgpack, unhashable key
    pytest.param(b"\x82\xa2id\x01\xa3cmd\x81\x81\xc0\xc0\xc0", id="map-keyed-by-a-map"),
])
def test_regression_undecodable_map_key_gets_an_error_reply(daemon: Daemon, data: bytes) -> None:
    """msgpack raised TypeError (unhashable key), which the connection thread did not catch: it
    died with a traceback, and the client got no reply."""
    with Client(daemon.path) as c:
        c.send(data)
        replies = c.until_closed()
    assert len(replies) == 1 and replies[0]["ok"] is False and "invalid msgpack" in replies[0]["error"], replies
    daemon.served()


def test_regression_deeply_nested_cmd_gets_an_error_reply(daemon: Daemon) -> None:
    """The unknown-command reply embedded repr(cmd): a cmd nested 1000 deep raised RecursionError
    outside the handler's try, killing the connection without a reply (and a 1 MiB cmd was echoed
    back whole)."""
    nested = b"\x91" * 1000 + b"\xc0"
    with Client(daemon.path) as c:
        c.send(b"\x82\xa2id\x01\xa3cmd" + nested)
        c.send(b"\x82\xa2id\x02\xa3cmd" + nested[:-1] + b"\xa1x")
        c.send(b"\x82\xa2id" + nested + b"\xa3cmd\xa6health")  # a deep id: not echoed, but served
        replies = c.replies(3)
    assert [r["id"] for r in replies] == [1, 2, None], replies
    assert [r["ok"] for r in replies] == [False, False, True]
    assert "'cmd' must be a string" in replies[0]["error"]
    daemon.served()
    daemon.settle()
