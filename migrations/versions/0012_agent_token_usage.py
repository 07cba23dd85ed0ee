"""agent_token_usage: tokens each rate-limited agent reported, per 10-second bucket

The claim sums an agent's last minute against its `tokens_per_minute` (agents file) and takes none of
its steps while the limit is reached.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "agent_token_usage",
        sa.Column("agent", sa.String(100), nullable=False),
        sa.Column("bucket", sa.BigInteger(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("agent", "bucket", name="pk_agent_token_usage"),
    )


def downgrade() -> None:
    op.drop_table("agent_token_usage")
