"""The flowdb command line."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from flowdb import __version__
from flowdb.cli_approvals import approvals_group
from flowdb.cli_budgets import budget_group
from flowdb.cli_common import (
    FlowdbGroup,
    agents_option,
    create_option,
    db_option,
    engine_for,
    load_agents,
    open_database,
    refuse_missing_sqlite,
)
from flowdb.cli_lists import definitions_group, instances_group
from flowdb.cli_pause import pause, resume
from flowdb.cli_report import report
from flowdb.cli_rerun import rerun
from flowdb.cli_tokens import tokens_group
from flowdb.errors import DefinitionError, FlowdbError, InputError

# Every command imports what it uses itself: `flowdb` starts afresh for each command (the tests run it
# hundreds of times), and SQLAlchemy, pydantic, Jinja and the engine would cost every command their
# start-up, --help too.
if TYPE_CHECKING:
    from flowdb.db.instances import StartRequest
    from flowdb.definitions import CompiledDefinition


@click.group(cls=FlowdbGroup)
@click.version_option(__version__)
@click.option("--debug", is_flag=True, help="Show the Python traceback of an error (also FLOWDB_DEBUG=1).")
def main(debug: bool) -> None:
    """flowdb: processes of agent tasks, approvals and timers, run from SQL tables."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.group()
def db() -> None:
    """Schema management."""


@db.command("upgrade")
@db_option
@click.option("--revision", default="head", show_default=True)
def db_upgrade(db_url: str | None, revision: str) -> None:
    """Create or upgrade the schema (Alembic migrations)."""
    from flowdb.db import migrate

    engine = engine_for(db_url)
    migrate.upgrade(engine, revision)
    click.echo(f"database at revision {migrate.current_revision(engine)}")


@db.command("downgrade")
@db_option
@click.argument("revision")
def db_downgrade(db_url: str | None, revision: str) -> None:
    """Downgrade the schema to REVISION ('base' removes every table)."""
    from flowdb.db import migrate

    engine = engine_for(db_url)
    refuse_missing_sqlite(engine)
    migrate.downgrade(engine, revision)
    click.echo(f"database at revision {migrate.current_revision(engine) or 'base'}")


def load_definition_file(path: str) -> CompiledDefinition:
    """flowdb.definitions.load_definition_file, imported by the first file read (and a name here that
    a test can replace)."""
    from flowdb.definitions import load_definition_file as load

    return load(path)


def _check_files(files: tuple[str, ...], agents_file: str | None, *, strict: bool = False) -> list[CompiledDefinition]:
    """Load and check every file and its agents; print every problem and warning; exit 1 if there was
    a problem (with `strict`, a missing agents file is one)."""
    from flowdb.agents.check import check_agents

    loaded = []
    failed = False
    for file in files:
        try:
            definition = load_definition_file(file)  # runnable: a type this flowdb cannot run is a problem
            findings = check_agents(definition, agents_file, strict=strict)
            for warning in findings.warnings:
                click.echo(warning, err=True)
            findings.raise_problems()
            loaded.append(definition)
        except DefinitionError as exc:
            click.echo(str(exc), err=True)
            failed = True
        except FlowdbError as exc:  # an agents file that cannot be read, ...
            click.echo(f"{file}: error: {exc}", err=True)
            failed = True
        except Exception as exc:  # a bug in flowdb, not in the file: still one line, never a traceback
            reason = " ".join(str(exc).split())[:300] or "no details"
            click.echo(f"{file}: flowdb could not check this file ({type(exc).__name__}: {reason}); "
                       "please report it", err=True)
            failed = True
    if failed:
        sys.exit(1)
    return loaded


strict_option = click.option("--strict", is_flag=True,
                             help="No agents file, or an agent it does not define, is an error, not a warning.")


@main.command()
@agents_option
@strict_option
@click.argument("files", nargs=-1, required=True, type=click.Path())
def validate(files: tuple[str, ...], agents_file: str | None, strict: bool) -> None:
    """Check definition files and their agents; print FILE:LINE:COL for every problem (exit 1 if any)."""
    for definition in _check_files(files, agents_file, strict=strict):
        click.echo(f"{definition.filename}: ok ({definition.name}, {len(definition.steps)} steps)")


