"""The live view of `flowdb run`: a failed attempt shows how long it ran and the real delay before the
next one; a failure is reported when it is decided, not after the calls of steps it cancelled (those
are left to finish, their results dropped as cancelled, never called a lost lease)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from flowdb.db.tables import events, step_instances

from conftest import Database, flowdb_cli

AGENTS = Path(__file__).parent / "agents.yaml"


@pytest.mark.slow
def test_a_retried_attempt_shows_the_policys_delay(db: Database, tmp_path: Path) -> None:
    file = tmp_path / "retried.yaml"
    file.write_text("""process:
  name: retried
  steps:
    - id: a
      type: agent_task
      agent: flaky
      message: x
      retry: {max_attempts: 3, initial_interval: 0.3, backoff: 2}
""")
    result = flowdb_cli("run", str(file), "--agents", str(AGENTS), env=db.cli_env())
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if "failed after" in line]
    assert len(lines) == 2, result.stdout
    assert re.search(r"a +failed after \d+\.\d\ds \(attempt 1 of 3\); next attempt in 0\.30s", lines[0]), lines[0]
    assert re.search(r"\(attempt 2 of 3\); next attempt in 0\.60s", lines[1]), lines[1]
    assert "flaky attempt 1" in lines[0]
    assert re.search(r"a +completed in", result.stdout)


def test_a_failure_is_reported_without_waiting_for_the_calls_it_cancelled(db: Database, tmp_path: Path) -> None:
    file = tmp_path / "fails-fast.yaml"
    file.write_text("""process:
  name: fails-fast
  steps:
    - {id: slow, type: agent_task, agent: sleepy, message: x}
    - {id: bad, type: agent_task, agent: refuses, message: x}
""")
    env = {**db.cli_env(), "FLOWDB_TEST_SLEEP": "30"}  # a plain function in a thread: it cannot be interrupted
    began = time.monotonic()
    result = flowdb_cli("run", str(file), "--agents", str(AGENTS), env=env, timeout=60)
    elapsed = time.monotonic() - began
    assert result.returncode == 1, result.stdout + result.stderr
    assert elapsed < 20, (elapsed, result.stdout)  # the sleeping call (30 s) was not waited for
    assert re.search(r"bad +failed in .*refused on purpose", result.stdout), result.stdout
    assert re.search(r"instance \d+ failed in", result.stdout), result.stdout
    assert "lease" not in result.stdout + result.stderr
    with db.engine.connect() as conn:
        slow = conn.execute(select(step_instances.c.id, step_instances.c.status)
                            .where(step_instances.c.step_id == "slow")).one()
        dropped = conn.execute(select(events.c.payload).where(events.c.step_instance_id == slow.id,
                                                               events.c.type == "step.late_result_dropped")).all()
    assert slow.status == "cancelled"
    assert [row.payload["reason"] for row in dropped] == ["the step was cancelled while it ran"]
