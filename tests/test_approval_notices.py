"""Approval notices and notification steps through real servers (aiosmtpd, an HTTP webhook); both databases."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, select

from flowdb.approvals import decide
from flowdb.db.tables import approvals, events
from flowdb.notifications import Notifier, NotifierConfig

import helpers
from conftest import EXAMPLES, Database
from helpers import event_types, instance, start, steps
from servers import Collecting, Webhook, free_port

MANAGER = "manager@company.com"


def drive(engine: Engine, notifier: Notifier, until: Callable[[], bool], timeout: float = 30.0) -> None:
    helpers.drive(engine, until, EXAMPLES / "agents.yaml", timeout, notifier)


def config(**given: Any) -> NotifierConfig:
    base: dict[str, Any] = {"attempts": 2, "backoff_seconds": 0.01, "timeout_seconds": 5.0}
    return NotifierConfig(**(base | given))


def smtp(port: int) -> dict[str, Any]:
    return {"smtp_host": "127.0.0.1", "smtp_port": port, "smtp_sender": "flowdb@example.com", "smtp_tls": "none"}


def the_approval(engine: Engine) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(approvals)).one()


def notified(engine: Engine) -> Callable[[], bool]:
    def check() -> bool:
        with engine.connect() as conn:
            row = conn.execute(select(approvals.c.notified_at)).first()
        return row is not None and row.notified_at is not None
    return check


def deliveries(engine: Engine, instance_id: int) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(select(events.c.payload).where(events.c.instance_id == instance_id,
                                                           events.c.type == "approval.notified"))
        return {row.payload["channel"]: row.payload for row in rows}


def test_approvers_get_an_email_and_a_slack_message(db: Database, smtp_server: Any, webhook: Any) -> None:
    mailbox, port = smtp_server()
    hook: Webhook = webhook()
    notifier = Notifier(config(**smtp(port), slack_webhook_url=hook.url(), allow_private=True))
    [iid] = start(db.engine, EXAMPLES / "reviewed-report.yaml")
    drive(db.engine, notifier, notified(db.engine))
    approval = the_approval(db.engine)
    artifact = steps(db.engine, iid)["draft"].output["output_path"]

    [mail] = mailbox.messages()
    assert mail["To"] == MANAGER and mail["Subject"] == "Approval needed: reviewed-report / review"
    [body] = mailbox.bodies()
    assert artifact in body and f"flowdb approvals decide {approval.id} approve|reject" in body
    [posted] = hook.requests
    payload = json.loads(posted.body)
    assert "Approval needed: reviewed-report / review" in payload["text"]
    assert artifact in json.dumps(payload["blocks"]) and f"decide {approval.id}" in json.dumps(payload["blocks"])
    assert {c: (d["ok"], d["attempts"]) for c, d in deliveries(db.engine, iid).items()} == {
        "log": (True, 1), "email": (True, 1), "slack": (True, 1)}

    decide(db.engine, approval.id, "approve", MANAGER)
    drive(db.engine, notifier, lambda: instance(db.engine, iid).status != "running")
    assert steps(db.engine, iid)["publish"].status == "completed"
    assert len(mailbox.messages()) == 1 and len(hook.requests) == 1  # no notice after the decision


def test_a_failing_smtp_server_does_not_lose_the_approval(db: Database, smtp_server: Any) -> None:
    refusing, port = smtp_server(Collecting(reply="554 5.7.1 rejected by policy"))
    notifier = Notifier(config(**smtp(port)))
    [iid] = start(db.engine, EXAMPLES / "reviewed-report.yaml")
    drive(db.engine, notifier, notified(db.engine))
    email = deliveries(db.engine, iid)["email"]
    assert (email["ok"], email["attempts"]) == (False, 2) and "554" in email["error"]
    assert refusing.data_calls == 2
    approval = the_approval(db.engine)
    assert approval.status == "pending" and steps(db.engine, iid)["review"].status == "waiting"
    decide(db.engine, approval.id, "approve", MANAGER)
    drive(db.engine, notifier, lambda: instance(db.engine, iid).status != "running")
    assert instance(db.engine, iid).status == "completed"


def test_nothing_listening_on_smtp_does_not_lose_the_approval(db: Database) -> None:
    notifier = Notifier(config(**smtp(free_port())))
    [iid] = start(db.engine, EXAMPLES / "reviewed-report.yaml")
    drive(db.engine, notifier, notified(db.engine))
    assert deliveries(db.engine, iid)["email"]["ok"] is False
    assert the_approval(db.engine).status == "pending"


def test_a_webhook_at_a_private_address_is_refused_at_send_time(db: Database, webhook: Any) -> None:
    hook: Webhook = webhook()
    notifier = Notifier(config(slack_webhook_url=hook.url(), allow_private=False))
    [iid] = start(db.engine, EXAMPLES / "reviewed-report.yaml")
    drive(db.engine, notifier, notified(db.engine))
    slack = deliveries(db.engine, iid)["slack"]
    assert slack["ok"] is False and "127.0.0.1" in slack["error"]
    assert hook.requests == []
    approval = the_approval(db.engine)
    decide(db.engine, approval.id, "reject", MANAGER)
    drive(db.engine, notifier, lambda: instance(db.engine, iid).status != "running")
    assert steps(db.engine, iid)["publish"].status == "skipped"


NOTIFY = """
process:
  name: notify-{channel}
  steps:
    - id: tell
      type: notification
      channel: {channel}
      to: [ops@example.com]
      title: "Run {{{{process.instance_id}}}} of {{{{process.name}}}}"
      message: "Topic was {{{{inputs.topic}}}}"
      retry: {{max_attempts: 2, initial_interval: 0.05s}}
  inputs:
    topic: {{type: string, default: agents}}
