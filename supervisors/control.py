"""The control channel: msgpack maps over a Unix socket.

Wire format (any language can speak it): a stream of msgpack maps in each direction. Each
request `{"id": ..., "cmd": "...", ...args}` gets exactly one reply, `{"id": ..., "ok": true,
"result": ...}` or `{"id": ..., "ok": false, "error": "..."}`, in order; requests may be
pipelined on one connection. The id is echoed when it is a scalar (nil, bool, int, float, str,
bin), nil otherwise. A message larger than `MAX_MESSAGE` bytes or invalid msgpack closes the
connection after an error reply; at most `MAX_CONNECTIONS` clients are served at once (the others
get an error reply and a close). tests/test_control_fuzz.py fuzzes all of this.

An optional TCP listener (`[control] tcp`, loopback unless configured otherwise) serves the same
protocol to remote clients, but only requests carrying `"token": "<[control] token>"`; a request
without a valid token gets an error reply and the connection is closed. The token is never logged.

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
from typing import Any

import msgpack

from supervisors.child import Child
from supervisors.config import ControlConfig

MAX_MESSAGE = 1 << 20
MAX_CONNECTIONS = 32


class SocketInUse(Exception):
    pass


def check_free(config: ControlConfig) -> None:
    """Fail fast, before the tree starts, when another daemon holds the socket or the TCP port:
    a supervisor restarting the control server could not fix that."""
    claim_unix_socket_path(config.socket)
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


def commands(system: Any) -> dict[str, Callable[[dict[str, Any]], Any]]:
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

    def count(req: dict[str, Any]) -> int:
        n = req.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool):
            raise ValueError("'n' must be an integer")
        return n

    return {
        "health": lambda req: system.health(),
        "tree": lambda req: system.tree(),
        "reset": lambda req: system.reset(*target(req)),
        "pause": lambda req: system.pause(*target(req), paused=True),
        "resume": lambda req: system.pause(*target(req), paused=False),
        "restart": lambda req: system.restart(text(req, "target")),
        "add": lambda req: system.add_series(*series(req)),
        "remove": lambda req: system.remove_series(*series(req)),
        "latest": lambda req: system.latest(*series(req), n=count(req)),
        "shutdown": lambda req: system.shutdown(),
        "crash": lambda req: system.crash(text(req, "target"), text(req, "reason", default="injected crash")),
    }


def parse_host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


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
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closing = threading.Event()

    def on_start(self) -> None:
        self._sock = prepare_unix_socket(self.path_)
        self._listen(self._sock, remote=False)
        self.log.info("control_listening", socket=self.path_)
        if self.tcp:
            if not self._token:
                raise ValueError("[control] tcp is refused without a token")
            host, port = parse_host_port(self.tcp)
            self._tcp_sock = socket.create_server((host, port), reuse_port=False)
            self.tcp_port = self._tcp_sock.getsockname()[1]
            self._listen(self._tcp_sock, remote=True)
            self.log.info("control_listening_tcp", host=host, port=self.tcp_port)

    def _listen(self, sock: socket.socket, *, remote: bool) -> None:
        t = threading.Thread(target=self._accept_loop, args=(sock, remote), name=f"{self.path}/accept", daemon=True)
        t.start()
        self._threads.add(t)

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
            for conn in list(self._conns):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    self.log.debug("connection_already_closed")
        for t in list(self._threads):
            if t is not threading.current_thread():
                t.join(5)

    def _accept_loop(self, sock: socket.socket, remote: bool) -> None:
        """Accept until closed. Nothing a client does may end this loop: a dead accept thread
        would leave a daemon that runs but can never be asked anything again."""
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
            with self._lock:
                full = len(self._conns) >= MAX_CONNECTIONS
                if not full:
                    self._conns.add(conn)
            if full:
                _refuse(conn, "too many connections")
                continue
            t = threading.Thread(target=self._serve, args=(conn, remote), name=f"{self.path}/conn", daemon=True)
            with self._lock:
                self._threads.add(t)
            try:
                t.start()
            except RuntimeError as exc:  # cannot start a thread: refuse this client, keep accepting
                with self._lock:
                    self._threads.discard(t)
                    self._conns.discard(conn)
                _refuse(conn, f"cannot serve: {exc}")

    def _serve(self, conn: socket.socket, remote: bool = False) -> None:
        # `max_buffer_size` alone does not bound a message: the unpacker parses arrays and maps
        # incrementally and drops the bytes it has parsed, so each message's size is counted here.
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_MESSAGE, strict_map_key=False)
        too_large = {"id": None, "ok": False, "error": f"message larger than {MAX_MESSAGE} bytes"}
        received = start = 0  # bytes received so far; where the current message began
        try:
            while not self._closing.is_set():
                data = conn.recv(65536)
                if not data:
                    return
                received += len(data)
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
                    if remote and not self._authorized(request):
                        _send(conn, {"id": _request_id(request), "ok": False, "error": "unauthorized: a valid token is required"})
                        return
                    _send(conn, self.handle(request))
        except OSError:
            return  # the client went away
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())
            conn.close()

    def _authorized(self, request: Any) -> bool:
        token = request.get("token") if isinstance(request, dict) else None
        return isinstance(token, str) and self._token is not None and hmac.compare_digest(
            token.encode(), self._token.encode()
        )

    def handle(self, request: Any) -> dict[str, Any]:
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


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(msgpack.packb(message, use_bin_type=True, default=str))


def _refuse(conn: socket.socket, error: str) -> None:
    """Best effort error reply, then close; the client may be gone already (EPIPE), and the
    accepting thread must never block on it."""
    try:
        conn.settimeout(1.0)
        _send(conn, {"id": None, "ok": False, "error": error})
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