@main.command("deploy")
@db_option
@create_option
@agents_option
@strict_option
@click.argument("files", nargs=-1, required=True, type=click.Path())
def deploy_cmd(files: tuple[str, ...], db_url: str | None, create: bool, agents_file: str | None,
               strict: bool) -> None:
    """Store definitions as new immutable versions (identical content is a no-op)."""
    from flowdb.db.instances import deploy

    definitions = _check_files(files, agents_file, strict=strict)
    engine = open_database(db_url, create=create, offers_create=True)
    with engine.begin() as conn:
        results = [deploy(conn, definition) for definition in definitions]
    for result in results:
        what = "deployed" if result.created else "unchanged"
        click.echo(f"{what} {result.name} version {result.version} ({result.content_hash[:12]})")


@main.command()
@db_option
@click.argument("name")
@click.option("--input", "-i", "inputs", multiple=True, help="An input as KEY=VALUE (repeatable).")
@click.option("--inputs-file", type=click.Path(exists=True, dir_okay=False),
              help="JSON lines: one instance per line, each line an object of inputs.")
@click.option("--idempotency-key", default=None, help="Starting again with this key returns the same instance.")
@click.option("--version", "version", type=int, default=None, help="Definition version (default: latest).")
def start(db_url: str | None, name: str, inputs: tuple[str, ...], inputs_file: str | None,
          idempotency_key: str | None, version: int | None) -> None:
    """Start instances of a deployed process; print each new instance id on its own line."""
    from flowdb.db.engine import read_only
    from flowdb.db.instances import DefinitionCache, StartRequest, find_definition, start_instances
    from flowdb.inputs import parse_assignments
    from flowdb.notify import publish_events_sync, publish_sync
    from flowdb.settings import load_settings

    engine = open_database(db_url)
    cache = DefinitionCache()
    pinned = version is not None
    with read_only(engine).connect() as conn:
        definition_id, version = find_definition(conn, name, version)
        definition = cache.get(conn, definition_id)
    if inputs_file:
        if inputs or idempotency_key:
            raise click.UsageError("--inputs-file cannot be combined with --input or --idempotency-key")
        requests = _read_inputs_file(inputs_file)
        _check_inputs_file(inputs_file, requests, definition)  # every line first: a bad line starts nothing
        ids: list[int] = []
        for chunk_start in range(0, len(requests), 500):  # batched transactions for bulk starts
            chunk = requests[chunk_start:chunk_start + 500]
            with engine.begin() as conn:
                ids += [i for i, _ in start_instances(conn, definition_id, version, definition, chunk,
                                                      trigger="bulk", pinned_version=pinned)]
        for instance_id in ids:
            click.echo(instance_id)
    else:
        request = StartRequest(parse_assignments(list(inputs)), idempotency_key)
        with engine.begin() as conn:
            [(instance_id, _)] = start_instances(conn, definition_id, version, definition, [request],
                                                 from_text=True, pinned_version=pinned)
        click.echo(instance_id)
    redis_url = load_settings().redis_url
    publish_sync(redis_url)
    publish_events_sync(redis_url)


def _check_inputs_file(path: str, requests: list[StartRequest], definition: CompiledDefinition) -> None:
    """Refuse the file, naming each line whose inputs do not fit the process (at most 20 of them)."""
    from flowdb.inputs import validate_inputs

    problems = []
    for request in requests:
        try:
            validate_inputs(definition.process.inputs, request.inputs)
        except InputError as exc:
            problems.append(f"{path}:{request.line}: {exc.in_file}")
    if problems:
        more = f"\n... and {len(problems) - 20} more line(s)" if len(problems) > 20 else ""
        raise FlowdbError("no instance was started:\n" + "\n".join(problems[:20]) + more)


def _read_inputs_file(path: str) -> list[StartRequest]:
    from flowdb.db.instances import StartRequest

    requests = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FlowdbError(f"{path}:{number}: not JSON: {exc.msg}") from None
        if not isinstance(value, dict):
            raise FlowdbError(f"{path}:{number}: each line must be a JSON object of inputs")
        key = value.pop("_idempotency_key", None)
        requests.append(StartRequest(value, key, line=number))
    return requests


