"""One in-process worker on a fresh database, optionally under cProfile: where a step's time goes.

    python -m bench.profile [--agent noop|noop_async] [--chains 3000] [--db sqlite|postgresql] [--templated]
                            [--profile]

Prints steps/s (and the top functions by own time with --profile). Figures from one run on a shared
machine swing; compare variants in the same minute.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time
from pathlib import Path

from bench.databases import scratch_database
from bench.workloads import WORKLOADS
from flowdb.agents.registry import AgentRegistry
from flowdb.db import migrate
from flowdb.db.engine import make_engine
from flowdb.db.instances import StartRequest, deploy, start_instances
from flowdb.definitions import parse_definition
from flowdb.worker import Worker, WorkerOptions

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agent", choices=("noop", "noop_async"), default="noop_async")
    parser.add_argument("--chains", type=int, default=3000)
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--templated", action="store_true", help="messages are templates reading the step before")
    parser.add_argument("--profile", action="store_true", help="run under cProfile and print the top 30")
    args = parser.parse_args()
    workload = "templated-chain" if args.templated else "chain"
    definition = parse_definition(WORKLOADS[workload](args.agent), "chain.yaml")
    with scratch_database(args.db) as url:
        engine = make_engine(url)
        migrate.upgrade(engine)
        with engine.begin() as conn:
            deployed = deploy(conn, definition)
            start_instances(conn, deployed.id, deployed.version, definition, [StartRequest({})] * args.chains)
        worker = Worker(engine, AgentRegistry.from_file(HERE / "agents.yaml"), WorkerOptions(poll_seconds=0.05))
        total = args.chains * 3
        done = [0]
        worker.listener = lambda kind, data: done.__setitem__(0, done[0] + len(data[0])) if kind == "progress" \
            else None
        profiler = cProfile.Profile()
        began = time.perf_counter()
        if args.profile:
            profiler.enable()
        asyncio.run(worker.run(until=lambda: done[0] >= total))
        if args.profile:
            profiler.disable()
        seconds = time.perf_counter() - began
        engine.dispose()
    print(f"{total / seconds:,.0f} steps/s ({total} steps in {seconds:.2f} s, {args.db}, agent {args.agent})")
    if args.profile:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
