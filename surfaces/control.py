"""The control channel: msgpack maps over a Unix socket.

Wire format (any language can speak it): a stream of msgpack maps in each direction. Each
request `{"id": ..., "cmd": "...", ...args}` gets exactly one reply, `{"id": ..., "ok": true,
"result": ...}` or `{"id": ..., "ok": false, "error": "..."}`, in order; requests may be
pipelined on one connection. The id is echoed when it is a scalar (nil, bool, int, float, str,
bin), nil otherwise. A message larger than `MAX_MESSAGE` bytes or invalid msgpack closes the
connection after an error reply. A message not received whole within `MESSAGE_TIMEOUT` seconds
of its first byte gets an error reply and a close; a client that does not take a reply within
that time, or is silent for `IDLE_TIMEOUT` seconds between messages, is just closed. The Unix
socket and the TCP listener each serve at most `MAX_CONNECTIONS` clients at once (the others get
an error reply and a close), so remote clients can never lock out the local socket.
tests/test_control_fuzz.py fuzzes the framing; tests/test_control.py the timeouts and limits.

An optional TCP listener (`[control] tcp`, loopback unless configured otherwise) serves the same
protocol to remote clients, but only requests carrying `"token": "<[control] token>"`; a request
without a valid token gets an error reply and the connection is closed. The token is never logged.
A TCP connection must authenticate with its first message within `AUTH_TIMEOUT` seconds or it is
closed. Connections that have not authenticated yet have their own `MAX_CONNECTIONS` slots, the
oldest dropped to make room for a new one, so connections that never send a token can neither
fill the listener nor make an authenticated client be refused.

The listener and each connection run on their own threads (they block on sockets), never in
an actor's mailbox; commands reach the actors through `System`'s asks.
"""

from __future__ import annotations

import hmac
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from ..app.config import ControlConfig, parse_host_port
from ..app.errors import SocketInUse, SocketUnusable
from ..supervisors.child import Child
from ..supervisors.supervisor import ChildSpec

if TYPE_CHECKING:  # the server's side only: `ctl` (the client, `request`) does not import the whole tree
    from ..app.system import System

MAX_MESSAGE = 1 << 20
MAX_CONNECTIONS = 32  # per listener: the Unix socket and the TCP listener each have their own
MESSAGE_TIMEOUT = 10.0  # seconds for a message to arrive whole (or a reply to be taken): no slowloris
IDLE_TIMEOUT = 60.0  # seconds a connection may stay silent between messages before it is closed
AUTH_TIMEOUT = 5.0  # seconds a TCP connection has to send its first message, with a valid token
LISTENERS = ("unix", "tcp")


@dataclass(frozen=True)
class AfterReply:
    """A command's result, and what to do once the reply has been sent: `shutdown`, and `restart`
    of the control server itself, must not close the connection before it carries the reply."""

    result: Any
    then: Callable[[], Any]


class ControlSurface:
    """The control socket as a surface of a `System`: checked before start, started as `control`."""

    def __init__(self, config: ControlConfig) -> None:
        self.config = config

    def preflight(self) -> None:
        check_free(self.config)

    def spec(self, system: System) -> ChildSpec:
        return ChildSpec("control", ControlServer, args=(self.config, system), kind="control")


def check_free(config: ControlConfig) -> None:
    """Fail fast, before the tree starts, when another daemon holds the socket or the TCP port:
    a supervisor restarting the control server could not fix that. Nor a socket that cannot be
    created at its path (`SocketUnusable`)."""
    claim_unix_socket_path(config.socket)
    check_bindable(config.socket)
    if config.tcp:
        host, port = parse_host_port(config.tcp)
        try:
            socket.create_server((host, port)).close()
        except OSError as exc:
            raise SocketInUse(f"cannot listen on {config.tcp}: {exc.strerror or exc}") from None


