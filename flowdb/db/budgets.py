"""Budgets: checked in the claim's transaction before an agent task starts.

A process's `budget:` limits all its steps together; an agent task's own `budget:` limits that step
(all its attempts, loop rounds and items). Each limit is a row of `instance_budgets`, copied from the
definition when the instance starts, so it can be raised for one instance while it runs.

What counts against a limit: the cost (and tokens) spent so far, plus what the other steps running
now reserve (their `estimated_cost_usd`), plus this step's own estimate. The instance's row is
locked first on PostgreSQL, so two workers starting parallel branches of one instance check one
after the other and cannot overspend together (SQLite runs one writer at a time anyway).

When a limit would be passed, the budget's `on_exceed` decides:
- `fail`: the step fails with BudgetExceeded (not retried);
- `pause`: the step waits, started but not run, until `flowdb budget raise` (or the API) raises
  a limit and wakes it; it then checks again;
- `ask`: an approval is opened to the budget's approver; approved, the limit is raised by its
  original amount and the step runs; rejected (or expired), the step fails with BudgetExceeded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import BindParameter, Connection, bindparam, func, insert, select, update
from sqlalchemy.sql.elements import ColumnElement

from flowdb.db.approvals import ApprovalRow, ApprovalStatements
from flowdb.db.claims import Claimed
from flowdb.db.clock import Clock
from flowdb.db.tables import instance_budgets, process_instances, step_instances
from flowdb.definitions import CompiledDefinition, CompiledStep
from flowdb.engine.status import StepStatus
from flowdb.models import AgentTask, Budget

B, I, S = instance_budgets, process_instances, step_instances  # noqa: E741
BUDGET_EXCEEDED = "BudgetExceeded"
PROCESS = "process"  # how the process's budget is named to people (a step may be called that too)


@dataclass(frozen=True)
class Limit:
    """One budget of an instance, as it stands now."""

    step_id: str | None  # None: the process's budget
    max_cost_usd: float | None
    max_tokens: int | None
    on_exceed: str
    approver: str | None
    original: Budget  # as the definition gives it (an approved raise adds its amounts)
    raises: int = 0  # raises so far

    @property
    def scope(self) -> str:
        return "the process's budget" if self.step_id is None else f"the budget of step {self.step_id!r}"


    def raised_by(self) -> str:
        amounts = [f"${self.original.max_cost_usd:g}" if self.original.max_cost_usd else "",
                   f"{self.original.max_tokens} tokens" if self.original.max_tokens else ""]
        return " and ".join(a for a in amounts if a)


@dataclass(frozen=True)
class Exceeded:
    """A limit the step would pass: what it is, and what counts against it."""

    limit: Limit
    spent_usd: float
    reserved_usd: float  # the other running steps' estimates
    estimate_usd: float  # this step's
    spent_tokens: int

    def describe(self) -> str:
        limit = self.limit
        parts = []
        if limit.max_cost_usd is not None:
            parts.append(f"${self.spent_usd:g} spent" + (f", ${self.reserved_usd:g} reserved by running steps"
                                                         if self.reserved_usd else "")
                         + (f", ${self.estimate_usd:g} estimated for this step" if self.estimate_usd else "")
                         + f" of ${limit.max_cost_usd:g}")
        if limit.max_tokens is not None:
            parts.append(f"{self.spent_tokens} tokens spent of {limit.max_tokens}")
        return f"{limit.scope} would be passed ({'; '.join(parts)})"

    def facts(self) -> dict[str, Any]:
        return {"scope": scope_name(self.limit.step_id), "step_id": self.limit.step_id,
                "max_cost_usd": self.limit.max_cost_usd,
                "max_tokens": self.limit.max_tokens, "spent_usd": self.spent_usd, "reserved_usd": self.reserved_usd,
                "estimate_usd": self.estimate_usd, "spent_tokens": self.spent_tokens,
                "on_exceed": self.limit.on_exceed}


@dataclass(frozen=True)
class Verdict:
    """What the budgets say about a claimed step: nothing in the way (exceeded None), or the limit it
    would pass; and the budget approval a woken step waited on, if any."""

    exceeded: Exceeded | None = None
    approval: ApprovalRow | None = None
    raised: bool = False  # that approval was approved and its limit raised in this transaction


def budgets_of(definition: CompiledDefinition) -> list[tuple[str | None, Budget]]:
    """The definition's budgets: the process's (step None) and its agent tasks' own."""
    found: list[tuple[str | None, Budget]] = []
    if definition.process.budget is not None:
        found.append((None, definition.process.budget))
    for sid, step in definition.steps.items():
        budget = getattr(step.model, "budget", None)
        if budget is not None:
            found.append((sid, budget))
    return found


def insert_budgets(conn: Connection, instance_ids: list[int], definition: CompiledDefinition) -> None:
    """The budget rows of newly started instances (in their start's transaction)."""
    budgets = budgets_of(definition)
    if not budgets or not instance_ids:
        return
    clock = Clock(conn.dialect.name)
    conn.execute(insert(B).values(updated_at=clock.now), [
        {"instance_id": iid, "step_id": sid, "max_cost_usd": b.max_cost_usd, "max_tokens": b.max_tokens,
         "on_exceed": b.on_exceed, "approver": b.approver}
        for iid in instance_ids for sid, b in budgets])


def scope_is(step_id: str | None) -> ColumnElement[bool]:
    """The budget row of a scope: the process's (None) or a step's."""
    return B.c.step_id.is_(None) if step_id is None else B.c.step_id == step_id


def scope_name(step_id: str | None) -> str:
    return "process" if step_id is None else "step"


