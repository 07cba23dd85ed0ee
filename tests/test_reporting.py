"""The reporting views in sql/ and `flowdb report`: a history with known numbers, written row by row
with fixed timestamps on several days, gives exactly the rows below on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, text

from flowdb.db import migrate
from flowdb.db.tables import approvals, process_definitions, process_instances, step_instances
from flowdb.db.timings import refresh_timings
from flowdb.db.views import load_views, stale_views, view_names

from conftest import ROOT, Database, flowdb_cli
from helpers import start, work

VIEWS = ["v_agent_runs", "v_approval_latency", "v_budgets", "v_cost_by_agent", "v_dead_letters", "v_instance_summary",
         "v_process_daily", "v_step_runs", "v_step_stats", "v_unservable_steps"]


def at(day: int, clock: str) -> datetime:
    """A UTC time on a day of November 2026."""
    return datetime.fromisoformat(f"2026-11-{day:02d} {clock}").replace(tzinfo=UTC)


# The history. Instances: (id, definition, status, trigger, started, finished, cost, error).
DEFINITIONS = [(1, "orders", 1), (2, "orders", 2), (3, "reports", 1), (4, "bulk", 1)]
INSTANCES = [
    (1, 1, "completed", "cli", at(23, "09:00:00"), at(23, "09:00:30.500"), 0.30, None),
    (2, 1, "failed", "cli", at(23, "10:00:00"), at(23, "10:01:00"), 0.05, "step fetch failed: boom"),
    (3, 2, "completed", "api", at(24, "08:00:00"), at(24, "08:00:10"), 0.12, None),
    (4, 2, "cancelled", "api", at(24, "12:00:00"), at(24, "12:30:00"), 0.01, "cancelled by an operator"),
    (5, 2, "running", "cli", at(25, "23:59:59"), None, 0.02, None),
    (6, 3, "completed", "api", at(23, "14:00:00"), at(23, "14:00:02"), 0.5, None),
    (7, 3, "completed", "webhook", at(23, "15:00:00"), at(23, "15:00:04"), 0.25, None),
    (8, 3, "failed", "webhook", at(23, "16:00:00"), at(23, "16:00:10"), 0.0, "step write failed: rate limited"),
    (9, 1, "completed", "cli", at(24, "09:00:00"), at(24, "09:05:00"), 0.1, None),
]
# Steps, ids 1.. in this order: (instance, step id, type, agent, status, attempt, max attempts,
# ready, started, finished, cost, tokens in, tokens out, error).
AGENT, APPROVAL, NOTE = "agent_task", "human_approval", "notification"
STEPS = [
    (1, "fetch", AGENT, "clerk", "completed", 1, 3, at(23, "09:00:00"), at(23, "09:00:01"), at(23, "09:00:11"),
     0.10, 100, 50, None),
    (1, "review", APPROVAL, None, "completed", 1, 1, at(23, "09:00:11"), at(23, "09:00:11.250"),
     at(23, "09:00:25.250"), 0, 0, 0, None),
    (1, "ship", AGENT, "clerk", "completed", 2, 3, at(23, "09:00:27"), at(23, "09:00:27.500"),
     at(23, "09:00:30.500"), 0.20, 300, 120, None),
    (2, "fetch", AGENT, "clerk", "failed", 3, 3, at(23, "10:00:40"), at(23, "10:00:42"), at(23, "10:01:00"),
     0.05, 30, 0, "boom"),
    (2, "review", APPROVAL, None, "cancelled", 0, 1, None, None, at(23, "10:01:00"), 0, 0, 0, None),
    (2, "ship", AGENT, "clerk", "cancelled", 0, 3, None, None, at(23, "10:01:00"), 0, 0, 0, None),
    (3, "fetch", AGENT, "clerk", "completed", 1, 3, at(24, "08:00:00"), at(24, "08:00:00.500"), at(24, "08:00:04"),
     0.04, 40, 20, None),
    (3, "review", APPROVAL, None, "completed", 1, 1, at(24, "08:00:04"), at(24, "08:00:04.050"),
     at(24, "08:00:09.200"), 0, 0, 0, None),
    (3, "ship", AGENT, "clerk", "completed", 1, 3, at(24, "08:00:09.200"), at(24, "08:00:09.300"),
     at(24, "08:00:10"), 0.08, 80, 40, None),
    (4, "fetch", AGENT, "clerk", "completed", 1, 3, at(24, "12:00:00"), at(24, "12:00:02"), at(24, "12:00:05"),
     0.01, 10, 5, None),
    (4, "review", APPROVAL, None, "cancelled", 1, 1, at(24, "12:00:05"), at(24, "12:00:05.100"), at(24, "12:30:00"),
     0, 0, 0, None),
    (4, "ship", AGENT, "clerk", "cancelled", 0, 3, None, None, at(24, "12:30:00"), 0, 0, 0, None),
    (5, "fetch", AGENT, "clerk", "completed", 1, 3, at(25, "23:59:59"), at(26, "00:00:00.500"), at(26, "00:00:01"),
     0.02, 20, 10, None),
    (5, "review", APPROVAL, None, "waiting", 1, 1, at(26, "00:00:01"), at(26, "00:00:01.100"), None, 0, 0, 0, None),
    (5, "ship", AGENT, "clerk", "pending", 0, 3, None, None, None, 0, 0, 0, None),
    (6, "write", AGENT, "writer", "completed", 1, 2, at(23, "14:00:00"), at(23, "14:00:00.200"),
     at(23, "14:00:01.200"), 0.5, 1000, 2000, None),
    (6, "notify", NOTE, None, "completed", 1, 1, at(23, "14:00:01.200"), at(23, "14:00:01.300"), at(23, "14:00:02"),
     0, 0, 0, None),
    (6, "extra", AGENT, "writer", "skipped", 0, 1, None, None, at(23, "14:00:01.200"), 0, 0, 0, None),
    (7, "write", AGENT, "writer", "completed", 1, 2, at(23, "15:00:00"), at(23, "15:00:01"), at(23, "15:00:03"),
     0.25, 500, 600, None),
    (7, "notify", NOTE, None, "completed", 1, 1, at(23, "15:00:03"), at(23, "15:00:03"), at(23, "15:00:04"),
     0, 0, 0, None),
    (7, "extra", AGENT, "writer", "skipped", 0, 1, None, None, at(23, "15:00:03"), 0, 0, 0, None),
    (8, "write", AGENT, "writer", "failed", 2, 2, at(23, "16:00:05"), at(23, "16:00:06"), at(23, "16:00:10"),
     0, 0, 0, "rate limited"),
    (8, "notify", NOTE, None, "cancelled", 0, 1, None, None, at(23, "16:00:10"), 0, 0, 0, None),
    (8, "extra", AGENT, "writer", "cancelled", 0, 1, None, None, at(23, "16:00:10"), 0, 0, 0, None),
    (9, "fetch", AGENT, "clerk", "completed", 1, 3, at(24, "09:00:00"), at(24, "09:00:00"), at(24, "09:00:02"),
     0.1, 100, 100, None),
    (9, "review", APPROVAL, None, "completed", 1, 1, at(24, "09:00:02"), at(24, "09:00:02.400"), at(24, "09:05:00"),
     0, 0, 0, None),
    (9, "ship", AGENT, "clerk", "skipped", 0, 3, None, None, at(24, "09:05:00"), 0, 0, 0, None),
]
# Approvals: (id, instance, step row id, status, decision, decided_by, requested, due, decided, reminders).
APPROVALS = [
    (1, 1, 2, "approved", "approved", "ann@example.com", at(23, "09:00:11.500"), at(23, "10:00:11.500"),
     at(23, "09:00:25"), 0),
    (2, 3, 8, "expired", "approved", None, at(24, "08:00:04.100"), at(24, "08:00:09.100"), at(24, "08:00:09.100"), 1),
    (3, 4, 11, "cancelled", None, None, at(24, "12:00:05.200"), None, at(24, "12:30:00"), 0),
    (4, 5, 14, "pending", None, None, at(26, "00:00:01.200"), at(27, "00:00:01.200"), None, 0),
    (5, 9, 26, "rejected", "rejected", "bob@example.com", at(24, "09:00:02.500"), at(24, "10:00:02.500"),
     at(24, "09:04:59.500"), 0),
]
# And 20 instances of `bulk` on the 25th (k = 1..20): instance 100+k lasts k s, its one step
# (row 27+k) queues 0.1·k s and runs 0.5·k s, costs 0.001·k $, and uses 10·k / 20·k tokens.
BULK = range(1, 21)


def bulk_start(k: int) -> datetime:
    return at(25, f"10:{k:02d}:00")


def fill(engine: Engine) -> None:
    """Write the history above through the tables."""
    instance_rows = [
        {"id": iid, "definition_id": did, "process_name": DEFINITIONS[did - 1][1], "version": DEFINITIONS[did - 1][2],
         "status": status, "inputs": {}, "trigger": trigger, "cost_usd": cost, "open_steps": 0,
         "created_at": started, "started_at": started, "finished_at": finished, "error": error}
        for iid, did, status, trigger, started, finished, cost, error in INSTANCES]
    step_rows = [
        {"id": n, "instance_id": iid, "definition_id": INSTANCES[iid - 1][1], "step_id": sid, "type": kind,
         "agent": agent, "status": status, "attempt": attempt, "max_attempts": most, "ready_at": ready,
         "started_at": began, "finished_at": finished, "cost_usd": cost, "tokens_in": tin, "tokens_out": tout,
         "error": error, "created_at": INSTANCES[iid - 1][4]}
        for n, (iid, sid, kind, agent, status, attempt, most, ready, began, finished, cost, tin, tout, error)
        in enumerate(STEPS, start=1)]
    for k in BULK:
        began = bulk_start(k)
        instance_rows.append({"id": 100 + k, "definition_id": 4, "process_name": "bulk", "version": 1,
                              "status": "completed", "inputs": {}, "trigger": "bulk", "cost_usd": 0.001 * k,
                              "open_steps": 0, "created_at": began, "started_at": began,
                              "finished_at": began + timedelta(seconds=k), "error": None})
        step_rows.append({"id": 27 + k, "instance_id": 100 + k, "definition_id": 4, "step_id": "only", "type": AGENT,
                          "agent": "bulk-agent", "status": "completed", "attempt": 1, "max_attempts": 1,
                          "ready_at": began, "started_at": began + timedelta(milliseconds=100 * k),
                          "finished_at": began + timedelta(milliseconds=600 * k), "cost_usd": 0.001 * k,
                          "tokens_in": 10 * k, "tokens_out": 20 * k, "error": None, "created_at": began})
    approval_rows = [
        {"id": aid, "instance_id": iid, "step_instance_id": sid, "step_id": "review", "approvers": ["ann@example.com",
         "bob@example.com"], "quorum": 1, "status": status, "decision": decision, "decided_by": by,
         "title": "Review", "artifacts": [], "on_timeout": "approve", "due_at": due, "reminders": reminders,
         "created_at": requested, "decided_at": decided}
        for aid, iid, sid, status, decision, by, requested, due, decided, reminders in APPROVALS]
    with engine.begin() as conn:
        conn.execute(process_definitions.insert(), [
            {"id": did, "name": name, "version": version, "content_hash": f"h{did}", "source": "", "parsed": {},
             "created_at": at(1, "00:00:00")} for did, name, version in DEFINITIONS])
        conn.execute(process_instances.insert(), instance_rows)
        conn.execute(step_instances.insert(), step_rows)
        conn.execute(approvals.insert(), approval_rows)
        refresh_timings(conn)  # what the engine writes with the timestamps


def t(day: int, clock: str) -> str:
    """How a time is compared below: UTC, to the millisecond."""
    return f"2026-11-{day:02d} {clock}" + ("" if "." in clock else ".000")


def norm(value: Any) -> Any:
    """One representation for both databases: times as UTC text to the millisecond (SQLite returns
    the stored text, PostgreSQL a datetime); everything else is compared as it comes."""
    if isinstance(value, datetime):
        value = value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, str) and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)?", value):
        day, clock = value.split(" ")
        whole, _, fraction = clock.partition(".")
        return f"{day} {whole}.{(fraction + '000')[:3]}"
    return value


def rows(engine: Engine, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    with engine.connect() as conn:
        result = conn.execute(text(sql))
        return list(result.keys()), [tuple(norm(v) for v in row) for row in result]


def same(got: list[tuple[Any, ...]], expected: list[tuple[Any, ...]]) -> None:
    """Equal values of equal types (3 == 3.0 == Decimal(3) in Python; not here)."""
    assert got == expected
    assert [tuple(type(v).__name__ for v in row) for row in got] == [
        tuple(type(v).__name__ for v in row) for row in expected]


@pytest.fixture
def history(db: Database) -> Database:
    fill(db.engine)
    return db


def test_every_view_is_created_with_a_header_naming_each_column(db: Database) -> None:
    assert sorted(view_names()) == VIEWS
    for view in load_views():
        columns, _ = rows(db.engine, f"SELECT * FROM {view.name}")
        assert view.header.startswith(f"{view.name}: one row per "), view.header
        for name in columns:
            assert re.search(rf"^  {name} ", view.header, re.MULTILINE), f"{view.name}: {name} not described"


def test_instance_summary(history: Database) -> None:
    columns, got = rows(history.engine, "SELECT * FROM v_instance_summary ORDER BY instance_id")
    assert columns == ["instance_id", "process", "version", "status", "trigger", "day", "started_at", "finished_at",
                       "duration_s", "steps_total", "steps_completed", "steps_failed", "steps_skipped", "attempts",
                       "retries", "cost_usd", "error"]
    expected = [
        (1, "orders", 1, "completed", "cli", "2026-11-23", t(23, "09:00:00"), t(23, "09:00:30.500"), 30.5,
         3, 3, 0, 0, 4, 1, 0.3, None),
        (2, "orders", 1, "failed", "cli", "2026-11-23", t(23, "10:00:00"), t(23, "10:01:00"), 60.0,
         3, 0, 1, 0, 3, 2, 0.05, "step fetch failed: boom"),
        (3, "orders", 2, "completed", "api", "2026-11-24", t(24, "08:00:00"), t(24, "08:00:10"), 10.0,
         3, 3, 0, 0, 3, 0, 0.12, None),
        (4, "orders", 2, "cancelled", "api", "2026-11-24", t(24, "12:00:00"), t(24, "12:30:00"), 1800.0,
         3, 1, 0, 0, 2, 0, 0.01, "cancelled by an operator"),
        (5, "orders", 2, "running", "cli", "2026-11-25", t(25, "23:59:59"), None, None, 3, 1, 0, 0, 2, 0, 0.02, None),
        (6, "reports", 1, "completed", "api", "2026-11-23", t(23, "14:00:00"), t(23, "14:00:02"), 2.0,
         3, 2, 0, 1, 2, 0, 0.5, None),
        (7, "reports", 1, "completed", "webhook", "2026-11-23", t(23, "15:00:00"), t(23, "15:00:04"), 4.0,
         3, 2, 0, 1, 2, 0, 0.25, None),
        (8, "reports", 1, "failed", "webhook", "2026-11-23", t(23, "16:00:00"), t(23, "16:00:10"), 10.0,
         3, 0, 1, 0, 2, 1, 0.0, "step write failed: rate limited"),
        (9, "orders", 1, "completed", "cli", "2026-11-24", t(24, "09:00:00"), t(24, "09:05:00"), 300.0,
         3, 2, 0, 1, 2, 0, 0.1, None),
    ] + [
        (100 + k, "bulk", 1, "completed", "bulk", "2026-11-25", t(25, f"10:{k:02d}:00"),
         t(25, f"10:{k:02d}:{k:02d}"), float(k), 1, 1, 0, 0, 1, 0, round(0.001 * k, 6), None) for k in BULK]
    same(got, expected)


def _step(n: int, iid: int, process: str, version: int, step: str, kind: str, agent: str | None, status: str,
          attempts: int, most: int, day: str | None, ready: str | None, began: str | None, finished: str | None,
          queued: float | None, ran: float | None, cost: float = 0.0, tin: int = 0, tout: int = 0,
          error: str | None = None) -> tuple[Any, ...]:
    return (n, iid, process, version, step, 1, None, kind, agent, status, attempts, most, max(attempts - 1, 0), day,
            ready, began, finished, queued, ran, cost, tin, tout, error)


def test_step_runs(history: Database) -> None:
    columns, got = rows(history.engine, "SELECT * FROM v_step_runs ORDER BY step_instance_id")
    assert columns == ["step_instance_id", "instance_id", "process", "version", "step_id", "round", "item", "type",
                       "agent",
                       "status", "attempts", "max_attempts", "retries", "day", "ready_at", "started_at",
                       "finished_at", "queued_s", "run_s", "cost_usd", "tokens_in", "tokens_out", "error"]
    d23, d24, d26 = "2026-11-23", "2026-11-24", "2026-11-26"
    expected = [
        _step(1, 1, "orders", 1, "fetch", AGENT, "clerk", "completed", 1, 3, d23, t(23, "09:00:00"),
              t(23, "09:00:01"), t(23, "09:00:11"), 1.0, 10.0, 0.1, 100, 50),
        _step(2, 1, "orders", 1, "review", APPROVAL, None, "completed", 1, 1, d23, t(23, "09:00:11"),
              t(23, "09:00:11.250"), t(23, "09:00:25.250"), 0.25, 14.0),
        _step(3, 1, "orders", 1, "ship", AGENT, "clerk", "completed", 2, 3, d23, t(23, "09:00:27"),
              t(23, "09:00:27.500"), t(23, "09:00:30.500"), 0.5, 3.0, 0.2, 300, 120),
        _step(4, 2, "orders", 1, "fetch", AGENT, "clerk", "failed", 3, 3, d23, t(23, "10:00:40"),
              t(23, "10:00:42"), t(23, "10:01:00"), 2.0, 18.0, 0.05, 30, 0, "boom"),
        _step(5, 2, "orders", 1, "review", APPROVAL, None, "cancelled", 0, 1, None, None, None, t(23, "10:01:00"),
              None, None),
        _step(6, 2, "orders", 1, "ship", AGENT, "clerk", "cancelled", 0, 3, None, None, None, t(23, "10:01:00"),
              None, None),
        _step(7, 3, "orders", 2, "fetch", AGENT, "clerk", "completed", 1, 3, d24, t(24, "08:00:00"),
              t(24, "08:00:00.500"), t(24, "08:00:04"), 0.5, 3.5, 0.04, 40, 20),
        _step(8, 3, "orders", 2, "review", APPROVAL, None, "completed", 1, 1, d24, t(24, "08:00:04"),
              t(24, "08:00:04.050"), t(24, "08:00:09.200"), 0.05, 5.15),
        _step(9, 3, "orders", 2, "ship", AGENT, "clerk", "completed", 1, 3, d24, t(24, "08:00:09.200"),
              t(24, "08:00:09.300"), t(24, "08:00:10"), 0.1, 0.7, 0.08, 80, 40),
        _step(10, 4, "orders", 2, "fetch", AGENT, "clerk", "completed", 1, 3, d24, t(24, "12:00:00"),
              t(24, "12:00:02"), t(24, "12:00:05"), 2.0, 3.0, 0.01, 10, 5),
        _step(11, 4, "orders", 2, "review", APPROVAL, None, "cancelled", 1, 1, d24, t(24, "12:00:05"),
              t(24, "12:00:05.100"), t(24, "12:30:00"), 0.1, 1794.9),
        _step(12, 4, "orders", 2, "ship", AGENT, "clerk", "cancelled", 0, 3, None, None, None, t(24, "12:30:00"),
              None, None),
        _step(13, 5, "orders", 2, "fetch", AGENT, "clerk", "completed", 1, 3, d26, t(25, "23:59:59"),
              t(26, "00:00:00.500"), t(26, "00:00:01"), 1.5, 0.5, 0.02, 20, 10),
        _step(14, 5, "orders", 2, "review", APPROVAL, None, "waiting", 1, 1, d26, t(26, "00:00:01"),
              t(26, "00:00:01.100"), None, 0.1, None),
        _step(15, 5, "orders", 2, "ship", AGENT, "clerk", "pending", 0, 3, None, None, None, None, None, None),
        _step(16, 6, "reports", 1, "write", AGENT, "writer", "completed", 1, 2, d23, t(23, "14:00:00"),
              t(23, "14:00:00.200"), t(23, "14:00:01.200"), 0.2, 1.0, 0.5, 1000, 2000),
        _step(17, 6, "reports", 1, "notify", NOTE, None, "completed", 1, 1, d23, t(23, "14:00:01.200"),
              t(23, "14:00:01.300"), t(23, "14:00:02"), 0.1, 0.7),
        _step(18, 6, "reports", 1, "extra", AGENT, "writer", "skipped", 0, 1, None, None, None, t(23, "14:00:01.200"),
              None, None),
        _step(19, 7, "reports", 1, "write", AGENT, "writer", "completed", 1, 2, d23, t(23, "15:00:00"),
              t(23, "15:00:01"), t(23, "15:00:03"), 1.0, 2.0, 0.25, 500, 600),
        _step(20, 7, "reports", 1, "notify", NOTE, None, "completed", 1, 1, d23, t(23, "15:00:03"),
              t(23, "15:00:03"), t(23, "15:00:04"), 0.0, 1.0),
        _step(21, 7, "reports", 1, "extra", AGENT, "writer", "skipped", 0, 1, None, None, None, t(23, "15:00:03"),
              None, None),
        _step(22, 8, "reports", 1, "write", AGENT, "writer", "failed", 2, 2, d23, t(23, "16:00:05"),
              t(23, "16:00:06"), t(23, "16:00:10"), 1.0, 4.0, error="rate limited"),
        _step(23, 8, "reports", 1, "notify", NOTE, None, "cancelled", 0, 1, None, None, None, t(23, "16:00:10"),
              None, None),
        _step(24, 8, "reports", 1, "extra", AGENT, "writer", "cancelled", 0, 1, None, None, None, t(23, "16:00:10"),
              None, None),
        _step(25, 9, "orders", 1, "fetch", AGENT, "clerk", "completed", 1, 3, d24, t(24, "09:00:00"),
              t(24, "09:00:00"), t(24, "09:00:02"), 0.0, 2.0, 0.1, 100, 100),
        _step(26, 9, "orders", 1, "review", APPROVAL, None, "completed", 1, 1, d24, t(24, "09:00:02"),
              t(24, "09:00:02.400"), t(24, "09:05:00"), 0.4, 297.6),
        _step(27, 9, "orders", 1, "ship", AGENT, "clerk", "skipped", 0, 3, None, None, None, t(24, "09:05:00"),
              None, None),
    ] + [
        _step(27 + k, 100 + k, "bulk", 1, "only", AGENT, "bulk-agent", "completed", 1, 1, "2026-11-25",
              t(25, f"10:{k:02d}:00"), t(25, f"10:{k:02d}:{k // 10:02d}.{k % 10}00"),
              t(25, f"10:{k:02d}:{6 * k // 10:02d}.{6 * k % 10}00"), round(0.1 * k, 3), round(0.5 * k, 3),
              round(0.001 * k, 6), 10 * k, 20 * k) for k in BULK]
    same(got, expected)


def test_process_daily(history: Database) -> None:
    columns, got = rows(history.engine, "SELECT * FROM v_process_daily ORDER BY process, version, day")
    assert columns == ["process", "version", "day", "started", "running", "completed", "failed", "cancelled",
                       "success_rate", "mean_duration_s", "p95_duration_s", "cost_usd"]
    same(got, [
        # 20 completed, lasting 1..20 s: the nearest-rank p95 is the 19th.
        ("bulk", 1, "2026-11-25", 20, 0, 20, 0, 0, 1.0, 10.5, 19.0, 0.21),
        ("orders", 1, "2026-11-23", 2, 0, 1, 1, 0, 0.5, 30.5, 30.5, 0.35),
        ("orders", 1, "2026-11-24", 1, 0, 1, 0, 0, 1.0, 300.0, 300.0, 0.1),
        ("orders", 2, "2026-11-24", 2, 0, 1, 0, 1, 0.5, 10.0, 10.0, 0.13),
        ("orders", 2, "2026-11-25", 1, 1, 0, 0, 0, None, None, None, 0.02),
        ("reports", 1, "2026-11-23", 3, 0, 2, 1, 0, 0.6667, 3.0, 4.0, 0.75),
    ])


def test_step_stats(history: Database) -> None:
    columns, got = rows(history.engine, "SELECT * FROM v_step_stats ORDER BY process, step_id")
    assert columns == ["process", "step_id", "type", "steps", "runs", "attempts", "retries", "completed",
                       "failures", "skipped", "mean_run_s", "p95_run_s", "mean_queued_s", "p95_queued_s", "cost_usd"]
    same(got, [
        # runs 0.5..10 s, queues 0.1..2 s: the p95s are the 19th of 20
        ("bulk", "only", AGENT, 20, 20, 20, 0, 20, 0, 0, 5.25, 9.5, 1.05, 1.9, 0.21),
        # runs 0.5, 2, 3, 3.5, 10, 18 (one failed after 3 attempts, one ran twice); queues 0, 0.5, 1, 1.5, 2, 2
        ("orders", "fetch", AGENT, 6, 6, 8, 2, 5, 1, 0, 6.167, 18.0, 1.167, 2.0, 0.32),
        # runs of the decided ones 5.15, 14, 297.6 (the cancelled and the waiting one only queued)
        ("orders", "review", APPROVAL, 6, 5, 5, 0, 3, 0, 0, 105.583, 297.6, 0.18, 0.4, 0.0),
        ("orders", "ship", AGENT, 6, 2, 3, 1, 2, 0, 1, 1.85, 3.0, 0.3, 0.5, 0.28),
        ("reports", "extra", AGENT, 3, 0, 0, 0, 0, 0, 2, None, None, None, None, 0.0),
        ("reports", "notify", NOTE, 3, 2, 2, 0, 2, 0, 0, 0.85, 1.0, 0.05, 0.1, 0.0),
        ("reports", "write", AGENT, 3, 3, 4, 1, 2, 1, 0, 2.333, 4.0, 0.733, 1.0, 0.75),
    ])


def test_approval_latency(history: Database) -> None:
    columns, got = rows(history.engine, "SELECT * FROM v_approval_latency ORDER BY approval_id")
    assert columns == ["approval_id", "instance_id", "process", "version", "step_id", "status", "decision",
                       "decided_by", "timed_out", "quorum", "reminders", "day", "requested_at", "due_at",
                       "decided_at", "latency_s"]
    same(got, [
        (1, 1, "orders", 1, "review", "approved", "approved", "ann@example.com", 0, 1, 0, "2026-11-23",
         t(23, "09:00:11.500"), t(23, "10:00:11.500"), t(23, "09:00:25"), 13.5),
        (2, 3, "orders", 2, "review", "expired", "approved", None, 1, 1, 1, "2026-11-24",
         t(24, "08:00:04.100"), t(24, "08:00:09.100"), t(24, "08:00:09.100"), 5.0),
        (3, 4, "orders", 2, "review", "cancelled", None, None, 0, 1, 0, "2026-11-24",
         t(24, "12:00:05.200"), None, t(24, "12:30:00"), 1794.8),
        (4, 5, "orders", 2, "review", "pending", None, None, 0, 1, 0, "2026-11-26",
         t(26, "00:00:01.200"), t(27, "00:00:01.200"), None, None),
        (5, 9, "orders", 1, "review", "rejected", "rejected", "bob@example.com", 0, 1, 0, "2026-11-24",
         t(24, "09:00:02.500"), t(24, "10:00:02.500"), t(24, "09:04:59.500"), 297.0),
    ])


def test_cost_by_agent(history: Database) -> None:
    columns, got = rows(history.engine, "SELECT * FROM v_cost_by_agent ORDER BY agent, day")
    assert columns == ["agent", "day", "steps", "calls", "failed", "cost_usd", "tokens_in", "tokens_out"]
    same(got, [
        ("bulk-agent", "2026-11-25", 20, 20, 0, 0.21, 2100, 4200),
        ("clerk", "2026-11-23", 3, 6, 1, 0.35, 430, 170),
        ("clerk", "2026-11-24", 4, 4, 0, 0.23, 230, 165),
        ("clerk", "2026-11-26", 1, 1, 0, 0.02, 20, 10),  # claimed just after midnight UTC
        ("writer", "2026-11-23", 3, 4, 1, 0.75, 1500, 2600),
    ])


def test_days_are_utc_whatever_the_session_time_zone(history: Database) -> None:
    """PostgreSQL turns timestamptz into a date in the session's TimeZone; the views must not."""
    queries = ["SELECT day, agent FROM v_cost_by_agent ORDER BY agent, day",
               "SELECT instance_id, day, duration_s FROM v_instance_summary ORDER BY instance_id"]
    expected = [rows(history.engine, sql)[1] for sql in queries]
    if history.kind == "postgresql":
        with history.engine.connect() as conn:
            conn.execute(text("SET TIME ZONE 'Pacific/Kiritimati'"))  # UTC+14
            got = [[tuple(norm(v) for v in row) for row in conn.execute(text(sql))] for sql in queries]
        assert got == expected
    assert ("2026-11-26", "clerk") in expected[0]


