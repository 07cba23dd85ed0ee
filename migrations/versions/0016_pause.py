"""pause: an instance can be paused (paused_at, paused_by), its open rows held out of the claim (paused)

A paused instance's pending, ready and waiting rows get `paused`; the claimable index leaves them
out, so the claim costs the same however many rows are paused, and their claimable times (a
timer's, a retry's backoff) are kept for when the instance resumes. The index is rebuilt with the
new condition.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-08
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | Sequence[str] | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Ts = sa.DateTime(timezone=True)
CLAIMABLE = "status IN ('ready', 'running', 'waiting')"


def upgrade() -> None:
    op.add_column("process_instances", sa.Column("paused_at", Ts))
    op.add_column("process_instances", sa.Column("paused_by", sa.String(200)))
    op.add_column("step_instances", sa.Column("paused", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.drop_index("ix_step_instances_claimable", table_name="step_instances")
    where = sa.text(f"{CLAIMABLE} AND NOT paused")
    op.create_index("ix_step_instances_claimable", "step_instances", ["claimable_at", "id"],
                    sqlite_where=where, postgresql_where=where)


def downgrade() -> None:
    op.drop_index("ix_step_instances_claimable", table_name="step_instances")
    op.create_index("ix_step_instances_claimable", "step_instances", ["claimable_at", "id"],
                    sqlite_where=sa.text(CLAIMABLE), postgresql_where=sa.text(CLAIMABLE))
    op.drop_column("step_instances", "paused")
    op.drop_column("process_instances", "paused_by")
    op.drop_column("process_instances", "paused_at")
