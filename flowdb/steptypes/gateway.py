"""gateway: choose which routes to take (exclusive: the first whose condition holds, else the default;
inclusive: every one whose condition holds, the default only when none does; parallel: all).

A route back to an ancestor (a loop-back, R1) is ineligible once its target ran `max_visits` rounds
(R3): the gateway goes on to its next route, then its default, and records `gateway.loop_exhausted`;
with no eligible route left, the step fails and with it the instance, naming the step and the limit.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, bindparam, func, select

from flowdb.db.claims import Claimed
from flowdb.db.tables import step_instances
from flowdb.definitions import CompiledStep
from flowdb.models import Gateway
from flowdb.outcomes import Outcome
from flowdb.steptypes.base import StepContext, StepType

S = step_instances
# The latest round of each loop target (not for_each items).
_ROUNDS = select(S.c.step_id, func.max(S.c.round)).where(
    S.c.instance_id == bindparam("iid"), S.c.step_id.in_(bindparam("sids", expanding=True)),
    S.c.item.is_(None)).group_by(S.c.step_id)


class GatewayType(StepType):
    name = "gateway"
    renders = True
    loads = True

    def load(self, conn: Connection, claimed: Claimed, step: CompiledStep) -> dict[str, int]:
        """How many rounds each loop target has run (read in the claim's transaction)."""
        if not step.loops:
            return {}
        return dict(conn.execute(_ROUNDS, {"iid": claimed.instance_id, "sids": sorted(step.loops)}).all())

    def render(self, ctx: StepContext) -> tuple[list[str], list[dict[str, Any]]]:
        """The routes taken, in order, and the loop-backs passed over (conditions are evaluated here,
        off the event loop)."""
        model = ctx.step.model
        assert isinstance(model, Gateway)
        rounds: dict[str, int] = ctx.loaded or {}
        chosen: list[str] = []
        exhausted: list[dict[str, Any]] = []
        default: str | None = None
        for route, condition in zip(model.routes, ctx.step.route_conditions, strict=True):
            holds = model.gateway_type == "parallel" or route.default or (
                condition is not None and condition.evaluate(ctx.templates))
            if not holds:
                continue
            if route.next in ctx.step.loops:
                limit = ctx.definition.steps[route.next].model.max_visits
                if rounds.get(route.next, 1) >= limit:
                    exhausted.append({"target": route.next, "max_visits": limit, "rounds": rounds.get(route.next, 1)})
                    continue
            if route.default:
                default = route.next
                continue
            chosen.append(route.next)
            if model.gateway_type == "exclusive":
                break
        if not chosen and default is not None:
            chosen.append(default)
        return chosen, exhausted

    async def run(self, ctx: StepContext) -> Outcome:
        chosen, exhausted = ctx.rendered
        model = ctx.step.model
        assert isinstance(model, Gateway)
        events = [("gateway.loop_exhausted", e) for e in exhausted]
        if exhausted and not chosen:
            spent = ", ".join(f"{e['target']!r} ran {e['rounds']} of max_visits {e['max_visits']}" for e in exhausted)
            return ctx.outcome("failed", retryable=False, events=events,
                               error=f"gateway {ctx.step.id!r} has no eligible route: the loop is exhausted ({spent}) "
                                     "and no other route applies; add a default route out of the loop")
        # Children reached through depends_on (not routes) always count as taken.
        routed = {route.next for route in model.routes}
        taken = frozenset(chosen) | frozenset(c for c in ctx.step.children if c not in routed)
        return ctx.outcome("completed", output={"routes": chosen}, taken=taken, events=events)
