"""gateway: choose which routes to take (exclusive: first true; inclusive: every true; parallel: all)."""

from __future__ import annotations

from flowdb.handlers.base import StepContext
from flowdb.models import Gateway
from flowdb.outcomes import Outcome


class GatewayHandler:
    type = "gateway"

    def render(self, ctx: StepContext) -> list[str]:
        """The routes taken, in order (conditions are evaluated here, off the event loop)."""
        model = ctx.step.model
        assert isinstance(model, Gateway)
        chosen: list[str] = []
        default: str | None = None
        for route, condition in zip(model.routes, ctx.step.route_conditions, strict=True):
            if route.default:
                default = route.next
            elif model.gateway_type == "parallel" or (condition is not None and condition.evaluate(ctx.templates)):
                chosen.append(route.next)
                if model.gateway_type == "exclusive":
                    break
        if model.gateway_type == "parallel" and default is not None:
            chosen.append(default)
        elif not chosen and default is not None:
            chosen.append(default)
        return chosen

    async def run(self, ctx: StepContext) -> Outcome:
        chosen: list[str] = ctx.rendered
        model = ctx.step.model
        assert isinstance(model, Gateway)
        # Children reached through depends_on (not routes) always count as taken.
        routed = {route.next for route in model.routes}
        taken = frozenset(chosen) | frozenset(c for c in ctx.step.children if c not in routed)
        return ctx.outcome("completed", output={"routes": chosen}, taken=taken)