def claim_unix_socket_path(path: str) -> None:
    """Remove a stale socket file left by a crash; refuse when a live daemon listens there."""
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise SocketInUse(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: a stale file from a crash
        else:
            raise SocketInUse(f"another candlekeeper is listening on {path}")
        finally:
            probe.close()


def check_bindable(path: str) -> None:
    """Fail fast, with the path in the message, when the socket cannot be created there at all
    (no such directory, no permission, longer than a Unix socket path may be): a bind, undone."""
    if os.path.exists(path):
        return  # a stale socket file, removed by claim_unix_socket_path, or a live one (refused there)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.bind(path)
    except OSError as exc:
        where = os.path.dirname(os.path.abspath(path))
        if isinstance(exc, FileNotFoundError):
            why = f"directory {where} does not exist"
        elif isinstance(exc, PermissionError):
            why = f"no permission to create it in {where}"
        elif "too long" in str(exc):
            why = (f"the path is {len(os.fsencode(path))} bytes, longer than a Unix socket path may be; "
                   "use a shorter one")
        else:
            why = exc.strerror or str(exc)
        raise SocketUnusable(f"[control] socket {path}: cannot create it: {why}") from None
    else:
        os.unlink(path)
    finally:
        probe.close()


def prepare_unix_socket(path: str) -> socket.socket:
    """Bind `path` with mode 0600; replace a stale socket file left by a crash, never steal a live one."""
    claim_unix_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


def commands(system: System) -> dict[str, Callable[[dict[str, Any]], Any]]:
    """The command table: name -> callable taking the request map. Arguments are checked here,
    so a wrong type is a clear refusal, never an exception deep inside an actor."""

    def text(req: dict[str, Any], name: str, *, required: bool = True, default: str | None = None) -> Any:
        value = req.get(name, default)
        if value is None:
            if required:
                raise ValueError(f"missing '{name}' (a string)")
            return None
        if not isinstance(value, str) or not value:
            raise ValueError(f"'{name}' must be a non-empty string")
        return value

    def target(req: dict[str, Any]) -> tuple[str, str | None, str | None]:
        return text(req, "exchange"), text(req, "symbol", required=False), text(req, "timeframe", required=False)

    def series(req: dict[str, Any]) -> tuple[str, str, str]:
        return text(req, "exchange"), text(req, "symbol"), text(req, "timeframe", default="1m")

    def restart(target: str) -> Any:
        if target.strip("/").removeprefix("root/") == "control":  # this very server: reply first
            return AfterReply({"restarted": "root/control"},
                              lambda: threading.Thread(target=system.restart, args=(target,), daemon=True,
                                                       name="candlekeeper-restart-control").start())
        return system.restart(target)

    def coverage(req: dict[str, Any]) -> Any:
        exchange = text(req, "exchange", required=False)
        symbol = text(req, "symbol", required=False)
        if symbol is not None and exchange is None:
            raise ValueError("'symbol' needs 'exchange'")
        return system.coverage(exchange, symbol, text(req, "timeframe", required=False))

    def health(req: dict[str, Any]) -> Any:
        counts = req.get("counts", False)
        if not isinstance(counts, bool):
            raise ValueError("'counts' must be a boolean")
        return system.health(counts=counts)

    def moment(req: dict[str, Any], name: str) -> Any:
        value = req.get(name)
        if value is None:
            raise ValueError(f"missing '{name}' (an ISO 8601 time, or epoch milliseconds)")
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError(f"'{name}' must be an ISO 8601 string or an integer (epoch milliseconds)")
        return value

    def accept_gap(req: dict[str, Any]) -> Any:
        exchange, symbol, timeframe = series(req)
        return system.accept_gap(exchange, symbol, moment(req, "from"), moment(req, "to"), timeframe,
                                 reason=text(req, "reason", default="operator"))

    def count(req: dict[str, Any]) -> int:
        n = req.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool):
            raise ValueError("'n' must be an integer")
        return n

    return {
        "health": health,
        "coverage": coverage,
        "tree": lambda req: system.tree(),
        "cluster": lambda req: system.cluster(),
        "reset": lambda req: system.reset(*target(req)),
        "pause": lambda req: system.pause(*target(req), paused=True),
        "resume": lambda req: system.pause(*target(req), paused=False),
        "restart": lambda req: restart(text(req, "target")),
        "add": lambda req: system.add_series(*series(req)),
        "remove": lambda req: system.remove_series(*series(req)),
        "accept_gap": accept_gap,
        "latest": lambda req: system.latest(*series(req), n=count(req)),
        "shutdown": lambda req: AfterReply({"stopping": True}, system.shutdown),
        "crash": lambda req: system.crash(text(req, "target"), text(req, "reason", default="injected crash")),
    }


