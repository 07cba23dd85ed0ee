"""Approvals across real processes: fifty approvers racing from five processes, and workers that
stop (SIGKILL, SIGTERM) while approvals are pending; both databases.

The in-process behaviour of approvals (quorum, refusals, timeouts...) is tested in test_approvals.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from flowdb.approvals import decide
from flowdb.db.tables import approval_approvers, events, step_instances

from conftest import Database
from helpers import TESTS, approval_rows, drive, instance, start, steps, waiting_for_decision
from processes import Fleet, instance_statuses, read_call_log, wait_until

DECIDE_MANY = TESTS / "decide_many.py"
PROCESSES, THREADS = 5, 10
APPROVERS = [f"a{n}@x.com" for n in range(1, PROCESSES * THREADS + 1)]

FIFTY_APPROVERS = f"""\
process:
  name: fifty-approvers
  steps:
    - id: draft
      type: agent_task
      agent: noop
      message: "draft"
    - id: review
      type: human_approval
      depends_on: [draft]
      config:
        approvers: [{", ".join(APPROVERS)}]
        quorum: 1
    - id: publish
      type: agent_task
      agent: counted
      message: "publish"
      depends_on: [review]
      condition: "{{{{steps.review.decision}}}} == 'approved'"
"""

# reviewed-report.yaml with the test agents (real worker processes load tests/agents.yaml); `counted`
# writes a line per call, so the log shows what ran, and where.
REVIEWED = """\
process:
  name: reviewed-by-processes
  steps:
    - id: draft
      type: agent_task
      agent: counted
      message: "Write draft report"
    - id: review
      type: human_approval
      depends_on: [draft]
      config:
        approvers: [manager@company.com]
        timeout: 48h
        on_timeout: notify
        artifacts:
          - "{{steps.draft.step}}"
    - id: publish
      type: agent_task
      agent: counted
      message: "Publish approved report"
      depends_on: [review]
      condition: "{{steps.review.decision}} == 'approved'"