def test_time_functions_behave_as_sqlite_builtins(history: Database) -> None:
    """julianday, strftime and round of a float: SQLite's built-ins, and migration 0005's PostgreSQL
    functions of the same names, in UTC whatever the session's time zone."""
    sql = ("SELECT julianday('2026-11-23'), julianday('2026-11-23 12:00:00'), "
           "(julianday(finished_at) - julianday(started_at)) * 86400.0, "
           "strftime('%Y-%m-%dT%H:%M:%f day %j', finished_at), strftime('%Y-%m-%d', finished_at), "
           "ROUND(CAST(2.5 AS DOUBLE PRECISION), 0), ROUND(CAST(0.0625 AS DOUBLE PRECISION), 3), "
           "ROUND(CAST(1.0005 AS DOUBLE PRECISION), 3), ROUND(CAST(2.675 AS DOUBLE PRECISION), 2) "
           "FROM process_instances WHERE id = 1")
    with history.engine.connect() as conn:
        if history.kind == "postgresql":
            conn.execute(text("SET TIME ZONE 'America/Los_Angeles'"))
        [row] = conn.exec_driver_sql(sql, execution_options={"no_parameters": True}).all()
    assert row[:2] == (2461367.5, 2461368.0)
    assert round(row[2], 3) == 30.5  # a julianday is good to ~40 µs: durations are rounded to ms
    assert row[3:] == ("2026-11-23T09:00:30.500 day 327", "2026-11-23", 3.0, 0.063, 1.001, 2.68)


