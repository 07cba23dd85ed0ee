"""Agents used by the tests. `counted` appends a line per call to $FLOWDB_TEST_CALL_LOG (crash tests)."""

from __future__ import annotations

import os
import time
from typing import Any

from flowdb import AgentReply, AgentRequest, NonRetryableError

_flaky_calls: dict[str, int] = {}


def noop(request: AgentRequest) -> dict[str, Any]:
    return {"ok": True, "step": request.step_id}


async def echo(request: AgentRequest) -> str:
    return request.message


def sleepy(request: AgentRequest) -> dict[str, Any]:
    time.sleep(float(os.environ.get("FLOWDB_TEST_SLEEP", "0.2")))
    return {"slept": True}


def flaky(request: AgentRequest) -> dict[str, Any]:
    """Fails on the first two attempts of every step, then succeeds."""
    if request.attempt < 3:
        raise ConnectionError(f"flaky attempt {request.attempt}")
    return {"attempts": request.attempt}


def broken(request: AgentRequest) -> None:
    raise RuntimeError("this agent always fails")


def refuses(request: AgentRequest) -> None:
    raise NonRetryableError("refused on purpose")


def pricey(request: AgentRequest) -> AgentReply:
    return AgentReply(output={"paid": True}, cost_usd=0.25, tokens_in=100, tokens_out=50)


def scorer(request: AgentRequest) -> dict[str, Any]:
    return {"quality_score": int(request.message)}


def counted(request: AgentRequest) -> dict[str, Any]:
    log = os.environ.get("FLOWDB_TEST_CALL_LOG")
    delay = float(os.environ.get("FLOWDB_TEST_SLEEP", "0"))
    if log:
        with open(log, "a") as handle:
            handle.write(f"start {request.instance_id} {request.step_id} {request.attempt} {os.getpid()}\n")
    if delay:
        time.sleep(delay)
    if log:
        with open(log, "a") as handle:
            handle.write(f"end {request.instance_id} {request.step_id} {request.attempt} {os.getpid()}\n")
    return {"step": request.step_id}


def poison(request: AgentRequest) -> dict[str, Any]:
    """Makes its own worker die the way its message says (exit | kill | term), after noting the call
    in $FLOWDB_TEST_CALL_LOG like `counted`: `term` sends SIGTERM to its worker and then hangs."""
    import signal

    log = os.environ.get("FLOWDB_TEST_CALL_LOG")
    if log:
        with open(log, "a") as handle:
            handle.write(f"start {request.instance_id} {request.step_id} {request.attempt} {os.getpid()}\n")
    if request.message == "exit":
        os._exit(3)
    if request.message == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if request.message == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(3600)
    return {}


def nul(request: AgentRequest) -> str:
    """An answer PostgreSQL cannot store in a JSON column (a NUL character)."""
    return "before\x00after"


def quality(request: AgentRequest) -> dict[str, Any]:
    """An analyst whose score is $FLOWDB_TEST_QUALITY (the conditional-flow example's three cases)."""
    return {"summary": "analysed", "quality_score": int(os.environ.get("FLOWDB_TEST_QUALITY", "50"))}


def lister(request: AgentRequest) -> dict[str, Any]:
    """A list of `message` company names, for for_each."""
    return {"companies": [f"company-{i}" for i in range(int(request.message))]}


def timed(request: AgentRequest) -> dict[str, Any]:
    """Sleeps $FLOWDB_TEST_SLEEP and says when it ran (for max_parallel)."""
    began = time.time()
    time.sleep(float(os.environ.get("FLOWDB_TEST_SLEEP", "0.2")))
    if request.message == "fail":
        raise NonRetryableError("this item fails")
    return {"message": request.message, "began": began, "ended": time.time()}


# --- agents with limits and platform-like answers (tests/test_agent_limits.py) -----------------------
TRACKED: list[tuple[str, str, float]] = []  # (start|end, agent, time.monotonic())
BUSY_LEFT: dict[str, int] = {}  # message -> how many more calls answer "busy"
EXECUTIONS: dict[str, int] = {}  # execution id -> polls left before it is done
SENT: list[str] = []  # messages platform_like was sent (not polls)


async def tracked(request: AgentRequest) -> dict[str, Any]:
    """Notes when each call starts and ends (in this process), so a test can count overlaps."""
    import asyncio

    TRACKED.append(("start", request.agent, time.monotonic()))
    await asyncio.sleep(0.02)
    TRACKED.append(("end", request.agent, time.monotonic()))
    return {"step": request.step_id}


def platform_like(request: AgentRequest) -> AgentReply:
    """`busy N`: the first N calls with this message answer busy; `queue N`: the work runs as an
    execution that is done after N polls; anything else answers at once."""
    from flowdb.agents.types import AgentBusy, AgentStillRunning

    if request.execution_id is not None:
        if request.message.startswith("queue-unreachable") and EXECUTIONS[request.execution_id] == 2:
            from flowdb.errors import AgentUnreachable

            EXECUTIONS[request.execution_id] -= 1
            raise AgentUnreachable("the platform did not answer the poll")
        EXECUTIONS[request.execution_id] -= 1
        if EXECUTIONS[request.execution_id] > 0:
            raise AgentStillRunning("still running", request.execution_id, 0.05)
        return AgentReply(f"done {request.execution_id}", execution_id=request.execution_id)
    word, number = [*request.message.split(), "0"][:2]
    if word == "busy":
        left = BUSY_LEFT.setdefault(request.message, int(number))
        if left > 0:
            BUSY_LEFT[request.message] = left - 1
            raise AgentBusy("queue full", 0.05)
    SENT.append(request.message)
    if word in ("queue", "queue-unreachable"):
        execution = f"exe-{request.instance_id}-{request.step_id}-{request.attempt}"
        EXECUTIONS[execution] = int(number)
        raise AgentStillRunning("queued", execution, 0.05)
    return AgentReply(f"did {request.message}", session_id="s-1")


# --- contexts, subscribers (tests/test_agent_links.py) -------------------------------------------------
HEARD: list[AgentRequest] = []  # notices the `listener` agent was sent


def listener(request: AgentRequest) -> str:
    HEARD.append(request)
    return "noted"


def remembers(request: AgentRequest) -> AgentReply:
    """Replies with a context to save, and quotes any context it was given."""
    given = request.context or {}
    return AgentReply(f"{request.message} | context: {given.get('response', '-')} from {given.get('step_id', '-')}",
                      session_id="sess-9", context={"response": f"facts about {request.message}", "blob": [1, 2]})


def failif(request: AgentRequest) -> dict[str, Any]:
    """Sleeps $FLOWDB_TEST_SLEEP when its message says `slow`; fails while $FLOWDB_TEST_FAIL_<step> is set
    (a test fixes the cause by unsetting it, then retries or reruns)."""
    if "slow" in request.message:
        time.sleep(float(os.environ.get("FLOWDB_TEST_SLEEP", "1.0")))
    if os.environ.get(f"FLOWDB_TEST_FAIL_{request.step_id}"):
        raise RuntimeError(f"asked to fail: {request.step_id}")
    return {"step": request.step_id}
