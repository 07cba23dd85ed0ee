"""Status words as enums, and the named sets the engine branches on (one place for all of them).

SQL that must match a partial index's condition text (the claim's) takes `sql_in(...)`, which writes
the set exactly as the index does.
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import literal_column
from sqlalchemy.sql.elements import ColumnClause, ColumnElement


class StepStatus(StrEnum):
    PENDING = "pending"  # parents not settled yet
    READY = "ready"  # claimable once ready_at has passed
    RUNNING = "running"  # claimed: a worker holds its lease
    WAITING = "waiting"  # parked without a lease (an approval, a timer): woken by a row update or its time
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"  # its condition was false, no route reached it, or no parent completed
    CANCELLED = "cancelled"  # stopped: by an operator, a race, `end`, or its instance stopping


class InstanceStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ApprovalStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"  # nobody decided in time (its decision, if any, is on_timeout's)
    CANCELLED = "cancelled"  # its step or instance stopped


class EdgeState(StrEnum):
    PENDING = "pending"
    TAKEN = "taken"
    SKIPPED = "skipped"


OPEN_STEP = (StepStatus.PENDING, StepStatus.READY, StepStatus.RUNNING, StepStatus.WAITING)
FINAL_STEP = (StepStatus.COMPLETED, StepStatus.FAILED, StepStatus.SKIPPED, StepStatus.CANCELLED)
# Taken by the claim query once claimable_at has passed (the claimable index holds exactly these).
CLAIMABLE_STEP = (StepStatus.READY, StepStatus.RUNNING, StepStatus.WAITING)
# How a settled parent counts for its children's joins: completed, or not (R5: cancelled is skipped).
SETTLED_STEP = (StepStatus.COMPLETED, StepStatus.SKIPPED, StepStatus.CANCELLED)
FINAL_INSTANCE = (InstanceStatus.COMPLETED, InstanceStatus.FAILED, InstanceStatus.CANCELLED)


def sql_list(words: tuple[StrEnum, ...]) -> str:
    """`('a', 'b')`: a set of words as SQL text (the way partial indexes are written)."""
    return "(" + ", ".join(f"'{w.value}'" for w in words) + ")"


def sql_in(column: str, words: tuple[StrEnum, ...]) -> ColumnElement[bool]:
    """`table.column IN ('a', 'b')` written out, so that SQLite matches it with a partial index."""
    return literal_column(f"{column} IN {sql_list(words)}")


def word(value: StrEnum) -> ColumnClause[str]:
    """A status word as an SQL literal (not a bound parameter: plans and partial indexes see it)."""
    return literal_column(f"'{value.value}'")
