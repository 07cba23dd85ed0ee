"""Schemathesis against the /openapi.json a running server gives, on both databases.

Every operation (but the never-ending event stream) gets generated requests, valid and invalid ones,
each sent with an admin token and with an approver's token; every answer must be no 5xx, a documented
status, a documented content type, and a body that fits its schema. Then edge values (ids past the
database's integer types, NUL characters, text YAML refuses) go through the same checks, so they are
tested on every run, not only when the generator happens to pick them.

Kept small and repeatable: a few examples per operation, derandomized (the same requests every run).
`schemathesis.pytest.from_fixture` is not used: with pytest 9 it fails (`'Function' object has no
attribute '_nodeid'`), so the operations are walked here, each one a subtest.

POST /v1/definitions takes YAML text, which the document gives as `{"type": "string"}` under
application/yaml; schemathesis YAML-dumps a generated string, so the server only ever sees one quoted
scalar. The text itself is therefore also generated here and sent as it is (`send_yaml`).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, GenerationMode
from schemathesis import Case as AnyCase
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Ok
from schemathesis.schemas import BaseSchema
from sqlalchemy import select

from flowdb.agents.registry import AgentRegistry
from flowdb.db.tables import approvals
from flowdb.worker import Worker, WorkerOptions

from apiserver import ApiServer, api_for
from conftest import EXAMPLES, Database

MANAGER = "manager@company.com"  # reviewed-report's approver
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]
STREAM = "GET /v1/events/stream"  # its 200 never ends
EXAMPLES_PER_OPERATION = 20
REVIEWED = (EXAMPLES / "reviewed-report.yaml").read_text()
BIG = 2**63  # one past the largest id a database column holds
Operation = APIOperation[Any, Any, Any, Any]
Case = AnyCase[Any]
TOPICAL = """
process:
  name: topical
  inputs: {topic: {type: string}}
  steps:
    - {id: write, type: agent_task, agent: writer, message: "Write about {{inputs.topic}}"}
