"""The reporting views over a large history: python -m bench.reporting [--instances N] [--json FILE].

Fills a scratch database of each kind with N instances (default 100,000) of 10 process versions,
3 steps each (an agent task, an approval, an agent task), an approval for every 5th instance, spread
over 29 days with completed, failed, cancelled and running ones. Then it times queries on each
view (every row fetched), the median of 5 runs after one warm-up. Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

from sqlalchemy import Connection, text

from bench.databases import scratch_database
from flowdb.db import migrate
from flowdb.db.engine import make_engine
from flowdb.db.timings import refresh_timings

QUERIES = [
    ("v_instance_summary", "SELECT COUNT(*) FROM v_instance_summary"),
    ("v_instance_summary", "SELECT * FROM v_instance_summary WHERE process = 'proc-3' AND day >= '2026-10-26'"),
    ("v_instance_summary", "SELECT * FROM v_instance_summary WHERE status = 'failed'"),
    ("v_instance_summary", "SELECT * FROM v_instance_summary ORDER BY instance_id LIMIT 100"),
    ("v_step_runs", "SELECT COUNT(*) FROM v_step_runs"),
    ("v_step_runs", "SELECT * FROM v_step_runs WHERE instance_id = 54321"),
    ("v_process_daily", "SELECT * FROM v_process_daily"),
    ("v_process_daily", "SELECT * FROM v_process_daily WHERE process = 'proc-3' AND day >= '2026-10-26'"),
    ("v_step_stats", "SELECT * FROM v_step_stats"),
    ("v_step_stats", "SELECT * FROM v_step_stats WHERE process = 'proc-3'"),
    ("v_approval_latency", "SELECT COUNT(*), AVG(latency_s) FROM v_approval_latency"),
    ("v_approval_latency", "SELECT decided_by, COUNT(*), AVG(latency_s) FROM v_approval_latency GROUP BY decided_by"),
    ("v_cost_by_agent", "SELECT * FROM v_cost_by_agent"),
    ("v_cost_by_agent", "SELECT * FROM v_cost_by_agent WHERE day >= '2026-10-26'"),
]


def _time(kind: str, seconds: str) -> str:
    """A UTC timestamp `seconds` (an SQL expression) after 2026-10-01, as each database stores it."""
    if kind == "sqlite":
        return f"strftime('%Y-%m-%d %H:%M:%f000', '2026-10-01', '+' || ({seconds}) || ' seconds')"
    return f"(TIMESTAMPTZ '2026-10-01 00:00:00+00' + ({seconds}) * INTERVAL '1 second')"


def _fill_statements(kind: str, instances: int) -> list[str]:
    # Instance i starts i·spacing s after the base (the last one 29 days later) and lasts 5..605 s
    # to the millisecond; its steps share that time in thirds, each first queued 0..1.999 s.
    start = f"i * {2_505_600 / instances:.6f}"
    duration = "(5 + (i * 7919) % 600 + (i * 7717) % 1000 / 1000.0)"
    status = (f"CASE WHEN i % 50 = 0 THEN 'failed' WHEN i % 97 = 0 THEN 'cancelled' "
              f"WHEN i > {instances} - 2000 THEN 'running' ELSE 'completed' END")
    numbers = f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {instances})"
    definitions = ("INSERT INTO process_definitions (id, name, version, content_hash, source, parsed, created_at) "
                   "SELECT d, 'proc-' || CAST(d % 5 AS VARCHAR(10)), 1 + d / 5, 'h' || CAST(d AS VARCHAR(10)), "
                   "'', '{}', CURRENT_TIMESTAMP FROM (WITH RECURSIVE m(d) AS (SELECT 0 UNION ALL "
                   "SELECT d + 1 FROM m WHERE d < 9) SELECT d FROM m) AS ds")
    instance_rows = (
        f"{numbers} INSERT INTO process_instances (id, definition_id, process_name, version, status, inputs, "
        "\"trigger\", cost_usd, open_steps, created_at, started_at, finished_at, error) "
        f"SELECT i, i % 10, 'proc-' || CAST(i % 5 AS VARCHAR(10)), 1 + (i % 10) / 5, {status}, '{{}}', 'api', "
        f"(i % 13) * 0.01, 0, {_time(kind, start)}, {_time(kind, start)}, "
        f"CASE WHEN {status} = 'running' THEN NULL ELSE {_time(kind, f'{start} + {duration}')} END, "
        f"CASE WHEN {status} = 'failed' THEN 'step fetch failed: timeout' END FROM n")
    ready = f"{start} + j * ({duration}) / 3.0"
    step_status = ("CASE WHEN p.status = 'completed' THEN 'completed' "
                   "WHEN p.status = 'failed' THEN (CASE WHEN j = 0 THEN 'failed' ELSE 'cancelled' END) "
                   "WHEN p.status = 'cancelled' THEN (CASE WHEN j = 0 THEN 'completed' ELSE 'cancelled' END) "
                   "ELSE (CASE WHEN j = 0 THEN 'completed' WHEN j = 1 THEN 'waiting' ELSE 'pending' END) END")
    step_rows = (
        "INSERT INTO step_instances (id, instance_id, definition_id, step_id, type, status, attempt, max_attempts, "
        "agent, ready_at, started_at, finished_at, cost_usd, tokens_in, tokens_out, error, created_at) "
        "SELECT 3 * i + j, i, definition_id, step_id, type, st, "
        "CASE WHEN st IN ('pending') OR (st = 'cancelled' AND j > 0) THEN 0 "
        "     WHEN st = 'failed' THEN 3 WHEN i % 17 = 0 THEN 2 ELSE 1 END, "
        "CASE WHEN j = 1 THEN 1 ELSE 3 END, agent, "
        f"CASE WHEN st = 'pending' OR (st = 'cancelled' AND j > 0) THEN NULL ELSE {_time(kind, ready)} END, "
        f"CASE WHEN st = 'pending' OR (st = 'cancelled' AND j > 0) THEN NULL "
        f"     ELSE {_time(kind, f'{ready} + (i * 31) % 2000 / 1000.0')} END, "
        f"CASE WHEN st IN ('pending', 'waiting') THEN NULL ELSE {_time(kind, f'{ready} + ({duration}) / 3.0')} END, "
        "CASE WHEN j = 1 THEN 0 ELSE (i % 13) * 0.005 END, CASE WHEN j = 1 THEN 0 ELSE 100 + i % 900 END, "
        "CASE WHEN j = 1 THEN 0 ELSE 50 + i % 400 END, CASE WHEN st = 'failed' THEN 'timeout' END, created_at "
        "FROM (SELECT p.id AS i, p.definition_id, p.created_at, k.j, "
        "  CASE k.j WHEN 0 THEN 'fetch' WHEN 1 THEN 'review' ELSE 'ship' END AS step_id, "
        "  CASE k.j WHEN 1 THEN 'human_approval' ELSE 'agent_task' END AS type, "
        "  CASE k.j WHEN 1 THEN NULL ELSE 'agent-' || CAST(p.id % 4 AS VARCHAR(10)) END AS agent, "
        f"  {step_status} AS st "
        "  FROM process_instances p CROSS JOIN (SELECT 0 AS j UNION ALL SELECT 1 UNION ALL SELECT 2) AS k) AS s")
    approval_rows = (
        "INSERT INTO approvals (id, instance_id, step_instance_id, step_id, approvers, quorum, status, decision, "
        "decided_by, title, artifacts, on_timeout, due_at, reminders, created_at, decided_at) "
        "SELECT s.instance_id, s.instance_id, s.id, 'review', '[\"a@example.com\"]', 1, "
        "CASE WHEN s.status = 'waiting' THEN 'pending' WHEN s.status = 'cancelled' THEN 'cancelled' "
        "     WHEN s.instance_id % 3 = 0 THEN 'expired' WHEN s.instance_id % 3 = 1 THEN 'approved' "
        "     ELSE 'rejected' END, "
        "CASE WHEN s.status IN ('waiting', 'cancelled') THEN NULL WHEN s.instance_id % 3 = 2 THEN 'rejected' "
        "     ELSE 'approved' END, "
        "CASE WHEN s.status IN ('waiting', 'cancelled') OR s.instance_id % 3 = 0 THEN NULL "
        "     ELSE 'approver-' || CAST(s.instance_id % 7 AS VARCHAR(10)) END, "
        "'Review', '[]', 'approve', NULL, 0, s.started_at, s.finished_at "
        "FROM step_instances s WHERE s.step_id = 'review' AND s.instance_id % 5 = 0 AND s.started_at IS NOT NULL")
    return [definitions, instance_rows, step_rows, approval_rows]


# The same percentiles by brute force: every value sorted in one window, as v_step_stats avoids.
REFERENCE_P95 = """
SELECT process, step_id, MIN(CASE WHEN metric = 'run' THEN ms END), MIN(CASE WHEN metric = 'queued' THEN ms END)
FROM (
    SELECT process, step_id, metric, ms,
        CUME_DIST() OVER (PARTITION BY process, step_id, metric ORDER BY ms) AS share
    FROM (
        SELECT d.name AS process, s.step_id, 'run' AS metric, s.run_ms AS ms
        FROM step_instances s JOIN process_definitions d ON d.id = s.definition_id WHERE s.run_ms IS NOT NULL
        UNION ALL
        SELECT d.name, s.step_id, 'queued', s.queued_ms
        FROM step_instances s JOIN process_definitions d ON d.id = s.definition_id WHERE s.queued_ms IS NOT NULL
    ) AS timings
) AS ranked
WHERE share >= 0.95
GROUP BY process, step_id
ORDER BY process, step_id
"""


def check_step_stats(conn: Connection) -> None:
    """v_step_stats' p95s, read through the buckets, equal a sort of every value."""
    began = time.perf_counter()
    expected = [tuple(row) for row in conn.exec_driver_sql(REFERENCE_P95).all()]
    reference_ms = (time.perf_counter() - began) * 1000
    got = [tuple(row) for row in conn.exec_driver_sql(
        "SELECT process, step_id, CAST(ROUND(p95_run_s * 1000) AS INTEGER), "
        "CAST(ROUND(p95_queued_s * 1000) AS INTEGER) FROM v_step_stats "
        "WHERE p95_run_s IS NOT NULL OR p95_queued_s IS NOT NULL ORDER BY process, step_id").all()]
    if got != expected:
        raise SystemExit(f"v_step_stats' p95s differ from a full sort:\n{got}\n{expected}")
    print(f"  v_step_stats' {len(got)} rows of p95s equal a full sort of every value "
          f"(which takes {reference_ms:.0f} ms)", flush=True)


