"""One backend fixture carries the database axis: every test taking `db` runs on SQLite and PostgreSQL.

Each PostgreSQL test gets a database of its own, created from a migrated template (fast); each
SQLite test gets a fresh file migrated through Alembic. In CI (CI=true) a PostgreSQL or Redis that
does not answer fails the run instead of skipping.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text

from flowdb.db import migrate
from flowdb.db.engine import make_engine

ROOT = Path(__file__).resolve().parent.parent
# The servers the tests use (README, "Tests"): a PostgreSQL database the tests may create databases
# from (each test gets its own, copied from a migrated template) and a Redis database number of its own.
PG_ADMIN_URL = os.environ.get("FLOWDB_TEST_PG", "postgresql+psycopg://127.0.0.1:5432/test")
REDIS_URL = os.environ.get("FLOWDB_TEST_REDIS", "redis://127.0.0.1:6379/15")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
pytest_plugins = ["servers", "apiserver", "pgserver"]  # SMTP and webhook servers; the HTTP API; a private PostgreSQL
_TEMPLATE = f"flowdb_tpl_{os.getpid()}"


def _unavailable(what: str, why: object) -> None:
    if IN_CI:
        pytest.fail(f"{what} is required in CI and is not answering: {why}")
    pytest.skip(f"{what} not available: {why}")


@dataclass
class Database:
    """A fresh, migrated database for one test."""

    kind: str  # sqlite | postgresql
    url: str
    engine: Engine

    def cli_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWDB_")}
        env["FLOWDB_DATABASE_URL"] = self.url
        return env


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated PostgreSQL database that per-test databases are copied from."""
    try:
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {_TEMPLATE}"))
            conn.execute(text(f"CREATE DATABASE {_TEMPLATE}"))
    except Exception as exc:  # connection refused, auth...
        _unavailable("PostgreSQL", exc)
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{_TEMPLATE}"
    engine = make_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    yield _TEMPLATE
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {_TEMPLATE} WITH (FORCE)"))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'flowdb.sqlite3'}"
        engine = make_engine(url)
        migrate.upgrade(engine)
        yield Database("sqlite", url, engine)
        engine.dispose()
        return
    template = request.getfixturevalue("pg_template")
    name = f"flowdb_t_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name} TEMPLATE {template}"))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    engine = make_engine(url)
    yield Database("postgresql", url.replace("postgresql+psycopg://", "postgresql://"), engine)
    engine.dispose()
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


@pytest.fixture
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:
        _unavailable("Redis", exc)
    return REDIS_URL


def flowdb_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
               timeout: float = 120, memory_limit: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `flowdb` command (as a user would) and capture its output.

    `memory_limit` caps the process's address space in bytes, like `ulimit -v` (in KiB) in a shell.
    """
    exe = shutil.which("flowdb", path=str(Path(sys.executable).parent)) or "flowdb"
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout,
                          preexec_fn=address_space_limit(memory_limit) if memory_limit is not None else None)


def address_space_limit(max_bytes: int) -> Callable[[], None]:
    """A preexec_fn for subprocess: the child may map at most `max_bytes` of memory (RLIMIT_AS)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))

    return apply


EXAMPLES = ROOT / "examples"