def test_views_over_work_done_by_the_engine(db: Database) -> None:
    """A real run: costs, retries and failures reach the views as the engine recorded them."""
    definition = """
process:
  name: engine-made
  steps:
    - {id: pay, type: agent_task, agent: pricey, message: "pay"}
    - id: wobble
      type: agent_task
      agent: flaky
      message: "again"
      depends_on: [pay]
      retry: {max_attempts: 3, initial_interval: 0.01s, backoff: 1}
"""
    ids = start(db.engine, definition, count=2)
    work(db.engine)
    _, summary = rows(db.engine, "SELECT instance_id, status, steps_total, steps_completed, attempts, retries, "
                                 "cost_usd FROM v_instance_summary ORDER BY instance_id")
    assert summary == [(iid, "completed", 2, 2, 4, 2, 0.25) for iid in ids]
    _, runs = rows(db.engine, "SELECT step_id, attempts, retries, cost_usd, tokens_in, tokens_out, queued_s >= 0, "
                              "run_s >= 0 FROM v_step_runs ORDER BY step_id, instance_id")
    true = True if db.kind == "postgresql" else 1
    assert runs == [("pay", 1, 0, 0.25, 100, 50, true, true)] * 2 + [("wobble", 3, 2, 0.0, 0, 0, true, true)] * 2
    _, stats = rows(db.engine, "SELECT step_id, runs, attempts, retries, completed, cost_usd FROM v_step_stats "
                               "ORDER BY step_id")
    assert stats == [("pay", 2, 2, 0, 2, 0.5), ("wobble", 2, 6, 4, 2, 0.0)]
    _, agents = rows(db.engine, "SELECT agent, SUM(calls), SUM(cost_usd), SUM(tokens_in) FROM v_cost_by_agent "
                                "GROUP BY agent ORDER BY agent")
    assert agents == [("flaky", 6, 0.0, 0), ("pricey", 2, 0.5, 200)]
    _, daily = rows(db.engine, "SELECT process, started, completed, success_rate, cost_usd FROM v_process_daily")
    assert daily == [("engine-made", 2, 2, 1.0, 0.5)]


