"""`flowdb instances list` and `flowdb definitions list|show`, through the real command, on both databases."""

from __future__ import annotations

import json

import pytest

from conftest import EXAMPLES, Database, flowdb_cli
from helpers import start

SIMPLE = EXAMPLES / "simple-report.yaml"
OTHER = """
process:
  name: other-process
  steps:
    - {id: a, type: agent_task, agent: noop, message: a}
"""


@pytest.mark.slow
def test_instances_list_filters_and_definitions(db: Database) -> None:
    env = db.cli_env()
    ids = start(db.engine, SIMPLE, count=3)
    [other] = start(db.engine, OTHER)
    listed = json.loads(flowdb_cli("instances", "list", "--json", env=env).stdout)
    assert [i["id"] for i in listed] == sorted([*ids, other], reverse=True)
    assert {i["status"] for i in listed} == {"running"}
    only = json.loads(flowdb_cli("instances", "list", "--json", "--process", "other-process", env=env).stdout)
    assert [i["id"] for i in only] == [other]
    assert json.loads(flowdb_cli("instances", "list", "--json", "--status", "completed", env=env).stdout) == []
    recent = json.loads(flowdb_cli("instances", "list", "--json", "--since", "1h", "--limit", "2", env=env).stdout)
    assert len(recent) == 2
    assert json.loads(flowdb_cli("instances", "list", "--json", "--since", "2999-01-01", env=env).stdout) == []
    table = flowdb_cli("instances", "list", env=env).stdout
    assert "simple-report" in table and "other-process" in table
    bad = flowdb_cli("instances", "list", "--since", "yesterday", env=env)
    assert bad.returncode == 2 and "neither a date" in bad.stderr

    definitions = json.loads(flowdb_cli("definitions", "list", "--json", env=env).stdout)
    assert [(d["name"], d["latest_version"], d["versions"]) for d in definitions] == [
        ("other-process", 1, 1), ("simple-report", 1, 1)]
    shown = flowdb_cli("definitions", "show", "simple-report", env=env)
    assert shown.returncode == 0 and shown.stdout.startswith("# simple-report version 1")
    assert "name: simple-report" in shown.stdout
    missing = flowdb_cli("definitions", "show", "nope", env=env)
    assert missing.returncode == 1 and "process nope is not deployed (deployed: other-process, simple-report)" \
        in missing.stderr and "Traceback" not in missing.stderr
