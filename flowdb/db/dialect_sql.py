"""SQL text written once per database, for the few schema expressions where the two differ."""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement


class DialectSQL(ColumnElement[int]):
    """An expression given as SQL text per dialect name (a generated column's, say)."""

    inherit_cache = False  # schema only: never part of a cached statement
    type = BigInteger()

    def __init__(self, **by_dialect: str) -> None:
        self.by_dialect = by_dialect


@compiles(DialectSQL)
def _compile(element: DialectSQL, compiler: SQLCompiler, **kw: Any) -> str:
    try:
        return element.by_dialect[compiler.dialect.name]
    except KeyError:
        raise NotImplementedError(f"no SQL for {compiler.dialect.name}: flowdb runs on SQLite and PostgreSQL") from None
