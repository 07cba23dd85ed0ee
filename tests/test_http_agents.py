"""Agents behind HTTP (`http: {url, headers_env, timeout}`), against a real HTTP server on 127.0.0.1:
the request flowdb sends, the reply it records, and which answers are retried and which fail at once."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flowdb.agents.registry import AgentRegistry
from flowdb.errors import DefinitionError

from conftest import Database, flowdb_cli
from helpers import instance, start, steps, work
from servers import Webhook

ONE_STEP = """
process:
  name: http-agent
  steps:
    - id: ask
      type: agent_task
      agent: remote
      message: "Summarize {{ process.instance_id }}"
      retry: {max_attempts: 3, initial_interval: 0.01}
"""


def agents_for(folder: Path, http: str) -> Path:
    path = folder / "agents.yaml"
    path.write_text(f"agents:\n  remote:\n    http: {http}\n")
    return path


def reply(body: Any, status: int = 200) -> tuple[int, dict[str, str], bytes]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return status, {"Content-Type": "application/json"}, raw


def run(db: Database, tmp_path: Path, hook: Webhook, extra: str = "") -> tuple[int, Any]:
    [iid] = start(db.engine, ONE_STEP)
    work(db.engine, agents_for(tmp_path, f"{{url: \"{hook.url('/agent')}\"{extra}}}"), timeout=60)
    return iid, steps(db.engine, iid)["ask"]


def test_a_reply_is_recorded_with_its_cost_and_the_request_carries_what_the_agent_needs(
        db: Database, tmp_path: Path, webhook: Callable[..., Webhook], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMOTE_AGENT_TOKEN", "Bearer s3cret")
    hook = webhook([reply({"output": {"summary": "all good"}, "cost_usd": 0.02, "tokens_in": 120, "tokens_out": 30})])
    iid, row = run(db, tmp_path, hook, ", headers_env: {Authorization: REMOTE_AGENT_TOKEN}")
    assert row.status == "completed" and row.output == {"summary": "all good"}
    assert (row.cost_usd, row.tokens_in, row.tokens_out) == (0.02, 120, 30)
    assert instance(db.engine, iid).cost_usd == 0.02
    [sent] = hook.requests
    assert sent.path == "/agent" and sent.headers["Authorization"] == "Bearer s3cret"
    body = json.loads(sent.body)
    assert body == {"agent": "remote", "message": f"Summarize {iid}", "instance_id": iid, "step_id": "ask",
                    "attempt": 1, "idempotency_key": f"{iid}:ask"}
    assert sent.headers["Idempotency-Key"] == f"{iid}:ask"


def test_server_errors_are_retried_with_the_same_idempotency_key(db: Database, tmp_path: Path,
                                                                 webhook: Callable[..., Webhook]) -> None:
    hook = webhook([reply({"error": "overloaded"}, 503), reply(b"gateway down", 502), reply({"output": "fine"})])
    _, row = run(db, tmp_path, hook)
    assert row.status == "completed" and row.attempt == 3 and row.output == "fine"
    keys = {r.headers["Idempotency-Key"] for r in hook.requests}
    assert len(hook.requests) == 3 and len(keys) == 1
    assert [json.loads(r.body)["attempt"] for r in hook.requests] == [1, 2, 3]


@pytest.mark.parametrize(("answer", "said"), [
    (reply({"error": "message too long"}, 400), "answered 400: message too long"),
    (reply({"error": "over quota", "retryable": False}, 503), "answered 503: over quota"),
    (reply({"output": None, "retryable": False, "error": "not allowed"}), "refused: not allowed"),
    (reply(b"<html>hello</html>"), "without a JSON object holding `output`"),
    (reply({"result": "wrong protocol"}), "without a JSON object holding `output`"),
])
def test_refusals_and_foreign_replies_fail_at_once(db: Database, tmp_path: Path, webhook: Callable[..., Webhook],
                                                   answer: tuple[int, dict[str, str], bytes], said: str) -> None:
    hook = webhook([answer, reply({"output": "too late"})])
    iid, row = run(db, tmp_path, hook)
    assert row.status == "failed" and row.attempt == 1 and len(hook.requests) == 1
    assert said in row.error and f"agent 'remote' at {hook.url('/agent')}" in row.error
    assert instance(db.engine, iid).status == "failed"


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


def test_an_agent_that_does_not_answer_times_out_and_is_retried(db: Database, tmp_path: Path,
                                                                 silent_port: int) -> None:
    [iid] = start(db.engine, ONE_STEP.replace("max_attempts: 3", "max_attempts: 2"))
    work(db.engine, agents_for(tmp_path, f"{{url: \"http://127.0.0.1:{silent_port}/\", timeout: 0.3}}"), timeout=60)
    row = steps(db.engine, iid)["ask"]
    assert row.status == "failed" and row.attempt == 2
    assert "did not answer within 0.3s" in row.error


def test_a_closed_port_is_a_transport_error_and_retried(db: Database, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again when the block ends: nothing listens there
    [iid] = start(db.engine, ONE_STEP)
    work(db.engine, agents_for(tmp_path, f"{{url: \"http://127.0.0.1:{port}/\"}}"), timeout=60)
    row = steps(db.engine, iid)["ask"]
    assert row.status == "failed" and row.attempt == 3 and "ConnectError" in row.error


@pytest.mark.parametrize(("http", "said"), [
    ("{url: \"ftp://example.com/\"}", "http needs url: http(s)://host/path"),
    ("{headers_env: {Authorization: X}}", "http needs url"),
    ("{url: \"http://127.0.0.1/\", token: abc}", "http does not take token"),
    ("{url: \"http://127.0.0.1/\", headers_env: [A]}", "headers_env maps a header name"),
    ("{url: \"http://127.0.0.1/\", timeout: soon}", "timeout: 'soon' is not a duration"),
    ("\"http://127.0.0.1/\"", "http takes a mapping"),
])
def test_a_bad_http_agent_is_refused_where_it_is_written(tmp_path: Path, http: str, said: str) -> None:
    path = agents_for(tmp_path, http)
    with pytest.raises(DefinitionError) as caught:
        AgentRegistry.from_file(path)
    [problem] = caught.value.problems
    assert problem.file == str(path) and problem.line == 3 and said in problem.message, problem


def test_a_worker_without_the_header_variables_stops_at_start(db: Database, tmp_path: Path) -> None:
    path = agents_for(tmp_path, "{url: \"http://127.0.0.1:9/\", headers_env: {Authorization: FLOWDB_NO_SUCH_VAR}}")
    result = flowdb_cli("worker", "--agents", str(path), env=db.cli_env(), timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("set the environment variable(s) FLOWDB_NO_SUCH_VAR (its headers_env reads "
                                          "them)"), result.stderr