@main.command()
@db_option
@create_option
@agents_option
@click.option("--concurrency", type=int, default=None, help="Handlers in flight at once (default 64).")
@click.option("--batch", type=int, default=None, help="Steps claimed per query (default 32).")
@click.option("--grace", type=click.FloatRange(min=0), default=None,
              help="Seconds a stopping worker lets running steps finish before releasing them (default 10).")
def worker(db_url: str | None, create: bool, agents_file: str | None, concurrency: int | None, batch: int | None,
           grace: float | None) -> None:
    """Claim and run ready steps until stopped (SIGTERM/SIGINT finishes or releases held steps)."""
    import asyncio
    import signal

    from flowdb.expressions import TemplateLimits, set_limits
    from flowdb.notifications import Notifier
    from flowdb.settings import load_settings
    from flowdb.worker import Worker, WorkerOptions

    logging.getLogger().setLevel(logging.INFO)
    settings = load_settings(database_url=db_url)
    log = logging.getLogger("flowdb.worker")
    # A broken agents file stops the worker here, before it claims a step it would fail.
    agents = load_agents(agents_file or settings.agents, None)
    agents.check()
    engine = open_database(db_url, wait=True, create=create, offers_create=True)
    if agents.names():
        log.info("serving agents %s (from %s)", ", ".join(agents.names()), agents.source)
    else:
        log.warning("no agents (no agents file found, or it defines none; give --agents FILE or set FLOWDB_AGENTS): "
                    "this worker runs no agent tasks; they wait for a worker whose agents file defines their agent")
    options = WorkerOptions(lease_seconds=settings.lease_seconds, poll_seconds=settings.poll_seconds,
                            redis_url=settings.redis_url, batch=batch or settings.claim_batch,
                            free_releases=settings.free_releases, suspect_wait_seconds=settings.suspect_wait_seconds,
                            unservable_check_seconds=settings.unservable_check_seconds)
    if concurrency:
        options.concurrency = concurrency
    if grace is not None:
        options.grace_seconds = grace
    set_limits(TemplateLimits.from_settings(settings))
    runner = Worker(engine, agents, options, notifier=Notifier.from_settings(settings))
    log.info("worker %s started on %s", options.name, engine.url.render_as_string())

    async def main_loop() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, runner.stop)
        await runner.run()
        if runner.abandoned:
            # Their steps are released, but a handler blocked in a thread (a plain-function agent)
            # cannot be interrupted, and asyncio.run and the interpreter would wait for it at exit.
            log.info("worker %s stopped (abandoned %d running handler(s))", options.name, runner.abandoned)
            engine.dispose()
            logging.shutdown()
            sys.stdout.flush()
            os._exit(0)

    asyncio.run(main_loop())
    log.info("worker %s stopped", options.name)


