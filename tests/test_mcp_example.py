"""The MCP example (examples/mcp/) as its README runs it: the agent-platform emulator, the example's own agents
file pointed at it, and the real `flowdb run`, on both databases. Each agent is called in its mode (the
researcher in its session, the analyst and the writer as parallel tasks) and the analyst two at a time."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import text

from conftest import EXAMPLES, Database, flowdb_cli
from mcp_platform import Platform, most_at_once, start_platform

pytestmark = pytest.mark.slow
EXAMPLE = EXAMPLES / "mcp"
EXAMPLE_URL = "http://127.0.0.1:8765/mcp"  # the URL the example's agents file names (the README's port)
WORK_SECONDS = 0.3  # each piece of work takes this long (the emulator's [slow S]), so overlaps show


def agents_copy(folder: Path, platform: Platform) -> Path:
    """The example's agents file, unchanged but for the emulator's URL (a free port, not 8765)."""
    source = (EXAMPLE / "agents.yaml").read_text(encoding="utf-8")
    assert source.count(EXAMPLE_URL) == 3, "every agent of the example points at the README's emulator"
    path = folder / "agents.yaml"
    path.write_text(source.replace(EXAMPLE_URL, platform.url), encoding="utf-8")
    return path




def test_the_due_diligence_example_runs_against_the_emulator(db: Database, tmp_path: Path) -> None:
    with start_platform(tmp_path) as platform:
        env = {**db.cli_env(), "TRINITY_MCP_KEY": platform.key}
        result = flowdb_cli("run", str(EXAMPLE / "due-diligence.yaml"), "--agents", str(agents_copy(tmp_path,
                            platform)), "--input", "supplier=Globex", "--input", f"hint=[slow {WORK_SECONDS}]",
                            env=env, timeout=120)
        calls = platform.tool_calls()
        work = platform.work()
    assert result.returncode == 0, result.stdout + result.stderr
    started = re.search(r"started instance (\d+)", result.stdout)
    assert started, result.stdout
    iid = int(started.group(1))
    assert f"instance {iid} completed" in result.stdout
    assert "due diligence of Globex done: 4 aspects scored" in result.stdout

    # Each agent was called in its mode, every call answered with a reply (nothing busy, nothing queued).
    modes = {(c["agent"], c["parallel"]) for c in calls}
    assert modes == {("researcher", False), ("analyst", True), ("writer", True)}
    assert sorted(c["agent"] for c in calls) == ["analyst"] * 4 + ["researcher"] * 2 + ["writer"]
    assert {c["answer"] for c in calls} == {"reply"}
    assert all("Globex" in c["message"] for c in calls)
    # concurrency: 2 across the four scores: two ran side by side, never three.
    assert most_at_once([w for w in work if w["agent"] == "analyst"]) == 2

    # Which execution and session ran each step, as the README says to look: the view and `flowdb status`.
    with db.engine.connect() as conn:
        runs = conn.execute(text("SELECT step_id, item, backend, execution_id, session_id FROM v_agent_runs "
                                 "WHERE instance_id = :i AND execution_id IS NOT NULL ORDER BY step_id, item"),
                            {"i": iid}).all()
    assert {r.execution_id for r in runs} == {c["execution_id"] for c in calls}
    assert {r.backend for r in runs} == {"mcp"}
    sessions = {r.step_id: r.session_id for r in runs}
    assert sessions["profile"] == sessions["adverse-media"] == "researcher-session-1"  # one session, context kept
    assert sessions["memo"] is None and sessions["score"] is None
    status = flowdb_cli("status", str(iid), env=env)
    assert status.returncode == 0, status.stderr
    assert re.search(r"profile\s+researcher via mcp \(execution exe-\w+, session researcher-session-1\)",
                     status.stdout), status.stdout
