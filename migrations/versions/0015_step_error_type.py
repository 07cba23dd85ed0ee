"""step_instances.error_type: what kind of error failed a step (for error boundaries and reports)

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-08
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | Sequence[str] | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("step_instances", sa.Column("error_type", sa.String(100)))


def downgrade() -> None:
    op.drop_column("step_instances", "error_type")
