"""Workers claim only the steps they can serve: a step whose agent a worker lacks waits, ready, for a
worker that has it (it never fails with "unknown agent"); steps nobody can serve show in
v_unservable_steps, in `flowdb status` and in the workers' log. Agents files are checked before any
step runs: by validate and deploy (a warning without one, an error with --strict) and at worker start."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, text

from flowdb.agents.registry import AgentRegistry
from flowdb.db.tables import events, step_instances, worker_serves, workers
from flowdb.db.workers import Capabilities, WorkerRegistry
from flowdb.steptypes.registry import STEP_TYPES
from flowdb.worker import Worker, WorkerOptions

from apiserver import ApiServer, assert_problem, client
from conftest import Database, flowdb_cli
from helpers import TESTS, instance, start, steps
from processes import FLOWDB, wait_until

TWO_AGENTS = """
process:
  name: two-agents
  steps:
    - {id: a, type: agent_task, agent: alpha, message: "a"}
    - {id: b, type: agent_task, agent: beta, message: "b"}
    - {id: done, type: notification, channel: log, message: "both ran", depends_on: [a, b]}
"""

NOBODY = """
process:
  name: nobody-serves
  steps:
    - {id: first, type: notification, channel: log, message: "hello"}
    - {id: research, type: agent_task, agent: researcher, message: "x", depends_on: [first]}
"""


def agents_file(folder: Path, name: str, **agents: str) -> Path:
    path = folder / name
    path.write_text("agents:\n" + "".join(f"  {agent}: {{python: \"{target}\"}}\n" for agent, target in agents.items()))
    return path


def unservable(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT step_id, agent, needs, running_workers FROM v_unservable_steps "
                                 "ORDER BY step_instance_id")).mappings().all()
    return [dict(row) for row in rows]


@pytest.mark.slow
def test_a_step_whose_agent_the_worker_lacks_waits_ready_and_shows(db: Database, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    [iid] = start(db.engine, NOBODY)
    agents = AgentRegistry.from_file(agents_file(tmp_path, "agents.yaml", alpha="agents_for_tests:noop"))
    worker = Worker(db.engine, agents, WorkerOptions(poll_seconds=0.05, unservable_check_seconds=0.1))
    seen: dict[str, Any] = {}

    async def go() -> None:
        task = asyncio.create_task(worker.run())
        try:
            def first_done() -> bool:
                return bool(steps(db.engine, iid)["first"].status == "completed")

            while not first_done():
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # several claim cycles, and the worker's look for unservable steps
            seen["view"] = unservable(db.engine)
            seen["status"] = flowdb_cli("status", str(iid), env=db.cli_env())
            seen["json"] = flowdb_cli("status", str(iid), "--json", env=db.cli_env())
            with db.engine.connect() as conn:
                seen["serves"] = conn.execute(select(worker_serves.c.kind, worker_serves.c.name)
                                              .where(worker_serves.c.worker == worker.options.name)).all()
        finally:
            worker.stop()
            await task

    with caplog.at_level(logging.WARNING, logger="flowdb.worker"):
        asyncio.run(go())
    row = steps(db.engine, iid)["research"]
    assert (row.status, row.attempt, row.error) == ("ready", 0, None)  # never claimed, never failed
    assert instance(db.engine, iid).status == "running"
    assert seen["view"] == [{"step_id": "research", "agent": "researcher", "needs": "agent researcher",
                             "running_workers": 1}]
    assert ("agent", "alpha") in seen["serves"] and ("step_type", "agent_task") in seen["serves"]
    assert seen["status"].returncode == 0
    [line] = [line for line in seen["status"].stdout.splitlines() if line.startswith("research")]
    assert "waits for agent researcher: no running worker has it" in line
    [research] = [s for s in json.loads(seen["json"].stdout)["steps"] if s["step_id"] == "research"]
    assert research["waits_for"] == "waits for agent researcher: no running worker has it"
    warnings = [r.getMessage() for r in caplog.records if "no running worker has" in r.getMessage()]
    assert len(warnings) == 1 and "'researcher' (1)" in warnings[0] and "'alpha'" in warnings[0], warnings
    with db.engine.connect() as conn:  # the stopped worker marked its registration
        stopped = conn.execute(select(workers.c.stopped_at).where(workers.c.name == worker.options.name)).scalar()
    assert stopped is not None
    assert unservable(db.engine)[0]["running_workers"] == 0
    report = flowdb_cli("report", "v_unservable_steps", "--format", "json", env=db.cli_env())
    assert report.returncode == 0, report.stderr
    assert [r["step_id"] for r in json.loads(report.stdout)] == ["research"]


def test_an_agent_that_cannot_be_loaded_fails_its_step_without_retry(db: Database, tmp_path: Path) -> None:
    [iid] = start(db.engine, """
