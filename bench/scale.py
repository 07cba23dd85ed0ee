"""Claim latency as finished rows pile up: the claim must cost the same with 1,000 or 1,000,000
finished steps in the table (the partial claim index, kept after ANALYZE)."""

from __future__ import annotations

import statistics
import time
import uuid
from typing import Any

from sqlalchemy import text

from bench.databases import scratch_database
from flowdb.db import migrate
from flowdb.db.claims import ClaimStatements
from flowdb.db.engine import make_engine

# Finished rows are made by the database itself (a recursive CTE works on both), in one statement.
FILL = """
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :rows)
INSERT INTO step_instances (instance_id, definition_id, step_id, type, status, attempt, created_at, finished_at)
SELECT 1, 1, 'done-' || CAST(i AS VARCHAR(20)), 'agent_task', 'completed', 1, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP
FROM n
"""
READY = """
INSERT INTO step_instances (instance_id, definition_id, step_id, type, status, created_at, ready_at, claimable_at)
VALUES (1, 1, :sid, 'agent_task', 'ready', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)
"""


def run_scale(kind: str, finished_rows: int, claims: int = 200) -> dict[str, Any]:
    with scratch_database(kind) as url:
        engine = make_engine(url)
        migrate.upgrade(engine)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO process_definitions (id, name, version, content_hash, source, parsed, "
                              "created_at) VALUES (1, 'scale', 1, 'h', 's', '{}', CURRENT_TIMESTAMP)"))
            conn.execute(text("INSERT INTO process_instances (id, definition_id, process_name, version, status, "
                              "inputs, open_steps, created_at) VALUES (1, 1, 'scale', 1, 'running', '{}', 0, "
                              "CURRENT_TIMESTAMP)"))
        if kind == "sqlite":  # SQLite's default recursion depth is far above this; chunks keep memory low
            for start in range(0, finished_rows, 100_000):
                with engine.begin() as conn:
                    conn.execute(text(FILL.replace("'done-'", f"'done-{start}-'")),
                                 {"rows": min(100_000, finished_rows - start)})
        else:
            with engine.begin() as conn:
                conn.execute(text(FILL), {"rows": finished_rows})
        with engine.begin() as conn:
            conn.execute(text(READY), [{"sid": f"ready-{i}"} for i in range(claims)])
            conn.exec_driver_sql("ANALYZE")
        statements = ClaimStatements(engine.dialect.name)
        timings = []
        with engine.connect() as conn:
            for _ in range(claims):
                began = time.perf_counter()
                with conn.begin():
                    got = statements.claim_steps(conn, "scale", uuid.uuid4().hex, 1, 30.0)
                timings.append((time.perf_counter() - began) * 1000)
                assert len(got) == 1
        engine.dispose()
    cuts = statistics.quantiles(timings, n=100, method="inclusive")
    return {"engine": "flowdb-claim", "kind": kind, "finished_rows": finished_rows,
            "claim_p50_ms": round(cuts[49], 3), "claim_p99_ms": round(cuts[98], 3)}


if __name__ == "__main__":
    for kind in ("sqlite", "postgresql"):
        for rows in (1_000, 100_000):
            print(run_scale(kind, rows))
