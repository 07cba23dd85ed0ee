"""notification: send one notice (log, email or Slack) rendered from the step's templates.

One delivery attempt per step attempt: a failure is retried by the step's retry policy (durable,
with backoff between claims) rather than inside the handler.
"""

from __future__ import annotations

from flowdb.models import Notification
from flowdb.notifications import Notice
from flowdb.outcomes import Outcome
from flowdb.steptypes.base import StepContext, StepType


class NotificationType(StepType):
    name = "notification"
    renders = True

    def render(self, ctx: StepContext) -> tuple[str, str]:
        """The notice's text and title."""
        assert ctx.step.message is not None
        text = ctx.step.message.render(ctx.templates)
        title_template = ctx.step.templates.get("title")
        title = title_template.render(ctx.templates) if title_template is not None else \
            f"{ctx.definition.name}: {ctx.step.id}"
        return text, title

    async def run(self, ctx: StepContext) -> Outcome:
        model = ctx.step.model
        assert isinstance(model, Notification)
        text, title = ctx.rendered
        given = {"channel": model.channel, "title": title, "message": text, "to": list(model.to)}
        notice = Notice(model.channel, title, text, to=tuple(model.to), instance_id=ctx.claimed.instance_id)
        delivery = await ctx.notifier.send(notice, attempts=1)
        # What was sent is kept: in the step's output and in the event (the text is bounded by the
        # template limits).
        event = {"channel": delivery.channel, "ok": delivery.ok, "attempts": ctx.claimed.attempt,
                 "error": delivery.error, "title": title, "message": text}
        if not delivery.ok:
            # A channel that is not configured, or a URL the outbound check refuses, will not be
            # different at the next attempt: fail at once.
            return ctx.outcome("failed", error=f"{model.channel} notice not delivered: {delivery.error}",
                               retryable=delivery.retryable, input=given,
                               events=[("notification.failed", event)])
        return ctx.outcome("completed", output={"channel": model.channel, "delivered": True, "title": title,
                                                "message": text, **delivery.detail},
                           input=given, events=[("notification.sent", event)])

    def describe_done(self, outcome: Outcome) -> str | None:
        output = outcome.output if isinstance(outcome.output, dict) else {}
        return f"[{output.get('channel')}] {output.get('message')}" if "message" in output else None
