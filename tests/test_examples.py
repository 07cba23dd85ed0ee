"""The user's own examples, end to end, on both databases."""

from __future__ import annotations

import shutil

import pytest

from conftest import EXAMPLES, Database, flowdb_cli
from helpers import instance, start, steps, work


def test_simple_report_runs_with_the_cli(db: Database) -> None:
    result = flowdb_cli("run", str(EXAMPLES / "simple-report.yaml"), env=db.cli_env())
    assert result.returncode == 0, result.stderr
    assert "research" in result.stdout and "write" in result.stdout
    assert "completed" in result.stdout
    assert "Process completed successfully" in result.stdout
    assert '"output_path"' in result.stdout  # the outputs are printed at the end


def test_multi_competitor_research_fans_out_and_in(db: Database) -> None:
    [iid] = start(db.engine, EXAMPLES / "multi-competitor-research.yaml")
    work(db.engine, EXAMPLES / "agents.yaml")
    assert instance(db.engine, iid).status == "completed"
    rows = steps(db.engine, iid)
    assert {sid: r.status for sid, r in rows.items()} == dict.fromkeys(
        ["research-alpha", "research-beta", "research-gamma", "merge-findings"], "completed")
    merge = rows["merge-findings"]
    assert all(rows[p].finished_at <= merge.started_at for p in ("research-alpha", "research-beta", "research-gamma"))
    assert instance(db.engine, iid).cost_usd == round(3 * 0.0021 + 0.0015, 6)


def test_run_uses_agents_yaml_beside_the_file(db: Database, tmp_path) -> None:  # type: ignore[no-untyped-def]
    for name in ("simple-report.yaml", "agents.yaml", "example_agents.py"):
        shutil.copy(EXAMPLES / name, tmp_path / name)
    result = flowdb_cli("run", "simple-report.yaml", env=db.cli_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_run_finishes_when_another_worker_does_the_work(db: Database) -> None:
    """`flowdb run` must notice its instance finished even when a worker elsewhere ran every step."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    env = {**db.cli_env(), "FLOWDB_POLL_SECONDS": "0.05"}
    exe = str(Path(sys.executable).parent / "flowdb")
    fleet = subprocess.Popen([exe, "worker", "--agents", str(EXAMPLES / "agents.yaml")], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # the worker is up and polling
        result = flowdb_cli("run", str(EXAMPLES / "multi-competitor-research.yaml"), env=env, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "completed" in result.stdout
    finally:
        fleet.terminate()
        fleet.wait(timeout=30)