@dataclass
class Batch:
    """The steps one claim took (all `running` in its transaction), as the budget checks go through
    them one after another: those not checked yet, and those held back, reserve nothing; those let
    through reserve their estimates like any running step."""

    unchecked: set[int]
    held_back: set[int] = field(default_factory=set)

    @classmethod
    def of(cls, ids: list[int]) -> Batch:
        return cls(set(ids))


class BudgetChecks:
    def __init__(self, dialect_name: str) -> None:
        self.postgres = dialect_name == "postgresql"
        self.clock = Clock(dialect_name)
        self.approvals = ApprovalStatements(dialect_name)
        iid: BindParameter[int] = bindparam("iid")
        lock = select(I.c.cost_usd).where(I.c.id == iid)
        self.lock_instance = lock.with_for_update() if self.postgres else lock
        self.limits = select(B.c.step_id, B.c.max_cost_usd, B.c.max_tokens, B.c.raises).where(B.c.instance_id == iid)
        tokens = func.coalesce(func.sum(S.c.tokens_in + S.c.tokens_out), 0)
        self.step_spent = select(func.coalesce(func.sum(S.c.cost_usd), 0), tokens).where(
            S.c.instance_id == iid, S.c.step_id == bindparam("sid"))
        self.instance_tokens = select(tokens).where(S.c.instance_id == iid)
        self.running = select(S.c.id, S.c.step_id).where(S.c.instance_id == iid,
                                                         S.c.status == StepStatus.RUNNING.value)

    def check(self, conn: Connection, item: Claimed, definition: CompiledDefinition, step: CompiledStep,
              batch: Batch | None = None) -> Verdict:
        """The budgets' verdict on starting `item` now (in the claim's transaction); `batch`: the steps
        the same claim took, checked one after another."""
        batch = batch or Batch.of([item.id])
        batch.unchecked.discard(item.id)
        verdict = self._verdict(conn, item, definition, step, batch)
        if verdict.exceeded is not None or (verdict.approval is not None and not verdict.raised):
            batch.held_back.add(item.id)
        return verdict

    def _verdict(self, conn: Connection, item: Claimed, definition: CompiledDefinition, step: CompiledStep,
                 batch: Batch) -> Verdict:
        model = step.model
        assert isinstance(model, AgentTask)
        declared = {sid: b for sid, b in budgets_of(definition) if sid is None or sid == item.step_id}
        if not declared:
            return Verdict()
        spent_usd = float(conn.execute(self.lock_instance, {"iid": item.instance_id}).scalar_one())
        approval, raised = self._waited_on(conn, item), False
        if approval is not None and approval.status == "approved":
            raised = self._raise(conn, item, declared)
        elif approval is not None:
            return Verdict(approval=approval)  # pending, or refused: the step type decides what follows
        rows = {row.step_id: row for row in conn.execute(self.limits, {"iid": item.instance_id})}
        estimate = model.estimated_cost_usd or 0.0
        # What reserves: the steps running from earlier claims, and those this claim admitted before this one.
        running = [sid for rid, sid in conn.execute(self.running, {"iid": item.instance_id})
                   if rid != item.id and rid not in batch.unchecked and rid not in batch.held_back]
        for sid in sorted(declared, key=lambda s: s is None):  # the step's own budget first
            budget, row = declared[sid], rows.get(sid)
            limit = Limit(sid, row.max_cost_usd if row is not None else budget.max_cost_usd,
                          row.max_tokens if row is not None else budget.max_tokens,
                          budget.on_exceed, budget.approver, budget, row.raises if row is not None else 0)
            if sid is None:  # the instance's tokens are summed over its rows only when there is a limit
                cost = spent_usd
                tokens = int(conn.execute(self.instance_tokens, {"iid": item.instance_id}).scalar_one()) \
                    if limit.max_tokens is not None else 0
                others = running
            else:
                step_cost, step_tokens = conn.execute(self.step_spent, {"iid": item.instance_id, "sid": sid}).one()
                cost, tokens = float(step_cost), int(step_tokens)
                others = [r for r in running if r == sid]
            reserved = sum(_estimate(definition, r) for r in others)
            over_cost = limit.max_cost_usd is not None and (
                cost + reserved >= limit.max_cost_usd or cost + reserved + estimate > limit.max_cost_usd)
            over_tokens = limit.max_tokens is not None and tokens >= limit.max_tokens
            if over_cost or over_tokens:
                return Verdict(Exceeded(limit, cost, reserved, estimate, tokens), approval, raised)
        return Verdict(None, approval, raised)

    def _waited_on(self, conn: Connection, item: Claimed) -> ApprovalRow | None:
        """The budget approval this woken step waited on (an `ask`), if any."""
        state = item.input
        if not item.woken or not isinstance(state, dict) or "budget" not in state \
                or not isinstance(state.get("approval_id"), int):
            return None
        return self.approvals.get(conn, state["approval_id"])

    def _raise(self, conn: Connection, item: Claimed, declared: dict[str | None, Budget]) -> bool:
        """An approved ask: raise the limit it was about by the budget's own amounts. Once per approval,
        however often the step is claimed again (its state holds the raise's number)."""
        state = item.input
        step_id = state["budget"]  # None: the process's budget
        budget = declared.get(step_id)
        if budget is None:
            return False
        number = int(state.get("raise", 1))
        return bool(conn.execute(
            update(B).where(B.c.instance_id == item.instance_id, scope_is(step_id), B.c.raises < number)
            .values(max_cost_usd=B.c.max_cost_usd + (budget.max_cost_usd or 0),
                    max_tokens=B.c.max_tokens + (budget.max_tokens or 0), raises=number,
                    updated_at=self.clock.now)).rowcount)


def _estimate(definition: CompiledDefinition, step_id: str) -> float:
    step = definition.steps.get(step_id)
    return float(getattr(step.model, "estimated_cost_usd", None) or 0.0) if step is not None else 0.0
