"""A throwaway PostgreSQL server for tests and benchmarks: real binaries, loopback only.

``PgCluster`` runs initdb into a temporary directory and starts a server listening on a unix
socket in that directory and on 127.0.0.1 at a free port. Authentication is ``trust`` for every
user except ``PASSWORD_USER``, who must give ``PASSWORD`` over TCP (scram-sha-256), so password
handling is tested for real. As root (CI runs as root, and initdb refuses root) the server runs
as the unprivileged ``postgres`` user through ``runuser``; the user is created if missing.

pytest: ``pg_cluster`` (session) and ``pg_db`` (per test: a fresh database, dropped after)::

    from tests.pg import pg_cluster, pg_db  # noqa: F401  (or wire this module into conftest)

    def test_x(pg_db):
        with PostgresStore(pg_db.url) as store: ...

Outside pytest (benchmarks, CI smoke check)::

    python -m tests.pg            # start, create a database, print its URL, stop
    with PgCluster() as cluster: url = cluster.create_database("x")

Missing binaries fail loudly with how to install them; nothing is skipped.
"""

from __future__ import annotations

import fcntl
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import psycopg
import pytest

from tests.tmpfs import memory_dir

SUPERUSER = "postgres"
PASSWORD_USER = "ck_pw"
# characters that need percent-encoding in a URL, so the URL handling is exercised too
PASSWORD = "s3cr:t/p@ss%w0rd"
_RUN_AS = "postgres"  # the unprivileged OS user the server runs as when we are root
# a directory for the run's template data directory (tests/conftest.py makes it in the xdist
# controller); without it, each server runs initdb itself
TEMPLATE = "CANDLEKEEPER_TEST_PG_TEMPLATE"

INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found. Install them with "
    "`apt-get install -y postgresql` (Debian/Ubuntu; `.ci/postgres` does it in CI), "
    "or point PG_BINDIR at the directory holding them."
)


class PgUnavailable(RuntimeError):
    """The server binaries are missing or the server would not start."""


def find_bindir() -> Path:
    """Directory with initdb/pg_ctl/postgres: $PG_BINDIR, then PATH, then Debian's layout."""
    candidates: list[str] = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(os.environ["PG_BINDIR"])
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(os.path.dirname(os.path.realpath(on_path)))
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    candidates.extend(debian)
    for d in candidates:
        if all(os.access(os.path.join(d, b), os.X_OK) for b in ("initdb", "pg_ctl", "postgres")):
            return Path(d)
    raise PgUnavailable(INSTALL_HINT)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ensure_os_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        # another test worker may be creating it at the same moment: judge by the result
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=False, capture_output=True,
        )
        try:
            return pwd.getpwnam(name)
        except KeyError:
            raise PgUnavailable(f"cannot create the unprivileged user {name!r} to run PostgreSQL as") from None


