"""The HTTP API through a real uvicorn server and httpx, on both databases: each route's success and
failure paths, the authorization matrix, body limits, and concurrent decisions."""

from __future__ import annotations

import asyncio
import select
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from flowdb.agents.registry import AgentRegistry
from flowdb.tokens import Principal, create_token, revoke_token
from flowdb.worker import Worker, WorkerOptions

from apiserver import ApiServer, api_for, assert_problem, client
from conftest import EXAMPLES, Database
from helpers import approval_rows, drive

REVIEWED = (EXAMPLES / "reviewed-report.yaml").read_text()
MANAGER = "manager@company.com"


def deploy_reviewed(http: httpx.Client) -> None:
    response = http.post("/v1/definitions", content=REVIEWED, headers={"content-type": "application/yaml"})
    assert response.status_code in (200, 201), response.text


def drive_until_waiting(server: ApiServer) -> None:
    """Work in-process until every approval is notified."""
    def parked() -> bool:
        rows = approval_rows(server.engine)
        return bool(rows) and all(r.notified_at is not None for r in rows)

    drive(server.engine, parked, EXAMPLES / "agents.yaml")


def test_definitions(api_server: ApiServer) -> None:
    with client(api_server) as http:
        created = http.post("/v1/definitions", content=REVIEWED, headers={"content-type": "application/yaml"})
        assert created.status_code == 201
        body = created.json()
        assert (body["name"], body["version"], body["created"]) == ("reviewed-report", 1, True)
        assert len(body["content_hash"]) == 64
        again = http.post("/v1/definitions", content=REVIEWED, headers={"content-type": "application/yaml"})
        assert again.status_code == 200 and again.json()["created"] is False and again.json()["version"] == 1

        bad = http.post("/v1/definitions?filename=mine.yaml", content=REVIEWED.replace("depends_on: [draft]",
                                                                                       "depends_on: [drafts]"),
                        headers={"content-type": "application/yaml"})
        problem = assert_problem(bad, 422, "mine.yaml:")
        error = problem["errors"][0]
        assert error["file"] == "mine.yaml" and error["line"] == 12 and "'drafts'" in error["message"], error
        assert error["location"].startswith("mine.yaml:12:20:")
        assert_problem(http.post("/v1/definitions", content="process: [", headers={"content-type": "text/yaml"}),
                       422)
        assert_problem(http.post("/v1/definitions", content=b"\xff\xfe", headers={"content-type": "text/yaml"}),
                       422, "not UTF-8")
        assert_problem(http.post("/v1/definitions", json={"process": {}}), 415, "application/yaml")

        listed = http.get("/v1/definitions").json()["items"]
        assert [(d["name"], d["latest_version"], d["versions"]) for d in listed] == [("reviewed-report", 1, 1)]
        detail = http.get("/v1/definitions/reviewed-report").json()
        assert detail["latest_version"] == 1 and [v["version"] for v in detail["versions"]] == [1]
        version = http.get("/v1/definitions/reviewed-report/versions/1").json()
        assert version["source"] == REVIEWED and version["parsed"]["name"] == "reviewed-report"
        assert_problem(http.get("/v1/definitions/nope"), 404, "'nope' is not deployed")
        assert_problem(http.get("/v1/definitions/reviewed-report/versions/9"), 404, "has no version 9")


