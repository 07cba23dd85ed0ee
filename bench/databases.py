"""Scratch databases for one benchmark run: a SQLite file in a temp folder, or a PostgreSQL database."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text

PG_ADMIN_URL = os.environ.get("FLOWDB_BENCH_PG", "postgresql+psycopg://127.0.0.1:5432/test")
REDIS_URL = os.environ.get("FLOWDB_BENCH_REDIS", "redis://127.0.0.1:6379/0")


@contextmanager
def scratch_database(kind: str) -> Iterator[str]:
    """Yield the URL of an empty database of this kind; remove it afterwards."""
    if kind == "sqlite":
        folder = tempfile.mkdtemp(prefix="flowdb-bench-")
        try:
            yield f"sqlite:///{folder}/bench.sqlite3"
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    name = f"flowdb_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql+psycopg://", "postgresql://") + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()
