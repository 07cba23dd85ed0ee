"""A notification step records the text it sent (its output and its event), and `flowdb run` shows it;
an on_failure message can say what failed: `{{ error }}` (the instance's error), `error.type`,
`error.message`, `error.step`. `error` is refused in on_success messages, with the names usable there."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from flowdb.db.tables import events
from flowdb.errors import DefinitionError

from conftest import Database, flowdb_cli
from helpers import definition_from, instance, start, steps, work

NOTIFIES = """
process:
  name: notifies
  inputs: {who: {type: string}}
  steps:
    - {id: hello, type: notification, channel: log, title: "Greeting", message: "Hello {{ inputs.who }}, all is well"}
"""

FAILS = """
process:
  name: fails-with-a-reason
  steps:
    - {id: fine, type: agent_task, agent: noop, message: "x"}
    - {id: draft, type: agent_task, agent: broken, message: "x", depends_on: [fine], retry: {max_attempts: 1}}
  output:
    on_failure:
      - {type: log, level: error, message: "{{ process.name }} failed: {{ error }}"}
      - {type: log, message: "type={{ error.type }} step={{ error.step }} message={{ error.message }}"}
"""


def payloads(db: Database, instance_id: int, kind: str) -> list[dict[str, object]]:
    with db.engine.connect() as conn:
        return [row.payload for row in conn.execute(select(events.c.payload).where(
            events.c.instance_id == instance_id, events.c.type == kind).order_by(events.c.id))]


def test_a_notification_records_the_text_it_sent(db: Database) -> None:
    [iid] = start(db.engine, NOTIFIES, {"who": "Ada"})
    work(db.engine)
    row = steps(db.engine, iid)["hello"]
    assert row.status == "completed"
    assert row.output["message"] == "Hello Ada, all is well" and row.output["title"] == "Greeting"
    assert row.output["channel"] == "log" and row.output["delivered"] is True
    [sent] = payloads(db, iid, "notification.sent")
    assert sent["message"] == "Hello Ada, all is well" and sent["title"] == "Greeting" and sent["ok"] is True


def test_run_shows_the_notification_text(db: Database, tmp_path: Path) -> None:
    file = tmp_path / "notifies.yaml"
    file.write_text(NOTIFIES)
    result = flowdb_cli("run", str(file), "--input", "who=Grace", env=db.cli_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[log] Hello Grace, all is well" in result.stdout


def test_on_failure_messages_say_what_failed(db: Database) -> None:
    [iid] = start(db.engine, FAILS)
    work(db.engine)
    failed = instance(db.engine, iid)
    assert failed.status == "failed"
    assert failed.error == "step 'draft' failed: agent 'broken' raised RuntimeError: this agent always fails"
    logged = [p["message"] for p in payloads(db, iid, "action.log")]
    assert logged == [f"fails-with-a-reason failed: {failed.error}",
                      "type=RuntimeError step=draft message=agent 'broken' raised RuntimeError: "
                      "this agent always fails"]
    [ended] = payloads(db, iid, "instance.failed")
    assert ended == {"error": failed.error, "step": "draft", "error_type": "RuntimeError"}


def test_error_is_refused_outside_on_failure() -> None:
    text = FAILS.replace("on_failure:", "on_success:")
    with pytest.raises(DefinitionError) as caught:
        definition_from(text)
    assert "unknown name 'error' in template" in str(caught.value)
    assert "templates here can use inputs, process, steps" in str(caught.value)