# --- flowdb db upgrade and downgrade ----------------------------------------------------------------


def _view_names_in(engine: Engine) -> set[str]:
    from sqlalchemy import inspect

    return set(inspect(engine).get_view_names())


@pytest.mark.slow
def test_db_upgrade_recreates_a_view_dropped_by_hand(db: Database) -> None:
    with db.engine.begin() as conn:
        conn.execute(text("DROP VIEW v_step_stats"))
        conn.execute(text("DROP VIEW v_step_runs"))
    assert _view_names_in(db.engine) == set(VIEWS) - {"v_step_stats", "v_step_runs"}
    result = flowdb_cli("db", "upgrade", env=db.cli_env())
    assert result.returncode == 0, result.stderr
    assert _view_names_in(db.engine) == set(VIEWS)


def test_a_database_at_head_gets_views_its_files_changed_on_first_use(db: Database) -> None:
    """A new release may change a view's file without a migration: the embedded default picks it up
    when a command opens the database, as `flowdb db upgrade` does on PostgreSQL."""
    with db.engine.begin() as conn:
        conn.execute(text("DROP VIEW v_step_stats"))
        conn.execute(text("CREATE VIEW v_step_stats AS SELECT 1 AS an_older_column"))
        conn.execute(text("DROP VIEW v_cost_by_agent"))
    with db.engine.connect() as conn:
        # SQLite keeps each view's text as written, so it also sees the changed one
        assert stale_views(conn) == (["v_cost_by_agent", "v_step_stats"] if db.kind == "sqlite"
                                     else ["v_cost_by_agent"])
    if db.kind == "sqlite":
        result = flowdb_cli("report", "step_stats", "--format", "json", env=db.cli_env())
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == []
    else:
        migrate.ensure_current(db.engine)
    assert _view_names_in(db.engine) == set(VIEWS)
    with db.engine.connect() as conn:
        assert stale_views(conn) == []
    columns, _ = rows(db.engine, "SELECT * FROM v_cost_by_agent")
    assert columns[0] == "agent"
    if db.kind == "sqlite":
        columns, _ = rows(db.engine, "SELECT * FROM v_step_stats")
        assert columns[:2] == ["process", "step_id"]


