"""end: complete the instance at once; steps still running or waiting are cancelled (engine/stop.py)."""

from __future__ import annotations

from flowdb.outcomes import Outcome
from flowdb.steptypes.base import StepContext, StepType


class EndType(StepType):
    name = "end"

    async def run(self, ctx: StepContext) -> Outcome:
        return ctx.outcome("completed", output={"ended": True}, ends_instance=True)