@pytest.mark.slow
def test_instances_start_list_show_events_cancel(api_server: ApiServer) -> None:
    with client(api_server) as http:
        deploy_reviewed(http)
        started = http.post("/v1/processes/reviewed-report/instances", json={"inputs": {}},
                            headers={"Idempotency-Key": "order-1"})
        assert started.status_code == 201, started.text
        instance = started.json()
        assert instance["status"] == "running" and instance["trigger"] == "api"
        assert {s["step_id"]: s["status"] for s in instance["steps"]} == {
            "draft": "ready", "review": "pending", "publish": "pending"}
        repeat = http.post("/v1/processes/reviewed-report/instances", json={"inputs": {}},
                           headers={"Idempotency-Key": "order-1"})
        assert repeat.status_code == 200 and repeat.json()["id"] == instance["id"]
        topical = REVIEWED.replace("name: reviewed-report", "name: topical\n  inputs: {topic: {type: string}}")
        assert http.post("/v1/definitions", content=topical, headers={"content-type": "text/yaml"}).status_code == 201
        first = http.post("/v1/processes/topical/instances", json={"inputs": {"topic": "a"}},
                          headers={"Idempotency-Key": "order-2"})
        assert first.status_code == 201, first.text
        assert_problem(http.post("/v1/processes/topical/instances", json={"inputs": {"topic": "b"}},
                                 headers={"Idempotency-Key": "order-2"}), 409, "order-2")
        assert_problem(http.post("/v1/processes/topical/instances", json={"inputs": {"topic": "a"}},
                                 headers={"Idempotency-Key": "order-1"}), 409, "order-1")
        assert_problem(http.post("/v1/processes/nope/instances", json={}), 404, "is not deployed")
        assert_problem(http.post("/v1/processes/reviewed-report/instances", json={"inputs": {"x": 1}}), 422)
        assert_problem(http.post("/v1/processes/reviewed-report/instances", json={"inputs": [], "extra": 1}), 422)
        assert_problem(http.post("/v1/processes/reviewed-report/instances", content=b"{not json",
                                 headers={"content-type": "application/json"}), 400, "not valid JSON")

        ids = [instance["id"]] + [http.post("/v1/processes/reviewed-report/instances", json={}).json()["id"]
                                  for _ in range(4)]
        page = http.get("/v1/instances", params={"limit": 2, "process": "reviewed-report"}).json()
        assert [i["id"] for i in page["items"]] == sorted(ids, reverse=True)[:2]
        seen = [i["id"] for i in page["items"]]
        while page["next_cursor"]:
            page = http.get("/v1/instances", params={"limit": 2, "cursor": page["next_cursor"],
                                                     "process": "reviewed-report"}).json()
            seen += [i["id"] for i in page["items"]]
        assert seen == sorted(ids, reverse=True)
        assert http.get("/v1/instances", params={"status": "completed"}).json()["items"] == []
        assert len(http.get("/v1/instances", params={"process": "reviewed-report"}).json()["items"]) == 5
        assert len(http.get("/v1/instances", params={"process": "topical"}).json()["items"]) == 1
        assert_problem(http.get("/v1/instances", params={"status": "nope"}), 422)
        assert_problem(http.get("/v1/instances", params={"cursor": "garbage"}), 422, "cursor")
        assert_problem(http.get("/v1/instances", params={"limit": 0}), 422)

        shown = http.get(f"/v1/instances/{ids[0]}").json()
        assert shown["id"] == ids[0] and len(shown["steps"]) == 3
        assert_problem(http.get("/v1/instances/999999"), 404, "instance 999999 does not exist")
        events = http.get(f"/v1/instances/{ids[0]}/events").json()["items"]
        assert [e["type"] for e in events][:2] == ["instance.started", "step.ready"]

        cancelled = http.post(f"/v1/instances/{ids[1]}/cancel")
        assert cancelled.status_code == 200 and sorted(cancelled.json()["cancelled_steps"]) == [
            "draft", "publish", "review"]
        assert_problem(http.post(f"/v1/instances/{ids[1]}/cancel"), 409, "already cancelled")
        assert_problem(http.post("/v1/instances/999999/cancel"), 404)
        assert http.get(f"/v1/instances/{ids[1]}").json()["status"] == "cancelled"


FAILING = """
process:
  name: fails-once
  steps:
    - {id: first, type: agent_task, agent: flaky, message: "go", retry: {max_attempts: 2, initial_interval: 0.01s}}
    - {id: second, type: agent_task, agent: echo, message: "after {{steps.first.output}}", depends_on: [first]}
"""