def fill(conn: Connection, kind: str, instances: int) -> None:
    for statement in _fill_statements(kind, instances):
        conn.exec_driver_sql(statement, execution_options={"no_parameters": True})
    refresh_timings(conn)  # what the engine writes with the timestamps


def run_reporting(kind: str, instances: int, repeats: int = 5) -> list[dict[str, Any]]:
    with scratch_database(kind) as url:
        engine = make_engine(url)
        migrate.upgrade(engine)
        began = time.perf_counter()
        with engine.begin() as conn:
            fill(conn, kind, instances)
        if kind == "postgresql":
            # The fill wrote every step row twice (its timings after its timestamps, where the engine
            # writes both at once): compact the table, as large as the rows it holds. (SQLite updates
            # rows in place.)
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("VACUUM FULL")
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
        with engine.begin() as conn:
            counts = {table: conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar()
                      for table in ("process_instances", "step_instances", "approvals")}
        fill_s = time.perf_counter() - began
        print(f"{kind}: filled {counts} in {fill_s:.1f} s", flush=True)
        out = []
        with engine.connect() as conn:
            for view, sql in QUERIES:
                timings = []
                for _ in range(repeats + 1):  # the first run warms the caches and is not counted
                    began = time.perf_counter()
                    got = conn.exec_driver_sql(sql, execution_options={"no_parameters": True}).all()
                    timings.append((time.perf_counter() - began) * 1000)
                row = {"kind": kind, "instances": instances, "view": view, "query": sql, "rows": len(got),
                       "median_ms": round(statistics.median(timings[1:]), 1), "max_ms": round(max(timings[1:]), 1)}
                print(f"  {row['median_ms']:>8.1f} ms (max {row['max_ms']:.1f})  {len(got):>6} rows  {sql}",
                      flush=True)
                out.append(row)
            check_step_stats(conn)
        engine.dispose()
    return out


def table(rows: list[dict[str, Any]]) -> str:
    kinds = sorted({r["kind"] for r in rows}, key=lambda k: k != "sqlite")
    lines = ["| query | rows | " + " | ".join(f"{k} ms" for k in kinds) + " |",
             "|---|---:|" + "---:|" * len(kinds)]
    for _, sql in QUERIES:
        cells = {r["kind"]: r for r in rows if r["query"] == sql}
        first = next(iter(cells.values()))
        lines.append(f"| `{sql}` | {first['rows']:,} | " + " | ".join(
            f"{cells[k]['median_ms']:g}" if k in cells else "" for k in kinds) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reporting", description=__doc__)
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--kind", choices=["sqlite", "postgresql"], action="append",
                        help="database(s) to run on (default both)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    for kind in args.kind or ["sqlite", "postgresql"]:
        rows += run_reporting(kind, args.instances)
    print()
    print(table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
