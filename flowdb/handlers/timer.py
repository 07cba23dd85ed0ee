"""timer: park the step until a duration passes, a time of day comes (in a time zone), or a date-time."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from flowdb.handlers.base import StepContext
from flowdb.models import Timer
from flowdb.outcomes import Outcome


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


class TimerHandler:
    type = "timer"

    async def run(self, ctx: StepContext) -> Outcome:
        model = ctx.step.model
        assert isinstance(model, Timer)
        if ctx.claimed.woken:
            due = ctx.claimed.input["wake"]
            return ctx.outcome("completed", output={"fired_at": ctx.now.isoformat(), "due_at": due},
                               input=ctx.claimed.input)
        due = due_time(model, ctx.now)
        wait = (due - ctx.now).total_seconds()
        if wait <= 0:
            return ctx.outcome("completed", output={"fired_at": ctx.now.isoformat(), "due_at": due.isoformat()})
        return ctx.outcome("waiting", input={"wake": due.isoformat()}, wake_in=wait)
