"""Step timings (migration 0006): queued_ms and run_ms written by the engine with the timestamps,
and v_step_stats' percentiles read through their buckets, checked against a plain sort."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, bindparam, select, text, update

from flowdb.approvals import decide
from flowdb.control import cancel_instance, retry_step
from flowdb.db.claims import ClaimStatements
from flowdb.db.progress import ProgressStatements
from flowdb.db.tables import process_definitions, process_instances, step_instances
from flowdb.db.timings import TIMING_COLUMNS, refresh_timings

from conftest import Database
from helpers import approval_rows, drive, start, waiting_for_decision, work

BASE = datetime(2026, 11, 20, tzinfo=UTC)


def norm_utc(value: Any) -> str:
    """A time as SQLite stores it or PostgreSQL returns it, as UTC text to the millisecond."""
    if isinstance(value, datetime):
        value = value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return str(value)[:23]


def nearest_rank_p95(values: list[int]) -> int:
    return sorted(values)[(95 * len(values) + 99) // 100 - 1]


def _timings(rng: random.Random) -> dict[str, tuple[list[int], list[int]]]:
    """Step id -> (run times, queue times) in ms, each kind of distribution the buckets must survive."""
    cluster = [rng.randint(12_000, 12_099) for _ in range(300)] + [rng.randint(50_000, 90_000) for _ in range(5)]
    boundaries = [999, 1000, 1001, 9_999, 10_000, 10_001, 99_999, 100_000, 100_001, 999_999, 1_000_000] * 3
    return {
        # ms values over five orders of magnitude, few repeated
        "spread": ([rng.randint(1, 200_000) for _ in range(400)], [rng.randint(0, 5_000) for _ in range(400)]),
        # the p95 falls in one 100 ms bucket holding nearly every value: its rows are counted per value
        "cluster": (cluster, [rng.randint(1_000, 1_009) for _ in range(305)]),
        # one value many times over, and a few larger ones
        "ties": ([777] * 100 + [5_000] * 3, [0] * 100 + [1] * 3),
        "single": ([1_234], [56]),
        "twenty": ([1_000 * k for k in range(1, 21)], [100 * k for k in range(20, 0, -1)]),
        "boundaries": (boundaries, list(reversed(boundaries))),
    }


def _fill(engine: Engine, timings: dict[str, tuple[list[int], list[int]]]) -> None:
    """The `timed` process in two versions (each step's values dealt between them at random), and an
    `other` process with the same step ids whose values must not leak into timed's."""
    rng = random.Random(7)
    definitions = [(1, "timed", 1), (2, "timed", 2), (3, "other", 1)]
    instances: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    for step_id, (runs, queues) in timings.items():
        plan = [(rng.choice((1, 2)), run, queued) for run, queued in zip(runs, queues, strict=True)]
        plan += [(3, 9_999_999, 9_999_999)] * 5
        for definition_id, run, queued in plan:
            n = len(steps) + 1
            ready = BASE + timedelta(minutes=n)
            began = ready + timedelta(milliseconds=queued)
            _, name, version = definitions[definition_id - 1]
            instances.append({"id": n, "definition_id": definition_id, "process_name": name,
                              "version": version, "status": "completed", "inputs": {},
                              "open_steps": 0, "created_at": ready, "started_at": ready, "finished_at": began})
            steps.append({"id": n, "instance_id": n, "definition_id": definition_id, "step_id": step_id,
                          "type": "agent_task", "status": "completed", "attempt": 1, "max_attempts": 1,
                          "ready_at": ready, "started_at": began, "finished_at": began + timedelta(milliseconds=run),
                          "created_at": ready})
    with engine.begin() as conn:
        conn.execute(process_definitions.insert(), [
            {"id": d, "name": name, "version": v, "content_hash": f"h{d}", "source": "", "parsed": {},
             "created_at": BASE} for d, name, v in definitions])
        conn.execute(process_instances.insert(), instances)
        conn.execute(step_instances.insert(), steps)
        refresh_timings(conn)


def test_step_stats_percentiles_equal_a_sort_of_every_value(db: Database) -> None:
    timings = _timings(random.Random(2026))
    _fill(db.engine, timings)
    with db.engine.connect() as conn:
        got = {row.step_id: row for row in conn.execute(text(
            "SELECT step_id, runs, mean_run_s, p95_run_s, mean_queued_s, p95_queued_s FROM v_step_stats "
            "WHERE process = 'timed'"))}
    assert sorted(got) == sorted(timings)
    for step_id, (runs, queues) in timings.items():
        row = got[step_id]
        assert row.runs == len(runs)
        assert (row.p95_run_s, row.p95_queued_s) == (nearest_rank_p95(runs) / 1000, nearest_rank_p95(queues) / 1000), \
            step_id
        assert row.mean_run_s == pytest.approx(sum(runs) / len(runs) / 1000, abs=0.0005)
        assert row.mean_queued_s == pytest.approx(sum(queues) / len(queues) / 1000, abs=0.0005)


def test_buckets_sort_like_the_values(db: Database) -> None:
    timings = _timings(random.Random(1))
    _fill(db.engine, timings)
    with db.engine.connect() as conn:
        pairs = conn.execute(select(step_instances.c.run_ms, step_instances.c.run_bucket)).all()
    assert len(pairs) == sum(len(runs) + 5 for runs, _ in timings.values())
    by_value = sorted(set(pairs))
    assert [bucket for _, bucket in by_value] == sorted(bucket for _, bucket in by_value)
    for ms, bucket in by_value:  # three significant digits: a bucket spans under 1% of its values
        assert bucket == ms if ms < 1000 else bucket == len(str(ms)) * 1000 + int(str(ms)[:3])


def _timing_columns(engine: Engine, step_row: int) -> tuple[Any, ...]:
    with engine.connect() as conn:
        return tuple(conn.execute(select(step_instances.c.queued_ms, step_instances.c.run_ms)
                                  .where(step_instances.c.id == step_row)).one())


def test_refresh_follows_the_latest_attempt(db: Database) -> None:
    """The rules, applied to timestamps written by hand: claimed, finished, retried, cancelled."""
    _fill(db.engine, {"one": ([2_500], [300])})
    S = step_instances

    def after(**values: Any) -> tuple[Any, ...]:
        with db.engine.begin() as conn:
            conn.execute(update(S).where(S.c.id == 1).values(**values))
            refresh_timings(conn)
        return _timing_columns(db.engine, 1)

    assert _timing_columns(db.engine, 1) == (300, 2_500)
    # a retry: ready again after a backoff, the old claim stays in started_at
    assert after(status="ready", ready_at=BASE + timedelta(hours=1), finished_at=None) == (None, None)
    # claimed again 1.5 s after it became ready: running
    assert after(status="running", started_at=BASE + timedelta(hours=1, milliseconds=1_500)) == (1_500, None)
    # completed 4 s into the run
    assert after(status="completed", finished_at=BASE + timedelta(hours=1, milliseconds=5_500)) == (1_500, 4_000)
    # cancelled instead: where the cancellation cut it is no run time
    assert after(status="cancelled") == (1_500, None)
    # failed, with a clock that went backwards: no run time either
    assert after(status="failed", finished_at=BASE) == (1_500, None)
    # a pending step never claimed has neither
    assert after(status="pending", started_at=None, finished_at=None) == (None, None)


TIMED_PROCESS = """
process:
  name: timed-by-the-engine
  steps:
    - {id: pay, type: agent_task, agent: pricey, message: "pay"}
    - id: wobble
      type: agent_task
      agent: flaky
      message: "again"
      depends_on: [pay]
      retry: {max_attempts: 3, initial_interval: 0.01s, backoff: 1}
    - id: review
      type: human_approval
      depends_on: [wobble]
      config: {approvers: [ann@example.com], title: "Check"}
    - {id: nap, type: agent_task, agent: sleepy, message: "nap", depends_on: [pay]}
"""
FAILING_PROCESS = """
process:
  name: failing
  steps:
    - id: doomed
      type: agent_task
      agent: broken
      message: "fail"
      retry: {max_attempts: 2, initial_interval: 0.01s, backoff: 1}
"""


def _all_timings(engine: Engine) -> dict[tuple[int, str], tuple[Any, ...]]:
    S = step_instances
    with engine.connect() as conn:
        rows = conn.execute(select(S.c.instance_id, S.c.step_id, S.c.status, *(S.c[c] for c in TIMING_COLUMNS)))
        return {(r.instance_id, r.step_id): (r.status, r.queued_ms, r.queued_bucket, r.run_ms, r.run_bucket)
                for r in rows}


def test_the_engine_writes_what_the_timestamps_give(db: Database) -> None:
    """A real run through every path that moves a step's timestamps (claims, retries, a failure,
    approvals woken by a decision, a cancellation, a retry asked for by hand) leaves exactly the
    timings the rules compute from those timestamps."""
    approved, cancelled = start(db.engine, TIMED_PROCESS, count=2)
    (failed,) = start(db.engine, FAILING_PROCESS)
    drive(db.engine, waiting_for_decision(db.engine, count=2))
    (to_approve,) = [row for row in approval_rows(db.engine) if row.instance_id == approved]
    decide(db.engine, to_approve.id, "approved", "ann@example.com")
    cancel_instance(db.engine, cancelled)
    work(db.engine)
    retry_step(db.engine, failed, "doomed")  # back to ready: its timings are cleared
    written = _all_timings(db.engine)
    assert written[(failed, "doomed")] == ("ready", None, None, None, None)
    assert written[(approved, "review")][0] == "completed" and written[(approved, "review")][3] is not None
    assert written[(cancelled, "review")][0] == "cancelled" and written[(cancelled, "review")][3] is None
    for key in [(approved, "pay"), (approved, "wobble"), (approved, "nap"), (approved, "review")]:
        status, queued_ms, queued_bucket, run_ms, run_bucket = written[key]
        assert status == "completed" and None not in (queued_ms, queued_bucket, run_ms, run_bucket), key
    with db.engine.begin() as conn:
        refresh_timings(conn)
    assert _all_timings(db.engine) == written
    work(db.engine)  # the retried step fails again and gets its timings back
    assert _all_timings(db.engine)[(failed, "doomed")][0] == "failed"
    assert None not in _all_timings(db.engine)[(failed, "doomed")]


def test_a_step_taken_over_from_a_dead_worker_queues_from_its_lease_expiry(db: Database) -> None:
    """The take-over of an expired lease makes the lease's expiry the attempt's ready_at:
    the dead worker's time is neither queue time nor run time of the new attempt."""
    _fill(db.engine, {"one": ([2_500], [300])})
    S = step_instances
    claims = ClaimStatements(db.kind)
    with db.engine.begin() as conn:  # claimed days ago by a worker whose lease ran out a minute ago
        conn.execute(update(S).where(S.c.id == 1).values(
            status="running", finished_at=None, ready_at=BASE, started_at=BASE + timedelta(milliseconds=300),
            lease_owner="dead", lease_token="t0", claimable_at=claims.clock.plus(bindparam("ago")), attempt=1,
            max_attempts=2), {"ago": -60.0})
        lease_expiry = conn.execute(select(S.c.claimable_at).where(S.c.id == 1)).scalar_one()
    with db.engine.begin() as conn:  # the claim sweeps the expired lease; the take-over runs it
        assert claims.claim_steps(conn, "alive", "t1", 10, 30.0) == []
        claimed = claims.take_over_step(conn, "alive", "t1", 30.0)
    assert claimed is not None and claimed.id == 1
    with db.engine.connect() as conn:
        ready_at, queued_ms = conn.execute(select(S.c.ready_at, S.c.queued_ms).where(S.c.id == 1)).one()
    assert norm_utc(ready_at) == norm_utc(lease_expiry)
    assert 59_000 <= queued_ms <= 65_000  # a minute since the lease expired, not days


def test_a_completion_after_a_clock_that_went_backwards_has_no_run_time(db: Database) -> None:
    """Claimed (by the database's clock) before it was ready: the rule gives no timings, and the
    completion writes none either."""
    _fill(db.engine, {"one": ([2_500], [300])})
    S = step_instances
    with db.engine.begin() as conn:
        conn.execute(update(S).where(S.c.id == 1).values(
            status="running", lease_token="t", finished_at=None, queued_ms=None, queued_bucket=None,
            run_ms=None, run_bucket=None, ready_at=datetime(2099, 1, 1, tzinfo=UTC)))
        conn.execute(ProgressStatements(db.kind).complete, {
            "sid": 1, "token": "t", "status": "completed", "output": None, "input": None, "error": None, "etype": None,
            "cost": 0, "tin": 0, "tout": 0, "backend": None, "execution": None, "session": None})
    assert _timing_columns(db.engine, 1) == (None, None)
    with db.engine.begin() as conn:
        refresh_timings(conn)
    assert _timing_columns(db.engine, 1) == (None, None)


def test_a_step_skipped_after_its_claim_shows_how_long_it_took(db: Database) -> None:
    """A step whose condition turned out false is claimed, then skipped: no run time in the stats,
    but v_step_runs says how long the claim took, as for a cancelled one."""
    _fill(db.engine, {"one": ([2_500], [300])})
    S = step_instances
    with db.engine.begin() as conn:
        conn.execute(update(S).where(S.c.id == 1).values(status="skipped"))
        refresh_timings(conn)
        run_s, stats_runs = conn.execute(text(
            "SELECT (SELECT run_s FROM v_step_runs WHERE step_instance_id = 1), "
            "(SELECT mean_run_s FROM v_step_stats WHERE process = 'timed')")).one()
    assert (run_s, stats_runs) == (2.5, None)
