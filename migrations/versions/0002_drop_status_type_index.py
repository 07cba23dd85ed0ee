"""drop ix_step_instances_status_type: no query needs it, and SQLite's planner chose it over the
(instance_id, step_id) key for per-instance lookups, scanning every completed row

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_step_instances_status_type", table_name="step_instances")


def downgrade() -> None:
    op.create_index("ix_step_instances_status_type", "step_instances", ["status", "type"])
