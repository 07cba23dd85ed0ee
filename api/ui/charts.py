"""The runs page's two bar charts (instances per day, cost per day), as geometry for an inline SVG.

Bars of one series over consecutive days need no charting library: each bar's height is its value
over the series' largest, and the template draws a rect with a <title> per day.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

WIDTH, HEIGHT = 600, 120  # the SVG's viewBox; bars fill it
GAP = 2


@dataclass(frozen=True)
class Bar:
    day: str
    value: float
    label: str  # the value as the tooltip and the table show it
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Series:
    title: str
    bars: list[Bar]
    peak: str  # the largest value, as a label for the axis

    @property
    def total(self) -> float:
        return sum(bar.value for bar in self.bars)


@dataclass(frozen=True)
class DayChart:
    first: str
    last: str
    instances: Series
    cost: Series
    width: int = WIDTH
    height: int = HEIGHT


def _series(title: str, days: list[str], values: list[float], fmt: str) -> Series:
    peak = max(values, default=0.0)
    step = WIDTH / max(len(days), 1)
    bars = []
    for index, (day, value) in enumerate(zip(days, values, strict=True)):
        height = (value / peak) * (HEIGHT - 4) if peak > 0 else 0.0
        bars.append(Bar(day, value, fmt.format(value), x=index * step + GAP / 2, y=HEIGHT - height,
                        width=max(step - GAP, 1.0), height=height))
    return Series(title, bars, fmt.format(peak))


def day_chart(totals: dict[str, tuple[int, float]], days: int, today: datetime | None = None) -> DayChart:
    """Instances and cost per UTC day over the `days` days ending today; days without instances are 0."""
    last = (today or datetime.now(UTC)).date()
    span = [(last - timedelta(days=days - 1 - i)).isoformat() for i in range(days)]
    started = [float(totals.get(day, (0, 0.0))[0]) for day in span]
    cost = [totals.get(day, (0, 0.0))[1] for day in span]
    return DayChart(span[0], span[-1], _series("Instances started per day", span, started, "{:.0f}"),
                    _series("Cost per day (USD)", span, cost, "${:,.2f}"))
