"""Schemathesis against the served /openapi.json, on both databases: every operation's generated requests
(valid and invalid) get no 5xx, only documented statuses and content types, and bodies that fit their schema."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.config import SchemathesisConfig
from schemathesis.schemas import BaseSchema
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


@pytest.fixture(params=["admin", "approver"])
def api_schema(request: pytest.FixtureRequest, db: Database) -> Iterator[BaseSchema]:
    with api_for(db) as api:
        seed(api)
        token = api.token(request.param, MANAGER)
        config = SchemathesisConfig.from_dict({
            "seed": 20240601,
            "headers": {"Authorization": f"Bearer {token}"},
            "generation": {"deterministic": True},
            "phases": {"stateful": {"enabled": False}},
        })
        yield schemathesis.openapi.from_url(f"{api.url}/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("api_schema").exclude(method="GET", path=STREAM)


@schema.parametrize()
@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
def test_api_conforms_to_its_openapi_document(case: Case) -> None:
    case.call_and_validate(checks=CHECKS)
