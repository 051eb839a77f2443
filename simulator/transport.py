"""Sockets and threads for the simulator: a threading HTTP/1.1 server that knows its
connections (to reset them) and joins its threads on stop. Nothing exchange-specific: each
request is handed to the owning simulator's `_serve`.
"""

from __future__ import annotations

import logging
import socket
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

log = logging.getLogger(__name__)

_LINGER_RST = struct.pack("ii", 1, 0)


class Owner(Protocol):
    """What the transport needs from the simulator that owns it."""

    name: str
    port: int

    def _serve(self, h: Handler) -> None: ...

    def _date_header(self) -> str | None: ...


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real thing behind a CDN
    disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms stalls
    server: Server

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout_s  # type: ignore[misc]  # per connection, as the stdlib allows
        super().setup()

    def do_GET(self) -> None:
        self.server.sim._serve(self)

    def send_response(self, code: int, message: str | None = None) -> None:
        """As the stdlib's, but the Date header follows the exchange's clock (or is left out)."""
        self.log_request(code)
        self.send_response_only(code, message)
        self.send_header("Server", self.version_string())
        date = self.server.sim._date_header()
        if date is not None:
            self.send_header("Date", date)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its open connections (to reset them) and its connection
    threads (daemonic, so a forgotten simulator never blocks exit, yet joined by `join_all`:
    the stdlib only joins non-daemon ones)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], sim: Owner, idle_timeout_s: float):
        self.sim = sim
        self.idle_timeout_s = idle_timeout_s
        self._conn_lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._abort: set[socket.socket] = set()
        self._workers: set[threading.Thread] = set()
        super().__init__(addr, Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        t = threading.Thread(target=self._work, args=(request, client_address), daemon=True,
                             name=f"sim-{self.sim.name}-{self.sim.port}-conn")
        with self._conn_lock:
            self._conns.add(request)
            self._workers.add(t)
        t.start()

    def _work(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._conn_lock:
                self._workers.discard(threading.current_thread())

    def join_all(self) -> None:
        """Join every connection thread (call after `reset_all` so none is blocked)."""
        with self._conn_lock:
            workers = list(self._workers)
        for t in workers:
            t.join()

    def shutdown_request(self, request: Any) -> None:
        with self._conn_lock:
            self._conns.discard(request)
            abort = request in self._abort
            self._abort.discard(request)
        if abort:  # RST: skip the FIN that shutdown(SHUT_WR) would send first
            self.close_request(request)
        else:
            super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):  # client went away: routine
            log.debug("connection %s ended with an error", client_address, exc_info=True)
        else:  # a simulator bug: the client saw a dropped connection, make it visible
            log.exception("simulator %s failed serving %s", self.sim.name, client_address)

    def mark_abort(self, conn: socket.socket) -> None:
        """Make the eventual close of `conn` a TCP RST."""
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass
        with self._conn_lock:
            self._abort.add(conn)

    def reset_all(self) -> None:
        """RST every open connection and wake threads blocked reading them."""
        with self._conn_lock:
            conns = list(self._conns)
        for c in conns:
            self.mark_abort(c)
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
