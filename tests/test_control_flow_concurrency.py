"""Loops, for_each and joins under several real worker processes: exact counts, nothing lost or run twice.

One process combines a fan-out for_each outside a loop, a loop of one to three rounds (an input) whose
body splits into two branches (one of them a for_each of its own) that meet in a join, and a join after
both the loop's exit and the fan-out. Hundreds of instances run on three `flowdb worker` processes; the test
then checks every row, event and handler call (the `counted` agent's call log) per instance, round and item.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from flowdb.db.instances import StartRequest, deploy, start_instances
from flowdb.db.tables import events, process_instances, step_instances

from conftest import Database
from helpers import definition_from
from processes import Fleet, instance_statuses, read_call_log, wait_until

INSTANCES_PER_ROUNDS = 70  # instances of each loop length: 1, 2 and 3 rounds
MAX_ROUNDS = 3
FAN_ITEMS = 5  # the fan-out outside the loop
BRANCH_ITEMS = 2  # the for_each branch inside the loop, in every round

LOOPS_AND_FAN_OUT = """\
process:
  name: loops-and-fan-out
  inputs: {rounds: {type: integer}}
  steps:
    - {id: start, type: agent_task, agent: counted, message: go}
    - id: fan
      type: agent_task
      agent: counted
      depends_on: [start]
      for_each: [a, b, c, d, e]
      max_parallel: 3
      message: "fan {{ item }}"
    - {id: draft, type: agent_task, agent: counted, message: draft, depends_on: [start], max_visits: 5}
    - {id: left, type: agent_task, agent: counted, message: left, depends_on: [draft]}
    - id: right
      type: agent_task
      agent: counted
      depends_on: [draft]
      for_each: [x, y]
      max_parallel: 1
      message: "right {{ item }} in round {{ steps.draft.visit }}"
    - {id: meet, type: agent_task, agent: counted, message: meet, depends_on: [left, right]}
    - {id: score, type: agent_task, agent: scorer, message: "{{ steps.draft.visit * 40 }}", depends_on: [meet]}
    - id: decide
      type: gateway
      gateway_type: exclusive
      depends_on: [score]
      routes:
        - {condition: "{{ steps.score.output.quality_score }} < {{ inputs.rounds * 40 }}", next: draft}
        - {default: true, next: done}
    - {id: done, type: agent_task, agent: counted, message: done}
    - {id: merge, type: agent_task, agent: counted, message: merge, depends_on: [done, fan]}
