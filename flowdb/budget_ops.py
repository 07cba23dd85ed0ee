"""Operator actions on budgets that the command line and the HTTP API share: show an instance's
budgets, set a limit (which wakes the steps a `pause` budget holds back)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, column, select, table, update

from flowdb.control import InstanceNotRunning, locked_instance
from flowdb.db.budgets import PROCESS, B, scope_is, scope_name
from flowdb.db.clock import Clock
from flowdb.db.events import EventWriter, event_row
from flowdb.db.tables import step_instances
from flowdb.engine.status import InstanceStatus, StepStatus
from flowdb.errors import FlowdbError, NotFound
from flowdb.notify import Wakeups

S = step_instances
MAX_USD = 1e12  # below it, as the definition's budgets (Numeric(18, 6) holds up to 999999999999.999999)
MAX_TOKENS = 2**62
BUDGET_COLUMNS = ("scope", "step_id", "max_cost_usd", "max_tokens", "on_exceed", "approver", "raises", "spent_usd",
                  "spent_tokens", "running_steps")
V = table("v_budgets", column("instance_id"), *(column(name) for name in BUDGET_COLUMNS))


class BadBudget(FlowdbError):
    """A budget change that cannot be made as asked."""


def instance_budgets(conn: Connection, instance_id: int) -> list[dict[str, Any]]:
    """The instance's budgets with what was spent against each (v_budgets), the process's first."""
    rows = conn.execute(select(*(V.c[name] for name in BUDGET_COLUMNS)).where(V.c.instance_id == instance_id)
                        .order_by(V.c.step_id.is_not(None), V.c.step_id)).mappings().all()
    return [dict(row) for row in rows]


def set_budget(engine: Engine, instance_id: int, step_id: str | None, max_cost_usd: float | None,
               max_tokens: int | None, who: str, wakeups: Wakeups | None = None) -> list[dict[str, Any]]:
    """Set a budget's limits for one running instance (the process's, or step_id's), and wake the agent
    tasks a budget holds back (they check again). Returns the instance's budgets afterwards."""
    if max_cost_usd is None and max_tokens is None:
        raise BadBudget("give a new max_cost_usd, max_tokens or both")
    if max_cost_usd is not None and not 0 < max_cost_usd < MAX_USD:
        raise BadBudget(f"max_cost_usd must be more than 0 and less than {MAX_USD:g}, not {max_cost_usd:g}")
    if max_tokens is not None and not 1 <= max_tokens <= MAX_TOKENS:
        raise BadBudget(f"max_tokens must be from 1 to {MAX_TOKENS}, not {max_tokens}")
    clock = Clock(engine.dialect.name)
    with engine.begin() as conn:
        status = locked_instance(conn, instance_id).status
        if status != InstanceStatus.RUNNING:
            raise InstanceNotRunning(f"instance {instance_id} is {status}; only a running instance's budget "
                                     "can change")
        values: dict[str, Any] = {"updated_at": clock.now}
        if max_cost_usd is not None:
            values["max_cost_usd"] = max_cost_usd
        if max_tokens is not None:
            values["max_tokens"] = max_tokens
        changed = conn.execute(update(B).where(B.c.instance_id == instance_id, scope_is(step_id)).values(**values))
        if not changed.rowcount:
            have = [row or PROCESS for row in conn.execute(select(B.c.step_id).where(B.c.instance_id == instance_id))
                    .scalars()]
            which = "the process" if step_id is None else f"step {step_id!r}"
            raise NotFound(f"instance {instance_id} has no budget for {which}" + (
                f"; its budgets: {', '.join(sorted(have))}" if have else "; it has no budgets"))
        # Agent tasks waiting, not on a platform execution, are held by a budget (or wait on a budget
        # approval, which they find still pending and wait on again): each checks again now.
        woken = conn.execute(update(S).where(
            S.c.instance_id == instance_id, S.c.status == StepStatus.WAITING.value, S.c.type == "agent_task",
            S.c.agent_execution.is_(None)).values(claimable_at=clock.now)).rowcount
        EventWriter(engine.dialect.name).write(conn, [event_row(instance_id, "budget.set", {
            "scope": scope_name(step_id), "step_id": step_id, "max_cost_usd": max_cost_usd,
            "max_tokens": max_tokens, "by": who, "steps_woken": woken})])
        budgets = instance_budgets(conn, instance_id)
    (wakeups or Wakeups(None)).notify(workers=True, events=True)
    return budgets
