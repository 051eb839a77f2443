"""Daemon processes for tests without a second of imports each: a fork server.

A `python run.py` spends about a second of CPU importing ccxt, aiohttp, psycopg and the daemon
before it does anything; the suite starts some eighty of them (daemons, `ctl`, `export`,
`backfill`), over a minute of CPU on a 2-core machine. The fork server imports all that once,
starts nothing (no thread, no actor, no socket but its own), and forks a child per launch. Each
child is a real process, as `python run.py ARGS` would be: its own pid, working directory,
environment, stdin/stdout/stderr, exit code, and signals (`kill -9`, SIGSTOP, SIGTERM reach it as
they would reach `python run.py`; an unhandled error ends it with the interpreter's exit path:
atexit, thread joins, flushes). It runs the same `candlekeeper.surfaces.cli.main` that `run.py`
runs.

What a forked child does not prove is the interpreter's start and the entry points themselves:
`python run.py`, `python -m candlekeeper` and the console script are still run as real programs
by the tests that name them (`RUN` in test_daemon.py, test_oanda_daemon.py, test_operator.py).

One server per test run: the xdist controller starts it before its workers (tests/conftest.py)
and each worker connects; a run without workers starts its own at its first launch. It ends when
the process that started it ends (its stdin closes). Wire: JSON messages over SOCK_SEQPACKET
connections to a Unix socket, the child's stdin/stdout/stderr passed as file descriptors
(SCM_RIGHTS); a child's exit is told to the client that asked for it.
"""

from __future__ import annotations

import atexit
import gc
import itertools
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, BinaryIO, TextIO

ROOT = Path(__file__).resolve().parent.parent
# what `python run.py` imports on its way to a running daemon (the heavy part: ccxt and its
# async and pro clients, aiohttp, psycopg), so a child imports nothing of weight itself
PRELOAD = (
    "candlekeeper.surfaces.cli",
    "candlekeeper.surfaces.control",
    "candlekeeper.surfaces.export",
    "candlekeeper.surfaces.backfill",
    "candlekeeper.surfaces.logging",
    "candlekeeper.app.system",
    "candlekeeper.app.data",
    "candlekeeper.actors.stores.postgres",
    "candlekeeper.actors.sources.ccxt_source",
    "candlekeeper.actors.sources.ccxt_stream",
    "candlekeeper.actors.sources.oanda",
)
# what a pytest worker imports besides (tests/forkpython.py starts xdist's workers from this server):
# pytest, hypothesis, the simulators and their web server. Not pyarrow: its import starts a
# thread, and a fork copies none. (pytest would rewrite the asserts of hypothesis, a plugin's
# package, if each worker imported it: setup.cfg silences its word that it cannot)
WORKER_PRELOAD = (
    "pytest",
    "hypothesis",
    "execnet",
    "aiohttp.web",
    "candlekeeper.simulator.server",
    "candlekeeper.simulator.ws",
    "candlekeeper.simulator.ws.ccxt_pro",
    "candlekeeper.surfaces.simulate",
    "candlekeeper.surfaces.top",
)
_MAX_MESSAGE = 1 << 20
# set by the xdist controller: the server imports the test modules too (`_preload_tests`)
PRELOAD_TESTS = "CANDLEKEEPER_TEST_PRELOAD"


# -- the server (its own process: `python -m tests.forkserver PATH`) -------------------------------

def _send(sock: socket.socket, message: Mapping[str, Any]) -> None:
    try:
        sock.send(json.dumps(message).encode())
    except OSError:
        pass  # that client has gone (its test process ended): nobody to tell


