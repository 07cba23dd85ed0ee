"""step timings: queued_ms and run_ms on step_instances, computed by the database, indexed for percentiles

A step row's latest attempt waited queued_ms = started_at - ready_at for a worker and ran
run_ms = finished_at - started_at, both whole milliseconds. They are generated columns: the
database computes them from the timestamps whatever code path wrote those (claims, completions,
retries, cancellation, a hand-written UPDATE), so the engine has nothing to keep in step.
queued_ms is set once the latest attempt has been claimed (any status but pending and ready);
run_ms once it completed or failed (a cancelled step's time is where the cancellation cut it, not
how long the step takes). Both are NULL unless started_at >= ready_at, that is unless the latest
attempt was the one claimed, and run_ms when the clock went backwards (finished before started).

queued_bucket and run_bucket are the same values cut to three significant digits, coded so that
they sort like the values (under 1,000 ms: the value; from 1,000 ms: digits * 1000 + the first
three digits, so 12,345 ms is 5123). With the partial indexes on (definition_id, step_id, bucket,
value), a nearest-rank percentile counts index entries per bucket in index order, then ranks
only the rows of the one bucket that holds it (sql/v_step_stats.sql), instead of sorting every
value ever recorded.

Both databases store them (STORED): the indexes then hold plain values. (SQLite could add VIRTUAL
ones without rebuilding the table, but SQLite before 3.41.2 answers some joins on an index over
a virtual column wrongly: its Bloom filter reads the wrong value. v_step_stats' join is one.)
So on SQLite the table is rebuilt (copied, dropped, renamed; foreign keys checked at the end), and
on PostgreSQL adding them rewrites it; both hold an exclusive lock, so on a large database run
this upgrade while no worker runs. PostgreSQL may not read one generated column from another, so
its bucket expressions repeat the value's.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# When each value applies: the latest attempt was claimed (queued) or finished running (run).
QUEUED_WHEN = "status NOT IN ('pending', 'ready') AND started_at >= ready_at"
RUN_WHEN = "status IN ('completed', 'failed') AND started_at >= ready_at AND finished_at >= started_at"

MILLISECONDS = {  # whole milliseconds from timestamp a to timestamp b
    "sqlite": "CAST(ROUND((julianday({b}) - julianday({a})) * 86400000.0) AS INTEGER)",
    "postgresql": "CAST(ROUND(EXTRACT(EPOCH FROM {b} - {a}) * 1000) AS BIGINT)",
}

BUCKET = ("CASE WHEN {v} < 1000 THEN {v} "
          "ELSE LENGTH(CAST({v} AS TEXT)) * 1000 + CAST(SUBSTR(CAST({v} AS TEXT), 1, 3) AS INTEGER) END")


def generated_columns(dialect: str) -> dict[str, str]:
    """Column name -> its generation expression on this database."""
    between = MILLISECONDS[dialect]
    queued = f"CASE WHEN {QUEUED_WHEN} THEN {between.format(a='ready_at', b='started_at')} END"
    run = f"CASE WHEN {RUN_WHEN} THEN {between.format(a='started_at', b='finished_at')} END"
    if dialect == "sqlite":  # SQLite may read a generated column in another one
        return {"queued_ms": queued, "run_ms": run,
                "queued_bucket": BUCKET.format(v="queued_ms"), "run_bucket": BUCKET.format(v="run_ms")}
    return {"queued_ms": queued, "run_ms": run,
            "queued_bucket": BUCKET.format(v=f"({queued})"), "run_bucket": BUCKET.format(v=f"({run})")}


INDEXES = {
    "ix_step_instances_definition_id_step_id_queued_bucket_queued_ms": "queued",
    "ix_step_instances_definition_id_step_id_run_bucket_run_ms": "run",
}


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        with op.batch_alter_table("step_instances", recreate="always") as batch:
            for name, expression in generated_columns(dialect).items():
                batch.add_column(sa.Column(name, sa.BigInteger(), sa.Computed(sa.text(expression), persisted=True)))
    else:  # one ALTER TABLE, so PostgreSQL rewrites the table once
        op.execute("ALTER TABLE step_instances " + ", ".join(
            f"ADD COLUMN {name} BIGINT GENERATED ALWAYS AS ({expression}) STORED"
            for name, expression in generated_columns(dialect).items()))
    for name, prefix in INDEXES.items():
        op.create_index(name, "step_instances", ["definition_id", "step_id", f"{prefix}_bucket", f"{prefix}_ms"],
                        sqlite_where=sa.text(f"{prefix}_ms IS NOT NULL"),
                        postgresql_where=sa.text(f"{prefix}_ms IS NOT NULL"))


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name="step_instances")
    # The buckets first: on SQLite they read the values.
    names = ("queued_bucket", "run_bucket", "queued_ms", "run_ms")
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("step_instances", recreate="always") as batch:
            for name in names:
                batch.drop_column(name)
    else:
        for name in names:
            op.drop_column("step_instances", name)
