"""The benchmark's quick run as a smoke test: it runs end to end and its results are complete.
No timing is asserted (speed is reported by `python -m bench`, never checked in tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_quick_benchmark_runs_and_reports_every_figure(tmp_path: Path, redis_url: str) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "bench", "--quick", "--json", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    raw = [r for r in rows if r["engine"] == "raw-sql"]
    assert {(r["kind"], r["batch"]) for r in raw} == {(k, b) for k in ("sqlite", "postgresql") for b in (1, 10)}
    assert all(r["steps"] == 3 * 1000 and r["steps_per_s"] > 0 for r in raw)
    flowdb = [r for r in rows if r["engine"] == "flowdb"]
    assert {(r["kind"], r["workload"]) for r in flowdb} == {
        (k, w) for k in ("sqlite", "postgresql") for w in ("chain", "fanout", "wide")}
    assert {r["redis"] for r in flowdb} == {False, True}
    assert all(r["steps_per_s"] > 0 for r in flowdb)
    throughput = [r for r in flowdb if not r["spacing_s"]]
    assert all(r["vs_raw_unbatched"] is not None and r["vs_raw_batched"] is not None for r in throughput)
    latency = [r for r in flowdb if r["spacing_s"]]
    assert latency and all(r["handoff_p50_ms"] is not None and r["wakeup_p50_ms"] is not None for r in latency)
    scale = [r for r in rows if r["engine"] == "flowdb-claim"]
    assert {(r["kind"], r["finished_rows"]) for r in scale} == {
        (k, n) for k in ("sqlite", "postgresql") for n in (1_000, 10_000)}
    assert "| engine | database |" in result.stdout
    peers = {(r["engine"], r["kind"]): r for r in rows if r["engine"] in ("dbos", "procrastinate", "spiffworkflow")}
    assert set(peers) == {("dbos", "sqlite"), ("dbos", "postgresql"), ("procrastinate", "postgresql"),
                          ("spiffworkflow", "memory")}
    assert all("error" not in r and r["steps_per_s"] > 0 and r["version"] for r in peers.values()), peers
