"""Agents on an agent platform's MCP server: flowdb's MCP backend against a real MCP server built with the
SDK (examples/mcp/agent_platform.py, the platform's contract), on both databases: replies with cost and
the session recorded, each of the platform's answers mapped, a worker killed while it polls an
execution (the execution is polled, never sent again), and `concurrency:` across worker processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from flowdb.db.tables import events

from conftest import Database
from helpers import event_types, start, steps, work
from mcp_platform import Platform, most_at_once, start_platform
from processes import Fleet, instance_statuses, wait_until

pytestmark = pytest.mark.slow
KEY_ENV = "FLOWDB_TEST_MCP_KEY"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    with start_platform(tmp_path_factory.mktemp("platform"), busy_retry=0.2) as server:
        yield server


@pytest.fixture
def keyed(platform: Platform, monkeypatch: pytest.MonkeyPatch) -> Platform:
    monkeypatch.setenv(KEY_ENV, platform.key)
    return platform


def agents_file(folder: Path, platform: Platform, **extra: Any) -> Path:
    """researcher (sequential: one call at a time) and analyst (parallel), both on the platform."""
    options = {"poll_interval": "0.1s", **extra}
    spec = ", ".join(f"{k}: {v}" for k, v in options.items())
    path = folder / "agents.yaml"
    path.write_text(
        "agents:\n"
        f"  researcher: {{mcp: {{url: {platform.url}, api_key_env: {KEY_ENV}, mode: sequential, {spec}}}}}\n"
        f"  analyst: {{mcp: {{url: {platform.url}, api_key_env: {KEY_ENV}, agent_name: analyst-7, mode: parallel, "
        f"{spec}}}}}\n")
    return path


def one_step(agent: str, message: str, retry: str = "{max_attempts: 3, initial_interval: 0.05}") -> str:
    return (f"process:\n  name: mcp-{agent}\n  steps:\n"
            f"    - {{id: ask, type: agent_task, agent: {agent}, message: {message!r}, retry: {retry}}}\n")


def sent(platform: Platform, message: str, tool: str = "chat_with_agent") -> list[dict[str, Any]]:
    return [c for c in platform.tool_calls(tool) if c.get("message") == message]


def test_a_reply_completes_the_step_with_cost_tokens_and_the_session(db: Database, keyed: Platform,
                                                                      tmp_path: Path) -> None:
    message = f"summarize the market {tmp_path.name} [cost 0.25] [tokens 40]"
    [iid] = start(db.engine, one_step("researcher", message))
    work(db.engine, agents_file(tmp_path, keyed))
    row = steps(db.engine, iid)["ask"]
    expected = f"researcher: summarize the market {tmp_path.name}"
    assert (row.status, row.attempt, row.output) == ("completed", 1, expected)
    assert (row.cost_usd, row.tokens_in, row.tokens_out) == (0.25, 40, 40)
    assert row.agent_backend == "mcp" and row.agent_session == "researcher-session-1"
    [call] = sent(keyed, message)
    assert row.agent_execution == call["execution_id"] and call["parallel"] is False
    with db.engine.connect() as conn:
        view = conn.execute(text("SELECT agent, backend, execution_id, session_id FROM v_agent_runs "
                                 "WHERE instance_id = :i"), {"i": iid}).one()
    assert tuple(view) == ("researcher", "mcp", call["execution_id"], "researcher-session-1")


def test_a_parallel_agent_is_called_by_its_platform_name_without_a_session(db: Database, keyed: Platform,
                                                                           tmp_path: Path) -> None:
    message = f"rank the leads {tmp_path.name}"
    [iid] = start(db.engine, one_step("analyst", message))
    work(db.engine, agents_file(tmp_path, keyed))
    row = steps(db.engine, iid)["ask"]
    assert (row.status, row.output, row.agent_session) == ("completed", f"analyst-7: rank the leads {tmp_path.name}",
                                                           None)
    [call] = sent(keyed, message)
    assert (call["agent"], call["parallel"]) == ("analyst-7", True)


def test_agent_busy_waits_and_tries_again_without_spending_an_attempt(db: Database, keyed: Platform,
                                                                      tmp_path: Path) -> None:
    message = f"[busy 2] [retry 0.1] draft {tmp_path.name}"
    [iid] = start(db.engine, one_step("researcher", message, retry="{max_attempts: 1}"))
    work(db.engine, agents_file(tmp_path, keyed))
    row = steps(db.engine, iid)["ask"]
    assert (row.status, row.attempt) == ("completed", 1)  # one attempt allowed, and it was enough
    assert [c["answer"] for c in sent(keyed, message)] == ["agent_busy", "agent_busy", "reply"]
    with db.engine.connect() as conn:
        waits = conn.execute(select(events.c.payload).where(events.c.instance_id == iid,
                                                            events.c.type == "step.deferred")).scalars().all()
    assert [w["retry_after_s"] for w in waits] == [0.1, 0.1]


def test_queued_timeout_polls_the_execution_and_never_sends_again(db: Database, keyed: Platform,
                                                                  tmp_path: Path) -> None:
    message = f"[queue 0.5] deep research {tmp_path.name}"
    [iid] = start(db.engine, one_step("researcher", message))
    work(db.engine, agents_file(tmp_path, keyed))
    row = steps(db.engine, iid)["ask"]
    assert (row.status, row.attempt) == ("completed", 1)
    [call] = sent(keyed, message)
    assert call["answer"] == "queued_timeout"
    polls = [c for c in keyed.tool_calls("get_execution_result") if c["execution_id"] == call["execution_id"]]
    assert len(polls) >= 2 and polls[-1]["answer"] == "reply" and {p["answer"] for p in polls[:-1]} == {"running"}
    assert row.agent_execution == call["execution_id"]
    assert event_types(db.engine, iid).count("step.waiting") >= 2  # queued, then polled while it ran


@pytest.mark.parametrize(("directive", "calls", "error", "error_type"), [
    ("[refuse]", 1, "refused", "AgentRefused"),
    ("[badjson]", 1, "not a JSON object", "AgentReplyInvalid"),
    ("[flaky 5]", 3, "failed for now", "AgentFailed"),  # transient: retried under the policy until attempts run out
])
def test_failures_are_retried_only_when_the_platform_says_they_may_be(
        db: Database, keyed: Platform, tmp_path: Path, directive: str, calls: int, error: str, error_type: str) -> None:
    message = f"{directive} {tmp_path.name}"
    [iid] = start(db.engine, one_step("researcher", message))
    work(db.engine, agents_file(tmp_path, keyed))
    row = steps(db.engine, iid)["ask"]
    assert row.status == "failed" and error in row.error and row.attempt == calls
    assert len(sent(keyed, message)) == calls
    with db.engine.connect() as conn:
        failed = conn.execute(select(events.c.payload).where(events.c.instance_id == iid,
                                                             events.c.type == "instance.failed")).scalar_one()
    assert failed["error_type"] == error_type


def test_a_wrong_key_fails_at_once_and_names_the_variable(db: Database, platform: Platform, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "not-the-key")
    [iid] = start(db.engine, one_step("researcher", f"hello {tmp_path.name}"))
    work(db.engine, agents_file(tmp_path, platform))
    row = steps(db.engine, iid)["ask"]
    assert (row.status, row.attempt) == ("failed", 1)
    assert "refused the API key (HTTP 401)" in row.error and KEY_ENV in row.error


def test_a_platform_that_is_down_is_retried_as_a_transport_error(db: Database, keyed: Platform,
                                                                  tmp_path: Path) -> None:
    path = tmp_path / "agents.yaml"
    path.write_text("agents:\n  gone: {mcp: {url: http://127.0.0.1:9/mcp, mode: parallel}}\n")
    [iid] = start(db.engine, one_step("gone", "hello", retry="{max_attempts: 2, initial_interval: 0.05}"))
    work(db.engine, path)
    row = steps(db.engine, iid)["ask"]
    assert (row.status, row.attempt) == ("failed", 2) and "ConnectError" in row.error


def _fleet_env(db: Database, platform: Platform) -> dict[str, str]:
    env = db.cli_env()
    env.update(FLOWDB_LEASE_SECONDS="2", FLOWDB_POLL_SECONDS="0.05", **{KEY_ENV: platform.key})
    return env


def test_a_worker_killed_while_polling_hands_the_poll_over_and_nothing_is_sent_twice(
        db: Database, tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    with start_platform(tmp_path / "p") as server:
        agents = agents_file(tmp_path, server, poll_interval="0.05s")
        messages = [f"[queue 2.5] audit supplier {n}" for n in range(6)]
        for message in messages:
            start(db.engine, one_step("analyst", message))
        fleet = Fleet(_fleet_env(db, server), tmp_path, "--concurrency", "8", agents=agents)
        try:
            [first] = fleet.start(1)
            # Every step sent and polled at least once: the worker is in the middle of its polls.
            wait_until(lambda: len(server.tool_calls("get_execution_result")) >= 12, 60, "polls", 0.05, fleet)
            fleet.kill(first)
            polled_before = len(server.tool_calls("get_execution_result"))
            fleet.start(1)
            wait_until(lambda: instance_statuses(db.engine) == {"completed": 6}, 90, "the instances to complete",
                       0.1, fleet)
            fleet.terminate()
        finally:
            fleet.close()
        for message in messages:
            assert len(sent(server, message)) == 1, f"{message!r} was sent more than once"
        assert len(server.tool_calls("get_execution_result")) > polled_before  # the new worker polled
        with db.engine.connect() as conn:
            rows = conn.execute(text("SELECT status, attempts, execution_id FROM v_agent_runs")).all()
        executions = {c["execution_id"] for c in server.tool_calls() if c["answer"] == "queued_timeout"}
        assert {(r.status, r.attempts) for r in rows} <= {("completed", 1), ("completed", 2)}
        assert {r.execution_id for r in rows} == executions


@pytest.mark.parametrize("limit", [1, 3])
def test_concurrency_holds_across_worker_processes(db: Database, tmp_path: Path, limit: int) -> None:
    (tmp_path / "p").mkdir()
    with start_platform(tmp_path / "p") as server:
        agents = tmp_path / "agents.yaml"
        agents.write_text(f"agents:\n  analyst: {{mcp: {{url: {server.url}, api_key_env: {KEY_ENV}, "
                          f"mode: parallel}}, concurrency: {limit}}}\n")
        for n in range(60):
            start(db.engine, one_step("analyst", f"[slow 0.1] item {n}"))
        fleet = Fleet(_fleet_env(db, server), tmp_path, "--concurrency", "8", agents=agents)
        try:
            fleet.start(3)
            wait_until(lambda: instance_statuses(db.engine) == {"completed": 60}, 120, "the instances to complete",
                       0.1, fleet)
            codes = fleet.terminate()
            assert set(codes.values()) == {0}, fleet.all_output()[-3000:]
        finally:
            fleet.close()
        work_done = server.work()
        assert sorted(w["message"] for w in work_done) == sorted(f"[slow 0.1] item {n}" for n in range(60))
        peak = most_at_once(work_done)
        assert peak <= limit
        assert peak >= min(limit, 2)  # the workers did use the slots they had



def test_a_context_saved_from_a_session_is_given_to_another_agent(db: Database, keyed: Platform,
                                                                   tmp_path: Path) -> None:
    tag = tmp_path.name
    [iid] = start(db.engine, f"""
process:
  name: mcp-context
  steps:
    - {{id: research, type: agent_task, agent: researcher, message: "find facts {tag}", context: {{save: facts}}}}
    - {{id: brief, type: agent_task, agent: analyst, message: "brief {tag}", depends_on: [research],
       context: {{restore: facts}}}}
""")
    work(db.engine, agents_file(tmp_path, keyed))
    assert steps(db.engine, iid)["brief"].status == "completed"
    [call] = [c for c in keyed.tool_calls() if c["agent"] == "analyst-7" and c["message"].endswith(f"brief {tag}")]
    assert call["message"].startswith(f"Context saved as 'facts' by step 'research' (researcher):\n"
                                      f"researcher: find facts {tag}\n\n---\n")
    with db.engine.connect() as conn:
        saved = conn.execute(text("SELECT session_id FROM agent_contexts WHERE instance_id = :i"), {"i": iid}).one()
    assert saved.session_id == "researcher-session-1"