class PgCluster:
    """One throwaway server. ``start()``/``stop()``/``restart()`` keep the same port and data."""

    def __init__(self, bindir: Path | None = None) -> None:
        self.bindir = bindir or find_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="ck-pg-", dir=memory_dir()))
        self.data = self.root / "data"
        self.sockdir = self.root / "run"
        self.logfile = self.root / "server.log"
        self.port = free_port()
        self.host = "127.0.0.1"
        self._owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self._owner = _ensure_os_user(_RUN_AS)
        self.running = False

    # -- commands ----------------------------------------------------------------------

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._owner is not None:
            cmd = ["runuser", "-u", self._owner.pw_name, "--", *cmd]
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False)
        if check and proc.returncode != 0:
            raise PgUnavailable(
                f"{' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
                f"\n--- server log ---\n{self.server_log()[-3000:]}"
            )
        return proc

    def server_log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def init(self) -> None:
        self.sockdir.mkdir()
        if self._owner is not None:
            for p in (self.root, self.sockdir):
                os.chown(p, self._owner.pw_uid, self._owner.pw_gid)
        template = os.environ.get(TEMPLATE)
        if template:
            self._copy_template(Path(template))
        else:
            self._initdb(self.data)
        with open(self.data / "postgresql.conf", "a") as fh:
            fh.write(
                f"listen_addresses = '{self.host}'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.sockdir}'\n"
            )

    def _initdb(self, data: Path) -> None:
        """A new data directory with this suite's settings (all but where the server listens)."""
        self._run("initdb", "-D", str(data), "-U", SUPERUSER, "--auth=trust",
                  "--encoding=UTF8", "--locale=C", "--no-sync")
        with open(data / "postgresql.conf", "a") as fh:
            fh.write(
                "\n# throwaway test server\n"
                # no OS-crash safety needed; a killed server still replays its WAL
                "fsync = off\nfull_page_writes = off\n"
                "max_connections = 60\n"
                "shared_buffers = 128MB\n"
                "logging_collector = off\n"
                "log_min_messages = warning\n"
                "password_encryption = 'scram-sha-256'\n"
            )
        (data / "pg_hba.conf").write_text(
            "local all all trust\n"
            f"host all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n"
            "host all all 127.0.0.1/32 trust\n"
        )

    def _copy_template(self, template: Path) -> None:
        """The run's data directory made once (by whichever test process comes first, under a
        lock) and copied for each server: initdb costs the better part of a second of CPU, a
        copy a few milliseconds."""
        with open(template / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (template / "ready").exists():
                data = template / "data"
                shutil.rmtree(data, ignore_errors=True)
                if self._owner is not None:
                    os.chown(template, self._owner.pw_uid, self._owner.pw_gid)
                self._initdb(data)
                (template / "ready").touch()
        # cp -a keeps the owner and the modes the server insists on (0700)
        subprocess.run(["cp", "-a", str(template / "data"), str(self.data)], check=True, capture_output=True)

    def start(self) -> None:
        if not self.data.exists():
            self.init()
        # the log file lives in root, which the server's user owns
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.logfile))
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        if self.running:
            self._run("pg_ctl", "stop", "-w", "-t", "60", "-m", mode, "-D", str(self.data), check=False)
            self.running = False

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        self.start()
        self.bootstrap()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.destroy()

    # -- databases ---------------------------------------------------------------------

    def url(self, db: str = "postgres", user: str = SUPERUSER, password: str | None = None) -> str:
        """A TCP URL (127.0.0.1) for ``user`` on ``db``; the password percent-encoded."""
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{db}"

    def socket_url(self, db: str = "postgres", user: str = SUPERUSER) -> str:
        return f"postgresql://{quote(user, safe='')}@/{db}?host={quote(str(self.sockdir), safe='')}&port={self.port}"

    def admin(self, db: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        """An autocommit superuser connection over the unix socket."""
        return psycopg.connect(self.socket_url(db), autocommit=True)

    def bootstrap(self) -> None:
        with self.admin() as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (PASSWORD_USER,)).fetchone()
            if not exists:
                conn.execute(
                    psycopg.sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                        psycopg.sql.Identifier(PASSWORD_USER), psycopg.sql.Literal(PASSWORD)
                    )
                )

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name`` TEMPLATE template0; returns the superuser TCP URL. From
        PostgreSQL 15 on, by copying the template's files (FILE_COPY) rather than writing each of
        its blocks to the WAL (the default): a third less of the server's CPU per test database,
        and its checkpoints cost nothing with fsync off."""
        with self.admin() as conn:
            strategy = " STRATEGY FILE_COPY" if conn.info.server_version >= 150000 else ""
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {} TEMPLATE template0" + strategy)
                         .format(psycopg.sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psycopg.sql.Identifier(name)))


@dataclass
class PgDatabase:
    cluster: PgCluster
    name: str
    url: str

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        """Superuser autocommit connection to this database (for faults and inspection)."""
        return self.cluster.admin(self.name)

    def password_url(self, password: str | None = PASSWORD) -> str:
        return self.cluster.url(self.name, PASSWORD_USER, password)


# -- pytest ------------------------------------------------------------------------------

_SESSION: PgCluster | None = None


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One server for the whole session; fails (never skips) when PostgreSQL is missing."""
    global _SESSION
    if _SESSION is None:
        try:
            cluster = PgCluster()
            cluster.start()
            cluster.bootstrap()
        except PgUnavailable as exc:
            pytest.fail(str(exc), pytrace=False)
        _SESSION = cluster
    try:
        yield _SESSION
    finally:
        _SESSION.destroy()
        _SESSION = None


@pytest.fixture
def pg_db(pg_cluster: PgCluster) -> Iterator[PgDatabase]:
    """A fresh database for one test, dropped (connections and all) after it."""
    if not pg_cluster.running:  # a fault test that failed half-way left it stopped
        pg_cluster.start()
    name = f"ck_{uuid.uuid4().hex[:12]}"
    url = pg_cluster.create_database(name)
    try:
        yield PgDatabase(pg_cluster, name, url)
    finally:
        if not pg_cluster.running:
            pg_cluster.start()
        pg_cluster.drop_database(name)


def main() -> int:
    """Smoke check for CI: start a server, create a database, print its URL, stop."""
    try:
        with PgCluster() as cluster:
            url = cluster.create_database("ck_smoke")
            with psycopg.connect(url) as conn:
                version = conn.execute("SHOW server_version").fetchone()
            print(f"postgresql {version[0] if version else '?'} ok at {url} (as {cluster._owner.pw_name if cluster._owner else 'self'})")
    except PgUnavailable as exc:
        print(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
