"""The log channel: one INFO line on the flowdb.notifications logger. Always available."""

from __future__ import annotations

import logging
from typing import Any

from flowdb.notifications.notice import Notice

LOGGER_NAME = "flowdb.notifications"
log = logging.getLogger(LOGGER_NAME)


def _flat(text: str) -> str:
    # One record, one line: newlines in user text would forge extra log lines.
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def deliver(notice: Notice) -> dict[str, Any]:
    log.info(
        "notice %s: %s | artifacts: %s | approval: %s | instance: %s",
        _flat(notice.title),
        _flat(notice.text),
        ", ".join(_flat(a) for a in notice.artifacts) or "-",
        notice.approval_id if notice.approval_id is not None else "-",
        notice.instance_id if notice.instance_id is not None else "-",
    )
    return {"logger": LOGGER_NAME}