process:
  name: broken-agent-file
  steps:
    - {id: a, type: agent_task, agent: gone, message: "x", retry: {max_attempts: 3, initial_interval: 0.01}}
""")
    agents = AgentRegistry.from_file(agents_file(tmp_path, "agents.yaml", gone="flowdb_no_such_module:run"))
    worker = Worker(db.engine, agents, WorkerOptions(poll_seconds=0.05))  # in-process: not checked at start

    async def go() -> None:
        await asyncio.wait_for(worker.run(until=lambda: instance(db.engine, iid).status != "running"), 30)

    asyncio.run(go())
    row = steps(db.engine, iid)["a"]
    assert row.status == "failed" and row.attempt == 1
    assert "cannot import 'flowdb_no_such_module'" in row.error and "fix the agents file" in row.error


@pytest.mark.slow
def test_two_workers_with_different_agents_each_run_their_own(db: Database, tmp_path: Path) -> None:
    env = {**db.cli_env(), "PYTHONPATH": str(TESTS), "FLOWDB_POLL_SECONDS": "0.05",
           "FLOWDB_UNSERVABLE_CHECK_SECONDS": "0.5"}
    files = {"alpha": agents_file(tmp_path, "alpha.yaml", alpha="agents_for_tests:noop"),
             "beta": agents_file(tmp_path, "beta.yaml", beta="agents_for_tests:noop")}
    ids = start(db.engine, TWO_AGENTS, count=20)
    [stuck] = start(db.engine, NOBODY)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = {name: tmp_path / f"{name}.log" for name in files}
    try:
        for name, path in files.items():
            with open(logs[name], "wb") as out:
                procs[name] = subprocess.Popen([FLOWDB, "worker", "--agents", str(path)], env=env, stdout=out,
                                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def finished() -> bool:
            return all(instance(db.engine, i).status == "completed" for i in ids)

        wait_until(finished, 120, "the 20 instances to complete")
        wait_until(lambda: all("'researcher' (1)" in logs[name].read_text() for name in files), 30,
                   "both workers to name the missing agent")
        view = unservable(db.engine)
        status = flowdb_cli("status", str(stuck), env=env)
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(30)
    pids = {name: proc.pid for name, proc in procs.items()}
    with db.engine.connect() as conn:
        started = conn.execute(
            select(step_instances.c.step_id, events.c.payload)
            .join(events, events.c.step_instance_id == step_instances.c.id)
            .where(events.c.type == "step.started", step_instances.c.instance_id.in_(ids),
                   step_instances.c.type == "agent_task")).all()
        failed = conn.execute(select(step_instances.c.id).where(step_instances.c.status == "failed")).all()
    assert failed == []  # nothing failed with "unknown agent"
    assert len(started) == 40  # each agent step ran exactly once
    for step_id, payload in started:
        owner = payload if isinstance(payload, dict) else json.loads(payload)
        assert f":{pids['alpha' if step_id == 'a' else 'beta']}:" in owner["worker"], (step_id, owner)
    assert view == [{"step_id": "research", "agent": "researcher", "needs": "agent researcher",
                     "running_workers": 2}]
    assert "waits for agent researcher" in status.stdout
    assert steps(db.engine, stuck)["research"].status == "ready"
    for name in files:
        assert "unknown agent" not in logs[name].read_text()


@pytest.mark.slow
def test_validate_and_deploy_warn_without_an_agents_file_and_refuse_with_strict(db: Database, tmp_path: Path) -> None:
    process = tmp_path / "p.yaml"
    process.write_text(TWO_AGENTS)
    env = {k: v for k, v in db.cli_env().items() if k != "FLOWDB_AGENTS"}
    checked = flowdb_cli("validate", str(process), env=env, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr.startswith(f"{process}:5:7: warning: no agents file found"), checked.stderr
    assert "'alpha', 'beta'" in checked.stderr
    strict = flowdb_cli("validate", "--strict", str(process), env=env, cwd=tmp_path)
    assert strict.returncode == 1 and f"{process}:5:7: no agents file found" in strict.stderr, strict.stderr
    refused = flowdb_cli("deploy", "--strict", str(process), env=env, cwd=tmp_path)
    assert refused.returncode == 1 and "no agents file found" in refused.stderr
    deployed = flowdb_cli("deploy", str(process), env=env, cwd=tmp_path)
    assert deployed.returncode == 0 and "warning: no agents file found" in deployed.stderr
    assert "deployed two-agents version 1" in deployed.stdout
    run = flowdb_cli("run", str(process), env=env, cwd=tmp_path)  # run works it here: it needs its agents
    assert run.returncode == 1 and "no agents file found" in run.stderr and "started instance" not in run.stdout


@pytest.mark.slow
def test_an_agent_module_that_cannot_be_imported_is_a_configuration_error(db: Database, tmp_path: Path) -> None:
    process = tmp_path / "p.yaml"
    process.write_text(TWO_AGENTS)
    bad = agents_file(tmp_path, "agents.yaml", alpha="agents_for_tests:noop", beta="flowdb_no_such_module:run")
    env = {**db.cli_env(), "PYTHONPATH": str(TESTS)}
    checked = flowdb_cli("validate", str(process), env=env)
    assert checked.returncode == 1
    assert (f"{process}:6:7: agent 'beta' cannot be loaded" in checked.stderr
            and "cannot import 'flowdb_no_such_module'" in checked.stderr), checked.stderr
    began = time.monotonic()
    worker = flowdb_cli("worker", "--agents", str(bad), env=env, timeout=60)
    assert worker.returncode == 1 and time.monotonic() - began < 30
    lines = [line for line in worker.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "flowdb_no_such_module" in lines[0], worker.stderr
    assert "Traceback" not in worker.stderr


@pytest.mark.slow
def test_a_worker_without_an_agents_file_says_so_and_runs_the_other_steps(db: Database, tmp_path: Path) -> None:
    [iid] = start(db.engine, NOBODY)
    env = {**db.cli_env(), "FLOWDB_POLL_SECONDS": "0.05"}
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([FLOWDB, "worker"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=tmp_path)
    try:
        wait_until(lambda: steps(db.engine, iid)["first"].status == "completed", 60, "the notification to run")
        time.sleep(0.3)
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    output = log.read_text()
    assert "no agents file" in output and "runs no agent tasks" in output
    assert steps(db.engine, iid)["research"].status == "ready"
    assert os.path.exists(log)


def test_the_api_deploy_warns_of_agents_no_running_worker_serves(db: Database, api_server: ApiServer) -> None:
    registry = WorkerRegistry(db.engine.dialect.name)
    serves = Capabilities(frozenset({"alpha"}), frozenset(STEP_TYPES.names()))
    with db.engine.begin() as conn:
        registry.register(conn, "host:1:alpha", serves, 30)
        # a stopped worker and a `flowdb run` of another instance serve nobody else
        registry.register(conn, "host:2:gone", Capabilities(frozenset({"beta"}), serves.step_types), 30)
        registry.stop(conn, "host:2:gone")
        registry.register(conn, "host:3:run", Capabilities(frozenset({"beta"}), serves.step_types), 30, instance_id=7)
    yaml = {"content-type": "application/yaml"}
    with client(api_server) as http:
        refused = assert_problem(http.post("/v1/definitions?strict=true", content=TWO_AGENTS, headers=yaml), 422,
                                 "no running worker serves agent 'beta' (steps b)")
        assert refused["type"].endswith("/unserved-agents")
        assert http.get("/v1/definitions").json()["items"] == []  # nothing deployed
        deployed = http.post("/v1/definitions", content=TWO_AGENTS, headers=yaml)
        assert deployed.status_code == 201, deployed.text
        [warning] = deployed.json()["warnings"]
        assert warning.startswith("no running worker serves agent 'beta' (steps b): its steps will wait")
        with db.engine.begin() as conn:
            registry.register(conn, "host:4:beta", Capabilities(frozenset({"beta"}), serves.step_types), 30)
        again = http.post("/v1/definitions?strict=true", content=TWO_AGENTS, headers=yaml)
        assert again.status_code == 200 and again.json()["warnings"] == [], again.text
        assert_problem(http.post("/v1/definitions?strict=yes", content=TWO_AGENTS, headers=yaml), 422,
                       "strict must be true or false")


@pytest.mark.parametrize("broken", ["syntax", "raises", "missing-file"])
def test_every_broken_agents_file_is_one_line(db: Database, tmp_path: Path, broken: str) -> None:
    process = tmp_path / "p.yaml"
    process.write_text(TWO_AGENTS)
    (tmp_path / "broken_syntax.py").write_text("def run(request):\n    return (\n")
    (tmp_path / "broken_raises.py").write_text("raise RuntimeError('set ALPHA_KEY first')\n")
    target = {"syntax": "broken_syntax:run", "raises": "broken_raises:run", "missing-file": ""}[broken]
    agents = agents_file(tmp_path, "agents.yaml", alpha=target, beta="agents_for_tests:noop") \
        if target else tmp_path / "no-such-agents.yaml"
    env = {**db.cli_env(), "PYTHONPATH": str(TESTS)}
    for command in (["validate", "--agents", str(agents), str(process)], ["worker", "--agents", str(agents)]):
        result = flowdb_cli(*command, env=env, timeout=60)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 1 and len(lines) == 1, (command, result.stderr)
        assert "Traceback" not in result.stderr and "please report it" not in result.stderr
        expected = {"syntax": "importing 'broken_syntax' raised SyntaxError",
                    "raises": "importing 'broken_raises' raised RuntimeError: set ALPHA_KEY first",
                    "missing-file": "cannot read agents file"}[broken]
        assert expected in lines[0], lines[0]