"""

LOOP_BODY = ("draft", "left", "right", "meet", "score", "decide")
ONCE = ("start", "fan", "done", "merge")
ITEMS = {"fan": FAN_ITEMS, "right": BRANCH_ITEMS}  # for_each steps: items per round
COUNTED = ("start", "fan", "draft", "left", "right", "meet", "done", "merge")  # steps whose agent is `counted`
JOIN_PARENTS = {"meet": ("left", "right"), "merge": ("done", "fan")}

Key = tuple[str, int, int | None]  # (step, round, item); item None: a step's own row


def _rounds_of(step_id: str, rounds: int) -> int:
    return rounds if step_id in LOOP_BODY else 1


def _expected_rows(rounds: int) -> list[Key]:
    """Every row an instance whose loop ran `rounds` rounds ends with."""
    keys: list[Key] = []
    for step_id in (*ONCE, *LOOP_BODY):
        for round_ in range(1, _rounds_of(step_id, rounds) + 1):
            keys.append((step_id, round_, None))
            keys += [(step_id, round_, item) for item in range(ITEMS.get(step_id, 0))]
    return sorted(keys, key=_key_order)


def _key_order(key: Key) -> tuple[str, int, int]:
    step_id, round_, item = key
    return step_id, round_, -1 if item is None else item


def _expected_calls(rounds: int) -> Counter[str]:
    """Handler runs of the `counted` steps (a for_each step's handler runs once per item, not for its own row)."""
    return Counter({step_id: _rounds_of(step_id, rounds) * ITEMS.get(step_id, 1) for step_id in COUNTED})


def _start_mixed(db: Database) -> dict[int, int]:
    """Start the instances, loop lengths 1, 2, 3 interleaved by id: instance id → rounds."""
    definition = definition_from(LOOPS_AND_FAN_OUT)
    lengths = [1 + i % MAX_ROUNDS for i in range(INSTANCES_PER_ROUNDS * MAX_ROUNDS)]
    with db.engine.begin() as conn:
        deployed = deploy(conn, definition)
        started = start_instances(conn, deployed.id, deployed.version, definition,
                                  [StartRequest({"rounds": n}) for n in lengths])
    return {instance_id: n for (instance_id, _), n in zip(started, lengths, strict=True)}


def _fleet_env(db: Database, call_log: Path) -> dict[str, str]:
    env = db.cli_env()
    env.update(FLOWDB_POLL_SECONDS="0.05", FLOWDB_TEST_CALL_LOG=str(call_log))
    return env


@pytest.mark.slow
def test_loops_fan_out_and_joins_run_exactly_once_under_several_workers(db: Database, tmp_path: Path) -> None:
    call_log = tmp_path / "calls.log"
    # Small claim batches and few handlers per worker spread the parents of one join over the processes.
    fleet = Fleet(_fleet_env(db, call_log), tmp_path, "--batch", "4", "--concurrency", "8")
    try:
        fleet.start(3)
        fleet.wait_ready()
        rounds_of = _start_mixed(db)
        total = len(rounds_of)
        # Wait for every instance to end (a failed one ends the wait too: the assertion below shows it).
        wait_until(lambda: "running" not in instance_statuses(db.engine), 240, "every instance to end", 0.25, fleet)
        assert instance_statuses(db.engine) == {"completed": total}, fleet.all_output()[-5000:]
        codes = fleet.terminate(30)
        assert codes == dict.fromkeys(fleet.pids, 0), fleet.all_output()[-5000:]
    finally:
        fleet.close()
    # The workers logged nothing but their start and stop: no exception, lock error or lost lease.
    logs = fleet.all_output()
    noisy = [line for line in logs.splitlines() if "Traceback" in line
             or any(f" {level} " in line for level in ("WARNING", "ERROR", "CRITICAL"))]
    assert not noisy, "\n".join(noisy[:20]) + "\n" + logs[-5000:]

    S = step_instances
    with db.engine.connect() as conn:
        rows = conn.execute(select(S.c.id, S.c.instance_id, S.c.step_id, S.c.round, S.c.item, S.c.status,
                                   S.c.attempt, S.c.reclaims, S.c.output, S.c.created_at, S.c.started_at,
                                   S.c.finished_at)).all()
        event_rows = conn.execute(select(events.c.instance_id, events.c.type, events.c.step_instance_id,
                                         events.c.payload)).all()
        outputs: dict[int, Any] = dict(conn.execute(select(process_instances.c.id, process_instances.c.outputs)).all())

    # Every row: completed at its first attempt, never taken over from another worker.
    assert len(rows) == sum(len(_expected_rows(n)) for n in rounds_of.values())
    assert {(r.status, r.attempt, r.reclaims) for r in rows} == {("completed", 1, 0)}

    # Per instance: exactly the expected rows, one per step, round and item (none lost, none doubled).
    by_instance: dict[int, dict[Key, Any]] = defaultdict(dict)
    for r in rows:
        key = (r.step_id, r.round, r.item)
        assert key not in by_instance[r.instance_id], (r.instance_id, key)
        by_instance[r.instance_id][key] = r
    assert sorted(by_instance) == sorted(rounds_of)
    for iid, own in by_instance.items():
        assert sorted(own, key=_key_order) == _expected_rows(rounds_of[iid]), iid

    # Every row was made ready once, started once and completed once; nothing else happened to a step.
    per_row = Counter((e.type, e.step_instance_id) for e in event_rows if e.step_instance_id is not None)
    row_ids = {r.id for r in rows}
    for kind in ("step.ready", "step.started", "step.completed"):
        assert {rid for k, rid in per_row if k == kind} == row_ids, kind
        assert {per_row[(kind, rid)] for rid in row_ids} == {1}, kind
    assert {kind for kind, _ in per_row} <= {"step.ready", "step.started", "step.completed", "step.expanded",
                                             "step.woken", "step.waiting"}
    for_each_own = {r.id for r in rows if r.step_id in ITEMS and r.item is None}
    assert {rid for kind, rid in per_row if kind == "step.expanded"} == for_each_own
    assert {per_row[("step.expanded", rid)] for rid in for_each_own} == {1}
    # And per instance: completed once; one loop-back event per round after the first.
    per_instance = Counter((e.type, e.instance_id) for e in event_rows if e.step_instance_id is None)
    assert {iid: per_instance[("instance.completed", iid)] for iid in rounds_of} == dict.fromkeys(rounds_of, 1)
    loop_backs = sorted((e.instance_id, e.payload["round"]) for e in event_rows if e.type == "step.loop_back")
    assert loop_backs == sorted((iid, r) for iid, n in rounds_of.items() for r in range(2, n + 1))

    # Handler runs from the call log: each at attempt 1, every start with its end, exactly as often as expected
    # (so every for_each item ran once: a handler run per item row, and one row per item).
    began: dict[int, Counter[str]] = defaultdict(Counter)
    ended: dict[int, Counter[str]] = defaultdict(Counter)
    for kind, iid, step_id, attempt, _pid in read_call_log(call_log):
        assert attempt == 1, (kind, iid, step_id, attempt)
        (ended if kind == "end" else began)[iid][step_id] += 1
    assert sorted(ended) == sorted(rounds_of)
    for iid, n in rounds_of.items():
        assert ended[iid] == _expected_calls(n), (iid, n, ended[iid])
        assert began[iid] == _expected_calls(n), (iid, n, began[iid])

    # Outputs and order, per instance: each round sees its own visit; joins start after all of their parents.
    for iid, row in by_instance.items():
        n = rounds_of[iid]
        assert [row[("score", visit, None)].output for visit in range(1, n + 1)] == [
            {"quality_score": 40 * visit} for visit in range(1, n + 1)], iid
        assert [row[("decide", visit, None)].output for visit in range(1, n + 1)] == [
            {"routes": ["draft"]}] * (n - 1) + [{"routes": ["done"]}], iid
        assert row[("fan", 1, None)].output == [{"step": "fan"}] * FAN_ITEMS, iid
        for visit in range(1, n + 1):
            where = (iid, visit)
            assert row[("right", visit, None)].output == [{"step": "right"}] * BRANCH_ITEMS, where
            # max_parallel 1: the second item starts after the first finished, in every round.
            assert row[("right", visit, 1)].started_at >= row[("right", visit, 0)].finished_at, where
            meet_began = row[("meet", visit, None)].started_at
            assert all(meet_began >= row[(p, visit, None)].finished_at for p in JOIN_PARENTS["meet"]), where
            if visit > 1:  # a round starts only after the previous round's decision
                assert row[("draft", visit, None)].created_at >= row[("decide", visit - 1, None)].finished_at, where
        merge_began = row[("merge", 1, None)].started_at
        assert merge_began >= row[("decide", n, None)].finished_at, iid
        assert merge_began >= row[("fan", 1, None)].finished_at, iid
        assert outputs[iid] == {"merge": {"step": "merge"}}, iid

    # The joins' race was really run: their parents often completed in different worker processes.
    worker_of = {e.step_instance_id: e.payload["worker"] for e in event_rows if e.type == "step.started"}
    mixed: Counter[str] = Counter()
    for iid, row in by_instance.items():
        for join, parents in JOIN_PARENTS.items():
            for visit in range(1, _rounds_of(join, rounds_of[iid]) + 1):
                mixed[join] += len({worker_of[row[(p, visit, None)].id] for p in parents}) > 1
    assert mixed["meet"] >= 1 and mixed["merge"] >= 1, mixed
