"""Decide one approval from many threads at once, as approvers aFIRST@x.com ... (one per thread).

    python tests/decide_many.py URL APPROVAL_ID FIRST COUNT BARRIER_DIR

Every thread opens its database connection first; then the process writes BARRIER_DIR/ready-PID
and waits for BARRIER_DIR/go, and all its threads call decide(..., "approve", ...) at once. Prints
one JSON list on stdout: per call the approver, the outcome ("decided" or the exception's class
name), the message, and when the call started and ended (time.time()).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from flowdb.approvals import decide
from flowdb.db.engine import make_engine


def main(url: str, approval_id: int, first: int, count: int, barrier_dir: Path) -> None:
    engine = make_engine(url, pool_size=count)
    warmed = threading.Barrier(count + 1)
    go = threading.Barrier(count + 1)
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def call(number: int) -> None:
        identity = f"a{number}@x.com"
        # Connect before the race, not in it: every thread holds a pooled connection at once, so the
        # pool keeps one each. (No statement: on SQLite that would BEGIN IMMEDIATE and take the lock.)
        raw = engine.raw_connection()
        warmed.wait()
        raw.close()
        go.wait()
        began = time.time()
        try:
            result = decide(engine, approval_id, "approve", identity, comment=f"from {identity}")
            outcome, message = ("decided" if result.decided else "voted"), result.approval.status
        except Exception as exc:  # every kind is reported: the test asserts there is no other
            outcome, message = type(exc).__name__, str(exc)
        ended = time.time()
        with lock:
            results.append({"approver": identity, "outcome": outcome, "message": message, "began": began,
                            "ended": ended, "pid": os.getpid()})

    threads = [threading.Thread(target=call, args=(n,)) for n in range(first, first + count)]
    for thread in threads:
        thread.start()
    warmed.wait()
    (barrier_dir / f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + 60
    while not (barrier_dir / "go").exists():
        if time.monotonic() > deadline:
            raise SystemExit("never told to go")
        time.sleep(0.001)
    go.wait()
    for thread in threads:
        thread.join()
    engine.dispose()
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
