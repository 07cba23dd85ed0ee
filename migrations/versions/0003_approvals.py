"""approvals and approval_approvers: human decisions kept in the database

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Types as they were when this revision was written (migrations never import today's tables).
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Ts = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "approvals",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("instance_id", Id, nullable=False),
        sa.Column("step_instance_id", Id, nullable=False),
        sa.Column("step_id", sa.String(100), nullable=False),
        sa.Column("approvers", Json, nullable=False),
        sa.Column("quorum", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("decision", sa.String(16)),
        sa.Column("decided_by", sa.String(200)),
        sa.Column("comment", sa.Text()),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("instructions", sa.Text()),
        sa.Column("artifacts", Json, nullable=False),
        sa.Column("on_timeout", sa.String(16), nullable=False),
        sa.Column("timeout_s", sa.Numeric(18, 3, asdecimal=False)),
        sa.Column("due_at", Ts),
        sa.Column("reminders", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("created_at", Ts, nullable=False),
        sa.Column("notified_at", Ts),
        sa.Column("decided_at", Ts),
        sa.ForeignKeyConstraint(["instance_id"], ["process_instances.id"], name="fk_approvals_instance_id"),
        sa.ForeignKeyConstraint(["step_instance_id"], ["step_instances.id"], name="fk_approvals_step_instance_id"),
        sa.PrimaryKeyConstraint("id", name="pk_approvals"),
    )
    op.create_index("ix_approvals_status_created_at", "approvals", ["status", "created_at"])
    op.create_index("ix_approvals_step_instance_id", "approvals", ["step_instance_id"])
    op.create_index("ix_approvals_instance_id", "approvals", ["instance_id"])
    op.create_table(
        "approval_approvers",
        sa.Column("approval_id", Id, nullable=False),
        sa.Column("approver", sa.String(200), nullable=False),
        sa.Column("decision", sa.String(16)),
        sa.Column("comment", sa.Text()),
        sa.Column("decided_at", Ts),
        sa.ForeignKeyConstraint(["approval_id"], ["approvals.id"], name="fk_approval_approvers_approval_id"),
        sa.PrimaryKeyConstraint("approval_id", "approver", name="pk_approval_approvers"),
    )
    op.create_index("ix_approval_approvers_approver", "approval_approvers", ["approver", "approval_id"])

def downgrade() -> None:
    op.drop_index("ix_approval_approvers_approver", table_name="approval_approvers")
    op.drop_table("approval_approvers")
    op.drop_index("ix_approvals_instance_id", table_name="approvals")
    op.drop_index("ix_approvals_step_instance_id", table_name="approvals")
    op.drop_index("ix_approvals_status_created_at", table_name="approvals")
    op.drop_table("approvals")
