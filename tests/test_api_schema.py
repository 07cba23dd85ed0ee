"""Schemathesis against the served /openapi.json, on both databases: every operation's generated requests
(valid and invalid) get no 5xx, only documented statuses and content types, and bodies that fit their schema."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import select

from flowdb.agents.registry import AgentRegistry
from flowdb.db.tables import approvals
from flowdb.worker import Worker, WorkerOptions

from apiserver import ApiServer, api_for
from conftest import EXAMPLES, Database

MANAGER = "manager@company.com"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]
STREAM = "/v1/events/stream"  # its 200 never ends
EXAMPLES_PER_OPERATION = 20


def seed(api: ApiServer) -> None:
    """Rows for the generated ids to hit: reviewed-report v1, instance 1 parked at review, approval 1."""
    with httpx.Client(base_url=api.url, headers=api.auth("admin"), timeout=30) as http:
        deployed = http.post("/v1/definitions", content=(EXAMPLES / "reviewed-report.yaml").read_text(),
                             headers={"content-type": "application/yaml"})
        assert deployed.status_code == 201, deployed.text
        started = http.post("/v1/processes/reviewed-report/instances", json={}, headers={"Idempotency-Key": "seed"})
        assert started.status_code == 201 and started.json()["id"] == 1, started.text
    worker = Worker(api.engine, AgentRegistry.from_file(EXAMPLES / "agents.yaml"), WorkerOptions(poll_seconds=0.05))

    def parked() -> bool:
        with api.engine.connect() as conn:
            return conn.execute(select(approvals.c.notified_at)).scalar() is not None

    asyncio.run(asyncio.wait_for(worker.run(until=parked), 30))


def fuzz(operation: APIOperation, tokens: dict[str, str], base_url: str) -> None:
    strategy = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(GenerationMode.NEGATIVE)

    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(case=strategy)
    def check(case: Case) -> None:
        for token in tokens.values():
            case.call_and_validate(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, checks=CHECKS)

    check()


def test_every_operation_conforms_to_the_served_document(db: Database, subtests: pytest.Subtests) -> None:
    began = time.monotonic()
    with api_for(db) as api:
        seed(api)
        tokens = {"admin": api.token("admin"), "approver": api.token("approver", MANAGER)}
        schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 15
        for operation in operations:
            if operation.path == STREAM:
                continue
            with subtests.test(msg=operation.label):
                fuzz(operation, tokens, api.url)
    print(f"{db.kind}: {time.monotonic() - began:.1f} s")
