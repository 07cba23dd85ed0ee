"""The approval flow as the README shows it: real commands and a real worker process, both databases."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import EXAMPLES, Database, flowdb_cli
from processes import FLOWDB, wait_until

MANAGER = "manager@company.com"


@pytest.mark.slow
def test_readme_approval_flow(db: Database, tmp_path: Path) -> None:
    env = {**db.cli_env(), "FLOWDB_POLL_SECONDS": "0.05"}
    assert flowdb_cli("deploy", str(EXAMPLES / "reviewed-report.yaml"), env=env).returncode == 0
    started = flowdb_cli("start", "reviewed-report", env=env)
    assert started.returncode == 0, started.stderr
    instance_id = int(started.stdout.split()[-1])
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen([FLOWDB, "worker", "--agents", str(EXAMPLES / "agents.yaml")], env=env,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        def inbox() -> list[dict[str, object]]:
            listed = flowdb_cli("approvals", "list", "--approver", MANAGER, "--status", "pending", "--json", env=env)
            assert listed.returncode == 0, listed.stderr
            rows: list[dict[str, object]] = json.loads(listed.stdout)
            return [r for r in rows if r["notified_at"]]

        [approval] = wait_until(inbox, 60, "the approval to be notified")
        approval_id = approval["id"]
        assert approval["instance_id"] == instance_id and approval["approvers"] == [MANAGER]

        table = flowdb_cli("approvals", "list", env=env)
        assert f"{approval_id:>6}  pending" in table.stdout
        shown = flowdb_cli("approvals", "show", str(approval_id), env=env)
        assert "quorum      1 of 1" in shown.stdout and f"{MANAGER}: has not decided" in shown.stdout
        assert "artifact    reports/" in shown.stdout

        stranger = flowdb_cli("approvals", "decide", str(approval_id), "approve", "--as", "eve@company.com", env=env)
        assert stranger.returncode == 1
        assert stranger.stderr.strip() == (f"error: eve@company.com is not an approver of approval {approval_id} "
                                           f"(approvers: {MANAGER})")
        word = flowdb_cli("approvals", "decide", str(approval_id), "yes", "--as", MANAGER, env=env)
        assert word.returncode == 1
        assert "decision must be one of approve, approved, reject, rejected, not 'yes'" in word.stderr

        decided = flowdb_cli("approvals", "decide", str(approval_id), "approve", "--as", MANAGER,
                             "--comment", "ship it", env=env)
        assert decided.returncode == 0, decided.stderr
        assert decided.stdout.strip() == (f"approval {approval_id} approved by {MANAGER}; "
                                          f"instance {instance_id} continues")
        again = flowdb_cli("approvals", "decide", str(approval_id), "reject", "--as", MANAGER, env=env)
        assert again.returncode == 1 and f"approval {approval_id} was already approved by {MANAGER} at" in again.stderr

        def finished() -> dict[str, object] | None:
            status = json.loads(flowdb_cli("status", str(instance_id), "--json", env=env).stdout)
            return status if status["status"] != "running" else None

        status = wait_until(finished, 60, "the instance to finish")
        assert status["status"] == "completed"
        by_step = {s["step_id"]: s for s in status["steps"]}  # type: ignore[attr-defined]
        assert by_step["publish"]["status"] == "completed"
        assert by_step["review"]["output"]["decision"] == "approved"
        assert "review" in log.read_text()  # the log channel's notice
    finally:
        worker.terminate()
        worker.wait(30)


@pytest.mark.slow
def test_cancel_command(db: Database) -> None:
    env = db.cli_env()
    flowdb_cli("deploy", str(EXAMPLES / "reviewed-report.yaml"), env=env)
    instance_id = flowdb_cli("start", "reviewed-report", env=env).stdout.split()[-1]
    cancelled = flowdb_cli("cancel", instance_id, "--reason", "duplicate request", env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.startswith(f"instance {instance_id} cancelled (3 unfinished step(s): ")
    again = flowdb_cli("cancel", instance_id, env=env)
    assert again.returncode == 1
    assert again.stderr.strip() == (f"error: instance {instance_id} is already cancelled; only running "
                                    "instances can be cancelled")
    status = json.loads(flowdb_cli("status", instance_id, "--json", env=env).stdout)
    assert status["status"] == "cancelled" and status["error"] == "duplicate request"
    missing = flowdb_cli("cancel", "999", env=env)
    assert missing.returncode == 1 and "instance 999 does not exist" in missing.stderr


@pytest.mark.slow
def test_tokens_and_retry_commands(db: Database, tmp_path: Path) -> None:
    env = db.cli_env()
    created = flowdb_cli("tokens", "create", "--identity", "Ops@Company.com", "--role", "operator", env=env)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("fdb_") and len(token) > 40 and token not in flowdb_cli("tokens", "list", env=env).stdout
    assert "shown only now" in created.stderr
    listed = flowdb_cli("tokens", "list", env=env).stdout
    assert "operator" in listed and "ops@company.com" in listed and "active" in listed
    token_id = listed.split()[0]
    assert flowdb_cli("tokens", "revoke", token_id, env=env).stdout.strip() == f"token {token_id} revoked"
    assert "revoked 20" in flowdb_cli("tokens", "list", env=env).stdout
    bad_role = flowdb_cli("tokens", "create", "--identity", "x@y.z", "--role", "root", env=env)
    assert bad_role.returncode == 2 and "'root' is not one of" in bad_role.stderr

    missing = flowdb_cli("retry", "1", "draft", env=env)
    assert missing.returncode == 1 and "instance 1 does not exist" in missing.stderr
    flowdb_cli("deploy", str(EXAMPLES / "reviewed-report.yaml"), env=env)
    instance_id = flowdb_cli("start", "reviewed-report", env=env).stdout.strip()
    not_failed = flowdb_cli("retry", instance_id, "draft", env=env)
    assert not_failed.returncode == 1
    assert not_failed.stderr.strip() == (f"error: step 'draft' of instance {instance_id} is ready; only failed "
                                         "steps can be retried")
