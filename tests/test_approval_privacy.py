"""Deciding an approval that does not list the caller (issue 20, point 12): to an approver token it does
not exist (the same 404 as GET), and the attempt writes nothing; an operator is told who the approvers are."""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import func, select

from flowdb.db.tables import approval_approvers, approvals, events

from apiserver import ApiServer
from conftest import EXAMPLES
from helpers import approval_rows, drive

MANAGER = "manager@company.com"


def _state(server: ApiServer) -> tuple[int, list[Any], list[Any]]:
    with server.engine.connect() as conn:
        return (conn.execute(select(func.count()).select_from(events)).scalar_one(),
                list(conn.execute(select(approvals).order_by(approvals.c.id))),
                list(conn.execute(select(approval_approvers).order_by(approval_approvers.c.approver))))


def test_a_strangers_decision_is_a_404_like_the_read_and_writes_nothing(api_server: ApiServer) -> None:
    url = api_server.url
    admin = api_server.auth("admin")
    deployed = httpx.post(f"{url}/v1/definitions", content=(EXAMPLES / "reviewed-report.yaml").read_text(),
                          headers={**admin, "content-type": "application/yaml"}, timeout=30)
    assert deployed.status_code == 201, deployed.text
    iid = httpx.post(f"{url}/v1/processes/reviewed-report/instances", json={}, headers=admin, timeout=30).json()["id"]
    drive(api_server.engine, lambda: any(r.notified_at is not None for r in approval_rows(api_server.engine)),
          EXAMPLES / "agents.yaml")
    [row] = approval_rows(api_server.engine)
    assert row.instance_id == iid
    eve = api_server.auth("approver", "eve@company.com")
    before = _state(api_server)

    read = httpx.get(f"{url}/v1/approvals/{row.id}", headers=eve, timeout=30)
    assert read.status_code == 404
    assert read.json() == {"type": "https://flowdb.dev/problems/not-found", "title": "Not Found", "status": 404,
                           "detail": f"approval {row.id} does not exist"}
    for decision in ("approve", "reject") * 10:  # an approver token cannot grow the events table
        attempt = httpx.post(f"{url}/v1/approvals/{row.id}/decision", json={"decision": decision}, headers=eve,
                             timeout=30)
        assert (attempt.status_code, attempt.headers["content-type"], attempt.json()) == (
            404, read.headers["content-type"], read.json())
    # An id that does not exist answers the same way (only the id differs).
    missing = httpx.post(f"{url}/v1/approvals/{row.id + 1000}/decision", json={"decision": "approve"}, headers=eve,
                         timeout=30)
    assert missing.json() == {**read.json(), "detail": f"approval {row.id + 1000} does not exist"}
    assert _state(api_server) == before

    # An operator sees every approval, so it is told why it cannot decide this one; that writes nothing either.
    operator = api_server.auth("operator", "ops@company.com")
    refused = httpx.post(f"{url}/v1/approvals/{row.id}/decision", json={"decision": "approve"}, headers=operator,
                         timeout=30)
    assert (refused.status_code, refused.json()["type"], refused.json()["detail"]) == (
        403, "https://flowdb.dev/problems/not-an-approver",
        f"ops@company.com is not an approver of approval {row.id} (approvers: {MANAGER})")
    assert _state(api_server) == before

    decided = httpx.post(f"{url}/v1/approvals/{row.id}/decision", json={"decision": "approve"},
                         headers=api_server.auth("approver", MANAGER), timeout=30)
    assert decided.status_code == 200 and decided.json()["approval"]["status"] == "approved", decided.text
    late = httpx.post(f"{url}/v1/approvals/{row.id}/decision", json={"decision": "reject"}, headers=eve, timeout=30)
    assert late.json() == read.json()  # decided or not, still nothing to a stranger
