"""Durations as people write them in definitions: 2s, 1m, 10m, 48h, 1h30m, 1.5s, seconds, or ISO 8601
(PT30S, P1DT2H). Parsed by kept libraries: pytimeparse for the short forms, isodate for ISO 8601."""

from __future__ import annotations

import datetime

import isodate
from pytimeparse.timeparse import timeparse as _parse

FORMS = "30s, 10m, 48h, 1h30m or ISO 8601 such as PT30S or P1DT2H"


def _iso(text: str) -> float | None:
    """Seconds of an ISO 8601 duration; None if it is not one. Months and years have no fixed length."""
    try:
        parsed = isodate.parse_duration(text)
    except (isodate.ISO8601Error, ValueError):
        return None
    if not isinstance(parsed, datetime.timedelta):
        raise ValueError(f"{text!r} counts months or years, which have no fixed length; write it in days "
                         "(P30D) or hours")
    return parsed.total_seconds()


def parse_duration(text: str | int | float) -> float:
    """Seconds in a duration; raises ValueError with the accepted forms when it is not one."""
    if isinstance(text, bool):
        raise ValueError(f"expected a duration such as {FORMS}, not a boolean")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        stripped = text.strip()
        parsed = _iso(stripped) if stripped[:1] in ("P", "p") else (_parse(stripped) if stripped else None)
        if parsed is None:
            raise ValueError(f"{text!r} is not a duration; write it like {FORMS}")
        seconds = float(parsed)
    if seconds < 0:
        raise ValueError(f"a duration must not be negative (got {text!r})")
    return seconds
