"""Rerun a finished instance from a step (issue 15, part 3), on SQLite and PostgreSQL."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func, select

from flowdb.db.instances import deploy
from flowdb.db.tables import events, step_instances
from flowdb.errors import NotFound
from flowdb.reports import run_report
from flowdb.rerun import RerunRefused, rerun_instance

from apiserver import ApiServer, assert_problem, client, csrf_of, ui_session
from conftest import Database, flowdb_cli
from helpers import background_worker, definition_from, event_types, instance, runs, start, steps, until, work

CHAIN = """
process:
  name: chain
  steps:
    - {id: a, type: agent_task, agent: counted, message: a}
    - {id: b, type: agent_task, agent: AGENT_B, retry: {max_attempts: 1}, message: "b after {{ steps.a.output.step }}"}
    - {id: c, type: agent_task, agent: counted, message: c, depends_on: [b]}
"""


def chain(agent_b: str = "counted", message_c: str = "c") -> str:
    text = CHAIN.replace("AGENT_B", agent_b).replace("message: c,", f"message: {message_c},")
    return text.replace('message: "b after', 'depends_on: [a], message: "b after')


def calls(log: Path) -> Counter[str]:
    return Counter(line.split()[2] for line in log.read_text().splitlines() if line.startswith("start"))


def snapshot(db: Database) -> tuple[int, int]:
    with db.engine.connect() as conn:
        return (conn.execute(select(func.count()).select_from(step_instances)).scalar_one(),
                conn.execute(select(func.count()).select_from(events)).scalar_one())


def test_a_rerun_runs_the_step_and_what_follows_as_new_rounds_and_keeps_what_came_before(
        db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "calls.log"
    monkeypatch.setenv("FLOWDB_TEST_CALL_LOG", str(log))
    [iid] = start(db.engine, chain())
    work(db.engine)
    assert instance(db.engine, iid).status == "completed"
    done = rerun_instance(db.engine, iid, "b", "ops@x.com")
    assert (done.version, done.steps) == (1, ["b", "c"])
    assert instance(db.engine, iid).status == "running"
    work(db.engine)
    assert instance(db.engine, iid).status == "completed"
    assert calls(log) == {"a": 1, "b": 2, "c": 2}  # a's output was kept, not paid for again
    assert [r.round for r in runs(db.engine, iid, "a")] == [1]
    assert [(r.round, r.status) for r in runs(db.engine, iid, "c")] == [(1, "completed"), (2, "completed")]
    assert steps(db.engine, iid)["b"].output == {"step": "b"}
    kinds = event_types(db.engine, iid)
    assert kinds.count("instance.rerun") == 1 and kinds.count("instance.completed") == 2
    with db.engine.connect() as conn:
        report = run_report(conn, "v_step_runs")
        rerun_event = conn.execute(select(events.c.payload).where(events.c.type == "instance.rerun")).scalar_one()
    assert len([r for r in report.rows if r[report.columns.index("instance_id")] == iid]) == 5  # both rounds
    assert rerun_event["by"] == "ops@x.com" and rerun_event["from_step"] == "b" and rerun_event["round"] == 2


def test_a_failed_instance_reruns_from_its_failed_step_on_a_fixed_version(
        db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "calls.log"
    monkeypatch.setenv("FLOWDB_TEST_CALL_LOG", str(log))
    [iid] = start(db.engine, chain(agent_b="broken"))
    work(db.engine)
    assert instance(db.engine, iid).status == "failed"
    assert steps(db.engine, iid)["c"].status == "cancelled"
    fixed = definition_from(chain(message_c="c again"))  # b's agent works now; c says something else
    with db.engine.begin() as conn:
        assert deploy(conn, fixed).version == 2
    rerun_instance(db.engine, iid, "b", "ops@x.com", version=2)
    work(db.engine)
    row = instance(db.engine, iid)
    assert (row.status, row.version) == ("completed", 2)
    assert calls(log) == {"a": 1, "b": 1, "c": 1}  # a is not run again; b (fixed) and c run on version 2
    got = steps(db.engine, iid)
    assert (got["b"].round, got["b"].status, got["c"].round, got["c"].status) == (2, "completed", 2, "completed")


def test_a_rerun_is_refused_when_the_version_changes_what_it_keeps_or_the_instance_runs(db: Database) -> None:
    [iid] = start(db.engine, chain())
    with pytest.raises(RerunRefused, match="is running; a rerun starts from a finished instance"):
        rerun_instance(db.engine, iid, "b", "x")
    work(db.engine)
    renamed = definition_from(chain().replace("{id: a,", "{id: first,").replace("[a]", "[first]")
                              .replace("steps.a.", "steps.first."))
    with db.engine.begin() as conn:
        deploy(conn, renamed)
    before = snapshot(db)
    with pytest.raises(RerunRefused, match="it has step\\(s\\) 'first' that this instance never ran"):
        rerun_instance(db.engine, iid, "b", "x", version=2)
    with pytest.raises(NotFound, match=r"has no step 'bb' \(did you mean 'b'\?\); its steps: a, b, c"):
        rerun_instance(db.engine, iid, "bb", "x")
    assert snapshot(db) == before and instance(db.engine, iid).status == "completed"
    # From the first step, a new version may change anything.
    rerun_instance(db.engine, iid, "first", "x", version=2)
    work(db.engine)
    assert (instance(db.engine, iid).status, instance(db.engine, iid).version) == ("completed", 2)


def test_the_cli_and_the_api_rerun(db: Database, api_server: ApiServer) -> None:
    [iid] = start(db.engine, chain())
    work(db.engine)
    with client(api_server, "operator") as http:
        response = http.post(f"/v1/instances/{iid}/rerun", json={"from_step": "c"})
        assert response.status_code == 200 and response.json()["status"] == "running", response.text
        assert_problem(http.post(f"/v1/instances/{iid}/rerun", json={"from_step": "c"}), 409, "is running")
        assert_problem(http.post(f"/v1/instances/{iid}/rerun", json={"from_step": "c", "extra": 1}), 422)
    with client(api_server, "viewer") as viewer:
        assert_problem(viewer.post(f"/v1/instances/{iid}/rerun", json={"from_step": "c"}), 403)
    work(db.engine)
    cli = flowdb_cli("rerun", str(iid), "--from", "c", env=db.cli_env())
    assert cli.returncode == 0 and f"instance {iid} runs again from c on version 1: c" in cli.stdout, cli.stderr
    work(db.engine)
    assert [r.round for r in runs(db.engine, iid, "c")] == [1, 2, 3]
    refused = flowdb_cli("rerun", str(iid), "--from", "zz", env=db.cli_env())
    assert refused.returncode != 0 and "has no step 'zz'" in refused.stderr


def test_the_web_ui_reruns_from_a_step(db: Database, api_server: ApiServer) -> None:
    [iid] = start(db.engine, chain())
    work(db.engine)
    with ui_session(api_server) as http:
        page = http.get(f"/ui/instances/{iid}")
        csrf = csrf_of(page)
        assert 'aria-label="Rerun from step b"' in page.text
        done = http.post(f"/ui/instances/{iid}/steps/b/rerun", data={"csrf": csrf})
        assert done.status_code == 303 and done.headers["location"].endswith("?done=rerun")
        assert http.post(f"/ui/instances/{iid}/steps/b/rerun", data={"csrf": csrf}).status_code == 409
    assert [r.round for r in runs(db.engine, iid, "b")] == [1, 2]


# -- what a failure stopped beside the rerun ---------------------------------------------------------------

PAR = """
process:
  name: par
  steps:
    - {id: a, type: agent_task, agent: failif, message: a, retry: {max_attempts: 1}}
    - {id: b, type: agent_task, agent: failif, message: slow b, retry: {max_attempts: 1}}
    - {id: c, type: agent_task, agent: failif, message: c, depends_on: [a, b]}
