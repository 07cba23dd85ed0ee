"""rounds and items: a step may run several times in an instance; `woken` is a column

A step runs once per round of a loop and once per item of a for_each, each run a `step_instances`
row of its own: `round` (1 for the first visit) and `item` (the for_each index; NULL for the step's
own row), the item's value in `item_value`. The step's own row counts its items down in
`items_left` (of `items_total`), so finishing an item costs the same however many there are.
UNIQUE(instance_id, step_id) gives way to a unique index over (instance_id, step_id, round, item),
with NULL items compared as -1 (NULLs are distinct in a unique index).

`halted` marks a row cancelled because its instance stopped (not for its own sake: an operator's
cancel, a race, a loop going back), which is what `flowdb retry` gives back.

`woken` says the row has waited before (a timer, an approval, a for_each's items): its later claims
go on from where it waited. The statements that park a step write it, where a `wake` key in the
input JSON used to tell; rows parked before this migration get it from that key.

SQLite cannot drop a table constraint: the table is rebuilt (Alembic's batch mode keeps its
checks and partial indexes; the views are dropped around every migration, db/migrate.py).
PostgreSQL adds the CHECKs NOT VALID, then validates them. Every migration runs in one transaction,
so the table stays locked against writes until it commits (the checks, the unique index and the
`woken` update each read the whole table): stop the workers while upgrading a large database.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_UNIQUE = "uq_step_instances_instance_id_step_id"
RUN_INDEX = "uq_step_instances_run"
CHECKS = {
    "ck_step_instances_round": "round >= 1",
    "ck_step_instances_item": "item IS NULL OR item >= 0",
    "ck_step_instances_items": "items_left IS NULL OR (items_left >= 0 AND items_left <= items_total)",
}
COLUMNS = ("round", "item", "item_value", "items_total", "items_left", "woken", "halted")


def _columns() -> list[sa.Column[object]]:
    return [sa.Column("round", sa.Integer(), nullable=False, server_default="1"),
            sa.Column("item", sa.Integer(), nullable=True),
            sa.Column("item_value", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=True),
            sa.Column("items_total", sa.Integer(), nullable=True),
            sa.Column("items_left", sa.Integer(), nullable=True),
            sa.Column("woken", sa.Boolean(), nullable=False, server_default=sa.false()),
            sa.Column("halted", sa.Boolean(), nullable=False, server_default=sa.false())]


def _run_index() -> None:
    op.create_index(RUN_INDEX, "step_instances",
                    ["instance_id", "step_id", "round", sa.text("coalesce(item, -1)")], unique=True)


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("step_instances", recreate="always") as batch:
            batch.drop_constraint(OLD_UNIQUE, type_="unique")
            for column in _columns():
                batch.add_column(column)
            for name, condition in CHECKS.items():
                batch.create_check_constraint(name, sa.text(condition))
        _run_index()
        _woken_from_input()
        return
    for column in _columns():
        op.add_column("step_instances", column)
    for name, condition in CHECKS.items():
        op.execute(f"ALTER TABLE step_instances ADD CONSTRAINT {name} CHECK ({condition}) NOT VALID")
        op.execute(f"ALTER TABLE step_instances VALIDATE CONSTRAINT {name}")
    _run_index()
    op.drop_constraint(OLD_UNIQUE, "step_instances", type_="unique")
    _woken_from_input()


def _woken_from_input() -> None:
    """Rows parked before 0008 said so with a `wake` key in their input (text search: no JSON functions)."""
    op.execute("UPDATE step_instances SET woken = true WHERE CAST(input AS TEXT) LIKE '%\"wake\"%'")


def downgrade() -> None:
    # Later rounds and items do not fit the old key: refuse rather than lose them.
    extra = op.get_bind().execute(sa.text(
        "SELECT count(*) FROM step_instances WHERE round > 1 OR item IS NOT NULL")).scalar_one()
    if extra:
        raise RuntimeError(f"{extra} step rows are loop rounds or for_each items, which the schema before 0008 "
                           "cannot hold; delete the instances that have them before downgrading")
    op.drop_index(RUN_INDEX, table_name="step_instances")
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("step_instances", recreate="always") as batch:
            for name in CHECKS:
                batch.drop_constraint(name, type_="check")
            for name in COLUMNS:
                batch.drop_column(name)
            batch.create_unique_constraint(OLD_UNIQUE, ["instance_id", "step_id"])
        return
    for name in CHECKS:
        op.drop_constraint(name, "step_instances", type_="check")
    for name in COLUMNS:
        op.drop_column("step_instances", name)
    op.create_unique_constraint(OLD_UNIQUE, "step_instances", ["instance_id", "step_id"])
