"""for_each (R7): a step that runs once per element of a list, each run an item row of its own.

The step's own row is claimed first: its list is computed (off the event loop, under the template
limits) and, in the completion's transaction, one row per element is inserted (`item` = its index,
`item_value` = the element), the first `max_parallel` of them ready (all, without a limit), the
rest pending; the own row then waits, counting its items down in `items_left`. Items are claimed,
leased, retried and reported like any step, in index order. Each finished item counts the own row
down by one (O(1), no scan of its siblings), starts the next pending item, and wakes the own row
when it was the last one (or at every item when there is a `complete_when` to evaluate). The woken
own row gathers: the item outputs in item order become its output and it settles like any step,
so its successors go on. An empty list completes at once with `[]` and no item. An item that fails
for good fails the step and its instance.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BindParameter, Boolean, Connection, bindparam, case, insert, literal, select, true, update

from flowdb.db.claims import LEASE_DROPPED
from flowdb.db.clock import Clock
from flowdb.db.tables import step_instances
from flowdb.engine.status import OPEN_STEP, StepStatus, sql_in, word
from flowdb.errors import TemplateError
from flowdb.models import effective_retry
from flowdb.outcomes import Outcome
from flowdb.steptypes.base import StepContext

S = step_instances
MAX_ITEMS = 100_000  # items of one for_each step


def is_own_row(ctx: StepContext) -> bool:
    """The claimed row is a for_each step's own row (not one of its items)."""
    return ctx.step.model.for_each is not None and ctx.claimed.item is None


def needs_render(ctx: StepContext) -> bool:
    """Whether this turn evaluates user expressions (the list, or complete_when)."""
    if not is_own_row(ctx):
        return False
    return ctx.step.complete_when is not None if ctx.claimed.woken else ctx.step.for_each is not None


def decide(ctx: StepContext) -> Outcome:
    """The own row's turn: expand the list (first claim) or gather the items (woken by them)."""
    if ctx.claimed.woken:
        return _gather(ctx)
    model, claimed = ctx.step.model, ctx.claimed
    if isinstance(model.for_each, list):
        values = model.for_each
    else:
        assert ctx.step.for_each is not None  # compiled from the expression
        values = ctx.step.for_each.value(ctx.templates)
    if isinstance(values, dict | str) or not hasattr(values, "__iter__"):
        raise TemplateError(f"for_each of step {claimed.step_id!r} gave {type(values).__name__} "
                            f"{str(values)[:80]!r}, not a list")
    values = list(values)
    if len(values) > MAX_ITEMS:
        raise TemplateError(f"for_each of step {claimed.step_id!r} gave {len(values)} items, more than the limit "
                            f"of {MAX_ITEMS}; split the list")
    if not values:
        return Outcome(claimed, "completed", output=[], input={"items": 0})
    return Outcome(claimed, "waiting", expand=values, input={"items": len(values)})


def _gather(ctx: StepContext) -> Outcome:
    claimed = ctx.claimed
    items: list[dict[str, Any]] = ctx.items or []
    outputs = [i["output"] if i["status"] == StepStatus.COMPLETED else None for i in items]
    done = sum(i["status"] not in OPEN_STEP for i in items)
    given = {"items": len(items)}
    if done == len(items):
        return Outcome(claimed, "completed", output=outputs, input=given)
    condition = ctx.step.complete_when
    if condition is not None:
        completed = sum(i["status"] == StepStatus.COMPLETED for i in items)
        if condition.evaluate({**ctx.templates, "items": items, "completed": completed, "total": len(items)}):
            return Outcome(claimed, "completed", output=outputs, cancel_items=bool(ctx.step.model.cancel_remaining),
                           input={**given, "complete_when": condition.source, "completed": completed})
    return Outcome(claimed, "waiting", input=given)