"""


def order_of(db: Database, iid: int) -> list[tuple[str, str]]:
    with db.engine.connect() as conn:
        return [(row.type, row.step_id) for row in conn.execute(
            select(events.c.type, step_instances.c.step_id)
            .join(step_instances, step_instances.c.id == events.c.step_instance_id)
            .where(events.c.instance_id == iid).order_by(events.c.id))]


def test_a_join_in_a_rerun_waits_for_the_parent_a_failure_stopped(db: Database,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """b was running when a failed (the failure halted it, its one attempt used): the rerun from a gives b
    back with attempts again, and c (join all) waits for it as well as for a's new round."""
    monkeypatch.setenv("FLOWDB_TEST_FAIL_a", "1")
    monkeypatch.setenv("FLOWDB_TEST_SLEEP", "0.5")
    [iid] = start(db.engine, PAR)
    with background_worker(db.engine):
        until(lambda: instance(db.engine, iid).status == "failed")
    assert steps(db.engine, iid)["b"].status == "cancelled"
    monkeypatch.delenv("FLOWDB_TEST_FAIL_a")
    rerun_instance(db.engine, iid, "a", "ops")
    work(db.engine)
    assert instance(db.engine, iid).status == "completed"
    seen = order_of(db, iid)
    assert seen.index(("step.started", "c")) > max(i for i, e in enumerate(seen) if e == ("step.completed", "b"))
    assert steps(db.engine, iid)["b"].max_attempts == 2  # its cut-short run does not count against it


