"""Durations as people write them in definitions: 2s, 1m, 10m, 48h, 1h30m, 1.5s, or seconds."""

from __future__ import annotations

from pytimeparse.timeparse import timeparse as _parse


def parse_duration(text: str | int | float) -> float:
    """Seconds in a duration; raises ValueError with the accepted forms when it is not one."""
    if isinstance(text, bool):
        raise ValueError("expected a duration such as 30s, 10m, 48h or 1h30m, not a boolean")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        parsed = _parse(text.strip()) if text.strip() else None
        if parsed is None:
            raise ValueError(f"{text!r} is not a duration; write it like 30s, 10m, 48h or 1h30m")
        seconds = float(parsed)
    if seconds < 0:
        raise ValueError(f"a duration must not be negative (got {text!r})")
    return seconds