def test_retry_a_failed_step(api_server: ApiServer) -> None:
    from sqlalchemy import select

    from flowdb.db.tables import process_instances

    with client(api_server) as http:
        assert http.post("/v1/definitions", content=FAILING, headers={"content-type": "text/yaml"}).status_code == 201
        iid = http.post("/v1/processes/fails-once/instances", json={}).json()["id"]
        worker = Worker(api_server.engine, AgentRegistry.from_file(Path(__file__).parent / "agents.yaml"),
                        WorkerOptions(poll_seconds=0.05))

        def done() -> bool:
            with api_server.engine.connect() as conn:
                return conn.execute(select(process_instances.c.status)
                                    .where(process_instances.c.id == iid)).scalar_one() != "running"

        asyncio.run(asyncio.wait_for(worker.run(until=done), 30))
        failed = http.get(f"/v1/instances/{iid}").json()
        assert failed["status"] == "failed"
        assert {s["step_id"]: s["status"] for s in failed["steps"]} == {"first": "failed", "second": "cancelled"}
        assert_problem(http.post(f"/v1/instances/{iid}/steps/second/retry"), 409, "only failed steps")
        assert_problem(http.post(f"/v1/instances/{iid}/steps/nope/retry"), 404, "has no step 'nope'")
        retried = http.post(f"/v1/instances/{iid}/steps/first/retry")
        assert retried.status_code == 200 and retried.json() == {"id": iid, "status": "running", "step_id": "first",
                                                                 "step_status": "ready"}
        asyncio.run(asyncio.wait_for(worker.run(until=done), 30))
        final = http.get(f"/v1/instances/{iid}").json()
        assert final["status"] == "completed"
        assert {s["step_id"]: (s["status"], s["attempt"]) for s in final["steps"]} == {
            "first": ("completed", 3), "second": ("completed", 1)}


def test_unknown_query_parameters_are_refused(api_server: ApiServer) -> None:
    with client(api_server) as http:
        body = assert_problem(http.get("/v1/instances", params={"statu": "failed"}), 422, "'statu'")
        assert "did you mean 'status'" in body["detail"] and "it takes cursor, limit, process, status" in body["detail"]
        assert_problem(http.get("/v1/definitions", params={"x": "1"}), 422, "it takes none")
        assert_problem(http.get("/v1/events/stream", params={"instance_id": "1"}), 422, "did you mean 'instance'")
        assert http.get("/v1/instances", params={"status": "failed"}).status_code == 200


