"""notification: send one notice (log, email or Slack) rendered from the step's templates.

One delivery attempt per step attempt: a failure is retried by the step's retry policy (durable,
with backoff between claims) rather than inside the handler.
"""

from __future__ import annotations

from flowdb.errors import TemplateError
from flowdb.handlers.base import StepContext
from flowdb.models import Notification
from flowdb.notifications import Notice
from flowdb.outcomes import Outcome


class NotificationHandler:
    type = "notification"

    async def run(self, ctx: StepContext) -> Outcome:
        model = ctx.step.model
        assert isinstance(model, Notification) and ctx.step.message is not None
        try:
            text = ctx.step.message.render(ctx.templates)
            title_template = ctx.step.templates.get("title")
            title = title_template.render(ctx.templates) if title_template is not None else \
                f"{ctx.definition.name}: {model.id}"
        except TemplateError as exc:
            return ctx.outcome("failed", error=str(exc), retryable=False)
        given = {"channel": model.channel, "title": title, "message": text, "to": list(model.to)}
        notice = Notice(model.channel, title, text, to=tuple(model.to), instance_id=ctx.claimed.instance_id)
        delivery = await ctx.notifier.send(notice, attempts=1)
        event = {"channel": delivery.channel, "ok": delivery.ok, "attempts": ctx.claimed.attempt,
                 "error": delivery.error}
        if not delivery.ok:
            # A channel that is not configured will not be by the next attempt: fail at once.
            return ctx.outcome("failed", error=f"{model.channel} notice not delivered: {delivery.error}",
                               retryable=ctx.notifier.configured(model.channel), input=given,
                               events=[("notification.failed", event)])
        return ctx.outcome("completed", output={"channel": model.channel, "delivered": True, **delivery.detail},
                           input=given, events=[("notification.sent", event)])
