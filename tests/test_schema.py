"""Migrations upgrade and downgrade on both databases, match the tables module, and keep the claim indexed."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, DateTime, bindparam, inspect, text

from flowdb.db import migrate
from flowdb.db.claims import ClaimStatements
from flowdb.db.progress import ProgressStatements
from flowdb.db.tables import metadata
from flowdb.db.workers import Capabilities
from flowdb.steptypes.registry import STEP_TYPES

from conftest import ROOT, Database

TABLES = {"process_definitions", "process_instances", "step_instances", "step_edges", "events"}


def test_migrations_downgrade_and_upgrade_again(db: Database) -> None:
    assert migrate.head_revision() == migrate.HEAD
    assert migrate.current_revision(db.engine) == migrate.HEAD
    migrate.downgrade(db.engine, "base")
    assert TABLES.isdisjoint(inspect(db.engine).get_table_names())
    migrate.upgrade(db.engine)
    assert TABLES <= set(inspect(db.engine).get_table_names())


def test_migrated_schema_matches_the_tables_module(db: Database) -> None:
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


# What a worker with one agent serves: the claim as workers run it.
SERVES = Capabilities(frozenset({"noop"}), frozenset(STEP_TYPES.names()))


def _plan(db: Database, statement: Any, values: dict[str, Any]) -> str:
    """The database's plan for a Core statement with these parameter values."""
    compiled = statement.compile(dialect=db.engine.dialect)
    params = compiled.construct_params(values)
    with db.engine.begin() as conn:
        if db.kind == "sqlite":
            positional = tuple(params[name] for name in compiled.positiontup)
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled), positional).all()
            return "\n".join(str(r[-1]) for r in rows)
        rows = conn.exec_driver_sql("EXPLAIN " + str(compiled), params).all()
        return "\n".join(r[0] for r in rows)


def _one_instance(conn: Connection) -> None:
    """Definition 1 and its instance 1, completed."""
    conn.execute(text("INSERT INTO process_definitions (id, name, version, content_hash, source, parsed, "
                      "created_at) VALUES (1, 'p', 1, 'h', 's', '{}', CURRENT_TIMESTAMP)"))
    conn.execute(text("INSERT INTO process_instances (id, definition_id, process_name, version, status, "
                      "inputs, open_steps, created_at) VALUES (1, 1, 'p', 1, 'completed', '{}', 0, "
                      "CURRENT_TIMESTAMP)"))


def _fill(db: Database) -> None:
    """20,000 finished rows and a few ready ones, then ANALYZE: a table scan would be the planner's mistake."""
    with db.engine.begin() as conn:
        _one_instance(conn)
        rows = [{"sid": f"s{n}", "st": "completed" if n > 5 else "ready", "ca": None if n > 5 else "2026-01-01"}
                for n in range(20_000)]
        conn.execute(text("INSERT INTO step_instances (instance_id, definition_id, step_id, type, status, "
                          "created_at, claimable_at) VALUES (1, 1, :sid, 'agent_task', :st, "
                          "CURRENT_TIMESTAMP, CAST(:ca AS TIMESTAMP))"), rows)
        conn.exec_driver_sql("ANALYZE")


@pytest.mark.slow
def test_claim_uses_the_claimable_index_even_after_analyze(db: Database) -> None:
    _fill(db)
    claim = ClaimStatements(db.engine.dialect.name, serves=SERVES).claim  # as a worker runs it
    plan = _plan(db, claim, {"n": 5, "owner": "w", "token": "t", "lease_seconds": 30})
    assert "ix_step_instances_claimable" in plan, plan
    if db.kind == "sqlite":
        assert "SCAN step_instances" not in plan, plan
    else:
        assert "Seq Scan on step_instances" not in plan, plan