def test_a_rerun_that_would_go_on_past_a_failure_is_refused(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWDB_TEST_FAIL_a", "1")
    monkeypatch.setenv("FLOWDB_TEST_SLEEP", "0.3")  # b completes before a fails
    [iid] = start(db.engine, PAR.replace("slow b", "b").replace("message: a,", "message: slow a,"))
    work(db.engine)
    assert (instance(db.engine, iid).status, steps(db.engine, iid)["b"].status) == ("failed", "completed")
    before = snapshot(db)
    with pytest.raises(RerunRefused, match=r"step\(s\) 'a' failed this instance and are not after 'b'"):
        rerun_instance(db.engine, iid, "b", "ops")
    assert snapshot(db) == before


def test_a_cancelled_instance_reruns_with_what_the_cancel_stopped(db: Database,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from flowdb.control import cancel_instance

    monkeypatch.setenv("FLOWDB_TEST_SLEEP", "0.5")
    [iid] = start(db.engine, PAR)
    with background_worker(db.engine):
        until(lambda: [s.status for s in steps(db.engine, iid).values()] == ["completed", "running", "pending"])
        cancel_instance(db.engine, iid)
    rerun_instance(db.engine, iid, "a", "ops")
    work(db.engine)
    got = steps(db.engine, iid)
    assert instance(db.engine, iid).status == "completed"
    assert (got["a"].round, got["b"].status, got["c"].status) == (2, "completed", "completed")


LOOPING = """
process:
  name: looping
  steps:
    - {id: a, type: agent_task, agent: noop, message: a}
    - {id: g, type: gateway, gateway_type: exclusive, depends_on: [a],
       routes: [{condition: "{{ steps.a.visit }} < 2", next: a}, {default: true, next: done}]}
    - {id: done, type: agent_task, agent: noop, message: done}
"""


def test_a_rerun_of_a_process_with_loops_is_refused_for_now(db: Database) -> None:
    [iid] = start(db.engine, LOOPING)
    work(db.engine)
    assert instance(db.engine, iid).status == "completed"
    with pytest.raises(RerunRefused, match="has loops: a rerun of such a process is not supported yet"):
        rerun_instance(db.engine, iid, "done", "ops")
