"""Wall-clock timers compute their moment in the step's time zone (daylight saving included)."""

from __future__ import annotations

from datetime import UTC, datetime

from flowdb.definitions import load_definition_file
from flowdb.models import Timer
from flowdb.steptypes.timer import due_time, next_time_of_day

from conftest import EXAMPLES


def test_market_open_in_new_york_across_daylight_saving() -> None:
    winter = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)  # 07:00 in New York (EST, UTC-5)
    assert next_time_of_day(winter, "09:30", "America/New_York") == datetime(2026, 1, 15, 14, 30, tzinfo=UTC)
    summer = datetime(2026, 7, 15, 12, 0, tzinfo=UTC)  # 08:00 in New York (EDT, UTC-4)
    assert next_time_of_day(summer, "09:30", "America/New_York") == datetime(2026, 7, 15, 13, 30, tzinfo=UTC)
    after_open = datetime(2026, 7, 15, 15, 0, tzinfo=UTC)  # 11:00 local: the next open is tomorrow
    assert next_time_of_day(after_open, "09:30", "America/New_York") == datetime(2026, 7, 16, 13, 30, tzinfo=UTC)


def test_timer_trade_example_waits_for_the_next_market_open() -> None:
    definition = load_definition_file(EXAMPLES / "timer-trade.yaml")
    model = definition.steps["wait-for-market-open"].model
    assert isinstance(model, Timer)
    now = datetime(2026, 11, 26, 13, 0, tzinfo=UTC)  # 08:00 in New York
    assert due_time(model, now) == datetime(2026, 11, 26, 14, 30, tzinfo=UTC)
