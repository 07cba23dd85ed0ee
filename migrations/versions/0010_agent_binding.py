"""agent state binding: which backend, platform execution and session ran each agent task

An agent task records the backend that ran it (python, http, mcp) and, for agents on a platform, the
platform's execution id and chat session. A step whose agent still works on it as a platform
execution waits with the execution's id in its row: whichever worker takes the step next polls that
execution instead of sending the message again.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


COLUMNS = (("agent_backend", 16), ("agent_execution", 200), ("agent_session", 200))


def upgrade() -> None:
    # Plain ALTER TABLE on both databases (SQLite has dropped columns since 3.35): no table rebuild, so
    # the expression and partial indexes of step_instances stay as they are.
    for name, length in COLUMNS:
        op.add_column("step_instances", sa.Column(name, sa.String(length)))


def downgrade() -> None:
    for name, _ in reversed(COLUMNS):
        op.drop_column("step_instances", name)
