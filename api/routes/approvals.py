"""Approvals: the caller's inbox, one approval, and deciding it as the token's identity."""

from __future__ import annotations

from sqlalchemy import Engine
from starlette.responses import Response

from flowdb.approvals import APPROVAL_STATUSES, decide, get_approval, list_approvals, not_found
from flowdb.db.approvals import approver_key
from flowdb.tokens import Principal

from ..convert import approval_out
from ..endpoints import Call, Endpoint, Query, json_response
from ..problems import ApiError
from ..schemas import ApprovalList, ApprovalOut, DecisionIn, DecisionOut


def _may_see(principal: Principal, approvers: list[str]) -> bool:
    """Operators see every approval; an approver only those that list them."""
    return principal.has("operator") or approver_key(principal.identity) in {approver_key(a) for a in approvers}


async def inbox(call: Call) -> Response:
    status = call.request.query_params.get("status", "pending")
    if status not in APPROVAL_STATUSES:
        raise ApiError(422, f"status must be one of {', '.join(APPROVAL_STATUSES)}", kind="invalid-query")
    rows = await call.db(list_approvals, call.engine, approver=call.who.identity, status=status)
    return json_response(ApprovalList(items=[approval_out(r) for r in rows]))


async def show(call: Call) -> Response:
    approval_id = call.path_int("approval_id")
    approval, votes = await call.db(get_approval, call.engine, approval_id)
    if not _may_see(call.who, approval.approvers):
        raise not_found(approval_id)  # as for an id that does not exist: nothing of others' approvals leaks
    return json_response(approval_out(approval, votes))


async def decision(call: Call) -> Response:
    approval_id = call.path_int("approval_id")
    body = await call.body(DecisionIn)

    def run(engine: Engine) -> DecisionOut:
        # The decider is the token's identity, never a field of the body. To an approver token, an approval
        # that does not list it does not exist (404, as GET answers); an operator is told it is not an approver.
        result = decide(engine, approval_id, body.decision, call.who.identity, body.comment,
                        sees_all=call.who.has("operator"), wakeups=call.wakeups)
        _, votes = get_approval(engine, approval_id)
        return DecisionOut(approval=approval_out(result.approval, votes), decided=result.decided,
                           approvals_needed=result.approvals_needed)

    return json_response(await call.db(run, call.engine))  # NotAnApprover → 403 (operators), AlreadyDecided → 409


ENDPOINTS = [
    Endpoint("GET", "/v1/approvals", inbox, "The caller's approvals (default: pending)", "approver", "approvals",
             responses={200: ApprovalList}, errors=(422,),
             query=(Query("status", {"type": "string", "enum": list(APPROVAL_STATUSES)}, "default: pending"),)),
    Endpoint("GET", "/v1/approvals/{approval_id:int}", show, "One approval with each approver's decision",
             "approver", "approvals", responses={200: ApprovalOut}, errors=(404,)),
    Endpoint("POST", "/v1/approvals/{approval_id:int}/decision", decision,
             "Decide as the token's identity (one of the approvers; to anyone else the approval does not exist)",
             "approver", "approvals", body=DecisionIn, responses={200: DecisionOut}, errors=(404, 409)),
]
