"""Telling a database that went away from one that said no, and waiting for it to come back.

A worker (or the API) that loses its database must not exit: it waits with a capped back-off and
carries on by itself when the database answers again. One log line when the database goes away and
one when it is back, not one per try.
"""

from __future__ import annotations

import logging
import sqlite3
import time

from sqlalchemy.exc import DBAPIError

from flowdb.errors import FlowdbError

FIRST_DELAY = 0.1  # seconds before the first retry once the database is found away
MAX_DELAY = 5.0  # the back-off never waits longer than this between tries


class DatabaseUnavailable(FlowdbError):
    """The database does not take work now (a restart, a network cut, a server that is not running,
    a full disk, a lock held past its timeout): waiting and trying again is the answer."""


class CommitUnknown(DatabaseUnavailable):
    """The connection was lost while the transaction committed: it may or may not have landed."""


def refused_data(exc: DBAPIError) -> bool:
    """The database refused the data itself (a value it cannot store, a constraint, a size limit): the
    same statement with the same values would fail again, so retrying it is no answer."""
    orig = exc.orig
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate:  # PostgreSQL: data exception, integrity constraint violation, program limit exceeded
        return str(sqlstate)[:2] in ("22", "23", "54")
    return isinstance(orig, sqlite3.DataError | sqlite3.IntegrityError) or "too big" in str(orig)


def is_conflict(exc: DBAPIError) -> bool:
    """A transaction that lost to a concurrent one (a deadlock, a serialization failure): worth
    running again at once. (A database that is away or locked past its timeout is another matter:
    flowdb.db.engine.database_unavailable.)"""
    return getattr(exc.orig, "sqlstate", None) in ("40001", "40P01")


def first_line(exc: BaseException) -> str:
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return lines[0] if lines else type(cause).__name__


class Outage:
    """Tracks whether the database is away: a capped back-off between tries, one line per outage."""

    def __init__(self, log: logging.Logger, what: str = "the database") -> None:
        self.log = log
        self.what = what
        self.since: float | None = None
        self.tries = 0

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException) -> float:
        """Note a failed try; return how long to wait before the next one."""
        if self.since is None:
            self.since = time.monotonic()
            self.tries = 0
            self.log.warning("%s is unavailable (%s); retrying with back-off up to %g s until it is back",
                             self.what, first_line(exc), MAX_DELAY)
        self.tries += 1
        return float(min(FIRST_DELAY * 2 ** (self.tries - 1), MAX_DELAY))

    def recovered(self) -> None:
        if self.since is not None:
            self.log.warning("%s is back after %.1f s (%d tries)", self.what, time.monotonic() - self.since,
                             self.tries)
            self.since = None
            self.tries = 0
