"""reporting: on PostgreSQL, the SQLite built-ins the views in sql/ use (julianday, strftime, round)

The reporting views are one SQL text for both databases. Time arithmetic is where the two differ, so
PostgreSQL gets functions named and behaving like SQLite's built-ins, always in UTC whatever the
session's TimeZone:
- julianday(timestamptz) -> double precision: days since noon UTC, 24 November 4714 BC;
  (julianday(b) - julianday(a)) * 86400.0 is a duration in seconds. julianday(text) reads
  'YYYY-MM-DD[ HH:MM:SS[.fff]]' as UTC (so julianday(day) and julianday('2026-11-23') work too).
- strftime(format text, timestamptz) -> text: the UTC time formatted with SQLite's %Y %m %d %H %M %S
  %f %j (other text is copied as is; '%Y-%m-%d' is the UTC day).
- round(double precision, integer) -> double precision: PostgreSQL only rounds numeric to n places;
  this one rounds the value's decimal form half away from zero, as SQLite's round does.
SQLite needs nothing. The views themselves are not part of any migration: `flowdb db upgrade`
recreates them from sql/ after the migrations (flowdb/db/views.py).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# LANGUAGE sql, one expression, not STRICT, no stronger volatility than their bodies (date_part and
# to_char on timestamptz are STABLE): PostgreSQL inlines these into the queries that call them.
FUNCTIONS = {
    "julianday(timestamptz)": """
CREATE OR REPLACE FUNCTION julianday(t timestamptz) RETURNS double precision
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT date_part('epoch', t) / 86400.0 + 2440587.5 $$
""",
    # A day or time written as text ('2026-11-23', '2026-11-23 09:30:00') is read as UTC, as SQLite
    # reads it; a bare literal picks this one (PostgreSQL prefers text for an unknown-typed literal).
    "julianday(text)": """
CREATE OR REPLACE FUNCTION julianday(t text) RETURNS double precision
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT julianday(CAST(t AS timestamp) AT TIME ZONE 'UTC') $$
""",
    # Each %X becomes a to_char field and everything else a quoted literal, so letters in the
    # format (a 'T', say) are never read as to_char patterns.
    "strftime(text, timestamptz)": """
CREATE OR REPLACE FUNCTION strftime(format text, t timestamptz) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT to_char(t AT TIME ZONE 'UTC', '"' ||
    replace(replace(replace(replace(replace(replace(replace(replace(format,
        '%Y', '"YYYY"'), '%m', '"MM"'), '%d', '"DD"'), '%H', '"HH24"'), '%M', '"MI"'),
        '%S', '"SS"'), '%f', '"SS.MS"'), '%j', '"DDD"')
    || '"') $$
""",
    "round(double precision, integer)": """
CREATE OR REPLACE FUNCTION round(x double precision, places integer) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT CAST(round(CAST(x AS numeric), places) AS double precision) $$
""",
}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    connection = op.get_bind()
    for statement in FUNCTIONS.values():  # as written: no bound parameters, so '%' is plain text
        connection.exec_driver_sql(statement, execution_options={"no_parameters": True})


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for signature in FUNCTIONS:
        op.execute(f"DROP FUNCTION IF EXISTS {signature}")
