"""The agent-platform emulator (examples/mcp/agent_platform.py) alone, through the MCP SDK's own client over HTTP:
the answers of its contract, the directives that provoke them, and the call log the other tests rely on."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mcp_platform import SERVER, Platform, call_tool, call_tool_async, most_at_once, session, start_platform


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    with start_platform(tmp_path_factory.mktemp("platform")) as p:
        yield p
        assert "Traceback" not in p.stderr() and "ERROR" not in p.stderr(), p.stderr()


def agent() -> str:
    """A fresh agent per test: the module's server keeps every agent's session and queue."""
    return f"agent-{uuid.uuid4().hex[:8]}"


def chat(platform: Platform, name: str, message: str, **arguments: Any) -> Any:
    return call_tool(platform, "chat_with_agent", agent_name=name, message=message, **arguments)


async def chats(platform: Platform, calls: list[dict[str, Any]]) -> list[Any]:
    """Calls side by side, each over its own session (as separate flowdb workers would)."""
    return list(await asyncio.gather(*(call_tool_async(platform, "chat_with_agent", **c) for c in calls)))


def work_of(platform: Platform, name: str) -> list[dict[str, Any]]:
    return sorted((w for w in platform.work() if w["agent"] == name), key=lambda w: w["start"])




def test_a_reply_carries_the_response_and_its_metadata(platform: Platform) -> None:
    name = agent()
    reply = chat(platform, name, "Summarize  [cost 0.25] the report [tokens 7]")
    assert reply["response"] == f"{name}: Summarize   the report"
    meta = reply["metadata"]
    assert meta["execution_id"].startswith("exe-") and meta["session_id"] == f"{name}-session-1"
    assert (meta["cost_usd"], meta["tokens_in"], meta["tokens_out"]) == (0.25, 7, 7)
    assert (meta["context_tokens_used"], meta["context_tokens_max"]) == (14, 200000)
    [call] = [c for c in platform.tool_calls() if c["agent"] == name]
    assert call["answer"] == "reply" and call["execution_id"] == meta["execution_id"]
    assert call["received"] <= call["answered"] and call["parallel"] is False and call["model"] is None


def test_defaults_and_the_model_echo(platform: Platform) -> None:
    name = agent()
    reply = chat(platform, name, "[echo-model] hello", model="opus-9", parallel=True)
    assert reply["response"] == f"{name}: hello (model opus-9)"
    meta = reply["metadata"]
    assert (meta["cost_usd"], meta["tokens_in"], meta["tokens_out"], meta["context_tokens_used"]) == (0.001, 10, 10, 20)
    assert "session_id" not in meta  # a parallel task is stateless
    assert platform.tool_calls()[-1]["model"] == "opus-9"


def test_the_tool_schema_names_the_argument_async(platform: Platform) -> None:
    async def tools() -> dict[str, Any]:
        async with session(platform) as client:
            return {t.name: t.inputSchema for t in (await client.list_tools()).tools}

    schemas = asyncio.run(tools())
    chat_schema = schemas["chat_with_agent"]
    assert set(chat_schema["properties"]) == {"agent_name", "message", "parallel", "model", "timeout_seconds", "async"}
    assert sorted(chat_schema["required"]) == ["agent_name", "message"]
    assert schemas["get_execution_result"]["required"] == ["execution_id"]


def test_requests_without_the_key_get_401(platform: Platform) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    missing = httpx.post(platform.url, json=body)
    wrong = httpx.post(platform.url, json=body, headers={"Authorization": "Bearer not-the-key"})
    assert (missing.status_code, wrong.status_code) == (401, 401)
    assert missing.json() == {"error": "missing Authorization: Bearer <api key>"}
    assert wrong.json() == {"error": "wrong API key"}
    with pytest.raises(BaseException) as raised:  # the SDK client gives up, from inside its task groups
        asyncio.run(asyncio.wait_for(call_tool_async(platform, "chat_with_agent", key="wrong", agent_name="a",
                                                     message="hi"), 10))
    assert [e.response.status_code for e in leaves(raised.value) if isinstance(e, httpx.HTTPStatusError)] == [401]
    assert all(c["agent"] != "a" for c in platform.tool_calls())


def leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for e in error.exceptions for leaf in leaves(e)]
    return [error]


def test_sequential_calls_share_one_session_whose_context_grows(platform: Platform) -> None:
    name = agent()
    replies = [chat(platform, name, f"turn {i}") for i in range(3)]
    assert {r["metadata"]["session_id"] for r in replies} == {f"{name}-session-1"}
    assert [r["metadata"]["context_tokens_used"] for r in replies] == [20, 40, 60]
    assert len({r["metadata"]["execution_id"] for r in replies}) == 3


def test_busy_answers_first_then_the_call_works(platform: Platform) -> None:
    name = agent()
    assert chat(platform, name, "[busy 1] go") == {"status": "agent_busy", "retry_after_seconds": 1,
                                                   "error": f"agent {name} queue is full"}
    assert chat(platform, name, "[busy 1] go")["response"] == f"{name}: go"
    assert chat(platform, name, "[busy 1] [retry 3] other")["retry_after_seconds"] == 3
    answers = [c["answer"] for c in platform.tool_calls() if c["agent"] == name]
    assert answers == ["agent_busy", "reply", "agent_busy"]
    assert [w["message"] for w in work_of(platform, name)] == ["[busy 1] go"]  # a busy answer ran nothing


@pytest.mark.slow
def test_queued_work_is_polled_until_its_reply(platform: Platform) -> None:
    name = agent()
    queued = chat(platform, name, "[queue 1] long one")
    assert queued["status"] == "queued_timeout" and queued["execution_id"].startswith("exe-") and queued["error"]
    ex = queued["execution_id"]
    assert call_tool(platform, "get_execution_result", execution_id=ex) == {"status": "running", "execution_id": ex}
    result: Any = None
    for _ in range(100):
        result = call_tool(platform, "get_execution_result", execution_id=ex)
        if result.get("status") != "running":
            break
        asyncio.run(asyncio.sleep(0.05))
    assert result["response"] == f"{name}: long one" and result["metadata"]["execution_id"] == ex
    assert call_tool(platform, "get_execution_result", execution_id=ex) == result  # kept
    polls = [c for c in platform.tool_calls("get_execution_result") if c["execution_id"] == ex]
    assert polls[0]["answer"] == "running" and polls[-1]["answer"] == "reply" and polls[-1]["agent"] == name
    [work] = work_of(platform, name)
    assert work["end"] - work["start"] >= 1


@pytest.mark.slow
def test_a_caller_that_walks_away_is_logged_and_its_work_goes_on(platform: Platform) -> None:
    name = agent()

    async def walk_away() -> None:
        async with session(platform) as client:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.call_tool("chat_with_agent", {"agent_name": name,
                                                                           "message": "[slow 2] x"}), 1)

    asyncio.run(walk_away())
    for _ in range(100):
        calls = [c for c in platform.tool_calls() if c["agent"] == name]
        if calls:
            break
        time.sleep(0.02)
    [call] = calls  # (the second above let the call reach the server first)
    assert call["answer"] == "cancelled" and call["execution_id"].startswith("exe-")
    for _ in range(100):
        result = call_tool(platform, "get_execution_result", execution_id=call["execution_id"])
        if result.get("status") != "running":
            break
        time.sleep(0.05)
    assert result["response"] == f"{name}: x"


def test_an_unknown_execution_is_an_error(platform: Platform) -> None:
    assert call_tool(platform, "get_execution_result", execution_id="exe-nope") == {
        "status": "error", "error": "unknown execution exe-nope", "retryable": False}


def test_refusals_are_not_retryable(platform: Platform) -> None:
    name = agent()
    refused = chat(platform, name, "[refuse] no")
    assert refused["status"] == "error" and refused["retryable"] is False
    assert chat(platform, "missing-x", "hello") == {"status": "error", "error": "agent 'missing-x' not found",
                                                    "retryable": False}
    assert work_of(platform, name) == [] and work_of(platform, "missing-x") == []


def test_flaky_calls_fail_transiently_then_work(platform: Platform) -> None:
    name = agent()
    first, second, third = (chat(platform, name, "[flaky 2] try") for _ in range(3))
    assert first["status"] == second["status"] == "error" and first["retryable"] is True
    assert third["response"] == f"{name}: try"
    assert len(work_of(platform, name)) == 1


def test_badjson_answers_text_that_is_not_json(platform: Platform) -> None:
    name = agent()
    assert chat(platform, name, "[badjson] hi") == "agent exploded <<"
    assert platform.tool_calls()[-1]["answer"] == "badjson"
    assert len(work_of(platform, name)) == 1  # the work ran; only its answer is garbled


@pytest.mark.slow
def test_parallel_work_overlaps_and_sequential_work_does_not(platform: Platform) -> None:
    side, queue = agent(), agent()
    asyncio.run(chats(platform, [dict(agent_name=side, message=f"p{i} [slow 1.5]", parallel=True) for i in range(3)]))
    replies = asyncio.run(chats(platform, [dict(agent_name=queue, message=f"s{i} [slow 0.2]") for i in range(3)]))
    assert most_at_once(work_of(platform, side)) == 3
    assert most_at_once(work_of(platform, queue)) == 1 and len(work_of(platform, queue)) == 3
    assert sorted(r["metadata"]["context_tokens_used"] for r in replies) == [20, 40, 60]
    for name in (side, queue):  # each message was sent once
        messages = [c["message"] for c in platform.tool_calls() if c["agent"] == name]
        assert len(messages) == len(set(messages)) == 3


@pytest.mark.slow
def test_a_full_queue_answers_busy(platform: Platform) -> None:
    """One running and --queue-limit (4) waiting: the next call is turned away, nothing of it runs."""
    name = agent()
    # [queue S] answers at once and leaves its work queued: one holds the agent for long, four wait behind it
    queued = [chat(platform, name, f"[queue {s}] m{i}") for i, s in enumerate([5, 0.05, 0.05, 0.05, 0.05])]
    assert [q["status"] for q in queued] == ["queued_timeout"] * 5
    assert chat(platform, name, "one too many") == {"status": "agent_busy", "retry_after_seconds": 1,
                                                    "error": f"agent {name} queue is full"}
    assert [c["answer"] for c in platform.tool_calls() if c["agent"] == name] == ["queued_timeout"] * 5 + ["agent_busy"]


@pytest.mark.slow
def test_sync_wait_timeouts_and_async_calls(tmp_path: Path) -> None:
    with start_platform(tmp_path, sync_wait=0.3, busy_retry=2.5, queue_limit=0) as p:
        queued = chat(p, "w", "[slow 3] long")
        assert queued["status"] == "queued_timeout"
        call = p.tool_calls()[-1]
        assert 0.3 <= call["answered"] - call["received"] < 0.9
        # queue limit 0: while the long work runs, another sequential call is turned away
        assert chat(p, "w", "next") == {"status": "agent_busy", "retry_after_seconds": 2.5,
                                        "error": "agent w queue is full"}
        accepted = chat(p, "w", "[slow 0.5] side", parallel=True, **{"async": True})
        assert accepted == {"status": "accepted", "execution_id": accepted["execution_id"]}
        timed_out = chat(p, "v", "[slow 5] endless", timeout_seconds=1, parallel=True)
        assert timed_out["status"] == "queued_timeout"
        for _ in range(100):
            if p.work() and p.work()[-1]["agent"] == "v":
                break
            time.sleep(0.05)
        result = call_tool(p, "get_execution_result", execution_id=timed_out["execution_id"])
        assert result == {"status": "error", "error": "agent 'v' timed out after 1 s", "retryable": True}
        assert [w["timed_out"] for w in p.work() if w["agent"] == "v"] == [True]
        p.stop()
        assert p.proc.returncode in (0, -signal.SIGTERM)  # uvicorn shuts down, then re-raises the signal it caught
        assert p.stderr().strip() == f"agent platform listening on {p.url}"  # and nothing else, no traceback


@pytest.mark.slow
def test_help_and_a_missing_key(tmp_path: Path) -> None:
    shown = subprocess.run([sys.executable, str(SERVER), "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "TRINITY_MCP_KEY=dev-key python examples/mcp/agent_platform.py" in shown.stdout
    assert "--queue-limit" in shown.stdout and "[queue S]" in shown.stdout
    env = {k: v for k, v in os.environ.items() if k != "TRINITY_MCP_KEY"}
    refused = subprocess.run([sys.executable, str(SERVER), "--port", "0"], capture_output=True, text=True,
                             env=env, timeout=60)
    assert refused.returncode == 2
    assert refused.stderr.strip() == "agent platform: no API key: pass --api-key KEY or set TRINITY_MCP_KEY"
