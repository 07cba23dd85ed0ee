"""`flowdb rerun ID --from STEP [--version N]`: a finished instance runs again from a step."""

from __future__ import annotations

import click

from flowdb.cli_common import db_option, open_database
from flowdb.cli_pause import who


@click.command()
@db_option
@click.argument("instance_id", type=int)
@click.option("--from", "from_step", required=True, metavar="STEP", help="The step to run again, and all after it.")
@click.option("--version", type=click.IntRange(1), default=None,
              help="Run the rest on this deployed version (it must keep the steps before STEP as they are).")
def rerun(db_url: str | None, instance_id: int, from_step: str, version: int | None) -> None:
    """Run a finished instance again from STEP: that step and the steps after it run as new rounds; the
    completed steps before it keep their outputs and do not run again."""
    from flowdb.notify import Wakeups
    from flowdb.rerun import rerun_instance
    from flowdb.settings import load_settings

    engine = open_database(db_url)
    wakeups = Wakeups(load_settings(database_url=db_url).redis_url)
    done = rerun_instance(engine, instance_id, from_step, who(), version, wakeups)
    click.echo(f"instance {instance_id} runs again from {from_step} on version {done.version}: "
               f"{', '.join(done.steps)} (a worker runs them)")
