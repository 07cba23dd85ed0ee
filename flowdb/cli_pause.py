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


def _target(instance_id: int | None, process: str | None) -> None:
    if (instance_id is None) == (process is None):
        raise click.UsageError("give an instance id or --process NAME (one of them)")


@click.command()
@db_option
@click.argument("instance_id", type=int, required=False)
@click.option("--process", metavar="NAME", help="Pause every running instance of this process.")
def pause(db_url: str | None, instance_id: int | None, process: str | None) -> None:
    """Pause an instance: no new step of it starts until `flowdb resume` (running steps finish; timers and
    approvals keep their due times)."""
    from flowdb.control import pause_instance, pause_process
    from flowdb.notify import Wakeups
    from flowdb.settings import load_settings

    _target(instance_id, process)
    engine = open_database(db_url)
    wakeups = Wakeups(load_settings(database_url=db_url).redis_url)
    if process is not None:
        paused = pause_process(engine, process, who(), wakeups)
        click.echo(f"paused {len(paused)} running instance(s) of {process}" +
                   (f": {', '.join(map(str, paused))}" if paused else ""))
        return
    assert instance_id is not None
    pause_instance(engine, instance_id, who(), wakeups)
    click.echo(f"instance {instance_id} paused; flowdb resume {instance_id} lets it go on")


@click.command()
@db_option
@click.argument("instance_id", type=int, required=False)
@click.option("--process", metavar="NAME", help="Resume every paused instance of this process.")
def resume(db_url: str | None, instance_id: int | None, process: str | None) -> None:
    """Resume a paused instance: its steps start as they are due (a timer whose time passed, at once)."""
    from flowdb.control import resume_instance, resume_process
    from flowdb.notify import Wakeups
    from flowdb.settings import load_settings

    _target(instance_id, process)
    engine = open_database(db_url)
    wakeups = Wakeups(load_settings(database_url=db_url).redis_url)
    if process is not None:
        resumed = resume_process(engine, process, who(), wakeups)
        click.echo(f"resumed {len(resumed)} paused instance(s) of {process}" +
                   (f": {', '.join(map(str, resumed))}" if resumed else ""))
        return
    assert instance_id is not None
    resume_instance(engine, instance_id, who(), wakeups)
    click.echo(f"instance {instance_id} resumed")
