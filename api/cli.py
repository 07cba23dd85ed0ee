"""`flowdb serve`: registered as a flowdb command through the `flowdb.commands` entry point."""

from __future__ import annotations

import click

from flowdb.cli_common import create_option, db_option, open_database
from flowdb.settings import load_settings


@click.command()
@db_option
@create_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
def serve(db_url: str | None, create: bool, host: str, port: int) -> None:
    """Serve the HTTP API (see /openapi.json) over the same database the workers use."""
    import uvicorn

    from .app import create_app

    settings = load_settings(database_url=db_url)
    engine = open_database(db_url, wait=True, create=create, offers_create=True)
    uvicorn.run(create_app(settings, engine), host=host, port=port, log_level="info")
