"""The raw SQL limit: the minimal step cycle on plain drivers (sqlite3; psycopg 3, no SQLAlchemy).

One cycle = claim ready steps (one UPDATE ... WHERE id IN (SELECT ... LIMIT n) RETURNING, one transaction),
then, in a second transaction, complete them and activate each successor through the edge table
(count down its pending-parents column; it turns ready at 0). Workload: `chains` chains of 3 steps, as
flowdb's `chain`. `batch` = steps claimed per claim transaction; a batch is completed with executemany
in one transaction. Each worker is an OS process (multiprocessing, 'spawn') with one connection; the clock
runs from the barrier that releases all workers to the last completion.

    python -m bench.raw [chains]        # table: sqlite/postgresql x processes (1, 2) x batch (1, 10)

PostgreSQL: the server at FLOWDB_RAW_PG (libpq conninfo, default `host=127.0.0.1 port=5432 dbname=test`);
a scratch database is created there and dropped afterwards. SQLite: a file in a temp dir, WAL,
synchronous=NORMAL, BEGIN IMMEDIATE, busy_timeout.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import sqlite3
import sys
import tempfile
import time
import traceback
import uuid
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any, Protocol

import psycopg
from psycopg.conninfo import make_conninfo

PG_ADMIN = os.environ.get("FLOWDB_RAW_PG", "host=127.0.0.1 port=5432 dbname=test")
STEPS_PER_CHAIN = 3
IDLE_SLEEP = 0.001  # seconds between polls when nothing is ready but other workers still hold steps

SQLITE_SCHEMA = (
    "CREATE TABLE steps (id INTEGER PRIMARY KEY, status TEXT NOT NULL, pending INTEGER NOT NULL)",
    "CREATE TABLE edges (parent INTEGER NOT NULL, child INTEGER NOT NULL, PRIMARY KEY (parent, child))"
    " WITHOUT ROWID",
    "CREATE INDEX steps_ready ON steps (id) WHERE status = 'ready'",
)
SQLITE_INSERT_STEP = "INSERT INTO steps (id, status, pending) VALUES (?, ?, ?)"
SQLITE_INSERT_EDGE = "INSERT INTO edges (parent, child) VALUES (?, ?)"
SQLITE_CLAIM = (
    "UPDATE steps SET status = 'running' WHERE id IN"
    " (SELECT id FROM steps WHERE status = 'ready' ORDER BY id LIMIT ?) RETURNING id"
)
SQLITE_COMPLETE = "UPDATE steps SET status = 'completed' WHERE id = ? AND status = 'running'"
SQLITE_ACTIVATE = (
    "UPDATE steps SET pending = pending - 1, status = CASE WHEN pending = 1 THEN 'ready' ELSE status END"
    " WHERE id IN (SELECT child FROM edges WHERE parent = ?)"
)
SQLITE_UNFINISHED = "SELECT EXISTS (SELECT 1 FROM steps WHERE status <> 'completed')"
SQLITE_COUNT_COMPLETED = "SELECT count(*) FROM steps WHERE status = 'completed'"

PG_SCHEMA = (
    "CREATE TABLE steps (id bigint PRIMARY KEY, status text NOT NULL, pending integer NOT NULL)",
    "CREATE TABLE edges (parent bigint NOT NULL, child bigint NOT NULL, PRIMARY KEY (parent, child))",
    "CREATE INDEX steps_ready ON steps (id) WHERE status = 'ready'",
)
PG_INSERT_STEP = "INSERT INTO steps (id, status, pending) VALUES (%s, %s, %s)"
PG_INSERT_EDGE = "INSERT INTO edges (parent, child) VALUES (%s, %s)"
PG_CLAIM = (
    "UPDATE steps SET status = 'running' WHERE id IN"
    " (SELECT id FROM steps WHERE status = 'ready' ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING id"
)
PG_COMPLETE = "UPDATE steps SET status = 'completed' WHERE id = %s AND status = 'running'"
PG_ACTIVATE = (
    "UPDATE steps SET pending = pending - 1, status = CASE WHEN pending = 1 THEN 'ready' ELSE status END"
    " WHERE id IN (SELECT child FROM edges WHERE parent = %s)"
)
PG_UNFINISHED = "SELECT EXISTS (SELECT 1 FROM steps WHERE status <> 'completed')"
PG_COUNT_COMPLETED = "SELECT count(*) FROM steps WHERE status = 'completed'"


class Cycle(Protocol):
    def claim(self, n: int) -> list[int]: ...
    def complete(self, ids: list[int]) -> None: ...
    def unfinished(self) -> bool: ...
    def close(self) -> None: ...


class SqliteCycle:
    def __init__(self, path: str) -> None:
        # isolation_level=None: the module sends no BEGIN of its own; timeout= sets busy_timeout.
        self.conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = NORMAL")
        self.conn.execute("PRAGMA busy_timeout = 30000")

    def claim(self, n: int) -> list[int]:
        self.conn.execute("BEGIN IMMEDIATE")
        rows = self.conn.execute(SQLITE_CLAIM, (n,)).fetchall()
        self.conn.execute("COMMIT")
        return [row[0] for row in rows]

    def complete(self, ids: list[int]) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        if len(ids) == 1:
            self.conn.execute(SQLITE_COMPLETE, (ids[0],))
            self.conn.execute(SQLITE_ACTIVATE, (ids[0],))
        else:
            params = [(step_id,) for step_id in ids]
            self.conn.executemany(SQLITE_COMPLETE, params)
            self.conn.executemany(SQLITE_ACTIVATE, params)
        self.conn.execute("COMMIT")

    def unfinished(self) -> bool:
        return bool(self.conn.execute(SQLITE_UNFINISHED).fetchone()[0])

    def close(self) -> None:
        self.conn.close()


class PgCycle:
    def __init__(self, conninfo: str) -> None:
        # autocommit: the claim is one statement = one transaction; completion opens an explicit one.
        self.conn = psycopg.connect(conninfo, autocommit=True)

    def claim(self, n: int) -> list[int]:
        return [row[0] for row in self.conn.execute(PG_CLAIM, (n,)).fetchall()]

    def complete(self, ids: list[int]) -> None:
        with self.conn.transaction(), self.conn.cursor() as cur:
            if len(ids) == 1:
                cur.execute(PG_COMPLETE, (ids[0],))
                cur.execute(PG_ACTIVATE, (ids[0],))
            else:
                params = [(step_id,) for step_id in ids]
                cur.executemany(PG_COMPLETE, params)
                cur.executemany(PG_ACTIVATE, params)

    def unfinished(self) -> bool:
        row = self.conn.execute(PG_UNFINISHED).fetchone()
        return bool(row and row[0])

    def close(self) -> None:
        self.conn.close()


def _open(kind: str, target: str) -> Cycle:
    return SqliteCycle(target) if kind == "sqlite" else PgCycle(target)


def _chain_rows(chains: int) -> tuple[list[tuple[int, str, int]], list[tuple[int, int]]]:
    """Steps (id, status, pending) and edges (parent, child): chain i is ids 3i+1 -> 3i+2 -> 3i+3."""
    steps: list[tuple[int, str, int]] = []
    edges: list[tuple[int, int]] = []
    for i in range(chains):
        first = STEPS_PER_CHAIN * i + 1
        steps.append((first, "ready", 0))
        for k in range(1, STEPS_PER_CHAIN):
            steps.append((first + k, "pending", 1))
            edges.append((first + k - 1, first + k))
    return steps, edges


def _setup_sqlite(path: str, chains: int) -> None:
    steps, edges = _chain_rows(chains)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN IMMEDIATE")
        for statement in SQLITE_SCHEMA:
            conn.execute(statement)
        conn.executemany(SQLITE_INSERT_STEP, steps)
        conn.executemany(SQLITE_INSERT_EDGE, edges)
        conn.execute("COMMIT")
    finally:
        conn.close()


def _setup_pg(conninfo: str, chains: int) -> None:
    steps, edges = _chain_rows(chains)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        with conn.transaction(), conn.cursor() as cur:
            for statement in PG_SCHEMA:
                cur.execute(statement)
            cur.executemany(PG_INSERT_STEP, steps)
            cur.executemany(PG_INSERT_EDGE, edges)
        conn.execute("ANALYZE steps")
        conn.execute("ANALYZE edges")


def _count_completed(kind: str, target: str) -> int:
    if kind == "sqlite":
        conn = sqlite3.connect(target)
        try:
            return int(conn.execute(SQLITE_COUNT_COMPLETED).fetchone()[0])
        finally:
            conn.close()
    with psycopg.connect(target) as pg:
        row = pg.execute(PG_COUNT_COMPLETED).fetchone()
        return int(row[0]) if row else 0


def _work(kind: str, target: str, batch: int, barrier: Barrier, results: Any) -> None:
    """Worker process: loop claim/complete until no step is left; report (start, end, steps, error)."""
    try:
        cycle = _open(kind, target)
        try:
            barrier.wait(timeout=120)
            start = end = time.monotonic()  # CLOCK_MONOTONIC is system-wide: comparable across processes
            done = 0
            while True:
                ids = cycle.claim(batch)
                if not ids:
                    if not cycle.unfinished():
                        break
                    time.sleep(IDLE_SLEEP)
                    continue
                cycle.complete(ids)
                end = time.monotonic()
                done += len(ids)
        finally:
            cycle.close()
        results.put((start, end, done, None))
    except BaseException:
        barrier.abort()
        results.put((0.0, 0.0, 0, traceback.format_exc()))


def run_raw(kind: str, processes: int, batch: int, chains: int) -> dict[str, Any]:
    """kind 'sqlite' or 'postgresql'; returns {"kind", "processes", "batch", "steps", "seconds", "steps_per_s"}."""
    if kind not in ("sqlite", "postgresql"):
        raise ValueError(f"unknown kind {kind!r}")
    ctx = mp.get_context("spawn")
    tmpdir = admin_db = None
    workers: list[Any] = []
    try:
        if kind == "sqlite":
            tmpdir = tempfile.mkdtemp(prefix="flowdb_raw_")
            target = str(Path(tmpdir) / "raw.sqlite3")
            _setup_sqlite(target, chains)
        else:
            admin_db = "flowdb_raw_" + uuid.uuid4().hex[:8]
            with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
                admin.execute(f"CREATE DATABASE {admin_db}")
            target = make_conninfo(PG_ADMIN, dbname=admin_db)
            _setup_pg(target, chains)
        barrier = ctx.Barrier(processes)
        results = ctx.Queue()
        workers = [ctx.Process(target=_work, args=(kind, target, batch, barrier, results)) for _ in range(processes)]
        for worker in workers:
            worker.start()
        reports = [results.get(timeout=600) for _ in workers]
        for worker in workers:
            worker.join()
        errors = [error for *_, error in reports if error]
        if errors:
            raise RuntimeError(f"raw {kind} worker failed:\n" + "\n".join(errors))
        expected = STEPS_PER_CHAIN * chains
        done = sum(report[2] for report in reports)
        completed = _count_completed(kind, target)
        if completed != expected or done != expected:
            raise RuntimeError(f"raw {kind}: {completed} steps completed in the table, {done} reported by workers,"
                               f" expected {expected}")
        seconds = max(report[1] for report in reports) - min(report[0] for report in reports)
        return {"kind": kind, "processes": processes, "batch": batch, "steps": completed,
                "seconds": seconds, "steps_per_s": completed / seconds if seconds > 0 else float("inf")}
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join()
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
        if admin_db:
            with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
                admin.execute(f"DROP DATABASE IF EXISTS {admin_db} WITH (FORCE)")


def main(chains: int = 2000) -> None:
    print(f"raw SQL cycle, {chains} chains x {STEPS_PER_CHAIN} steps")
    print(f"{'database':<11}{'processes':>10}{'batch':>7}{'steps':>8}{'seconds':>9}{'steps/s':>10}")
    for kind in ("sqlite", "postgresql"):
        for processes in (1, 2):
            for batch in (1, 10):
                r = run_raw(kind, processes, batch, chains)
                print(f"{r['kind']:<11}{r['processes']:>10}{r['batch']:>7}{r['steps']:>8}"
                      f"{r['seconds']:>9.3f}{r['steps_per_s']:>10,.0f}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
