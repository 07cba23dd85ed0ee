"""Statements run on the driver cursor report errors as SQLAlchemy does, so callers retry or fail alike."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import IntegrityError

from flowdb.db.events import EventWriter, event_row

from conftest import Database


def test_driver_statement_errors_are_sqlalchemy_errors(db: Database) -> None:
    writer = EventWriter(db.engine.dialect.name)
    with db.engine.connect() as conn:
        with pytest.raises(IntegrityError), conn.begin():  # events.type is NOT NULL
            writer.write(conn, [{"instance_id": 1, "step_instance_id": None, "type": None, "payload": None}])
        with conn.begin():  # the connection is usable afterwards
            writer.write(conn, [event_row(1, "test.ok", {"a": 1})])
        assert conn.exec_driver_sql("SELECT count(*) FROM events WHERE type = 'test.ok'").scalar() == 1
