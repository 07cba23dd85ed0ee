"""Durations as people write them: short forms (30s, 1h30m) and ISO 8601 (PT30S, P1DT2H), as DESIGN.md says."""

from __future__ import annotations

import pytest

from flowdb.db import clock
from flowdb.definitions import parse_definition
from flowdb.durations import parse_duration
from flowdb.errors import DefinitionError

from conftest import Database
from helpers import drive, instance, start, steps, work


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("10m", 600), ("1h30m", 5400), ("1.5s", 1.5),
                                               ("PT30S", 30), ("P1DT2H", 93_600), ("PT0.25S", 0.25), ("P2D", 172_800),
                                               (45, 45)])
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "says"), [("P1M", "months or years"), ("P1Y", "months or years"),
                                            ("Pfoo", "ISO 8601 such as PT30S"), ("soon", "30s, 10m")])
def test_what_is_not_a_duration_says_what_is(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_duration(text)


def test_a_definition_reports_a_month_long_timeout_where_it_is() -> None:
    with pytest.raises(DefinitionError, match=r"t\.yaml:6:17: .*months or years"):
        parse_definition("process:\n  name: p\n  steps:\n    - id: a\n      type: timer\n"
                         "      duration: P1M\n", "t.yaml")


def test_an_iso_timer_fires(db: Database) -> None:
    definition = """
process:
  name: iso-timer
  steps:
    - {id: wait, type: timer, duration: PT2H}
    - {id: after, type: agent_task, agent: noop, message: done, depends_on: [wait],
       retry: {max_attempts: 2, initial_interval: PT0.01S}}
"""
    [iid] = start(db.engine, definition)
    drive(db.engine, lambda: steps(db.engine, iid)["wait"].status == "waiting")
    try:
        clock.set_offset(2 * 3600 + 1)  # a worker whose clock is two hours ahead: no sleep
        work(db.engine, timeout=20)
    finally:
        clock.set_offset(0)
    assert instance(db.engine, iid).status == "completed"