class ControlServer(Child):
    def __init__(self, config: ControlConfig, system: Any) -> None:
        super().__init__()
        self.path_ = config.socket
        self.tcp = config.tcp
        self._token = config.token  # never logged
        self.commands = commands(system)
        self._sock: socket.socket | None = None
        self._tcp_sock: socket.socket | None = None
        self.tcp_port: int | None = None
        self._threads: set[threading.Thread] = set()
        self._busy: set[threading.Thread] = set()  # connection threads inside a command
        self._conns: dict[str, set[socket.socket]] = {name: set() for name in LISTENERS}  # each its own limit
        # TCP connections that have not authenticated yet, oldest first: slots of their own
        self._pending: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()

    def on_start(self) -> None:
        self._sock = prepare_unix_socket(self.path_)
        self._listen(self._sock, "unix")
        self.log.info("control_listening", socket=self.path_)
        if self.tcp:
            if not self._token:
                raise ValueError("[control] tcp is refused without a token")
            host, port = parse_host_port(self.tcp)
            self._tcp_sock = socket.create_server((host, port), reuse_port=False)
            self.tcp_port = self._tcp_sock.getsockname()[1]
            self._listen(self._tcp_sock, "tcp")
            self.log.info("control_listening_tcp", host=host, port=self.tcp_port)

    def _listen(self, sock: socket.socket, listener: str) -> None:
        name = self._thread_name(listener, "accept")
        t = threading.Thread(target=self._accept_loop, args=(sock, listener), name=name,
                             daemon=True)
        t.start()
        self._threads.add(t)

    def _thread_name(self, listener: str, role: str) -> str:
        return f"{self.path}/{role}" if listener == "unix" else f"{self.path}/{listener}-{role}"

    def on_stop(self) -> None:
        self._close()

    def on_failure(self, *_: Any) -> None:
        self._close()

    def _close(self) -> None:
        self._closing.set()
        if self._tcp_sock is not None:
            try:
                self._tcp_sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                self.log.debug("control_tcp_already_closed")
            self._tcp_sock.close()
            self._tcp_sock = None
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                self.log.debug("control_socket_already_closed")
            self._sock.close()
            self._sock = None
            try:
                os.unlink(self.path_)
            except FileNotFoundError:
                self.log.debug("control_socket_file_gone")
        with self._lock:
            for conn in [c for conns in self._conns.values() for c in conns] + list(self._pending):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    self.log.debug("connection_already_closed")
        # every thread sees its socket shut and ends; one inside a command is not waited for:
        # its command may wait on the supervisor that is stopping this server (`tree` during
        # `restart control`), and it ends once its reply finds the connection closed
        with self._lock:  # `_closing` is set: no thread becomes busy after this
            idle = [t for t in self._threads if t not in self._busy]
        for t in idle:
            if t is not threading.current_thread():
                t.join(5)

    def _accept_loop(self, sock: socket.socket, listener: str) -> None:
        """Accept until closed. Nothing a client does may end this loop: a dead accept thread
        would leave a daemon that runs but can never be asked anything again. Each listener
        counts its own connections, so a flood on one cannot lock out the other."""
        conns = self._conns[listener]
        saturated = False  # log the first refusal of a flood, not every one
        while not self._closing.is_set():
            try:
                conn, _ = sock.accept()
            except OSError as exc:
                if self._closing.is_set():
                    return
                # e.g. EMFILE, ECONNABORTED: transient; back off a little instead of spinning
                self.log.warning("control_accept_failed", error=str(exc))
                time.sleep(0.05)  # sleep-ok: the accept thread, not a mailbox
                continue
            evicted = None
            with self._lock:
                if self._closing.is_set():  # accepted as the server stops: `_close` would miss it
                    conn.close()
                    return
                if listener == "tcp":  # not counted until it authenticates (see _authenticated)
                    full = False
                    if len(self._pending) >= MAX_CONNECTIONS:
                        evicted = next(iter(self._pending))
                        del self._pending[evicted]
                    self._pending[conn] = time.monotonic()
                else:
                    full = len(conns) >= MAX_CONNECTIONS
                    if not full:
                        conns.add(conn)
            if evicted is not None:
                self.log.info("control_unauthenticated_dropped", listener=listener, limit=MAX_CONNECTIONS)
                try:
                    evicted.shutdown(socket.SHUT_RDWR)  # its thread sees EOF and closes it
                except OSError:
                    pass
            if full:
                if not saturated:
                    self.log.warning("control_connections_full", listener=listener, limit=MAX_CONNECTIONS)
                saturated = True
                _refuse(conn, "too many connections")
                continue
            saturated = False
            t = threading.Thread(target=self._serve, args=(conn, listener), name=self._thread_name(listener, "conn"),
                                 daemon=True)
            with self._lock:
                self._threads.add(t)
            try:
                t.start()
            except RuntimeError as exc:  # cannot start a thread: refuse this client, keep accepting
                with self._lock:
                    self._threads.discard(t)
                    conns.discard(conn)
                    self._pending.pop(conn, None)
                _refuse(conn, f"cannot serve: {exc}")

    def _serve(self, conn: socket.socket, listener: str = "unix") -> None:
        # `max_buffer_size` alone does not bound a message: the unpacker parses arrays and maps
        # incrementally and drops the bytes it has parsed, so each message's size is counted here.
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_MESSAGE, strict_map_key=False)
        too_large = {"id": None, "ok": False, "error": f"message larger than {MAX_MESSAGE} bytes"}
        received = start = 0  # bytes received so far; where the current message began
        began: float | None = None  # when the current, incomplete message started to be waited for
        authenticated = listener != "tcp"
        auth_deadline = time.monotonic() + AUTH_TIMEOUT
        try:
            while not self._closing.is_set():
                deadline = time.monotonic() + IDLE_TIMEOUT if began is None else began + MESSAGE_TIMEOUT
                if not authenticated:
                    deadline = min(deadline, auth_deadline)
                data = _receive(conn, deadline)
                if data is None:
                    if not authenticated:
                        self.log.info("control_auth_timeout", listener=listener, timeout=AUTH_TIMEOUT)
                        _send(conn, {"id": None, "ok": False, "error": "unauthorized: no request with a valid token "
                                                                      f"within {AUTH_TIMEOUT:g} s"}, timeout=1.0)
                        return
                    self._timed_out(conn, listener, incomplete=began is not None)
                    return
                if not data:
                    return
                received += len(data)
                batch_start = start  # where the message pending before this batch began
                try:
                    unpacker.feed(data)
                except msgpack.BufferFull:
                    _send(conn, too_large)
                    return
                while True:
                    try:
                        request = next(unpacker)
                    except StopIteration:  # the rest of the message has not arrived yet
                        if received - start > MAX_MESSAGE:
                            _send(conn, too_large)
                            return
                        break
                    except Exception as exc:  # noqa: BLE001 - bad format, bad UTF-8, too deep, a map keyed by a map...
                        _send(conn, {"id": None, "ok": False, "error": f"invalid msgpack: {type(exc).__name__}: {exc}"})
                        return
                    size, start = unpacker.tell() - start, unpacker.tell()
                    if size > MAX_MESSAGE:
                        _send(conn, too_large)
                        return
                    if listener == "tcp" and not self._authorized(request):
                        _send(conn, {"id": _request_id(request), "ok": False,
                                     "error": "unauthorized: a valid token is required"})
                        return
                    if not authenticated:
                        if not self._authenticated(conn, listener):
                            return
                        authenticated = True
                    with self._lock:  # with `_close`'s check of who is busy: none starts after it
                        if self._closing.is_set():
                            return
                        self._busy.add(threading.current_thread())
                    try:
                        reply, then = self._answer(request)
                    finally:
                        with self._lock:
                            self._busy.discard(threading.current_thread())
                    try:
                        _send(conn, reply)
                    finally:
                        if then is not None:
                            then()
                # an incomplete message's clock starts once the complete ones before it are
                # answered, and keeps running while its bytes trickle in
                if received == start:
                    began = None
                elif began is None or start != batch_start:  # a new message is pending
                    began = time.monotonic()
        except OSError:
            return  # the client went away, or did not take its reply within MESSAGE_TIMEOUT
        finally:
            with self._lock:
                self._conns[listener].discard(conn)
                self._pending.pop(conn, None)
                self._threads.discard(threading.current_thread())
            conn.close()

    def _authenticated(self, conn: socket.socket, listener: str) -> bool:
        """Move a TCP connection that just sent a valid token from the unauthenticated slots to the
        listener's own; False (and a refusal) when it was dropped meanwhile or those are full."""
        with self._lock:
            if conn not in self._pending:
                return False  # dropped to make room for a newer unauthenticated one
            del self._pending[conn]
            conns = self._conns[listener]
            full = len(conns) >= MAX_CONNECTIONS
            if not full:
                conns.add(conn)
        if full:
            self.log.warning("control_connections_full", listener=listener, limit=MAX_CONNECTIONS)
            _send(conn, {"id": None, "ok": False, "error": "too many connections"}, timeout=1.0)
            return False
        return True

    def _timed_out(self, conn: socket.socket, listener: str, *, incomplete: bool) -> None:
        """An incomplete message gets an error reply (it answers that request); an idle
        connection is just closed, as no request is waiting for a reply."""
        if incomplete:
            self.log.info("control_message_timeout", listener=listener, timeout=MESSAGE_TIMEOUT)
            _send(conn, {"id": None, "ok": False,
                         "error": f"incomplete message: not received whole within {MESSAGE_TIMEOUT:g} s"})
        else:
            self.log.debug("control_idle_timeout", listener=listener, timeout=IDLE_TIMEOUT)

    def _authorized(self, request: Any) -> bool:
        token = request.get("token") if isinstance(request, dict) else None
        return isinstance(token, str) and self._token is not None and hmac.compare_digest(
            token.encode(), self._token.encode()
        )

    def handle(self, request: Any) -> dict[str, Any]:
        """The reply to one request (what to do after it is sent, if anything, is not done)."""
        return self._answer(request)[0]

    def _answer(self, request: Any) -> tuple[dict[str, Any], Callable[[], Any] | None]:
        reply = self._reply(request)
        result = reply.get("result")
        if isinstance(result, AfterReply):
            return {**reply, "result": result.result}, result.then
        return reply, None

    def _reply(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict):
            return {"id": None, "ok": False, "error": "a request must be a map"}
        req_id = _request_id(request)
        cmd = request.get("cmd")
        known = ", ".join(sorted(self.commands))
        if not isinstance(cmd, str):
            what = "missing" if cmd is None else f"a {type(cmd).__name__}"
            return {"id": req_id, "ok": False, "error": f"'cmd' must be a string, got {what}; known: {known}"}
        fn = self.commands.get(cmd)
        if fn is None:
            shown = repr(cmd) if len(cmd) <= 64 else repr(cmd[:64]) + "..."
            return {"id": req_id, "ok": False, "error": f"unknown command {shown}; known: {known}"}
        try:
            return {"id": req_id, "ok": True, "result": fn(request)}
        except Exception as exc:  # noqa: BLE001 - a refused command is a reply, never a crash
            self.log.info("command_refused", cmd=cmd, error=str(exc))
            return {"id": req_id, "ok": False, "error": str(exc) or type(exc).__name__}