@pytest.mark.slow
def test_take_over_finds_suspects_through_their_index_whatever_the_backlog(db: Database) -> None:
    """The look-up for steps to take over runs often: it must not scan the ready backlog."""
    _fill(db)
    with db.engine.begin() as conn:  # a backlog of 5,000 ready steps, claimable already
        conn.execute(text("UPDATE step_instances SET status = 'ready', claimable_at = CAST('2026-01-01' AS "
                          "TIMESTAMP) WHERE CAST(SUBSTR(step_id, 2) AS INTEGER) < 5000"))
        conn.exec_driver_sql("ANALYZE")
    take_over = ClaimStatements(db.engine.dialect.name, serves=SERVES).take_over
    plan = _plan(db, take_over, {"owner": "w", "token": "t", "lease_seconds": 30})
    assert "ix_step_instances_suspects" in plan, plan
    assert "ix_step_instances_claimable" not in plan, plan


def test_the_unservable_steps_view_reads_the_claimable_index(db: Database) -> None:
    """Workers read v_unservable_steps every minute: it must not scan the finished steps."""
    _fill(db)
    with db.engine.begin() as conn:
        if db.kind == "sqlite":
            plan = "\n".join(str(r[-1]) for r in conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN SELECT * FROM v_unservable_steps"))
            assert "SCAN s USING INDEX ix_step_instances_claimable" in plan, plan
        else:
            plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN SELECT * FROM v_unservable_steps"))
            assert "ix_step_instances_claimable" in plan and "Seq Scan on step_instances" not in plan, plan
        assert [row.step_id for row in conn.execute(text("SELECT step_id FROM v_unservable_steps "
                                                         "ORDER BY step_id"))] == [f"s{n}" for n in range(6)]


def test_per_instance_reads_of_the_completion_path_use_the_instance_key(db: Database) -> None:
    """Reads made while recording outcomes must cost the same however many finished rows there are."""
    _fill(db)
    statements = ProgressStatements(db.engine.dialect.name)
    for statement in (statements.leaf_outputs.params(iids=[1], leaves=["s7"]),
                      statements.settler.children.params(iids=[1], sids=["s3", "s7"])):
        sql = str(statement.compile(dialect=db.engine.dialect, compile_kwargs={"literal_binds": True}))
        with db.engine.begin() as conn:
            if db.kind == "sqlite":
                plan = "\n".join(str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))
                assert "(instance_id=? AND step_id=?)" in plan, plan
            else:
                plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql))
                assert "uq_step_instances_run" in plan, plan


def _history_at_0005(db: Database) -> None:
    """A database at revision 0005 with an approval pointing at a step (what 0006 rebuilds)."""
    migrate.downgrade(db.engine, "0005")
    with db.engine.begin() as conn:
        _one_instance(conn)
        ready = datetime(2026, 11, 20, 10, tzinfo=UTC)
        conn.execute(text("INSERT INTO step_instances (id, instance_id, definition_id, step_id, type, status, "
                          "created_at, ready_at, started_at, finished_at) VALUES (7, 1, 1, 'review', "
                          "'human_approval', 'completed', CURRENT_TIMESTAMP, :r, :s, :f)").bindparams(
            *(bindparam(name, type_=DateTime(timezone=True)) for name in "rsf")),
            {"r": ready, "s": ready + timedelta(milliseconds=1250), "f": ready + timedelta(seconds=301.25)})
        conn.execute(text("INSERT INTO approvals (id, instance_id, step_instance_id, step_id, approvers, quorum, "
                          "status, decision, title, artifacts, on_timeout, reminders, created_at) VALUES (1, 1, 7, "
                          "'review', '[]', 1, 'approved', 'approved', 'Review', '[]', 'approve', 0, "
                          "CURRENT_TIMESTAMP)"))


def _timings_after_upgrade(db: Database) -> None:
    assert migrate.current_revision(db.engine) == migrate.HEAD
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT queued_ms, run_ms FROM step_instances WHERE id = 7")).one() == (1250, 300000)
        assert conn.execute(text("SELECT step_instance_id FROM approvals")).scalar() == 7
        assert conn.execute(text("SELECT run_s FROM v_step_runs")).scalar() == 300.0
        if db.kind == "sqlite":
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []


def test_0006_keeps_every_row_and_computes_their_timings(db: Database) -> None:
    _history_at_0005(db)
    migrate.upgrade(db.engine)
    _timings_after_upgrade(db)


@pytest.mark.slow
def test_alembic_run_by_hand_migrates_the_same_way(db: Database, tmp_path: Path) -> None:
    """`alembic upgrade head` with an alembic.ini of one's own: SQLite's table rebuild works (foreign
    keys are checked at the end), and the views come back."""
    _history_at_0005(db)
    ini = tmp_path / "alembic.ini"
    ini.write_text(f"[alembic]\nscript_location = {ROOT / 'migrations'}\nsqlalchemy.url = {db.url}\n")
    for args in (["upgrade", "head"], ["current"]):
        result = subprocess.run([sys.executable, "-m", "alembic", "-c", str(ini), *args], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
    _timings_after_upgrade(db)


def test_crash_accounting_is_checked_by_the_database(db: Database) -> None:
    """Only a running step (or one handed back ready) is a suspect; only a suspect's run is isolated."""
    from sqlalchemy.exc import IntegrityError

    from flowdb.db.tables import step_instances as S

    with db.engine.begin() as conn:
        _one_instance(conn)
        conn.execute(S.insert().values(id=1, instance_id=1, definition_id=1, step_id="s", type="agent_task",
                                       status="completed", created_at=datetime.now(UTC)))
    refused = [dict(suspect=True), dict(status="running", isolated=True), dict(status="ready", suspect=True,
                                                                                isolated=True),
               dict(reclaims=-1), dict(releases=-1)]
    for values in refused:
        with pytest.raises(IntegrityError), db.engine.begin() as conn:
            conn.execute(S.update().where(S.c.id == 1).values(**values))
    for values in (dict(status="running", suspect=True, isolated=True), dict(status="ready", suspect=True)):
        with db.engine.begin() as conn:
            conn.execute(S.update().where(S.c.id == 1).values(isolated=False, suspect=False))
            conn.execute(S.update().where(S.c.id == 1).values(**values))


def test_0008_marks_rows_that_waited_and_refuses_to_drop_rounds(db: Database) -> None:
    """Upgrading to 0008 keeps every row and sets `woken` from the input's old `wake` key; a downgrade
    that would lose loop rounds or for_each items is refused, and changes nothing."""
    migrate.downgrade(db.engine, "0007")
    with db.engine.begin() as conn:
        _one_instance(conn)
        conn.execute(text("INSERT INTO step_instances (id, instance_id, definition_id, step_id, type, status, input, "
                          "created_at) VALUES (1, 1, 1, 'wait', 'timer', 'waiting', :woke, CURRENT_TIMESTAMP), "
                          "(2, 1, 1, 'work', 'agent_task', 'completed', :plain, CURRENT_TIMESTAMP)"),
                     {"woke": '{"wake": "2026-12-01T09:00:00+00:00"}', "plain": '{"message": "hi"}'})
    migrate.upgrade(db.engine)
    with db.engine.begin() as conn:
        got = conn.execute(text("SELECT id, woken, round, item FROM step_instances ORDER BY id")).all()
        assert [(r.id, bool(r.woken), r.round, r.item) for r in got] == [(1, True, 1, None), (2, False, 1, None)]
        conn.execute(text("INSERT INTO step_instances (id, instance_id, definition_id, step_id, type, status, round, "
                          "created_at) VALUES (3, 1, 1, 'work', 'agent_task', 'completed', 2, CURRENT_TIMESTAMP)"))
    with pytest.raises(Exception, match="loop rounds or for_each items"):
        migrate.downgrade(db.engine, "0007")
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM step_instances")).scalar_one() == 3
    assert migrate.current_revision(db.engine) == migrate.HEAD