"""


@dataclass
class Target:
    api: ApiServer
    schema: BaseSchema  # loaded from the server's /openapi.json
    tokens: dict[str, str]  # role → bearer token; both are identities of MANAGER

    def operation(self, label: str) -> Operation:
        method, path = label.split(" ", 1)
        found: Operation = self.schema[path][method]
        return found

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def send(self, case: Case, role: str) -> None:
        case.call_and_validate(base_url=self.api.url, headers=self.auth(role), checks=CHECKS)

    def send_yaml(self, text: str) -> None:
        """POST /v1/definitions with `text` as the body, byte for byte; the answer goes through CHECKS."""
        headers = {**self.auth("admin"), "content-type": "application/yaml"}
        response = httpx.post(f"{self.api.url}/v1/definitions", content=text.encode(), headers=headers, timeout=30)
        case = self.operation("POST /v1/definitions").Case(body=text, media_type="application/yaml")
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except BaseException as exc:  # the curl line shows the body YAML-dumped: say what was sent
            shown = repr(text) if len(text) <= 400 else f"{text[:400]!r}... ({len(text)} characters)"
            exc.add_note(f"The body sent, as a Python literal: {shown}")
            raise


def seed(api: ApiServer) -> None:
    """Rows for generated ids to hit: reviewed-report v1, instance 1 parked at its review, approval 1, topical."""
    with httpx.Client(base_url=api.url, headers=api.auth("admin"), timeout=30) as http:
        for text in (REVIEWED, TOPICAL):
            deployed = http.post("/v1/definitions", content=text, headers={"content-type": "application/yaml"})
            assert deployed.status_code == 201, deployed.text
        started = http.post("/v1/processes/reviewed-report/instances", json={}, headers={"Idempotency-Key": "seed"})
        assert started.status_code == 201 and started.json()["id"] == 1, started.text
    worker = Worker(api.engine, AgentRegistry.from_file(EXAMPLES / "agents.yaml"), WorkerOptions(poll_seconds=0.05))

    def parked() -> bool:
        with api.engine.connect() as conn:
            return conn.execute(select(approvals.c.notified_at)).scalar() is not None

    asyncio.run(asyncio.wait_for(worker.run(until=parked), 30))


@pytest.fixture
def target(db: Database) -> Iterator[Target]:
    with api_for(db) as api:
        seed(api)
        tokens = {"admin": api.token("admin", MANAGER), "approver": api.token("approver", MANAGER)}
        yield Target(api, schemathesis.openapi.from_url(f"{api.url}/openapi.json"), tokens)


@st.composite
def yaml_edits(draw: st.DrawFn) -> str:
    """A definition that deploys, with a few generated characters put in somewhere."""
    text = draw(st.sampled_from([REVIEWED, TOPICAL]))
    at = draw(st.integers(0, len(text)))
    return text[:at] + draw(st.text(min_size=1, max_size=4)) + text[at:]


def fuzz(target: Target, operation: Operation) -> None:
    """Valid and invalid requests for one operation, each sent as admin and as approver."""
    strategy = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(GenerationMode.NEGATIVE)

    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None)
    @given(case=strategy)
    def check(case: Case) -> None:
        for role in target.tokens:
            target.send(case, role)

    check()


@pytest.mark.slow
def test_generated_requests_get_documented_answers(target: Target, subtests: pytest.Subtests) -> None:
    document = httpx.get(f"{target.api.url}/openapi.json").json()
    documented = {f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item}
    operations: dict[str, Operation] = {}
    for result in target.schema.get_all_operations():
        assert isinstance(result, Ok), result.err()  # the document is one schemathesis can use
        operations[result.ok().label] = result.ok()
    # Every operation is tested but the stream (excluded) and /openapi.json (schemathesis skips the document itself).
    assert documented - set(operations) <= {"GET /openapi.json"}
    for label, operation in operations.items():
        if label == STREAM:
            continue
        with subtests.test(msg=label):
            fuzz(target, operation)

    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None)
    @given(text=st.text() | yaml_edits())
    def yaml_text(text: str) -> None:
        target.send_yaml(text)

    with subtests.test(msg="POST /v1/definitions (generated YAML text)"):
        yaml_text()


NUL = "a\x00b"  # PostgreSQL text and jsonb refuse NUL characters
BIG_CURSOR = base64.urlsafe_b64encode(f"id:{BIG}".encode()).decode().rstrip("=")  # as _next_cursor makes them
# (operation, role, Case arguments): each must get a documented status (404 or 422 here), never a 500.
EDGES: list[tuple[str, str, dict[str, Any]]] = [
    ("GET /v1/instances/{instance_id}", "admin", {"path_parameters": {"instance_id": BIG}}),
    ("GET /v1/instances/{instance_id}/events", "admin", {"path_parameters": {"instance_id": BIG}}),
    ("POST /v1/instances/{instance_id}/cancel", "admin", {"path_parameters": {"instance_id": BIG}}),
    ("POST /v1/instances/{instance_id}/steps/{step_id}/retry", "admin",
     {"path_parameters": {"instance_id": BIG, "step_id": "draft"}}),
    ("POST /v1/instances/{instance_id}/steps/{step_id}/retry", "admin",
     {"path_parameters": {"instance_id": 1, "step_id": NUL}}),
    ("GET /v1/approvals/{approval_id}", "approver", {"path_parameters": {"approval_id": BIG}}),
    ("POST /v1/approvals/{approval_id}/decision", "approver",
     {"path_parameters": {"approval_id": BIG}, "body": {"decision": "approve"}}),
    ("GET /v1/definitions/{name}", "admin", {"path_parameters": {"name": NUL}}),
    ("GET /v1/definitions/{name}/versions/{version}", "admin",
     {"path_parameters": {"name": "reviewed-report", "version": 2**31}}),
    ("GET /v1/definitions/{name}/versions/{version}", "admin",
     {"path_parameters": {"name": "reviewed-report", "version": BIG}}),
    ("POST /v1/processes/{name}/instances", "admin",
     {"path_parameters": {"name": "reviewed-report"}, "body": {"version": 2**31}}),
    ("POST /v1/processes/{name}/instances", "admin",
     {"path_parameters": {"name": "reviewed-report"}, "body": {"version": BIG}}),
    ("POST /v1/processes/{name}/instances", "admin", {"path_parameters": {"name": NUL}, "body": {}}),
    ("POST /v1/processes/{name}/instances", "admin",
     {"path_parameters": {"name": "topical"}, "body": {"inputs": {"topic": NUL}}}),
    ("GET /v1/instances", "admin", {"query": {"limit": "²"}}),
    ("GET /v1/instances", "admin", {"query": {"cursor": BIG_CURSOR}}),
    ("GET /v1/instances", "admin", {"query": {"process": NUL}}),
    ("GET /v1/instances/{instance_id}/events", "admin",
     {"path_parameters": {"instance_id": 1}, "query": {"limit": "²"}}),
    ("GET /v1/instances/{instance_id}/events", "admin",
     {"path_parameters": {"instance_id": 1}, "query": {"cursor": BIG_CURSOR}}),
    ("POST /v1/approvals/{approval_id}/decision", "approver",
     {"path_parameters": {"approval_id": 1}, "body": {"decision": "reject", "comment": NUL}}),
]

YAML_EDGES = [
    "\x00",  # characters YAML does not allow
    "process: \x01",
    "[" * 2000,  # deeper than Python's recursion limit
    TOPICAL.replace("name: topical", "name: nul").replace("{{inputs.topic}}", "\\0"),  # "\0": a NUL in a string
]


def test_edge_values_get_documented_answers(target: Target, subtests: pytest.Subtests) -> None:
    for label, role, arguments in EDGES:
        case = target.operation(label).Case(**arguments)
        with subtests.test(msg=f"{label} {arguments}"):
            target.send(case, role)
    for text in YAML_EDGES:
        with subtests.test(msg=f"POST /v1/definitions {text[:60]!r}"):
            target.send_yaml(text)
