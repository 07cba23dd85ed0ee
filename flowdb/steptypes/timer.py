"""timer: park the step until a duration passes, a time of day comes (in a time zone), or a date-time."""

from __future__ import annotations

import re
import zoneinfo
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from flowdb.models import Timer
from flowdb.outcomes import Outcome
from flowdb.problems import suggest
from flowdb.steptypes.base import Problem, StepContext, StepType


def next_time_of_day(now_utc: datetime, hhmm: str, zone: str | None) -> datetime:
    """The next moment (UTC) at or after now when the wall clock in `zone` shows hhmm."""
    tz = ZoneInfo(zone) if zone else UTC
    parts = [int(p) for p in hhmm.split(":")]
    wanted = time(parts[0], parts[1], parts[2] if len(parts) > 2 else 0)
    local_now = now_utc.astimezone(tz)
    candidate = datetime.combine(local_now.date(), wanted, tzinfo=tz)
    if candidate < local_now:
        candidate = datetime.combine(local_now.date() + timedelta(days=1), wanted, tzinfo=tz)
    return candidate.astimezone(UTC)


def due_time(model: Timer, now_utc: datetime) -> datetime:
    if model.duration is not None:
        return now_utc + timedelta(seconds=model.duration)
    if model.wait_until is not None:
        return next_time_of_day(now_utc, model.wait_until, model.timezone)
    assert model.until is not None
    moment = datetime.fromisoformat(model.until)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=ZoneInfo(model.timezone) if model.timezone else UTC)
    return moment.astimezone(UTC)


_HHMM = re.compile(r"^([01]?[0-9]|2[0-3]):([0-5][0-9])(?::([0-5][0-9]))?$")


def _zones() -> set[str]:
    try:
        return zoneinfo.available_timezones()
    except (OSError, ValueError):  # no tz database to list: no suggestion
        return set()


class TimerType(StepType):
    name = "timer"

    def check(self, model: Any) -> list[Problem]:
        """Exactly one of duration, wait_until, until; a known time zone; times that parse."""
        problems: list[Problem] = []
        given = [name for name in ("duration", "wait_until", "until") if getattr(model, name) is not None]
        if not given:
            problems.append(((), f"timer {model.id!r} needs one of duration, wait_until, until", False))
        elif len(given) > 1:
            problems.append(((given[1],), f"timer {model.id!r} needs exactly one of duration, wait_until, until "
                             f"(got {', '.join(given)}); keep one", False))
        if model.timezone is not None:
            try:
                zoneinfo.ZoneInfo(model.timezone)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                problems.append((("timezone",), f"unknown time zone {model.timezone!r}"
                                 f"{suggest(model.timezone, _zones())}; use an IANA name such as Europe/Paris or "
                                 "America/New_York", True))
        if model.wait_until is not None and not _HHMM.match(model.wait_until):
            problems.append((("wait_until",), f"wait_until {model.wait_until!r} is not a time of day; write it as "
                             "HH:MM or HH:MM:SS (24-hour), in quotes", True))
        if model.until is not None:
            try:
                datetime.fromisoformat(model.until)
            except ValueError:
                problems.append((("until",), f"until {model.until!r} is not an ISO 8601 date-time such as "
                                 "2026-12-01T09:30:00+01:00", True))
        return problems

    async def run(self, ctx: StepContext) -> Outcome:
        model = ctx.step.model
        assert isinstance(model, Timer)
        if ctx.claimed.woken:
            state = ctx.claimed.input or {}
            due = state.get("due_at", state.get("wake"))  # `wake`: written before migration 0008
            return ctx.outcome("completed", output={"fired_at": ctx.now.isoformat(), "due_at": due},
                               input=ctx.claimed.input)
        due = due_time(model, ctx.now)
        wait = (due - ctx.now).total_seconds()
        if wait <= 0:
            return ctx.outcome("completed", output={"fired_at": ctx.now.isoformat(), "due_at": due.isoformat()})
        return ctx.outcome("waiting", input={"due_at": due.isoformat()}, wake_in=wait)
