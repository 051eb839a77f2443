"""The control channel: msgpack maps over a Unix socket.

Wire format (any language can speak it): a stream of msgpack maps in each direction. Each
request `{"id": ..., "cmd": "...", ...args}` gets exactly one reply, `{"id": ..., "ok": true,
"result": ...}` or `{"id": ..., "ok": false, "error": "..."}`, in order; requests may be
pipelined on one connection. A message larger than `MAX_MESSAGE` bytes or invalid msgpack closes
the connection after an error reply; at most `MAX_CONNECTIONS` clients are served at once.

The listener and each connection run on their own threads (they block on sockets), never in
an actor's mailbox; commands reach the actors through `System`'s asks.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
from collections.abc import Callable
from typing import Any

import msgpack

from supervisors.child import Child
from supervisors.config import ControlConfig

MAX_MESSAGE = 1 << 20
MAX_CONNECTIONS = 32


class SocketInUse(Exception):
    pass


def prepare_unix_socket(path: str) -> socket.socket:
    """Bind `path` with mode 0600; replace a stale socket file left by a crash, never steal a live one."""
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
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


def commands(system: Any) -> dict[str, Callable[..., Any]]:
    """The command table: name -> callable taking the request's arguments."""

    def target(req: dict[str, Any]) -> tuple[str, str | None, str | None]:
        exchange = req.get("exchange")
        if not isinstance(exchange, str):
            raise ValueError("missing 'exchange' (a string)")
        symbol, timeframe = req.get("symbol"), req.get("timeframe")
        for name, v in (("symbol", symbol), ("timeframe", timeframe)):
            if v is not None and not isinstance(v, str):
                raise ValueError(f"'{name}' must be a string")
        return exchange, symbol, timeframe

    return {
        "health": lambda req: system.health(),
        "tree": lambda req: system.tree(),
        "reset": lambda req: system.reset(*target(req)),
        "pause": lambda req: system.pause(*target(req), paused=True),
        "resume": lambda req: system.pause(*target(req), paused=False),
    }


class ControlServer(Child):
    def __init__(self, config: ControlConfig, system: Any) -> None:
        super().__init__()
        self.path_ = config.socket
        self.commands = commands(system)
        self._sock: socket.socket | None = None
        self._threads: set[threading.Thread] = set()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closing = threading.Event()

    def on_start(self) -> None:
        self._sock = prepare_unix_socket(self.path_)
        t = threading.Thread(target=self._accept_loop, name=f"{self.path}/accept", daemon=True)
        t.start()
        self._threads.add(t)
        self.log.info("control_listening", socket=self.path_)

    def on_stop(self) -> None:
        self._close()

    def on_failure(self, *_: Any) -> None:
        self._close()

    def _close(self) -> None:
        self._closing.set()
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

    def _accept_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._closing.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with self._lock:
                if len(self._conns) >= MAX_CONNECTIONS:
                    _send(conn, {"id": None, "ok": False, "error": "too many connections"})
                    conn.close()
                    continue
                self._conns.add(conn)
                t = threading.Thread(target=self._serve, args=(conn,), name=f"{self.path}/conn", daemon=True)
                self._threads.add(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_MESSAGE, strict_map_key=False)
        try:
            while not self._closing.is_set():
                data = conn.recv(65536)
                if not data:
                    return
                try:
                    unpacker.feed(data)
                    for request in unpacker:
                        _send(conn, self.handle(request))
                except msgpack.BufferFull:
                    _send(conn, {"id": None, "ok": False, "error": f"message larger than {MAX_MESSAGE} bytes"})
                    return
                except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
                    _send(conn, {"id": None, "ok": False, "error": f"invalid msgpack: {exc}"})
                    return
        except OSError:
            return  # the client went away
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())
            conn.close()

    def handle(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict):
            return {"id": None, "ok": False, "error": "a request must be a map"}
        req_id = request.get("id")
        if isinstance(req_id, (dict, list)):
            req_id = None
        cmd = request.get("cmd")
        fn = self.commands.get(cmd) if isinstance(cmd, str) else None
        if fn is None:
            return {"id": req_id, "ok": False, "error": f"unknown command {cmd!r}; known: {', '.join(sorted(self.commands))}"}
        try:
            return {"id": req_id, "ok": True, "result": fn(request)}
        except Exception as exc:  # noqa: BLE001 - a refused command is a reply, never a crash
            self.log.info("command_refused", cmd=cmd, error=str(exc))
            return {"id": req_id, "ok": False, "error": str(exc) or type(exc).__name__}


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(msgpack.packb(message, use_bin_type=True, default=str))


def request(path: str, cmd: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
    """One request over the socket at `path`; raises ConnectionError when nobody listens."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
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
