"""A private PostgreSQL cluster for tests that stop, start or restart the database server.

    def test_x(private_pg: PgServer) -> None:      # a fresh cluster, database `flowdb` migrated
        engine = private_pg.engine                  # or private_pg.url, private_pg.cli_env() for processes
        private_pg.stop()                           # fast shutdown: clients are disconnected
        private_pg.start()                          # the same data, the same port
    with PgServer() as server: ...                  # by hand: an empty cluster (server.create_database())

The cluster lives in a temporary directory owned by the `postgres` user (initdb and pg_ctl refuse to
run as root: when the tests run as root, the commands run through `runuser -u postgres`), listens on
127.0.0.1 on a port of its own with trust authentication, and is removed at the end even when the
test fails. The server binaries come from $FLOWDB_TEST_PG_BIN, else the newest
/usr/lib/postgresql/*/bin, else PATH. In CI (CI=true) a missing initdb fails the test instead of
skipping it.

A PgServer has the attributes the `db` fixture's Database has (kind, url, engine, cli_env), so the
helpers that take a Database (tests/apiserver.py's api_for...) take it too.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest
from sqlalchemy import Engine, create_engine, text

from flowdb.db import migrate
from flowdb.db.engine import make_engine

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_USER = "postgres"
START_SECONDS = 60
STOP_SECONDS = 60
# Settings for a throwaway cluster: durability off (nothing here must survive a machine crash), small memory.
SERVER_OPTIONS = ("-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c shared_buffers=16MB "
                  "-c max_connections=200")


class PgUnavailable(RuntimeError):
    """The PostgreSQL server binaries (or the postgres user) are not on this machine."""


def find_bin_dir() -> Path:
    """The directory holding initdb, pg_ctl and postgres."""
    given = os.environ.get("FLOWDB_TEST_PG_BIN")
    candidates = [Path(given)] if given else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                         key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise PgUnavailable("initdb/pg_ctl not found (set FLOWDB_TEST_PG_BIN to PostgreSQL's bin directory)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgServer:
    """One PostgreSQL cluster: initdb on the first start(), then stop()/start()/restart() at will."""

    kind = "postgresql"

    def __init__(self, database: str = "flowdb", *, bin_dir: Path | None = None) -> None:
        self.bin = bin_dir or find_bin_dir()
        self.database = database
        self.as_root = os.geteuid() == 0
        if self.as_root:
            try:
                self._owner = pwd.getpwnam(PG_USER)
            except KeyError:
                raise PgUnavailable(f"the tests run as root and there is no {PG_USER!r} user to run PostgreSQL as") \
                    from None
        self.dir = Path(tempfile.mkdtemp(prefix="flowdb-pg-"))  # short: the Unix socket lives in it too
        if self.as_root:
            os.chown(self.dir, self._owner.pw_uid, self._owner.pw_gid)
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = free_port()
        self._engine: Engine | None = None
        self._initialized = False

    # -- URLs and the handles tests use ------------------------------------------------------------

    @property
    def url(self) -> str:
        """postgresql://postgres@127.0.0.1:PORT/<database> (the form users write; make_engine picks psycopg 3)."""
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{self.database}"

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/postgres"

    @property
    def engine(self) -> Engine:
        """flowdb's engine for `url` (created on first use; disposed by cleanup())."""
        if self._engine is None:
            self._engine = make_engine(self.url)
        return self._engine

    def cli_env(self) -> dict[str, str]:
        """The environment for a flowdb process over this database (no other FLOWDB_* settings)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWDB_")}
        env["FLOWDB_DATABASE_URL"] = self.url
        return env

    # -- the server --------------------------------------------------------------------------------

    def _run(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.as_root:
            command = ["runuser", "-u", PG_USER, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.dir,
                              stdin=subprocess.DEVNULL)

    def _check(self, result: subprocess.CompletedProcess[str], what: str) -> None:
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""
            raise RuntimeError(f"{what} failed ({result.returncode}): {result.stdout}{result.stderr}\n"
                               f"server log:\n{log}")

    def _initdb(self) -> None:
        result = self._run("initdb", "-D", str(self.data), "-U", PG_USER, "-A", "trust", "-E", "UTF8",
                           "--no-locale", "--no-sync", "--no-instructions", timeout=120)
        self._check(result, "initdb")
        self._initialized = True

    def start(self) -> None:
        """Start the server (initdb first, the first time) and wait until it accepts connections."""
        if not self._initialized:
            self._initdb()
        for attempt in range(3):
            options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 {SERVER_OPTIONS}"
            result = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options,
                               "-w", "-t", str(START_SECONDS), "start", timeout=START_SECONDS + 10)
            if result.returncode == 0:
                return
            in_use = "could not bind" in self.log.read_text(errors="replace") if self.log.exists() else False
            if not in_use or attempt == 2:
                self._check(result, "pg_ctl start")
            self.port = free_port()  # another process took the port: a new one (the URL changes)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: `fast` disconnects clients and shuts down cleanly; `immediate` is a crash."""
        result = self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", str(STOP_SECONDS), "stop",
                           timeout=STOP_SECONDS + 10)
        self._check(result, f"pg_ctl stop -m {mode}")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    @property
    def running(self) -> bool:
        if not self._initialized:
            return False
        return self._run("pg_ctl", "-D", str(self.data), "status", timeout=30).returncode == 0

    def create_database(self, name: str | None = None) -> None:
        """Create `name` (default: this server's database)."""
        admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name or self.database}"'))
        finally:
            admin.dispose()

    def cleanup(self) -> None:
        """Stop the server (immediately) if it runs and remove its directory."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        try:
            if self.running:
                self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PgServer:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()


@pytest.fixture
def private_pg() -> Iterator[PgServer]:
    """A PostgreSQL cluster of the test's own, running, with database `flowdb` migrated; removed at the end."""
    try:
        server = PgServer()
    except PgUnavailable as exc:
        if IN_CI:
            pytest.fail(f"a private PostgreSQL is required in CI: {exc}")
        pytest.skip(f"no private PostgreSQL: {exc}")
    try:
        server.start()
        server.create_database()
        migrate.upgrade(server.engine)
        yield server
    finally:
        server.cleanup()
