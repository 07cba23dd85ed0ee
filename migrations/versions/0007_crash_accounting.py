"""crash accounting: suspect, isolated, reclaims and releases on step_instances, an index of suspects

A step whose worker died while running it (its lease expired) is taken over as a *suspect*: it runs
alone on its next worker, and only a crash of a run that was alone (`isolated`) is charged to it,
so a step that crashes its worker fails by itself instead of taking the steps claimed with it down
(flowdb/db/claims.py). `reclaims` counts the take-overs and `releases` the times a stopping worker
gave the step back unfinished; releases past a bound are charged, so a step that makes its own
worker stop cannot run forever.

Adding columns with constant defaults is instant on both databases. SQLite takes the CHECKs as
column constraints of ADD COLUMN (a table constraint would need a rebuild); PostgreSQL as table
constraints, added NOT VALID (no scan under an exclusive lock) and then validated (a scan that lets
writes go on). Either way the same rules hold.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("suspect", "isolated", "reclaims", "releases")
CHECKS = {
    "ck_step_instances_crash_counts": "reclaims >= 0 AND releases >= 0",
    # A suspect runs, or waits ready after a hand-back; only a suspect's run is isolated.
    "ck_step_instances_suspect_running": "(status IN ('running', 'ready') OR NOT suspect) "
                                         "AND (NOT isolated OR (suspect AND status = 'running'))",
}

SQLITE_CHECKS = ("ck_step_instances_suspect", "ck_step_instances_isolated", "ck_step_instances_reclaims",
                 "ck_step_instances_releases")


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE step_instances ADD COLUMN suspect BOOLEAN NOT NULL DEFAULT 0 "
                   "CONSTRAINT ck_step_instances_suspect CHECK (status IN ('running', 'ready') OR NOT suspect)")
        op.execute("ALTER TABLE step_instances ADD COLUMN isolated BOOLEAN NOT NULL DEFAULT 0 "
                   "CONSTRAINT ck_step_instances_isolated CHECK (NOT isolated OR (suspect AND status = 'running'))")
        op.execute("ALTER TABLE step_instances ADD COLUMN reclaims INTEGER NOT NULL DEFAULT 0 "
                   "CONSTRAINT ck_step_instances_reclaims CHECK (reclaims >= 0)")
        op.execute("ALTER TABLE step_instances ADD COLUMN releases INTEGER NOT NULL DEFAULT 0 "
                   "CONSTRAINT ck_step_instances_releases CHECK (releases >= 0)")
        _suspects_index()
        return
    op.add_column("step_instances", sa.Column("suspect", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("step_instances", sa.Column("isolated", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("step_instances", sa.Column("reclaims", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("step_instances", sa.Column("releases", sa.Integer(), nullable=False, server_default="0"))
    for name, condition in CHECKS.items():
        op.execute(f"ALTER TABLE step_instances ADD CONSTRAINT {name} CHECK ({condition}) NOT VALID")
        op.execute(f"ALTER TABLE step_instances VALIDATE CONSTRAINT {name}")
    _suspects_index()


def _suspects_index() -> None:
    # The suspects waiting to be taken over: few, so finding one costs nothing whatever the backlog.
    op.create_index("ix_step_instances_suspects", "step_instances", ["claimable_at", "id"],
                    sqlite_where=sa.text("suspect"), postgresql_where=sa.text("suspect"))


def downgrade() -> None:
    op.drop_index("ix_step_instances_suspects", table_name="step_instances")
    if op.get_bind().dialect.name == "sqlite":  # DROP COLUMN needs SQLite 3.35: rebuild the table instead
        with op.batch_alter_table("step_instances", recreate="always") as batch:
            for name in SQLITE_CHECKS:
                batch.drop_constraint(name, type_="check")
            for name in COLUMNS:
                batch.drop_column(name)
        return
    for name in CHECKS:
        op.drop_constraint(name, "step_instances", type_="check")
    for name in COLUMNS:
        op.drop_column("step_instances", name)
