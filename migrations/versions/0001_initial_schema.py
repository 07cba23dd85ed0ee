"""initial schema: definitions, instances, steps, edges, events

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Types as they were when this revision was written (migrations never import today's tables).
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Money = sa.Numeric(precision=18, scale=6, asdecimal=False)
Ts = sa.DateTime(timezone=True)
CLAIMABLE = sa.text("status IN ('ready', 'running', 'waiting')")


def upgrade() -> None:
    op.create_table(
        "process_definitions",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("parsed", Json, nullable=False),
        sa.Column("created_at", Ts, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_process_definitions"),
        sa.UniqueConstraint("name", "version", name="uq_process_definitions_name_version"),
    )
    op.create_table(
        "process_instances",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("definition_id", Id, nullable=False),
        sa.Column("process_name", sa.String(100), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("inputs", Json, nullable=False),
        sa.Column("outputs", Json, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("trigger", sa.String(32), server_default="cli", nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("parent_step_instance_id", Id, nullable=True),
        sa.Column("cost_usd", Money, server_default="0", nullable=False),
        sa.Column("budget_usd", Money, nullable=True),
        sa.Column("open_steps", sa.Integer(), nullable=False),
        sa.Column("created_at", Ts, nullable=False),
        sa.Column("started_at", Ts, nullable=True),
        sa.Column("finished_at", Ts, nullable=True),
        sa.ForeignKeyConstraint(["definition_id"], ["process_definitions.id"],
                                name="fk_process_instances_definition_id"),
        sa.PrimaryKeyConstraint("id", name="pk_process_instances"),
        sa.UniqueConstraint("idempotency_key", name="uq_process_instances_idempotency_key"),
    )
    op.create_index("ix_process_instances_created_at", "process_instances", ["created_at"])
    op.create_index("ix_process_instances_status_process", "process_instances", ["status", "process_name"])
    op.create_table(
        "step_instances",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("instance_id", Id, nullable=False),
        sa.Column("definition_id", Id, nullable=False),
        sa.Column("step_id", sa.String(100), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer(), server_default="0", nullable=False),
        sa.Column("max_attempts", sa.Integer(), server_default="1", nullable=False),
        sa.Column("pending_parents", sa.Integer(), server_default="0", nullable=False),
        sa.Column("completed_parents", sa.Integer(), server_default="0", nullable=False),
        sa.Column("ready_at", Ts, nullable=True),
        sa.Column("claimable_at", Ts, nullable=True),
        sa.Column("lease_owner", sa.String(200), nullable=True),
        sa.Column("lease_token", sa.String(64), nullable=True),
        sa.Column("lease_expires_at", Ts, nullable=True),
        sa.Column("heartbeat_at", Ts, nullable=True),
        sa.Column("agent", sa.String(100), nullable=True),
        sa.Column("input", Json, nullable=True),
        sa.Column("output", Json, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("cost_usd", Money, server_default="0", nullable=False),
        sa.Column("tokens_in", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("tokens_out", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("created_at", Ts, nullable=False),
        sa.Column("started_at", Ts, nullable=True),
        sa.Column("finished_at", Ts, nullable=True),
        sa.ForeignKeyConstraint(["instance_id"], ["process_instances.id"], name="fk_step_instances_instance_id"),
        sa.PrimaryKeyConstraint("id", name="pk_step_instances"),
        sa.UniqueConstraint("instance_id", "step_id", name="uq_step_instances_instance_id_step_id"),
    )
    op.create_index("ix_step_instances_claimable", "step_instances", ["claimable_at", "id"],
                    sqlite_where=CLAIMABLE, postgresql_where=CLAIMABLE)
    op.create_index("ix_step_instances_status_type", "step_instances", ["status", "type"])
    op.create_table(
        "step_edges",
        sa.Column("instance_id", Id, nullable=False),
        sa.Column("from_step", sa.String(100), nullable=False),
        sa.Column("to_step", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), server_default="pending", nullable=False),
        sa.ForeignKeyConstraint(["instance_id"], ["process_instances.id"], name="fk_step_edges_instance_id"),
        sa.PrimaryKeyConstraint("instance_id", "from_step", "to_step", name="pk_step_edges"),
    )
    op.create_table(
        "events",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("instance_id", Id, nullable=False),
        sa.Column("step_instance_id", Id, nullable=True),
        sa.Column("type", sa.String(48), nullable=False),
        sa.Column("payload", Json, nullable=True),
        sa.Column("created_at", Ts, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
    )
    op.create_index("ix_events_instance_id_id", "events", ["instance_id", "id"])


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("step_edges")
    op.drop_index("ix_step_instances_status_type", table_name="step_instances")
    op.drop_index("ix_step_instances_claimable", table_name="step_instances")
    op.drop_table("step_instances")
    op.drop_index("ix_process_instances_status_process", table_name="process_instances")
    op.drop_index("ix_process_instances_created_at", table_name="process_instances")
    op.drop_table("process_instances")
    op.drop_table("process_definitions")