def test_downgrade_drops_the_views_and_upgrade_brings_them_back(db: Database) -> None:
    migrate.downgrade(db.engine, "0004")
    assert _view_names_in(db.engine) == set()
    if db.kind == "postgresql":
        with db.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM pg_proc WHERE proname IN "
                                     "('julianday', 'strftime')")).scalar() == 0
    migrate.upgrade(db.engine)
    assert _view_names_in(db.engine) == set(VIEWS)


# --- flowdb report ----------------------------------------------------------------------------------


def report(history: Database, *args: str) -> Any:
    return flowdb_cli("report", *args, env=history.cli_env())


@pytest.mark.slow
def test_report_json_csv_and_table(history: Database) -> None:
    result = report(history, "v_process_daily", "--format", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [(r["day"], r["process"], r["version"]) for r in data] == [
        ("2026-11-23", "orders", 1), ("2026-11-23", "reports", 1), ("2026-11-24", "orders", 1),
        ("2026-11-24", "orders", 2), ("2026-11-25", "bulk", 1), ("2026-11-25", "orders", 2)]
    assert data[1] == {"process": "reports", "version": 1, "day": "2026-11-23", "started": 3, "running": 0,
                       "completed": 2, "failed": 1, "cancelled": 0, "success_rate": 0.6667,
                       "mean_duration_s": 3.0, "p95_duration_s": 4.0, "cost_usd": 0.75}

    result = report(history, "approval_latency", "--format", "csv", "--limit", "2")  # the v_ may be left out
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "approval_id,instance_id,process,version,step_id,status,decision,decided_by,timed_out,quorum,reminders,"
        "day,requested_at,due_at,decided_at,latency_s",
        "1,1,orders,1,review,approved,approved,ann@example.com,0,1,0,2026-11-23,2026-11-23T09:00:11.500000+00:00,"
        "2026-11-23T10:00:11.500000+00:00,2026-11-23T09:00:25+00:00,13.5",
        "2,3,orders,2,review,expired,approved,,1,1,1,2026-11-24,2026-11-24T08:00:04.100000+00:00,"
        "2026-11-24T08:00:09.100000+00:00,2026-11-24T08:00:09.100000+00:00,5.0",
    ]

    result = report(history, "v_cost_by_agent")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "agent       day         steps  calls  failed  cost_usd  tokens_in  tokens_out",
        "----------  ----------  -----  -----  ------  --------  ---------  ----------",
        "clerk       2026-11-23      3      6       1      0.35        430         170",
        "writer      2026-11-23      3      4       1      0.75       1500        2600",
        "clerk       2026-11-24      4      4       0      0.23        230         165",
        "bulk-agent  2026-11-25     20     20       0      0.21       2100        4200",
        "clerk       2026-11-26      1      1       0      0.02         20          10",
    ]


