"""The private PostgreSQL of tests/pgserver.py: migrated, stopped, started, restarted, removed."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from flowdb.db import migrate

from pgserver import IN_CI, PgServer, PgUnavailable


def test_private_postgres_stops_starts_and_is_removed(private_pg: PgServer) -> None:
    assert migrate.current_revision(private_pg.engine) == migrate.HEAD
    assert private_pg.url == f"postgresql://postgres@127.0.0.1:{private_pg.port}/flowdb"
    with private_pg.engine.begin() as conn:
        conn.execute(text("CREATE TABLE kept (n integer)"))
        conn.execute(text("INSERT INTO kept VALUES (7)"))

    private_pg.stop()
    assert not private_pg.running
    with pytest.raises(OperationalError), private_pg.engine.connect() as conn:
        conn.execute(text("SELECT 1"))

    private_pg.start()
    assert private_pg.running
    with private_pg.engine.connect() as conn:  # the pool's dead connections are replaced (pre-ping)
        assert conn.execute(text("SELECT n FROM kept")).scalar_one() == 7

    private_pg.restart()
    with private_pg.engine.connect() as conn:
        assert conn.execute(text("SELECT n FROM kept")).scalar_one() == 7


def test_cleanup_removes_a_running_cluster() -> None:
    try:
        server = PgServer()
    except PgUnavailable as exc:
        if IN_CI:
            pytest.fail(f"a private PostgreSQL is required in CI: {exc}")
        pytest.skip(str(exc))
    with server:
        assert server.running and server.dir.is_dir()
    assert not server.dir.exists()