def serve(path: str) -> dict[str, Any] | None:
    """Listen at `path` and fork a child per request, for every client that connects, until
    stdin closes (the process that started the server has ended). Returns None in the server
    (time to exit) and the request in each child, which then runs it (`_run_child`)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    print("listening", flush=True)  # clients may connect now; they are served once the imports are done
    for name in (*PRELOAD, *WORKER_PRELOAD):
        __import__(name)
    if os.environ.get(PRELOAD_TESTS):
        _preload_tests()
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        # forking a process with threads copies their locks, held
        raise RuntimeError(f"fork server: imports started threads: {threading.enumerate()}")
    # what the imports made is never garbage: out of the collector's sight, every child's
    # collections stay small (and leave those pages shared with this process)
    gc.collect()
    gc.freeze()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    selector.register(sys.stdin, selectors.EVENT_READ)
    owners: dict[int, socket.socket] = {}  # child pid -> the client that asked for it
    while True:
        for key, _ in selector.select():
            if key.fileobj is sys.stdin:
                if not os.read(sys.stdin.fileno(), 4096):
                    return None
            elif key.fileobj == wake_r:
                os.read(wake_r, 4096)
                _reap(owners)
            elif key.fileobj is listener:
                client, _ = listener.accept()
                selector.register(client, selectors.EVENT_READ)
            else:
                client = key.fileobj  # type: ignore[assignment]
                data, fds, _flags, _addr = socket.recv_fds(client, _MAX_MESSAGE, 3)
                if not data:
                    selector.unregister(client)
                    client.close()
                    continue
                request = json.loads(data)
                pid = os.fork()
                if pid == 0:
                    for registered in list(selector.get_map().values()):
                        if isinstance(registered.fileobj, socket.socket):
                            registered.fileobj.close()
                    selector.close()
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    os.close(wake_r)
                    os.close(wake_w)
                    for target, source in enumerate(fds):
                        os.dup2(source, target)
                    for source in fds:
                        if source > 2:
                            os.close(source)
                    return dict(request)
                for source in fds:
                    os.close(source)
                owners[pid] = client
                _send(client, {"id": request["id"], "pid": pid})


def _preload_tests() -> None:
    """The test modules (and conftest) as pytest's workers would import them: their code with
    the asserts rewritten, read from pytest's cache of rewritten modules, which the controller
    fills before it starts this server (tests/conftest.py). A worker forked from here finds them
    imported (pytest's importlib mode takes a module already in sys.modules) and only collects.
    A module missing from the cache (or one that imports pyarrow, whose import starts a thread)
    is left to the workers, which import it as usual."""
    try:
        from _pytest.assertion.rewrite import PYC_TAIL, _read_pyc, get_cache_dir
    except ImportError:  # private API moved: the workers import everything, as before
        return
    import importlib.abc
    import importlib.util
    import types

    here = ROOT / "tests"
    sources = {f"tests.{p.stem}": p for p in [here / "conftest.py", *here.glob("test_*.py")]
               if "pyarrow" not in p.read_text()}

    class Rewritten(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
            source = sources.get(name)
            if source is None:
                return None
            code = _read_pyc(source, get_cache_dir(source) / (source.stem + PYC_TAIL))
            if code is None:
                return None
            spec = importlib.util.spec_from_file_location(name, source, loader=self)
            if spec is not None:
                spec.loader_state = code
            return spec

        def create_module(self, spec: Any) -> None:
            return None

        def exec_module(self, module: types.ModuleType) -> None:
            exec(module.__spec__.loader_state, module.__dict__)  # type: ignore[union-attr]

    finder = Rewritten()
    sys.meta_path.insert(0, finder)
    try:
        for name in ["tests.conftest", *sorted(sources)]:  # conftest first: the profiles it loads
            if name not in sys.modules and finder.find_spec(name) is not None:
                __import__(name)
    finally:
        sys.meta_path.remove(finder)


def _reap(owners: dict[int, socket.socket]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        client = owners.pop(pid, None)
        if client is not None:
            _send(client, {"exited": pid, "code": os.waitstatus_to_exitcode(status)})


def _run_child(request: Mapping[str, Any]) -> int:
    """In the forked child: become `python run.py ARGV` (or `python -u -c CODE`) in CWD with
    ENV, and run it."""
    import random
    import time

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    time.tzset()
    random.seed()  # every child would otherwise draw the server's random sequence
    if "code" in request:
        return _run_code(request["code"])
    sys.argv = [str(ROOT / "run.py"), *request["argv"]]
    from candlekeeper.surfaces.cli import main

    return main(list(request["argv"]))


def _run_code(code: str) -> int:
    """`python -u -c CODE`: a fresh `__main__`, unbuffered stdout and stderr, and the path a
    `-c` program starts with (the working directory first)."""
    import io
    import types

    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    sys.argv = ["-c"]
    sys.path[0] = ""
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True,
                                  errors="backslashreplace")
    exec(compile(code, "<string>", "exec"), main.__dict__)
    return 0


# -- the client (in the test process) ------------------------------------------------------------

class Forked:
    """A forked daemon, as much of `subprocess.Popen` as the tests use."""

    def __init__(self, server: ForkServer, pid: int, args: list[str]) -> None:
        self.args = args
        self.pid = pid
        self.returncode: int | None = None
        self._exit = server.exit_of(pid)

    def poll(self) -> int | None:
        if self._exit.done():
            self.returncode = self._exit.result()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        try:
            self.returncode = self._exit.result(timeout)
        except FutureTimeout:
            raise subprocess.TimeoutExpired(self.args, timeout or 0) from None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class Server:
    """A fork server process, listening at `path`, that ends when this object closes."""

    def __init__(self) -> None:
        self.path = os.path.join(tempfile.mkdtemp(prefix="ck-fork-", dir="/tmp"), "s")
        self._proc = subprocess.Popen([sys.executable, "-m", "tests.forkserver", self.path], cwd=ROOT,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._proc.stdout is not None
        if self._proc.stdout.readline() != b"listening\n":
            raise RuntimeError("the fork server did not start")

    def close(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)


class ForkServer:
    """A client of a fork server: this process's launches and their exits."""

    def __init__(self, path: str) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.connect(path)
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._started: dict[int, Future[int]] = {}
        self._exits: dict[int, Future[int]] = {}
        threading.Thread(target=self._read, name="forkserver", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(_MAX_MESSAGE)
            except OSError:
                data = b""
            if not data:
                with self._lock:
                    for fut in [*self._started.values(), *self._exits.values()]:
                        if not fut.done():
                            fut.set_exception(RuntimeError("the fork server is gone"))
                return
            message = json.loads(data)
            if "exited" in message:
                self.exit_of(message["exited"]).set_result(message["code"])
            else:
                with self._lock:
                    self._started.pop(message["id"]).set_result(message["pid"])

    def exit_of(self, pid: int) -> Future[int]:
        with self._lock:
            return self._exits.setdefault(pid, Future())

    def spawn(self, argv: Sequence[str], cwd: str | os.PathLike[str], stdout: int, stderr: int,
              env: Mapping[str, str] | None = None) -> Forked:
        started: Future[int] = Future()
        with self._lock:
            request_id = next(self._ids)
            self._started[request_id] = started
        request = {"id": request_id, "argv": list(argv), "cwd": os.fspath(cwd), "env": dict(env or os.environ)}
        with open(os.devnull, "rb") as stdin:
            socket.send_fds(self._sock, [json.dumps(request).encode()], [stdin.fileno(), stdout, stderr])
        return Forked(self, started.result(60), [*argv])

    def close(self) -> None:
        # shut down, not only closed: the reader thread's pending recv holds the socket open,
        # and the server would never see the end of it
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


# the xdist controller starts one server for all its workers (tests/conftest.py) and names it
# here; a run without workers starts its own at its first launch
SHARED = "CANDLEKEEPER_TEST_FORKSERVER"
_client: ForkServer | None = None
_own: Server | None = None
_client_lock = threading.Lock()


def server() -> ForkServer:
    global _client, _own
    with _client_lock:
        if _client is None:
            path = os.environ.get(SHARED)
            if path is None:
                _own = Server()
                atexit.register(_own.close)
                path = _own.path
            _client = ForkServer(path)
            atexit.register(_client.close)
        return _client


def _fileno(stream: int | BinaryIO | TextIO) -> int:
    return stream if isinstance(stream, int) else stream.fileno()


def launch(argv: Sequence[str], cwd: str | os.PathLike[str], stdout: int | BinaryIO | TextIO,
           stderr: int | BinaryIO | TextIO | None = None, env: Mapping[str, str] | None = None) -> Forked:
    """`subprocess.Popen(["python", "run.py", *argv], cwd=cwd, stdout=..., stderr=...)`, forked.
    `stderr=None` sends it where stdout goes (as `stderr=subprocess.STDOUT` would)."""
    out = _fileno(stdout)
    return server().spawn(argv, cwd, out, out if stderr is None else _fileno(stderr), env)


def run(argv: Sequence[str], cwd: str | os.PathLike[str], timeout: float = 60,
        env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`subprocess.run(["python", "run.py", *argv], cwd=cwd, capture_output=True, text=True,
    timeout=timeout)`, forked."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        child = server().spawn(argv, cwd, out_w, err_w, env)
    finally:
        os.close(out_w)
        os.close(err_w)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}

    def drain(fd: int) -> None:
        with open(fd, "rb", closefd=True) as pipe:
            chunks[fd].append(pipe.read())

    readers = [threading.Thread(target=drain, args=(fd,), daemon=True) for fd in (out_r, err_r)]
    for reader in readers:
        reader.start()
    try:
        code = child.wait(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(10)
        raise
    for reader in readers:
        reader.join(timeout)
    return subprocess.CompletedProcess([*argv], code, b"".join(chunks[out_r]).decode(errors="replace"),
                                       b"".join(chunks[err_r]).decode(errors="replace"))


def _exit_child(request: Mapping[str, Any]) -> None:
    """Run the child and end it as the interpreter would (non-daemon threads joined, atexit
    handlers run, stdout and stderr flushed, SystemExit's code), but without tearing down the
    modules: that costs a third of a second of CPU with ccxt loaded and nothing outside sees it."""
    try:
        code = _run_child(request)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - as the interpreter ends: print it, exit 1
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()  # type: ignore[attr-defined]  # what the interpreter's exit does first
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    _request = serve(sys.argv[1])
    if _request is not None:
        _exit_child(_request)