"""


def run_notification(db: Database, channel: str, notifier: Notifier) -> tuple[int, Any]:
    [iid] = start(db.engine, NOTIFY.format(channel=channel))
    drive(db.engine, notifier, lambda: instance(db.engine, iid).status != "running")
    return iid, steps(db.engine, iid)["tell"]


def test_notification_step_sends_an_email(db: Database, smtp_server: Any) -> None:
    mailbox, port = smtp_server()
    iid, step = run_notification(db, "email", Notifier(config(**smtp(port))))
    assert step.status == "completed" and step.output["channel"] == "email"
    [mail] = mailbox.messages()
    assert mail["Subject"] == f"Run {iid} of notify-email" and mail["To"] == "ops@example.com"
    assert "Topic was agents" in mailbox.bodies()[0]


def test_notification_step_to_the_log(db: Database) -> None:
    _, step = run_notification(db, "log", Notifier.log_only())
    assert step.status == "completed" and step.input["message"] == "Topic was agents"


def test_notification_step_on_a_channel_not_configured_fails_at_once(db: Database) -> None:
    iid, step = run_notification(db, "slack", Notifier.log_only())
    assert step.status == "failed" and step.attempt == 1
    assert "slack is not configured" in step.error and "FLOWDB_SLACK_WEBHOOK_URL" in step.error
    assert instance(db.engine, iid).status == "failed"


def test_notification_step_to_a_refused_webhook_url_fails_at_once(db: Database, webhook: Any) -> None:
    """The outbound check refuses the URL (loopback, not allowed here): no later attempt can differ."""
    hook: Webhook = webhook()
    iid, step = run_notification(db, "slack", Notifier(config(slack_webhook_url=hook.url(), allow_private=False)))
    assert step.status == "failed" and step.attempt == 1 and step.attempt < step.max_attempts
    assert "resolves to a refused address" in step.error and "loopback" in step.error
    assert "step.retry_scheduled" not in event_types(db.engine, iid)
    assert hook.requests == []
    assert instance(db.engine, iid).status == "failed"


def test_notification_step_retries_a_failing_server_then_fails(db: Database, smtp_server: Any) -> None:
    refusing, port = smtp_server(Collecting(reply="451 4.3.0 try again later"))
    iid, step = run_notification(db, "email", Notifier(config(**smtp(port))))
    assert step.status == "failed" and step.attempt == 2 and "451" in step.error
    assert refusing.data_calls == 2  # one delivery per step attempt: the step's retry policy spaces them
    assert instance(db.engine, iid).status == "failed"


ACTIONS = """
process:
  name: actions-{agent}
  steps:
    - id: work
      type: agent_task
      agent: {agent}
      message: "do it"
      retry: {{max_attempts: 1}}
  output:
    on_success:
      - {{type: notify, channel: email, to: [boss@example.com], message: "{{{{process.name}}}} done"}}
    on_failure:
      - {{type: notify, channel: slack, title: "flowdb alert", message: "{{{{process.name}}}} failed"}}
"""


def test_output_actions_notify_when_the_instance_ends(db: Database, smtp_server: Any, webhook: Any) -> None:
    import time

    mailbox, port = smtp_server()
    hook: Webhook = webhook()
    notifier = Notifier(config(**smtp(port), slack_webhook_url=hook.url(), allow_private=True))
    [ok] = start(db.engine, ACTIONS.format(agent="noop"))
    [bad] = start(db.engine, ACTIONS.format(agent="broken"))  # tests/agents.yaml: it always raises

    def sent() -> bool:
        with db.engine.connect() as conn:
            return len(conn.execute(select(events.c.id).where(events.c.type == "action.notified")).all()) == 2

    deadline = time.monotonic() + 20
    helpers.drive(db.engine, lambda: sent() or time.monotonic() > deadline, helpers.AGENTS_FILE, 30.0, notifier)
    assert (instance(db.engine, ok).status, instance(db.engine, bad).status) == ("completed", "failed")
    [mail] = mailbox.messages()
    assert mail["To"] == "boss@example.com" and mail["Subject"] == f"actions-noop: instance {ok} completed"
    assert "actions-noop done" in mailbox.bodies()[0]
    [posted] = hook.requests
    assert "flowdb alert" in json.loads(posted.body)["text"] and "actions-broken failed" in posted.body.decode()
    with db.engine.connect() as conn:
        rows = conn.execute(select(events.c.instance_id, events.c.payload).where(events.c.type == "action.notified"))
        assert {row.instance_id: (row.payload["channel"], row.payload["ok"]) for row in rows} == {
            ok: ("email", True), bad: ("slack", True)}
