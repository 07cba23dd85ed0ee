"""`flowdb pause` and `flowdb resume`: hold an instance (or every running instance of a process) and let it go on."""

from __future__ import annotations

import getpass

import click

from flowdb.cli_common import db_option, open_database


def who() -> str:
    try:
        return f"{getpass.getuser()} (cli)"
    except Exception:  # no user name in this environment
        return "cli"


@click.command()
@db_option
@click.argument("instance_id", type=int, required=False)
@click.option("--process", metavar="NAME", help="Pause every running instance of this process.")
def pause(db_url: str | None, instance_id: int | None, process: str | None) -> None:
    """Pause an instance: no new step of it starts until `flowdb resume` (running steps finish; timers and
    approvals keep their due times)."""
    _act(db_url, instance_id, process, pausing=True)


@click.command()
@db_option
@click.argument("instance_id", type=int, required=False)
@click.option("--process", metavar="NAME", help="Resume every paused instance of this process.")
def resume(db_url: str | None, instance_id: int | None, process: str | None) -> None:
    """Resume a paused instance: its steps start as they are due (a timer whose time passed, at once)."""
    _act(db_url, instance_id, process, pausing=False)


def _act(db_url: str | None, instance_id: int | None, process: str | None, pausing: bool) -> None:
    from flowdb.control import pause_instance, pause_process, resume_instance, resume_process
    from flowdb.notify import Wakeups
    from flowdb.settings import load_settings

    if (instance_id is None) == (process is None):
        raise click.UsageError("give an instance id or --process NAME (one of them)")
    engine = open_database(db_url)
    wakeups = Wakeups(load_settings(database_url=db_url).redis_url)
    if process is not None:
        done = (pause_process if pausing else resume_process)(engine, process, who(), wakeups)
        what = "running" if pausing else "paused"
        click.echo(f"{'paused' if pausing else 'resumed'} {len(done)} {what} instance(s) of {process}"
                   + (f": {', '.join(map(str, done))}" if done else ""))
        return
    assert instance_id is not None
    (pause_instance if pausing else resume_instance)(engine, instance_id, who(), wakeups)
    click.echo(f"instance {instance_id} paused; flowdb resume {instance_id} lets it go on" if pausing
               else f"instance {instance_id} resumed")
