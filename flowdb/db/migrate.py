"""Schema upgrades and downgrades through Alembic, using the scripts shipped inside the package.

Alembic is imported only when a migration runs: every command checks the schema revision, and
that check is one query, not an Alembic start-up.
"""

from __future__ import annotations

from importlib.resources import files
from typing import TYPE_CHECKING

from sqlalchemy import Engine, inspect, text

from flowdb.db import views

if TYPE_CHECKING:
    from alembic.config import Config

# The newest revision in migrations/versions (a test checks it against Alembic's own view).
HEAD = "0005"


def _config() -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(files("flowdb._migrations")))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate to `revision`; at the head, (re)create the reporting views from sql/ (db/views.py)."""
    from alembic import command

    config = _config()
    with engine.begin() as connection:
        views.drop_views(connection)  # a migration may rebuild a table a view reads
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
        if connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == HEAD:
            views.create_views(connection)


def downgrade(engine: Engine, revision: str) -> None:
    """Downgrade to `revision`; the views go first (they are recreated by the next upgrade)."""
    from alembic import command

    config = _config()
    with engine.begin() as connection:
        views.drop_views(connection)
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        found = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
        return str(found) if found is not None else None


def head_revision() -> str | None:
    """Alembic's view of the newest revision (imports Alembic; use HEAD on hot paths)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config()).get_current_head()


def ensure_current(engine: Engine) -> None:
    """Migrate a database that is behind (used by the embedded default on first use)."""
    if current_revision(engine) != HEAD:
        upgrade(engine)