def test_cancel_one_step(api_server: ApiServer) -> None:
    with client(api_server) as http:
        deploy_reviewed(http)
        iid = http.post("/v1/processes/reviewed-report/instances", json={}).json()["id"]
        drive_until_waiting(api_server)
        cancelled = http.post(f"/v1/instances/{iid}/steps/review/cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json() == {"id": iid, "step_id": "review", "step_status": "cancelled"}
        shown = http.get(f"/v1/instances/{iid}").json()
        # The review's only successor is skipped (no parent completed): nothing is left, so it completes.
        assert {s["step_id"]: s["status"] for s in shown["steps"]} == {
            "draft": "completed", "review": "cancelled", "publish": "skipped"}
        assert shown["status"] == "completed"
        assert [a.status for a in approval_rows(api_server.engine)] == ["cancelled"]
        step = next(s for s in shown["steps"] if s["step_id"] == "review")
        assert step["round"] == 1 and step["item"] is None and isinstance(step["id"], int)
        events = http.get(f"/v1/instances/{iid}/events").json()["items"]
        types = [e["type"] for e in events]
        assert "approval.cancelled" in types and types[-1] == "instance.completed"
        # Each event names its step (and round and item); instance events name none.
        cancelled = next(e for e in events if e["type"] == "step.cancelled")
        assert (cancelled["step_id"], cancelled["round"], cancelled["item"]) == ("review", 1, None)
        assert cancelled["step_instance_id"] == step["id"]
        assert {e["step_id"] for e in events if e["type"].startswith("instance.")} == {None}
        assert_problem(http.post(f"/v1/instances/{iid}/steps/review/cancel"), 409, "running")
        other = http.post("/v1/processes/reviewed-report/instances", json={}).json()["id"]
        assert_problem(http.post(f"/v1/instances/{other}/steps/nope/cancel"), 404, "has no step 'nope'")
        assert_problem(http.post("/v1/instances/999999/steps/draft/cancel"), 404)


def test_approvals_inbox_show_and_decide(api_server: ApiServer) -> None:
    with client(api_server) as admin:
        deploy_reviewed(admin)
        iid = admin.post("/v1/processes/reviewed-report/instances", json={}).json()["id"]
    drive_until_waiting(api_server)
    with client(api_server, "approver", MANAGER) as manager, client(api_server, "approver", "eve@company.com") as eve:
        [approval] = manager.get("/v1/approvals").json()["items"]
        assert approval["instance_id"] == iid and approval["approvers"] == [MANAGER]
        assert eve.get("/v1/approvals").json()["items"] == []
        assert manager.get("/v1/approvals", params={"status": "approved"}).json()["items"] == []
        assert_problem(manager.get("/v1/approvals", params={"status": "nope"}), 422)
        shown = manager.get(f"/v1/approvals/{approval['id']}").json()
        assert shown["votes"] == [{"approver": MANAGER, "decision": None, "comment": None, "decided_at": None}]
        assert_problem(eve.get(f"/v1/approvals/{approval['id']}"), 404)
        assert_problem(manager.get("/v1/approvals/999999"), 404)

        url = f"/v1/approvals/{approval['id']}/decision"
        assert eve.post(url, json={"decision": "approve"}).json() == assert_problem(
            eve.get(f"/v1/approvals/{approval['id']}"), 404)  # not hers: it does not exist, as for GET
        assert_problem(manager.post(url, json={"decision": "maybe"}), 422)
        assert_problem(manager.post(url, json={"decision": "approve", "decided_by": "x"}), 422)
        assert_problem(manager.post("/v1/approvals/999999/decision", json={"decision": "approve"}), 404)
        decided = manager.post(url, json={"decision": "approve", "comment": "ship it"})
        assert decided.status_code == 200, decided.text
        body = decided.json()
        assert body["decided"] is True and body["approvals_needed"] == 0
        assert (body["approval"]["status"], body["approval"]["decided_by"], body["approval"]["comment"]) == (
            "approved", MANAGER, "ship it")
        assert_problem(manager.post(url, json={"decision": "reject"}), 409, f"already approved by {MANAGER}")


def test_bodies_over_the_limit_get_413_without_being_read(db: Database) -> None:
    with api_for(db, api_max_body_bytes=64 * 1024) as server:
        token = server.token("admin")
        host, port = server.url.removeprefix("http://").split(":")
        # Content-Length of 100 MB: refused from the header, before any body byte is sent.
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall((f"POST /v1/definitions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                          f"Content-Type: application/yaml\r\nContent-Length: {100 * 1024 * 1024}\r\n\r\n").encode())
            head = sock.recv(65536).decode(errors="replace")
        assert head.startswith("HTTP/1.1 413"), head
        # Chunked (no Content-Length): counted while streaming. The 413 arrives while the client is
        # still sending, long before the 100 MB are through.
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall((f"POST /v1/processes/reviewed-report/instances HTTP/1.1\r\nHost: {host}\r\n"
                          f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                          "Transfer-Encoding: chunked\r\n\r\n").encode())
            block = b"x" * (1024 * 1024)
            chunk = f"{len(block):x}\r\n".encode() + block + b"\r\n"
            sent = 0
            answer = b""
            while sent < 100 * len(block):
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    answer = sock.recv(65536)
                    break
                try:
                    sock.sendall(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += len(block)
            if not answer:
                answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert sent < 20 * len(block), f"the server let {sent} bytes through before answering"


ROUTES: list[tuple[str, str, str, dict[str, Any]]] = [
    # method, path, least role, request kwargs
    ("POST", "/v1/definitions", "admin", {"content": REVIEWED, "headers": {"content-type": "application/yaml"}}),
    ("GET", "/v1/definitions", "viewer", {}),
    ("GET", "/v1/definitions/reviewed-report", "viewer", {}),
    ("GET", "/v1/definitions/reviewed-report/versions/1", "viewer", {}),
    ("POST", "/v1/processes/reviewed-report/instances", "operator", {"json": {}}),
    ("GET", "/v1/instances", "viewer", {}),
    ("GET", "/v1/instances/{iid}", "viewer", {}),
    ("GET", "/v1/instances/{iid}/events", "viewer", {}),
    ("POST", "/v1/instances/{cancel_iid}/cancel", "operator", {}),
    ("POST", "/v1/instances/{cancel_iid}/steps/draft/cancel", "operator", {}),
    ("POST", "/v1/instances/{iid}/steps/draft/retry", "operator", {}),
    ("GET", "/v1/approvals", "approver", {}),
    ("GET", "/v1/approvals/{aid}", "approver", {}),
    ("POST", "/v1/approvals/{aid}/decision", "approver", {"json": {"decision": "reject"}}),
]
ROLES = ["viewer", "approver", "operator", "admin"]


@pytest.mark.slow
def test_authorization_matrix(api_server: ApiServer) -> None:
    """Every route × {no token, bad token, revoked, viewer, approver, operator, admin}."""
    with client(api_server) as admin:
        deploy_reviewed(admin)
        iid = admin.post("/v1/processes/reviewed-report/instances", json={}).json()["id"]
    drive_until_waiting(api_server)
    with client(api_server, "approver", MANAGER) as manager:
        [approval] = manager.get("/v1/approvals").json()["items"]
    revoked_id, revoked = create_token(api_server.engine, MANAGER, "admin")
    revoke_token(api_server.engine, revoked_id)
    tokens = {role: api_server.token(role, MANAGER) for role in ROLES}
    credentials = {"none": None, "bad": "fdb_not-a-real-token", "revoked": revoked, **tokens}
    outcomes: Counter[str] = Counter()
    for method, path, least, kwargs in ROUTES:
        for who, token in credentials.items():
            cancel_iid = None
            if "{cancel_iid}" in path:
                with client(api_server) as admin:
                    cancel_iid = admin.post("/v1/processes/reviewed-report/instances", json={}).json()["id"]
            url = path.format(iid=iid, aid=approval["id"], cancel_iid=cancel_iid)
            headers = dict(kwargs.get("headers", {}))
            if token is not None:
                headers["Authorization"] = f"Bearer {token}"
            args = {k: v for k, v in kwargs.items() if k != "headers"}
            response = httpx.request(method, api_server.url + url, headers=headers, timeout=30, **args)
            label = f"{method} {path} as {who}"
            if who in ("none", "bad", "revoked"):
                assert response.status_code == 401, label
                assert response.headers["www-authenticate"].startswith("Bearer"), label
            elif not Principal(0, MANAGER, who).has(least):  # a viewer reads, an approver decides
                assert_problem(response, 403, f"needs the {least} role")
            else:
                # Allowed: whatever the route answers, it is not an authorization refusal.
                assert response.status_code not in (401, 403), (label, response.text)
            outcomes[str(response.status_code)] += 1
    assert outcomes["401"] == 3 * len(ROUTES)


def test_a_listed_approver_cannot_decide_someone_elses_approval(api_server: ApiServer) -> None:
    two = REVIEWED.replace("name: reviewed-report", "name: other-report").replace(MANAGER, "lead@company.com")
    with client(api_server) as admin:
        deploy_reviewed(admin)
        admin.post("/v1/definitions", content=two, headers={"content-type": "application/yaml"})
        admin.post("/v1/processes/reviewed-report/instances", json={})
        admin.post("/v1/processes/other-report/instances", json={})
    drive_until_waiting(api_server)
    with client(api_server, "approver", MANAGER) as manager, client(api_server, "approver", "lead@company.com") as lead:
        [mine] = manager.get("/v1/approvals").json()["items"]
        [theirs] = lead.get("/v1/approvals").json()["items"]
        assert mine["id"] != theirs["id"]
        hidden = assert_problem(manager.get(f"/v1/approvals/{theirs['id']}"), 404)
        assert manager.post(f"/v1/approvals/{theirs['id']}/decision", json={"decision": "approve"}).json() == hidden
        assert lead.get(f"/v1/approvals/{theirs['id']}").json()["status"] == "pending"


@pytest.mark.slow
def test_fifty_concurrent_decisions_over_http(db: Database) -> None:
    approvers = [f"a{i}@x.com" for i in range(50)]
    definition = REVIEWED.replace(f"approvers: [{MANAGER}]", f"approvers: [{', '.join(approvers)}]")
    with api_for(db) as server:
        with client(server) as admin:
            assert admin.post("/v1/definitions", content=definition,
                              headers={"content-type": "application/yaml"}).status_code == 201
            admin.post("/v1/processes/reviewed-report/instances", json={})
        drive_until_waiting(server)
        tokens = [server.token("approver", a) for a in approvers]
        with client(server, "approver", approvers[0]) as first:
            [approval] = first.get("/v1/approvals").json()["items"]

        async def race() -> list[int]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
                start = time.monotonic()
                responses = await asyncio.gather(*[
                    http.post(f"/v1/approvals/{approval['id']}/decision", json={"decision": "approve"},
                              headers={"Authorization": f"Bearer {t}"}) for t in tokens])
                assert time.monotonic() - start < 60
                return [r.status_code for r in responses]

        statuses = asyncio.run(race())
        assert Counter(statuses) == {200: 1, 409: 49}


@pytest.mark.parametrize("path", ["/v1/instances/abc", "/v1/nope"])
def test_unknown_paths_are_problems_not_500(api_server: ApiServer, path: str) -> None:
    with client(api_server) as http:
        assert_problem(http.get(path), 404)
