"""The engine's clock can be shifted (db/clock.py): waiting and leases are tested without sleeping."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from flowdb.db import clock
from flowdb.db.claims import ClaimStatements

from conftest import Database
from helpers import approval_rows, drive, event_types, instance, start, steps, waiting_for_decision, work

HOUR_TIMER = """
process:
  name: hour-timer
  steps:
    - {id: wait, type: timer, duration: 1h}
    - {id: after, type: agent_task, agent: noop, message: done, depends_on: [wait]}
"""

APPROVAL = """
process:
  name: day-approval
  steps:
    - id: review
      type: human_approval
      approvers: [boss@example.com]
      timeout: 48h
      on_timeout: approve
    - {id: after, type: agent_task, agent: noop, message: done, depends_on: [review]}
"""


@pytest.fixture
def shifted() -> Iterator[None]:
    yield
    clock.set_offset(0)


def test_a_timer_fires_for_a_worker_whose_clock_is_ahead(db: Database, shifted: None) -> None:
    [iid] = start(db.engine, HOUR_TIMER)
    drive(db.engine, lambda: steps(db.engine, iid)["wait"].status == "waiting")
    assert instance(db.engine, iid).status == "running"
    clock.set_offset(3601)
    work(db.engine, timeout=20)
    assert instance(db.engine, iid).status == "completed"
    assert steps(db.engine, iid)["after"].status == "completed"


def test_an_approval_times_out_for_a_worker_whose_clock_is_ahead(db: Database, shifted: None) -> None:
    [iid] = start(db.engine, APPROVAL)
    drive(db.engine, waiting_for_decision(db.engine))
    clock.set_offset(48 * 3600 + 1)
    work(db.engine, timeout=20)
    [approval] = approval_rows(db.engine)
    assert approval.status == "expired" and approval.decision == "approved"
    assert instance(db.engine, iid).status == "completed"


def test_a_lease_expires_for_a_worker_whose_clock_is_ahead(db: Database, shifted: None) -> None:
    [iid] = start(db.engine, HOUR_TIMER.replace("{id: wait, type: timer, duration: 1h}",
                                                "{id: wait, type: agent_task, agent: noop, message: w}"))
    claims = ClaimStatements(db.engine.dialect.name)
    with db.engine.begin() as conn:  # a worker claims the step and dies without a word
        [claimed] = claims.claim_steps(conn, "dead-worker", uuid.uuid4().hex, 1, 30)
    assert claimed.step_id == "wait"
    clock.set_offset(31)
    work(db.engine, timeout=20)
    row = steps(db.engine, iid)["wait"]
    assert row.status == "completed" and row.reclaims == 1 and row.attempt == 1
    assert "step.lease_expired" in event_types(db.engine, iid)
