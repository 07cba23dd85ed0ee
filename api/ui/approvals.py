"""The approval inbox of the signed-in approver: what is under review, quorum, due time, the decision form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, select
from starlette.responses import RedirectResponse, Response

from flowdb.approvals import APPROVAL_STATUSES, Vote, decide, get_approval, list_approvals
from flowdb.db.approvals import ApprovalRow, approver_key
from flowdb.db.instances import DefinitionCache, DefinitionUnloadable, instance_row
from flowdb.db.tables import approval_approvers as AA
from flowdb.db.tables import approvals as A
from flowdb.db.tables import step_instances as S

from .web import UiCall, UiError

DECISIONS = ("approve", "reject")
INBOX = 50  # approvals shown at once (pending: the soonest due)
MAX_COMMENT = 4000


@dataclass
class Reviewed:
    """A step whose output an approval is about (its `reviews:` step, else the steps it depends on)."""

    step_id: str
    status: str
    output: Any
    error: str | None


@dataclass
class InboxItem:
    approval: ApprovalRow
    votes: list[Vote]
    approved: int  # approving votes so far (of `quorum`)
    mine: str | None  # the signed-in approver's own decision, once given (the form is not shown again)
    process: str
    reviewed: list[Reviewed]


def _reviewed(engine: Engine, definitions: DefinitionCache, approval: ApprovalRow) -> tuple[str, list[Reviewed]]:
    with engine.connect() as conn:
        instance = instance_row(conn, approval.instance_id)
        try:
            model = definitions.get(conn, instance.definition_id).steps[approval.step_id].model
        except (DefinitionUnloadable, KeyError):
            return instance.process_name, []
        subjects = [model.reviews] if getattr(model, "reviews", None) else list(model.depends_on)
        if not subjects:
            return instance.process_name, []
        latest = (select(S.c.step_id, func.max(S.c.round).label("round"))
                  .where(S.c.instance_id == approval.instance_id, S.c.step_id.in_(subjects), S.c.item.is_(None))
                  .group_by(S.c.step_id).subquery())
        rows = conn.execute(select(S.c.step_id, S.c.status, S.c.output, S.c.error)
                            .join(latest, (latest.c.step_id == S.c.step_id) & (latest.c.round == S.c.round))
                            .where(S.c.instance_id == approval.instance_id, S.c.item.is_(None))).all()
    found = {row.step_id: Reviewed(row.step_id, row.status, row.output, row.error) for row in rows}
    return instance.process_name, [found[s] for s in subjects if s in found]


def _inbox(engine: Engine, definitions: DefinitionCache, identity: str, status: str) -> tuple[list[InboxItem], int]:
    """The approvals of `identity` in `status` (pending ones soonest due first), at most INBOX of them; and
    how many there are."""
    items = []
    with engine.connect() as conn:
        total = int(conn.execute(select(func.count()).select_from(A.join(AA, AA.c.approval_id == A.c.id))
                                 .where(AA.c.approver == approver_key(identity), A.c.status == status)).scalar_one())
    for approval in list_approvals(engine, approver=identity, status=status, limit=INBOX,
                                   due_first=status == "pending"):
        _, votes = get_approval(engine, approval.id)
        process, reviewed = _reviewed(engine, definitions, approval)
        approved = sum(1 for vote in votes if vote.decision == "approved")
        mine = next((vote.decision for vote in votes if approver_key(vote.approver) == approver_key(identity)), None)
        items.append(InboxItem(approval, votes, approved, mine, process, reviewed))
    return items, total


async def inbox(call: UiCall) -> Response:
    status = call.request.query_params.get("status", "pending")
    if status not in APPROVAL_STATUSES:
        raise UiError(422, f"status must be one of {', '.join(APPROVAL_STATUSES)}")
    items, total = await call.db(_inbox, call.reader, call.request.app.state.definitions, call.who.identity, status)
    done = call.request.query_params.get("done")
    return call.render("approvals.html", title="Approvals", items=items, total=total, current=status,
                       statuses=APPROVAL_STATUSES, done=done if done in ("approved", "rejected") else None)


async def decide_one(call: UiCall) -> Response:
    approval_id = call.path_id("approval_id")
    decision = call.field("decision")
    if decision not in DECISIONS:
        raise UiError(422, "choose Approve or Reject")
    comment = call.field("comment").strip() or None
    if comment is not None and len(comment) > MAX_COMMENT:
        raise UiError(422, f"the comment is longer than {MAX_COMMENT} characters")
    # As in the API: the decider is the signed-in identity; an approval that does not list it does not exist.
    await call.db(decide, call.engine, approval_id, decision, call.who.identity, comment,
                  sees_all=call.who.has("operator"), wakeups=call.wakeups)
    return RedirectResponse(f"/ui/approvals?done={decision}d", status_code=303)
