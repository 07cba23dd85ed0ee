"""The command line as a user runs it: deploy, start, idempotency, inputs, status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from flowdb.db.tables import process_definitions, process_instances, step_instances

from conftest import EXAMPLES, Database, flowdb_cli

TYPED = """process:
  name: typed
  inputs:
    company: {type: string}
    limit: {type: integer, default: 5}
    strict: {type: boolean, default: false}
  steps:
    - id: a
      type: agent_task
      agent: echo
      message: "{{inputs.company}} {{inputs.limit}} {{inputs.strict}}"
"""


def _count(db: Database, table) -> int:  # type: ignore[no-untyped-def]
    with db.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


@pytest.mark.slow
def test_deploy_is_versioned_and_identical_content_is_a_no_op(db: Database, tmp_path: Path) -> None:
    file = tmp_path / "typed.yaml"
    file.write_text(TYPED)
    env = db.cli_env()
    first = flowdb_cli("deploy", str(file), env=env)
    assert first.returncode == 0 and "deployed typed version 1" in first.stdout
    again = flowdb_cli("deploy", str(file), env=env)
    assert again.returncode == 0 and "unchanged typed version 1" in again.stdout
    file.write_text(TYPED.replace("default: 5", "default: 6"))
    changed = flowdb_cli("deploy", str(file), env=env)
    assert "deployed typed version 2" in changed.stdout
    file.write_text(TYPED.replace("name: typed", "name: typed\n  version: 1"))
    pinned_same = flowdb_cli("deploy", str(file), env=env)
    assert "unchanged typed version 1" in pinned_same.stdout  # the version is not part of the content
    file.write_text(TYPED.replace("name: typed", "name: typed\n  version: 1").replace("default: 5", "default: 7"))
    conflict = flowdb_cli("deploy", str(file), env=env)
    assert conflict.returncode == 1 and "already deployed with other content" in conflict.stderr
    assert _count(db, process_definitions) == 2


@pytest.mark.slow
def test_start_validates_inputs_and_honours_idempotency_keys(db: Database, tmp_path: Path) -> None:
    file = tmp_path / "typed.yaml"
    file.write_text(TYPED)
    env = db.cli_env()
    assert flowdb_cli("deploy", str(file), env=env).returncode == 0

    bad = flowdb_cli("start", "typed", "--input", "company=Acme", "--input", "limit=many", env=env)
    assert bad.returncode == 1 and "input 'limit' must be an integer, got 'many'" in bad.stderr
    missing = flowdb_cli("start", "typed", env=env)
    assert missing.returncode == 1 and "missing input 'company'" in missing.stderr
    unknown = flowdb_cli("start", "typed", "--input", "company=A", "--input", "colour=red", env=env)
    assert unknown.returncode == 1 and "unknown input(s) colour" in unknown.stderr
    assert "Traceback" not in bad.stderr + missing.stderr + unknown.stderr
    assert _count(db, process_instances) == 0 and _count(db, step_instances) == 0

    one = flowdb_cli("start", "typed", "-i", "company=Acme", "-i", "strict=yes", "--idempotency-key", "k1", env=env)
    assert one.returncode == 0, one.stderr
    assert one.stdout.strip().isdigit()  # the id alone on stdout
    two = flowdb_cli("start", "typed", "-i", "company=Acme", "-i", "strict=yes", "--idempotency-key", "k1", env=env)
    assert two.stdout == one.stdout
    clash = flowdb_cli("start", "typed", "-i", "company=Other", "--idempotency-key", "k1", env=env)
    assert clash.returncode == 1 and "already started instance" in clash.stderr
    assert _count(db, process_instances) == 1
    with db.engine.connect() as conn:
        inputs = conn.execute(select(process_instances.c.inputs)).scalar_one()
    assert inputs == {"company": "Acme", "limit": 5, "strict": True}


@pytest.mark.slow
def test_bulk_start_from_jsonl_and_status(db: Database, tmp_path: Path) -> None:
    env = db.cli_env()
    assert flowdb_cli("deploy", str(EXAMPLES / "simple-report.yaml"), env=env).returncode == 0
    lines = tmp_path / "inputs.jsonl"
    lines.write_text("\n".join("{}" for _ in range(1200)) + "\n")
    started = flowdb_cli("start", "simple-report", "--inputs-file", str(lines), env=env)
    ids = started.stdout.split()
    assert started.returncode == 0 and len(ids) == 1200 and len(set(ids)) == 1200
    assert _count(db, step_instances) == 2400

    status = flowdb_cli("status", ids[0], "--json", env=env)
    data = json.loads(status.stdout)
    assert data["status"] == "running" and [s["status"] for s in data["steps"]] == ["ready", "pending"]
    table = flowdb_cli("status", ids[0], env=env)
    assert "research" in table.stdout and "pending" in table.stdout
    nothing = flowdb_cli("status", "999999", env=env)
    assert nothing.returncode == 1 and "instance 999999 does not exist" in nothing.stderr


def test_run_exits_1_when_the_instance_fails(db: Database, tmp_path: Path) -> None:
    file = tmp_path / "fails.yaml"
    file.write_text("process:\n  name: fails\n  steps:\n    - {id: a, type: agent_task, agent: refuses, message: x}\n")
    result = flowdb_cli("run", str(file), "--agents", str(Path(__file__).parent / "agents.yaml"), env=db.cli_env())
    assert result.returncode == 1
    assert "failed" in result.stdout and "refused on purpose" in result.stdout


def test_start_of_an_unknown_process_says_what_is_deployed(db: Database) -> None:
    result = flowdb_cli("start", "nope", env=db.cli_env())
    assert result.returncode == 1 and "process nope is not deployed" in result.stderr


@pytest.mark.slow
def test_validate_with_agents_file_reports_unknown_agents(tmp_path: Path) -> None:
    file = tmp_path / "p.yaml"
    file.write_text("process:\n  name: p\n  steps:\n    - id: a\n      type: agent_task\n"
                    "      agent: ghostwriter\n      message: hi\n")
    agents = Path(__file__).parent / "agents.yaml"
    # Other workers may have the agent (each claims only its own agents' steps): a warning, unless --strict
    warned = flowdb_cli("validate", "--agents", str(agents), str(file))
    assert warned.returncode == 0 and f"{file}: ok" in warned.stdout
    assert warned.stderr.startswith(f"{file}:4:7: warning: step 'a' uses agent 'ghostwriter'"), warned.stderr
    assert "only workers whose agents file defines it will run its steps" in warned.stderr
    result = flowdb_cli("validate", "--strict", "--agents", str(agents), str(file))
    assert result.returncode == 1
    assert f"{file}:4:7: step 'a' uses agent 'ghostwriter'" in result.stderr
    assert "noop" in result.stderr  # it lists the agents that do exist
    fine = flowdb_cli("validate", "--agents", str(EXAMPLES / "agents.yaml"), str(EXAMPLES / "simple-report.yaml"))
    assert fine.returncode == 0 and "ok" in fine.stdout


def test_an_inputs_file_with_bad_lines_starts_nothing_and_names_each_line(db: Database, tmp_path: Path) -> None:
    process = tmp_path / "p.yaml"
    process.write_text("process:\n  name: priced\n  inputs: {amount: {type: number}}\n  steps:\n"
                       "    - {id: a, type: notification, channel: log, message: '{{ inputs.amount }}'}\n")
    env = db.cli_env()
    assert flowdb_cli("deploy", str(process), env=env).returncode == 0
    lines = tmp_path / "inputs.jsonl"
    lines.write_text('{"amount": 1}\n{}\n\n{"amount": "many"}\n{"amount": 2.5}\n')
    result = flowdb_cli("start", "priced", "--inputs-file", str(lines), env=env)
    assert result.returncode == 1 and result.stdout == "", result.stdout
    assert result.stderr.splitlines() == [
        "error: no instance was started:",
        f"{lines}:2: missing input 'amount' (number); add \"amount\" to the line's object",
        f"{lines}:4: input 'amount' must be a number, got 'many'"], result.stderr
    listed = flowdb_cli("instances", "list", "--json", env=env)
    assert json.loads(listed.stdout) == []
