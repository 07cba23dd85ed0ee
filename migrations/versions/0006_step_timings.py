"""step timings: queued_ms and run_ms on step_instances, with buckets, indexed for percentiles

A step row's latest attempt waited queued_ms = started_at - ready_at for a worker and ran
run_ms = finished_at - started_at, in whole milliseconds. From this revision on, the engine writes
them with the timestamps (flowdb/db/timings.py): queued_ms when an attempt is claimed, run_ms when
it completes or fails (a cancelled step's time is where the cancellation cut it, not how long the
step takes), both NULL again when the step goes back to ready or pending. This migration fills
them in for the rows already there by the same rules.

queued_bucket and run_bucket are the values cut to three significant digits, coded so that they
sort like the values (under 1,000 ms: the value; from 1,000 ms: digits * 1000 + the first three
digits, so 12,345 ms is 5123). With the partial indexes on (definition_id, step_id, bucket,
value), v_step_stats finds a nearest-rank percentile by counting index entries per bucket, then
counting the values of the one bucket that holds it, instead of sorting every value ever recorded.

Why not generated columns: PostgreSQL prepares a generated column's expression again for every
statement that writes the row (a quarter of a millisecond a step, measured), and SQLite before
3.41.2 answers some joins on an index over a virtual column wrongly (its Bloom filter reads the
wrong value; v_step_stats' join is one).

Adding nullable columns is instant on both databases; filling them rewrites the rows of steps
that were claimed, once.

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

COLUMNS = ("queued_ms", "queued_bucket", "run_ms", "run_bucket")

# When each value applies: the latest attempt was claimed (queued) or completed or failed (run),
# and its times are in order (a clock that went backwards gives none).
QUEUED_WHEN = "status NOT IN ('pending', 'ready') AND started_at >= ready_at"
RUN_WHEN = "status IN ('completed', 'failed') AND started_at >= ready_at AND finished_at >= started_at"

MILLISECONDS = {  # whole milliseconds from timestamp a to timestamp b
    "sqlite": "CAST(ROUND((julianday({b}) - julianday({a})) * 86400000.0) AS INTEGER)",
    "postgresql": "CAST(ROUND(EXTRACT(EPOCH FROM {b} - {a}) * 1000) AS BIGINT)",
}

BUCKET = ("CASE WHEN {v} < 1000 THEN {v} "
          "ELSE LENGTH(CAST({v} AS TEXT)) * 1000 + CAST(SUBSTR(CAST({v} AS TEXT), 1, 3) AS INTEGER) END")

INDEXES = {
    "ix_step_instances_definition_id_step_id_queued_bucket_queued_ms": "queued",
    "ix_step_instances_definition_id_step_id_run_bucket_run_ms": "run",
}


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    for name in COLUMNS:
        op.add_column("step_instances", sa.Column(name, sa.BigInteger()))
    between = MILLISECONDS[dialect]
    queued = f"CASE WHEN {QUEUED_WHEN} THEN {between.format(a='ready_at', b='started_at')} END"
    run = f"CASE WHEN {RUN_WHEN} THEN {between.format(a='started_at', b='finished_at')} END"
    # One UPDATE of only the rows that get a value (a claimed latest attempt): each is rewritten once.
    op.execute(f"UPDATE step_instances SET queued_ms = {queued}, run_ms = {run}, "
               f"queued_bucket = {BUCKET.format(v=f'({queued})')}, run_bucket = {BUCKET.format(v=f'({run})')} "
               f"WHERE {QUEUED_WHEN}")
    for name, prefix in INDEXES.items():
        op.create_index(name, "step_instances", ["definition_id", "step_id", f"{prefix}_bucket", f"{prefix}_ms"],
                        sqlite_where=sa.text(f"{prefix}_ms IS NOT NULL"),
                        postgresql_where=sa.text(f"{prefix}_ms IS NOT NULL"))


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name="step_instances")
    if op.get_bind().dialect.name == "sqlite":  # DROP COLUMN needs SQLite 3.35: rebuild the table instead
        with op.batch_alter_table("step_instances", recreate="always") as batch:
            for name in COLUMNS:
                batch.drop_column(name)
    else:
        for name in COLUMNS:
            op.drop_column("step_instances", name)
