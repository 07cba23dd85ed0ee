"""workers: the workers running now and the agents and step types each can serve

A worker claims only the steps it can serve (its agents, its step types), so a step nobody can serve
stays ready instead of failing on the first worker that lacks its agent. These tables record who runs
and what each serves: `v_unservable_steps` lists the ready steps no running worker can serve, and a
deploy warns about agents nobody serves. A worker keeps its row's `expires_at` ahead of the clock with
its heartbeat; a row whose time has passed is a worker that died.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Ts = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("instance_id", Id),
        sa.Column("started_at", Ts, nullable=False),
        sa.Column("expires_at", Ts, nullable=False),
        sa.Column("stopped_at", Ts),
        sa.PrimaryKeyConstraint("name", name="pk_workers"),
    )
    op.create_table(
        "worker_serves",
        sa.Column("worker", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.PrimaryKeyConstraint("worker", "kind", "name", name="pk_worker_serves"),
        sa.ForeignKeyConstraint(["worker"], ["workers.name"], name="fk_worker_serves_worker", ondelete="CASCADE"),
        sa.CheckConstraint("kind IN ('agent', 'step_type')", name="ck_worker_serves_kind"),
    )
    op.create_index("ix_worker_serves_kind_name", "worker_serves", ["kind", "name"])


def downgrade() -> None:
    op.drop_table("worker_serves")
    op.drop_table("workers")
