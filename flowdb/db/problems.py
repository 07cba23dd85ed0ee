"""A database error as one line a person can act on: what failed, where (the URL, password hidden),
and what to do. The commands print it instead of a traceback (`--debug` shows the traceback)."""

from __future__ import annotations

import re

from sqlalchemy.exc import DBAPIError

from flowdb.db.connectivity import first_line

# (what the driver says, what to tell the user): the first that matches wins.
_ADVICE: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r'database "[^"]*" does not exist'),
     "create that database (createdb NAME) or fix the database name in --db / FLOWDB_DATABASE_URL"),
    (re.compile(r'role "[^"]*" does not exist|password authentication failed|no password supplied'),
     "fix the user name or password in --db / FLOWDB_DATABASE_URL"),
    (re.compile(r"refused|could not connect|timeout expired|timed out|Name or service not known|"
                r"could not translate host name|No route to host|server closed the connection"),
     "is the database server running and reachable at that host and port? Check --db / FLOWDB_DATABASE_URL"),
    (re.compile(r"unable to open database file"),
     "the SQLite file's folder does not exist or cannot be written; create the folder or fix the path in "
     "--db / FLOWDB_DATABASE_URL"),
]

# Errors that waiting will not cure (a worker started against them stops at once instead of waiting).
_MISCONFIGURED = re.compile(r'does not exist|password authentication failed|no password supplied|'
                            r"unable to open database file|could not translate host name|Name or service not known")


def _cause(exc: BaseException) -> str:
    text = first_line(exc)
    return re.sub(r"^connection failed: |FATAL:\s+", "", text).replace("FATAL:  ", "").strip()


def describe(exc: BaseException, url: str | None) -> str:
    """One line for a database error: `cannot use the database at URL: CAUSE; WHAT TO DO`."""
    cause = _cause(exc)
    where = f"the database at {url}" if url else "the database"
    for pattern, advice in _ADVICE:
        if pattern.search(str(getattr(exc, "orig", None) or exc)):
            return f"cannot use {where}: {cause}; {advice}"
    return f"the database at {url or '(unknown)'} answered: {cause} (run with --debug for the traceback)"


def misconfigured(exc: BaseException) -> bool:
    """Whether the error says the URL itself is wrong (no such database, role, host or folder)."""
    return isinstance(exc, DBAPIError) and bool(_MISCONFIGURED.search(str(exc.orig or exc)))
