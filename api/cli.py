"""`flowdb serve`: registered as a flowdb command through the `flowdb.commands` entry point."""

from __future__ import annotations

import click

from flowdb.cli_common import create_option, db_option, open_database


@click.command()
@db_option
@create_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--open", "open_browser", is_flag=True, help="Open the web UI in a browser once the server is up.")
def serve(db_url: str | None, create: bool, host: str, port: int, open_browser: bool) -> None:
    """Serve the HTTP API (see /openapi.json) and the web UI (/ui) over the same database the workers use."""
    import threading
    import webbrowser

    import uvicorn

    from flowdb.settings import load_settings

    from .app import create_app

    settings = load_settings(database_url=db_url)
    engine = open_database(db_url, wait=True, create=create, offers_create=True)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    ui = f"http://{shown}:{port}/ui/"
    click.echo(f"web UI: {ui} (sign in with a token: flowdb tokens create --identity you@example.com "
               "--role operator)", err=True)
    if open_browser:  # after a moment, so the server answers when the browser asks
        threading.Timer(1.0, webbrowser.open, args=(ui,)).start()
    uvicorn.run(create_app(settings, engine), host=host, port=port, log_level="info")