@pytest.mark.slow
def test_report_filters_by_process_and_day(history: Database) -> None:
    result = report(history, "v_instance_summary", "--process", "orders", "--since", "2026-11-24", "--format", "json")
    assert result.returncode == 0, result.stderr
    assert [(r["instance_id"], r["day"], r["started_at"]) for r in json.loads(result.stdout)] == [
        (3, "2026-11-24", "2026-11-24T08:00:00+00:00"), (4, "2026-11-24", "2026-11-24T12:00:00+00:00"),
        (5, "2026-11-25", "2026-11-25T23:59:59+00:00"), (9, "2026-11-24", "2026-11-24T09:00:00+00:00")]
    result = report(history, "v_step_stats", "--process", "reports", "--limit", "1", "--format", "csv")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == ["reports,extra,agent_task,3,0,0,0,0,0,2,,,,,0.0"]
    result = report(history, "v_step_runs", "--since", "2026-11-26", "--format", "table")
    assert result.returncode == 0, result.stderr
    assert [line.split()[:2] for line in result.stdout.splitlines()[2:]] == [["13", "5"], ["14", "5"]]
    result = report(history, "v_process_daily", "--process", "nobody")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "(no rows in v_process_daily)"


@pytest.mark.slow
def test_report_refuses_what_it_cannot_do(history: Database) -> None:
    result = report(history, "v_nothing")
    assert result.returncode == 2
    assert "no view 'v_nothing'; the views are: " + ", ".join(view_names()) in result.stderr
    for bad in ("2026-13-01", "yesterday", "20261123", "2026-11-3"):
        result = report(history, "v_instance_summary", "--since", bad)
        assert result.returncode == 2 and "is not a date; write it as YYYY-MM-DD" in result.stderr, result.stderr
    result = report(history, "v_step_stats", "--since", "2026-11-01")
    assert result.returncode == 2 and "v_step_stats has no day column" in result.stderr
    result = report(history, "v_cost_by_agent", "--process", "orders")
    assert result.returncode == 2 and "v_cost_by_agent has no process column" in result.stderr
    result = report(history, "v_process_daily", "--format", "xml")
    assert result.returncode == 2
    result = report(history, "v_process_daily", "--limit", "0")
    assert result.returncode == 2


# --- docs/reporting.md ------------------------------------------------------------------------------


def doc_queries() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", (ROOT / "docs" / "reporting.md").read_text(encoding="utf-8"), re.DOTALL)


def test_the_docs_describe_every_column_of_every_view(db: Database) -> None:
    doc = (ROOT / "docs" / "reporting.md").read_text(encoding="utf-8")
    for name in VIEWS:
        columns, _ = rows(db.engine, f"SELECT * FROM {name}")
        section = doc.split(f"### {name}\n", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
        for column in columns:
            assert f"| `{column}` |" in section, f"docs/reporting.md: {name}.{column} is not described"


def test_the_docs_example_queries_run_as_written(history: Database) -> None:
    queries = doc_queries()
    assert len(queries) >= 10
    with history.engine.connect() as conn:
        for query in queries:
            # As a user would paste it into sqlite3 or psql: no bound parameters, '%' and ':' as written.
            result = conn.exec_driver_sql(query.strip().removesuffix(";"), execution_options={"no_parameters": True})
            assert result.keys(), query
            result.all()
