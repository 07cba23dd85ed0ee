"""python -m bench [--quick] [--json FILE] [--no-peers]: one run, one table, one JSON file.

Every figure in a run is measured on the same machine in the same minutes, so ratios between them
mean something even on a noisy machine; absolute figures less so.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any

from bench.flowdb_runs import run_flowdb
from bench.raw import run_raw
from bench.scale import run_scale


@dataclass(frozen=True)
class Plan:
    flowdb_configs: list[tuple[str, int]]  # (database, worker processes)
    workloads: dict[str, int]  # workload -> instances
    redis_workloads: list[str]  # workloads also run with Redis wake-ups
    latency_instances: int
    raw_chains: int
    peer_instances: int
    finished_rows: list[int]  # claim latency with this many finished steps in the table


FULL = Plan([("sqlite", 1), ("sqlite", 2), ("postgresql", 1), ("postgresql", 2), ("postgresql", 4)],
            {"chain": 5000, "fanout": 400, "wide": 8000}, ["chain"], 100, 10_000, 500,
            [1_000, 100_000, 1_000_000])
QUICK = Plan([("sqlite", 1), ("postgresql", 2)], {"chain": 200, "fanout": 20, "wide": 300}, ["chain"], 20, 1000, 60,
             [1_000, 10_000])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test, not a measurement")
    parser.add_argument("--json", default="bench-results.json", help="where to write the results")
    parser.add_argument("--no-peers", action="store_true", help="skip the peer engines")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    began = time.monotonic()
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        print(_line(row), flush=True)

    for kind, processes in plan.flowdb_configs:
        for batch in (1, 10):
            raw = run_raw(kind, processes, batch, plan.raw_chains)
            record({"engine": "raw-sql", "workload": "chain", **raw, "steps_per_s": round(raw["steps_per_s"])})
        for workload, instances in plan.workloads.items():
            record(run_flowdb(kind, workload, processes, False, instances))
            if workload in plan.redis_workloads:
                record(run_flowdb(kind, workload, processes, True, instances))
                record(run_flowdb(kind, workload, processes, False, instances, agent="noop_async"))
        for redis in (False, True):  # hand-off latency on idle workers
            record(run_flowdb(kind, "chain", processes, redis, plan.latency_instances, spacing=0.05))
    for kind in ("sqlite", "postgresql"):
        for finished in plan.finished_rows:
            scale = run_scale(kind, finished)
            rows.append(scale)
            print(f"claim with {finished:>9,} finished rows on {kind:<10}: p50 {scale['claim_p50_ms']} ms, "
                  f"p99 {scale['claim_p99_ms']} ms", flush=True)
    if not args.no_peers:
        for row in _peers(plan.peer_instances):
            record(row)
    _ratios(rows)
    result = {"machine": _machine(), "quick": args.quick, "seconds": round(time.monotonic() - began, 1),
              "rows": rows}
    with open(args.json, "w") as handle:
        json.dump(result, handle, indent=2, default=str)
    print()
    print(table(rows))
    print()
    print(scale_table(rows))
    print(f"\nwritten to {args.json} in {result['seconds']} s")
    return 0


def _peers(instances: int) -> list[dict[str, Any]]:
    try:
        from bench.peers import PEERS, PeerUnavailable, run_peer
    except ImportError as exc:
        return [{"engine": "peers", "error": f"peer benchmarks unavailable: {exc}"}]
    out = []
    for name, kind in PEERS:
        try:
            peer = run_peer(name, kind, instances)
            out.append({"engine": name, "workload": "chain", **peer, "steps_per_s": round(peer["steps_per_s"])})
        except PeerUnavailable as exc:
            out.append({"engine": name, "kind": kind, "workload": "chain", "error": str(exc)})
    return out


def _ratios(rows: list[dict[str, Any]]) -> None:
    """flowdb's steps/s against the raw limit with the same database and processes."""
    raw = {(r["kind"], r["processes"], r["batch"]): r["steps_per_s"] for r in rows if r["engine"] == "raw-sql"}
    for row in rows:
        if row["engine"] == "flowdb" and not row.get("spacing_s"):
            key = (row["kind"], row["processes"])
            row["vs_raw_unbatched"] = round(row["steps_per_s"] / raw[(*key, 1)], 3) if (*key, 1) in raw else None
            row["vs_raw_batched"] = round(row["steps_per_s"] / raw[(*key, 10)], 3) if (*key, 10) in raw else None


def _line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['engine']:<14} {row.get('kind', ''):<11} unavailable: {row['error']}"
    what = row.get("workload", "")
    if row["engine"] == "raw-sql":
        detail = f"batch {row['batch']}"
    elif row["engine"] == "flowdb":
        detail = ("redis" if row["redis"] else "poll") + (" latency" if row.get("spacing_s") else "") + (
            " async" if row.get("agent") == "noop_async" else "")
    else:
        detail = f"v{row.get('version', '?')}"
    procs = row.get("processes", "")
    hand = ""
    if row.get("handoff_p50_ms") is not None:
        hand = f"  hand-off p50 {row['handoff_p50_ms']:.1f} ms p99 {row['handoff_p99_ms']:.1f} ms"
    if row.get("spacing_s") and row.get("wakeup_p50_ms") is not None:
        hand += f"  wake-up p50 {row['wakeup_p50_ms']:.1f} ms p99 {row['wakeup_p99_ms']:.1f} ms"
    return (f"{row['engine']:<14} {row.get('kind', ''):<11} {what:<7} {procs!s:>2} {detail:<14} "
            f"{row['steps_per_s']:>8,} steps/s{hand}")


def table(rows: list[dict[str, Any]]) -> str:
    header = ("| engine | database | workload | procs | mode | steps/s | vs raw (unbatched) | vs raw (batched) "
              "| hand-off p50 ms | p99 ms | wake-up p50 ms | p99 ms |\n"
              "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [header]
    for r in rows:
        if r["engine"] == "flowdb-claim":
            continue
        if "error" in r:
            lines.append(f"| {r['engine']} | {r.get('kind', '')} | | | unavailable: {r['error']} | | | | | | | |")
            continue
        mode = {"raw-sql": f"batch {r.get('batch')}",
                "flowdb": ("redis" if r.get("redis") else "poll") + (" (latency)" if r.get("spacing_s") else "")
                + (", async agent" if r.get("agent") == "noop_async" else "")
                }.get(r["engine"], f"v{r.get('version', '?')}")
        cells = [r["engine"], r.get("kind", ""), r.get("workload", ""), r.get("processes", ""), mode,
                 f"{r['steps_per_s']:,}", _fmt(r.get("vs_raw_unbatched")), _fmt(r.get("vs_raw_batched")),
                 _fmt(r.get("handoff_p50_ms")), _fmt(r.get("handoff_p99_ms")),
                 # the wake-up only means something on idle workers (latency rows)
                 _fmt(r.get("wakeup_p50_ms") if r.get("spacing_s") else None),
                 _fmt(r.get("wakeup_p99_ms") if r.get("spacing_s") else None)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def scale_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| database | finished rows | claim p50 ms | claim p99 ms |", "|---|---:|---:|---:|"]
    lines += [f"| {r['kind']} | {r['finished_rows']:,} | {r['claim_p50_ms']} | {r['claim_p99_ms']} |"
              for r in rows if r["engine"] == "flowdb-claim"]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:g}"


def _machine() -> dict[str, Any]:
    import os

    return {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()}


if __name__ == "__main__":
    sys.exit(main())
