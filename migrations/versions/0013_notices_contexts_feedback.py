"""agent_notices, agent_contexts, step_feedback: subscriptions, context checkpoints and reviewers' feedback

- agent_notices: a notice per agent subscribed to a step (`subscribers:`), delivered at least once;
- agent_contexts: the context an agent task saved (`context: {save: NAME}`) for later ones to restore;
- step_feedback: what approvers said about an agent task's output, given to it when it runs again.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Ts = sa.DateTime(timezone=True)
Json = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "agent_notices",
        sa.Column("id", Id, nullable=False, autoincrement=True),
        sa.Column("instance_id", Id, nullable=False),
        sa.Column("step_instance_id", Id, nullable=False),
        sa.Column("step_id", sa.String(100), nullable=False),
        sa.Column("agent", sa.String(100), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("tries", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("error", sa.Text()),
        sa.Column("created_at", Ts, nullable=False),
        sa.Column("next_at", Ts, nullable=False),
        sa.Column("delivered_at", Ts),
        sa.PrimaryKeyConstraint("id", name="pk_agent_notices"),
        sa.ForeignKeyConstraint(["instance_id"], ["process_instances.id"], name="fk_agent_notices_instance_id"),
        sa.CheckConstraint("status IN ('pending', 'delivered', 'failed')", name="ck_agent_notices_status"),
    )
    op.create_index("ix_agent_notices_pending", "agent_notices", ["next_at", "id"],
                    sqlite_where=sa.text("status = 'pending'"), postgresql_where=sa.text("status = 'pending'"))
    op.create_table(
        "agent_contexts",
        sa.Column("instance_id", Id, nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("step_id", sa.String(100), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("agent", sa.String(100), nullable=False),
        sa.Column("session_id", sa.String(200)),
        sa.Column("context", Json),
        sa.Column("saved_at", Ts, nullable=False),
        sa.PrimaryKeyConstraint("instance_id", "name", name="pk_agent_contexts"),
        sa.ForeignKeyConstraint(["instance_id"], ["process_instances.id"], name="fk_agent_contexts_instance_id"),
    )
    op.create_table(
        "step_feedback",
        sa.Column("id", Id, nullable=False, autoincrement=True),
        sa.Column("instance_id", Id, nullable=False),
        sa.Column("step_id", sa.String(100), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("agent", sa.String(100)),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("comment", sa.Text()),
        sa.Column("given_by", sa.String(200), nullable=False),
        sa.Column("approval_id", Id, nullable=False),
        sa.Column("created_at", Ts, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_step_feedback"),
        sa.ForeignKeyConstraint(["instance_id"], ["process_instances.id"], name="fk_step_feedback_instance_id"),
    )
    op.create_index("ix_step_feedback_instance_id_step_id", "step_feedback", ["instance_id", "step_id"])


def downgrade() -> None:
    op.drop_table("step_feedback")
    op.drop_table("agent_contexts")
    op.drop_table("agent_notices")
