"""instance_budgets: each instance's budgets (the process's and its agent tasks'), raisable while it runs

A budget's limits are copied from the definition when an instance starts, so that `flowdb budget raise`
and an approved `on_exceed: ask` can raise them for that instance alone.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Money = sa.Numeric(18, 6, asdecimal=False)


def upgrade() -> None:
    op.create_table(
        "instance_budgets",
        sa.Column("id", Id, nullable=False, autoincrement=True),
        sa.Column("instance_id", Id, nullable=False),
        sa.Column("step_id", sa.String(100)),
        sa.Column("max_cost_usd", Money),
        sa.Column("max_tokens", sa.BigInteger()),
        sa.Column("on_exceed", sa.String(8), nullable=False),
        sa.Column("approver", sa.String(200)),
        sa.Column("raises", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_instance_budgets"),
        sa.ForeignKeyConstraint(["instance_id"], ["process_instances.id"], name="fk_instance_budgets_instance_id"),
        sa.CheckConstraint("on_exceed IN ('fail', 'pause', 'ask')", name="ck_instance_budgets_on_exceed"),
    )
    op.create_index("uq_instance_budgets_scope", "instance_budgets",
                    ["instance_id", sa.text("coalesce(step_id, '')")], unique=True)


def downgrade() -> None:
    op.drop_table("instance_budgets")