"""
MANAGER = "manager@company.com"


# -- helpers (as in test_approvals.py, with the test agents) ---------------------------------------

def step_events(engine: Engine, step_instance_id: int) -> list[tuple[str, dict[str, Any]]]:
    with engine.connect() as conn:
        rows = conn.execute(select(events.c.type, events.c.payload)
                            .where(events.c.step_instance_id == step_instance_id).order_by(events.c.id))
        return [(r.type, _payload(r.payload)) for r in rows]


def kinds_of(engine: Engine, step_instance_id: int, *kinds: str) -> list[str]:
    return [kind for kind, _ in step_events(engine, step_instance_id) if kind in kinds]


def step_trail(engine: Engine, step_instance_id: int) -> list[tuple[str, int | None]]:
    """The step.* events of a step, each with the pid of the worker that claimed (worker names are host:pid:random)."""
    return [(kind, int(p["worker"].split(":")[-2]) if p and "worker" in p else None)
            for kind, p in step_events(engine, step_instance_id) if kind.startswith("step.")]


def _payload(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def fleet_env(db: Database, **extra: str) -> dict[str, str]:
    env = db.cli_env()
    # A 30 s lease: a worker that died holding nothing must not make the next one wait for a lease.
    env.update(FLOWDB_POLL_SECONDS="0.05", FLOWDB_LEASE_SECONDS="30", **extra)
    return env


# -- fifty approvers, five processes ---------------------------------------------------------------

def _race(db: Database, approval_id: int, folder: Path) -> list[dict[str, Any]]:
    """Run decide_many.py in PROCESSES processes of THREADS threads each, released together."""
    barrier = folder / "barrier"
    barrier.mkdir()
    procs: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
    try:
        for p in range(PROCESSES):
            out, err = folder / f"decide-{p}.out", folder / f"decide-{p}.err"
            with open(out, "wb") as stdout, open(err, "wb") as stderr:
                procs.append((subprocess.Popen(
                    [sys.executable, str(DECIDE_MANY), db.url, str(approval_id), str(1 + p * THREADS), str(THREADS),
                     str(barrier)], stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=db.cli_env(),
                    cwd=TESTS), out, err))

        def all_ready() -> bool:
            dead = [(proc.returncode, err.read_text()) for proc, _, err in procs if proc.poll() is not None]
            assert not dead, f"a deciding process exited before the start: {dead}"
            return len(list(barrier.glob("ready-*"))) == PROCESSES

        wait_until(all_ready, 60, "the deciding processes to connect", 0.02)
        (barrier / "go").touch()
        results = []
        for proc, out, err in procs:
            assert proc.wait(60) == 0, err.read_text()
            results += json.loads(out.read_text())
        return results
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.mark.slow
def test_fifty_approvers_deciding_at_once_from_five_processes(db: Database, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    call_log = tmp_path / "calls.log"
    monkeypatch.setenv("FLOWDB_TEST_CALL_LOG", str(call_log))
    [iid] = start(db.engine, FIFTY_APPROVERS)
    drive(db.engine, waiting_for_decision(db.engine))
    [row] = approval_rows(db.engine)
    assert (row.status, row.quorum, len(row.approvers)) == ("pending", 1, 50)

    results = _race(db, row.id, tmp_path)

    assert sorted(r["approver"] for r in results) == sorted(APPROVERS)
    outcomes = Counter(r["outcome"] for r in results)
    assert outcomes == {"decided": 1, "AlreadyDecided": 49}, [r for r in results if r["outcome"] != "AlreadyDecided"]
    [winner] = [r["approver"] for r in results if r["outcome"] == "decided"]
    losers = {r["approver"] for r in results if r["outcome"] == "AlreadyDecided"}
    assert all(f"was already approved by {winner} at " in r["message"] for r in results if r["approver"] in losers)
    # The race was run: calls from different processes were in flight at once (usually all 50 are).
    first_end = min(r["ended"] for r in results)
    assert len({r["pid"] for r in results if r["began"] < first_end}) >= 2, sorted(
        (r["began"], r["ended"], r["pid"]) for r in results)

    [after] = approval_rows(db.engine)
    assert (after.status, after.decision, after.decided_by, after.comment) == (
        "approved", "approved", winner, f"from {winner}")
    with db.engine.connect() as conn:
        votes = dict(conn.execute(select(approval_approvers.c.approver, approval_approvers.c.decision)
                                  .where(approval_approvers.c.approval_id == row.id)).all())
    assert votes == {a: ("approved" if a == winner else None) for a in APPROVERS}  # refused votes left nothing
    review = steps(db.engine, iid)["review"]
    decided = [p for kind, p in step_events(db.engine, review.id) if kind == "approval.decided"]
    refused = [p for kind, p in step_events(db.engine, review.id) if kind == "approval.refused"]
    assert [(p["by"], p["decision"]) for p in decided] == [(winner, "approved")]
    assert len(refused) == 49 and {p["reason"] for p in refused} == {"already_decided"}
    assert {p["by"] for p in refused} == losers
    assert kinds_of(db.engine, review.id, "approval.voted") == []
    assert review.status == "waiting" and read_call_log(call_log) == []  # no worker ran: nothing moved

    drive(db.engine, lambda: instance(db.engine, iid).status != "running")

    assert instance(db.engine, iid).status == "completed"
    rows = steps(db.engine, iid)
    assert {sid: (r.status, r.attempt) for sid, r in rows.items()} == {
        "draft": ("completed", 1), "review": ("completed", 1), "publish": ("completed", 1)}
    assert (rows["review"].output["decision"], rows["review"].output["decided_by"]) == ("approved", winner)
    publish = step_events(db.engine, rows["publish"].id)
    assert [(kind, p["attempt"]) for kind, p in publish if kind in ("step.started", "step.completed")] == [
        ("step.started", 1), ("step.completed", 1)]
    assert kinds_of(db.engine, rows["review"].id, "step.completed") == ["step.completed"]
    assert [(kind, step) for kind, _, step, _, _ in read_call_log(call_log)] == [("start", "publish"),
                                                                                  ("end", "publish")]


# -- workers that stop while approvals are pending -------------------------------------------------

@pytest.mark.slow
def test_worker_killed_while_approvals_wait_and_a_new_one_takes_the_decisions(db: Database, tmp_path: Path) -> None:
    call_log = tmp_path / "calls.log"
    expected = {"approve": ("approved", "completed"), "reject": ("rejected", "skipped")}
    ids = start(db.engine, REVIEWED, count=3)
    fleet = Fleet(fleet_env(db, FLOWDB_TEST_CALL_LOG=str(call_log)), tmp_path)
    try:
        [first] = fleet.start(1)
        wait_until(waiting_for_decision(db.engine, 3), 30, "three approvals notified and waiting", 0.05, fleet)
        fleet.kill(first)

        # Decided while no worker runs: the approvals close, the steps stay parked until a worker comes.
        rows = {r.instance_id: r for r in approval_rows(db.engine)}
        decisions = dict(zip(ids, ["approve", "approve", "reject"], strict=True))
        for iid, decision in decisions.items():
            result = decide(db.engine, rows[iid].id, decision, MANAGER, comment=f"{decision} {iid}")
            assert result.decided and result.approval.status == expected[decision][0]
        assert {iid: {sid: r.status for sid, r in steps(db.engine, iid).items()} for iid in ids} == {
            iid: {"draft": "completed", "review": "waiting", "publish": "pending"} for iid in ids}
        assert instance_statuses(db.engine) == {"running": 3}
        assert sorted(step for kind, _, step, _, _ in read_call_log(call_log) if kind == "end") == ["draft"] * 3

        [second] = fleet.start(1)
        wait_until(lambda: instance_statuses(db.engine) == {"completed": 3}, 20, "the instances to complete",
                   0.05, fleet)
        assert fleet.terminate(20) == {second: 0}, fleet.all_output()[-5000:]
    finally:
        fleet.close()

    calls = read_call_log(call_log)
    for iid, decision in decisions.items():
        rows_now = steps(db.engine, iid)
        review = rows_now["review"]
        assert (review.status, review.attempt, review.output["decision"], rows_now["publish"].status) == (
            "completed", 1, *expected[decision])
        assert review.output["comment"] == f"{decision} {iid}"
        # Opened and notified by the first worker, finished by the second: one completion, no reclaim.
        trail = step_trail(db.engine, review.id)
        assert trail == [("step.ready", None), ("step.started", first), ("step.waiting", None),
                         ("step.woken", first), ("step.waiting", None), ("step.woken", second),
                         ("step.completed", None)]
        assert kinds_of(db.engine, review.id, "approval.notified", "approval.decided") == [
            "approval.notified", "approval.decided"]
        assert [(kind, pid) for kind, i, step, _, pid in calls if i == iid and step == "draft"] == [
            ("start", first), ("end", first)]
        published = [(kind, attempt, pid) for kind, i, step, attempt, pid in calls if i == iid and step == "publish"]
        assert published == ([("start", 1, second), ("end", 1, second)] if decision == "approve" else [])
        assert instance(db.engine, iid).status == "completed"
    with db.engine.connect() as conn:
        assert conn.execute(select(step_instances.c.id).where(step_instances.c.attempt > 1)).all() == []


class HangingWebhook:
    """A Slack webhook that holds every request until released (then answers 200)."""

    def __init__(self) -> None:
        self.received = 0
        self.release = threading.Event()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                hook.received += 1
                hook.release.wait(30)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # the killed worker's connection is gone when the answer is written

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/services/T0/B0/secret"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hanging_webhook() -> Iterator[HangingWebhook]:
    hook = HangingWebhook()
    yield hook
    hook.close()


@pytest.mark.slow
def test_sigterm_during_the_notify_turn_releases_the_step_and_a_decision_still_lands(
        db: Database, tmp_path: Path, hanging_webhook: HangingWebhook) -> None:
    """SIGTERM while the worker holds the approval step (its notices stuck on a slow webhook): the step
    is released, not lost; decided while no worker runs, the next worker completes it without waiting."""
    call_log = tmp_path / "calls.log"
    [iid] = start(db.engine, REVIEWED)
    env = fleet_env(db, FLOWDB_TEST_CALL_LOG=str(call_log), FLOWDB_SLACK_WEBHOOK_URL=hanging_webhook.url(),
                    FLOWDB_NOTIFY_ALLOW_PRIVATE="true", FLOWDB_NOTIFY_ATTEMPTS="1")
    # One fleet per worker: a worker that exited on SIGTERM must not count as a crash later.
    for name in ("before", "after"):
        (tmp_path / name).mkdir()
    before, after = Fleet(env, tmp_path / "before", "--grace", "0.5"), Fleet(env, tmp_path / "after")
    try:
        [first] = before.start(1)
        wait_until(lambda: hanging_webhook.received == 1, 30, "the notify turn to reach the webhook", 0.05, before)
        review = steps(db.engine, iid)["review"]
        assert (review.status, int(review.lease_owner.split(":")[-2])) == ("running", first)
        began = time.monotonic()
        assert before.terminate(20) == {first: 0}, before.all_output()[-5000:]
        assert time.monotonic() - began < 8
        assert "released 1 step(s)" in before.output(first)

        review = steps(db.engine, iid)["review"]
        assert (review.status, review.attempt, review.lease_token) == ("ready", 0, None)
        [row] = approval_rows(db.engine)
        assert (row.status, row.notified_at) == ("pending", None)
        result = decide(db.engine, row.id, "approve", MANAGER)
        assert result.decided and steps(db.engine, iid)["review"].status == "ready"

        hanging_webhook.release.set()
        [second] = after.start(1)
        wait_until(lambda: instance(db.engine, iid).status == "completed", 20, "the instance to complete",
                   0.05, after)
        assert after.terminate(20) == {second: 0}, after.all_output()[-5000:]
    finally:
        before.close()
        after.close()

    rows = steps(db.engine, iid)
    review = rows["review"]
    assert (review.status, review.attempt, review.output["decision"], rows["publish"].status) == (
        "completed", 1, "approved", "completed")
    trail = step_trail(db.engine, review.id)
    assert trail == [("step.ready", None), ("step.started", first), ("step.waiting", None),
                     ("step.woken", first), ("step.released", None), ("step.woken", second),
                     ("step.completed", None)]
    # The decision was taken as it stood: no second round of notices for a decided approval.
    assert hanging_webhook.received == 1
    assert [(kind, step, pid) for kind, _, step, _, pid in read_call_log(call_log)] == [
        ("start", "draft", first), ("end", "draft", first), ("start", "publish", second),
        ("end", "publish", second)]


@pytest.mark.slow
def test_timeouts_fire_exactly_once_with_several_workers(db: Database, tmp_path: Path) -> None:
    """Approval deadlines are rows claimed like ready steps: with three workers polling, each
    expired approval is closed once and its downstream step runs once."""
    timed = REVIEWED.replace("reviewed-report", "timed-report").replace("timeout: 48h", "timeout: 1s") \
        .replace("on_timeout: notify", "on_timeout: approve")
    assert "timeout: 1s" in timed and "on_timeout: approve" in timed
    call_log = tmp_path / "calls.log"
    ids = start(db.engine, timed, count=6)
    fleet = Fleet(fleet_env(db, FLOWDB_TEST_CALL_LOG=str(call_log)), tmp_path)
    try:
        fleet.start(3)
        wait_until(lambda: instance_statuses(db.engine) == {"completed": 6}, 60, "the instances to complete",
                   0.05, fleet)
    finally:
        fleet.terminate(20)
        fleet.close()
    rows = approval_rows(db.engine)
    assert len(rows) == 6 and {(r.status, r.decision, r.decided_by) for r in rows} == {("expired", "approved", None)}
    with db.engine.connect() as conn:
        expired = Counter(row.payload["approval_id"] if isinstance(row.payload, dict)
                          else json.loads(row.payload)["approval_id"] for row in conn.execute(
                              select(events.c.payload).where(events.c.type == "approval.expired")))
    assert expired == Counter({r.id: 1 for r in rows})
    for iid in ids:
        rows_now = steps(db.engine, iid)
        assert rows_now["review"].output["timed_out"] is True and rows_now["publish"].status == "completed"
    published = [step for kind, _, step, _, _ in read_call_log(call_log) if kind == "end" and step == "publish"]
    assert len(published) == 6
