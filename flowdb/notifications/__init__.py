"""Notices to people: approvers of human-approval steps and the audience of notification steps.

Channels are log, email (SMTP) and slack (incoming webhook). Notifier.send retries a failing channel
with backoff and reports the outcome as a Delivery instead of raising, for the caller to record.
"""

from flowdb.notifications.config import NotifierConfig
from flowdb.notifications.errors import ChannelNotConfigured, NotificationError, OutboundURLRefused
from flowdb.notifications.notice import Delivery, Notice, decide_command
from flowdb.notifications.notifier import Notifier

__all__ = [
    "ChannelNotConfigured",
    "Delivery",
    "Notice",
    "NotificationError",
    "Notifier",
    "NotifierConfig",
    "OutboundURLRefused",
    "decide_command",
]
