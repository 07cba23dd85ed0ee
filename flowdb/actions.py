"""Output actions (on_success / on_failure): rendered after the instance's end is committed.

Rendering runs off the event loop under the template limits (like every user template); carrying
the actions out (a log line, a notice) and recording them as events is the worker's part. Best
effort: a worker killed between the commit and these lines does not carry them out.
"""

from __future__ import annotations

from dataclasses import dataclass

from flowdb.db.progress import DueActions
from flowdb.errors import TemplateError
from flowdb.models import LogAction
from flowdb.notifications import Notice


@dataclass(frozen=True)
class RenderedAction:
    instance_id: int
    level: str  # for a log action: its level ("error" when its template failed)
    message: str
    notice: Notice | None = None  # for a notify action: what to send

    def event(self) -> tuple[str, dict[str, str]]:
        """The event that records it: action.log or action.notify."""
        if self.notice is None:
            return "action.log", {"level": self.level, "message": self.message}
        return "action.notify", {"channel": self.notice.channel, "title": self.notice.title, "message": self.message}


def render_actions(due: DueActions) -> list[RenderedAction]:
    """Each action with its message rendered; one whose template fails becomes an error log line."""
    rendered = []
    for action, template in due.actions:
        try:
            message = template.render(due.context)
        except TemplateError as exc:
            rendered.append(RenderedAction(due.instance_id, "error", f"output action failed to render: {exc}"))
            continue
        if isinstance(action, LogAction):
            rendered.append(RenderedAction(due.instance_id, action.level, message))
            continue
        title = action.title or f"{due.definition.name}: instance {due.instance_id} {due.context['process']['status']}"
        notice = Notice(action.channel, title, message, to=tuple(action.to), instance_id=due.instance_id)
        rendered.append(RenderedAction(due.instance_id, "info", message, notice))
    return rendered