@main.command()
@db_option
@agents_option
@click.argument("file", type=click.Path())
@click.option("--input", "-i", "inputs", multiple=True, help="An input as KEY=VALUE (repeatable).")
def run(file: str, db_url: str | None, agents_file: str | None, inputs: tuple[str, ...]) -> None:
    """Deploy FILE, start it and work it to the end here, showing each step (exit 1 if it failed)."""
    import asyncio

    from sqlalchemy.exc import DBAPIError

    from flowdb.db.engine import read_only
    from flowdb.db.instances import StartRequest, deploy, instance_row, start_instances
    from flowdb.expressions import TemplateLimits, set_limits
    from flowdb.inputs import parse_assignments
    from flowdb.live import LiveView
    from flowdb.notifications import Notifier
    from flowdb.settings import load_settings
    from flowdb.status import status_json
    from flowdb.worker import Worker, WorkerOptions

    # It works the instance here: every agent it names must be defined and load (strict).
    [definition] = _check_files((file,), agents_file, strict=True)
    settings = load_settings(database_url=db_url)
    engine = open_database(db_url, create=True)
    agents = load_agents(agents_file, file)
    with engine.begin() as conn:
        deployed = deploy(conn, definition)
        [(instance_id, _)] = start_instances(conn, deployed.id, deployed.version, definition,
                                             [StartRequest(parse_assignments(list(inputs)))], from_text=True)
    state = "deployed" if deployed.created else "using"
    click.echo(f"{state} {deployed.name} version {deployed.version}; started instance {instance_id}")
    view = LiveView(definition, instance_id)
    options = WorkerOptions(lease_seconds=settings.lease_seconds, poll_seconds=min(settings.poll_seconds, 0.2),
                            redis_url=settings.redis_url, instance_id=instance_id, free_releases=settings.free_releases,
                            suspect_wait_seconds=settings.suspect_wait_seconds,
                            unservable_check_seconds=settings.unservable_check_seconds)
    set_limits(TemplateLimits.from_settings(settings))
    runner = Worker(engine, agents, options, listener=view.on_event, notifier=Notifier.from_settings(settings))
    began = time.monotonic()
    checked = [began]

    def finished() -> bool:
        # Other workers sharing the database may finish steps of this instance too: look now and then.
        if view.is_finished():
            return True
        if time.monotonic() - checked[0] < 1.0:
            return False
        checked[0] = time.monotonic()
        try:
            with read_only(engine).connect() as conn:
                row = instance_row(conn, instance_id)
                return bool(row.status != "running" or row.paused_at is not None)  # paused: `run` stops there
        except DBAPIError:  # the database is away: the worker waits for it, and so does this check
            return False

    async def work_it() -> int:
        await runner.run(until=finished)
        with read_only(engine).connect() as conn:
            status = status_json(conn, instance_id)
        view.summary(status, time.monotonic() - began)
        code = 0 if status["status"] == "completed" else 1
        if runner.abandoned:
            # Calls of steps cancelled while they ran (the instance failed, say) are left to finish in
            # their threads; their results would be dropped, so the outcome is not held up by them.
            engine.dispose()
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code

    sys.exit(asyncio.run(work_it()))


@main.command()
@db_option
@click.argument("instance_id", type=int)
@click.argument("step_id")
def retry(db_url: str | None, instance_id: int, step_id: str) -> None:
    """Run a failed step again with fresh attempts; its failed instance resumes from there."""
    from flowdb.control import retry_step
    from flowdb.notify import publish_events_sync, publish_sync
    from flowdb.settings import load_settings

    settings = load_settings(database_url=db_url)
    engine = open_database(db_url)
    status = retry_step(engine, instance_id, step_id)
    publish_sync(settings.redis_url)
    publish_events_sync(settings.redis_url)
    click.echo(f"step {step_id} of instance {instance_id} is ready again; the instance is {status}")


@main.command()
@db_option
@click.argument("instance_id", type=int)
@click.option("--step", "step_id", default=None, metavar="STEP",
              help="Cancel only this step; its successors go on as after a skipped step.")
@click.option("--reason", default="cancelled by an operator", show_default=True, help="Kept as the instance's error.")
def cancel(db_url: str | None, instance_id: int, step_id: str | None, reason: str) -> None:
    """Cancel a running instance (its unfinished steps and pending approvals), or one of its steps."""
    from flowdb.control import cancel_instance, cancel_step
    from flowdb.notify import Wakeups
    from flowdb.settings import load_settings

    settings = load_settings(database_url=db_url)
    engine = open_database(db_url)
    wakeups = Wakeups(settings.redis_url)
    if step_id is not None:
        cancel_step(engine, instance_id, step_id, reason, wakeups)
        click.echo(f"step {step_id} of instance {instance_id} cancelled")
        return
    steps = cancel_instance(engine, instance_id, reason, wakeups)
    click.echo(f"instance {instance_id} cancelled" + (f" ({len(steps)} unfinished step(s): {', '.join(steps)})"
                                                      if steps else ""))


@main.command()
@db_option
@click.argument("instance_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def status(db_url: str | None, instance_id: int, as_json: bool) -> None:
    """Show an instance: its steps, statuses, attempts, durations and outputs."""
    from flowdb.db.engine import read_only
    from flowdb.status import print_status, status_json

    engine = open_database(db_url)
    with read_only(engine).connect() as conn:
        data = status_json(conn, instance_id)
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        print_status(data)


main.add_command(pause)
main.add_command(rerun)
main.add_command(resume)
main.add_command(approvals_group)
main.add_command(budget_group)
main.add_command(instances_group)
main.add_command(definitions_group)
main.add_command(tokens_group)
main.add_command(report)
