"""Writing the audit trail: the rows of `events` the engine appends, built and inserted one way.

A row is built by `event_row` (its payload as JSON text, ready for the driver) and inserted by
`EventWriter.write`, one executemany per transaction, with the database's clock as created_at.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection

from flowdb.db.clock import Clock
from flowdb.db.driver import DriverStatement, as_json
from flowdb.db.tables import events

EventRow = dict[str, Any]


def event_row(instance_id: int, kind: str, payload: dict[str, Any] | None = None,
              step_instance_id: int | None = None) -> EventRow:
    return {"instance_id": instance_id, "step_instance_id": step_instance_id, "type": kind,
            "payload": as_json(payload)}


class EventWriter:
    def __init__(self, dialect_name: str) -> None:
        self.insert = DriverStatement(events.insert().values(created_at=Clock(dialect_name).now),
                                      ["instance_id", "step_instance_id", "type", "payload"])

    def write(self, conn: Connection, rows: Sequence[EventRow]) -> None:
        self.insert.executemany(conn, rows)