class ForEachStatements:
    def __init__(self, dialect_name: str) -> None:
        clock = Clock(dialect_name)
        self.clock = clock
        own = (S.c.instance_id == bindparam("iid"), S.c.step_id == bindparam("step"), S.c.round == bindparam("rnd"))
        new_item = insert(S).values(created_at=clock.now)
        self.insert_pending = new_item
        self.insert_ready = new_item.values(ready_at=clock.now, claimable_at=clock.now).returning(S.c.id)
        waiting = word(StepStatus.WAITING)
        self.park_own = (
            update(S).where(S.c.id == bindparam("sid"), S.c.lease_token == bindparam("token"),
                            S.c.status == word(StepStatus.RUNNING))
            .values(status=waiting, input=bindparam("input"), claimable_at=None, items_total=bindparam("n"),
                    items_left=bindparam("n"), woken=true(), **LEASE_DROPPED)
        )
        # A gather that found items still open waits again; at once if more finished meanwhile.
        seen: BindParameter[int] = bindparam("seen")
        self.park_again = (
            update(S).where(S.c.id == bindparam("sid"), S.c.lease_token == bindparam("token"),
                            S.c.status == word(StepStatus.RUNNING))
            .values(status=waiting, input=bindparam("input"), **LEASE_DROPPED,
                    claimable_at=case((S.c.items_left < seen, clock.now), else_=None))
        )
        wakes = (S.c.status == waiting) & ((S.c.items_left == literal(1)) | bindparam("wake", type_=Boolean))
        self.count_down = (
            update(S).where(*own, S.c.item.is_(None))
            .values(items_left=S.c.items_left - literal(1), claimable_at=case((wakes, clock.now),
                                                                               else_=S.c.claimable_at))
            .returning(S.c.status, S.c.claimable_at.is_not(None))
        )
        next_pending = (select(S.c.id).where(*own, S.c.item.is_not(None), S.c.status == word(StepStatus.PENDING))
                        .order_by(S.c.item).limit(1).scalar_subquery())
        self.start_next = (update(S).where(S.c.id == next_pending)
                           .values(status=word(StepStatus.READY), ready_at=clock.now, claimable_at=clock.now)
                           .returning(S.c.id))
        self.items = select(S.c.item, S.c.status, S.c.output, S.c.item_value).where(
            *own, S.c.item.is_not(None)).order_by(S.c.item)
        self.open_items = select(S.c.id).where(*own, S.c.item.is_not(None),
                                               sql_in("step_instances.status", OPEN_STEP))
        self.fail_own = (update(S).where(*own, S.c.item.is_(None), sql_in("step_instances.status", OPEN_STEP))
                         .values(status=word(StepStatus.FAILED), error=bindparam("error"),
                                 error_type=bindparam("etype"), finished_at=clock.now, claimable_at=None))

    def load_items(self, conn: Connection, instance_id: int, step_id: str, round_: int) -> list[dict[str, Any]]:
        """The items as complete_when sees them, in index order."""
        return [{"index": r.item, "item": r.item_value, "status": r.status, "output": r.output}
                for r in conn.execute(self.items, {"iid": instance_id, "step": step_id, "rnd": round_})]

    def expand(self, conn: Connection, o: Outcome, step_type: str, model: Any) -> tuple[int, list[int]]:
        """Insert the item rows and park the own row on them: (items, ids of the items made ready)."""
        values = o.expand or []
        claimed = o.step
        retry = effective_retry(model)
        limit = model.max_parallel or len(values)
        rows = [{"instance_id": claimed.instance_id, "definition_id": claimed.definition_id, "step_id": claimed.step_id,
                 "type": step_type, "status": (StepStatus.READY if i < limit else StepStatus.PENDING).value,
                 "round": claimed.round, "item": i, "item_value": value,
                 "max_attempts": retry.max_attempts if retry else 1, "agent": getattr(model, "agent", None)}
                for i, value in enumerate(values)]
        conn.execute(self.park_own, {"sid": claimed.id, "token": claimed.lease_token, "input": o.input,
                                     "n": len(values)})
        ready = list(conn.execute(self.insert_ready, rows[:limit]).scalars())
        if rows[limit:]:
            conn.execute(self.insert_pending, rows[limit:])
        return len(values), ready

    def item_finished(self, conn: Connection, claimed: Any, wake_every_item: bool, limited: bool
                      ) -> tuple[bool, list[int]]:
        """Count the own row down by one finished item; start the next pending one (with max_parallel).
        Whether that woke the own row, and the ids of the items made ready."""
        key = {"iid": claimed.instance_id, "step": claimed.step_id, "rnd": claimed.round}
        row = conn.execute(self.count_down, {**key, "wake": wake_every_item}).first()
        woke = row is not None and row[0] == StepStatus.WAITING and bool(row[1])
        return woke, (list(conn.execute(self.start_next, key).scalars()) if limited else [])