def _request_id(request: Any) -> Any:
    """The request's id echoed back when it is a scalar (nil, bool, int, float, str, bin); None
    for a container or an extension type."""
    req_id = request.get("id") if isinstance(request, dict) else None
    return req_id if isinstance(req_id, (str, bytes, int, float, bool, type(None))) else None


def _receive(conn: socket.socket, deadline: float) -> bytes | None:
    """The next bytes (b"" at EOF), or None when `deadline` (monotonic) passes first. A socket
    timeout, not a sleep: the thread wakes as soon as bytes arrive."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return None
    conn.settimeout(remaining)
    try:
        return conn.recv(65536)
    except TimeoutError:
        return None


def _send(conn: socket.socket, message: dict[str, Any], timeout: float | None = None) -> None:
    """Write one reply; a client that does not take it within `timeout` (default
    MESSAGE_TIMEOUT) raises TimeoutError, an OSError, so it cannot hold its thread forever."""
    conn.settimeout(MESSAGE_TIMEOUT if timeout is None else timeout)
    conn.sendall(msgpack.packb(message, use_bin_type=True, default=str))


def _refuse(conn: socket.socket, error: str) -> None:
    """Best effort error reply, then close; the client may be gone already (EPIPE), and the
    accepting thread must never block on it."""
    try:
        _send(conn, {"id": None, "ok": False, "error": error}, timeout=1.0)
    except OSError:
        pass
    finally:
        conn.close()


def request(path: str, cmd: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
    """One request over the Unix socket at `path`, or to "tcp://host:port" (pass token=...);
    raises ConnectionError/OSError when nobody listens."""
    if path.startswith("tcp://"):
        sock = socket.create_connection(parse_host_port(path.removeprefix("tcp://")), timeout=timeout)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
    try:
        if not path.startswith("tcp://"):
            sock.connect(path)
        sock.sendall(msgpack.packb({"id": 1, "cmd": cmd, **args}, use_bin_type=True))
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=64 * MAX_MESSAGE, strict_map_key=False)
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the daemon closed the connection without a reply")
            unpacker.feed(data)
            for reply in unpacker:
                return reply
    finally:
        sock.close()
