"""Definitions and instances: deploy a version, start instances (one or many), read them back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, func, insert, select
from sqlalchemy.exc import IntegrityError

from flowdb.db.clock import Clock
from flowdb.db.events import EventRow, EventWriter, event_row
from flowdb.db.tables import process_definitions, process_instances, step_edges, step_instances
from flowdb.errors import (
    DefinitionConflict,
    DefinitionError,
    FlowdbError,
    IdempotencyConflict,
    IdempotencyInProgress,
    NotFound,
)

# Definitions (pydantic models, templates) load with the first one compiled or started: reading
# instances back (`flowdb status`, the API's reads) does not need them.
if TYPE_CHECKING:
    from flowdb.definitions import CompiledDefinition

D, I, S, E = process_definitions, process_instances, step_instances, step_edges  # noqa: E741
KEY_RACE_ROUNDS = 3  # lookups of keys another transaction took while this one inserted, before giving up


@dataclass(frozen=True)
class Deployed:
    id: int
    name: str
    version: int
    content_hash: str
    created: bool  # False when identical content was already deployed


def deploy(conn: Connection, definition: CompiledDefinition) -> Deployed:
    """Store a definition version. Identical content is a no-op; changed content is the next version."""
    name = definition.name
    latest = conn.execute(
        select(D.c.id, D.c.version, D.c.content_hash).where(D.c.name == name).order_by(D.c.version.desc()).limit(1)
    ).first()
    pinned = definition.process.version
    if pinned is not None:
        existing = conn.execute(
            select(D.c.id, D.c.content_hash).where(D.c.name == name, D.c.version == pinned)
        ).first()
        if existing is not None:
            if existing.content_hash == definition.content_hash:
                return Deployed(existing.id, name, pinned, definition.content_hash, False)
            raise DefinitionConflict(
                f"{definition.filename}: {name} version {pinned} is already deployed with other content; "
                f"raise 'version:' or remove it to deploy the change as version {(latest.version if latest else 0) + 1}"
            )
        if latest is not None and pinned < latest.version:
            raise DefinitionConflict(f"{definition.filename}: {name} is already at version {latest.version}; "
                                     f"version {pinned} cannot be added behind it")
        version = pinned
    elif latest is not None and latest.content_hash == definition.content_hash:
        return Deployed(latest.id, name, latest.version, definition.content_hash, False)
    else:
        version = (latest.version if latest else 0) + 1
    clock = Clock(conn.dialect.name)
    new_id = conn.execute(
        insert(D).values(name=name, version=version, content_hash=definition.content_hash,
                         source=definition.source, parsed=definition.parsed_json(), created_at=clock.now)
        .returning(D.c.id)
    ).scalar_one()
    return Deployed(new_id, name, version, definition.content_hash, True)


class DefinitionUnloadable(FlowdbError):
    """A stored definition that this flowdb cannot compile (deployed by a version with other rules)."""


class DefinitionCache:
    """Compiled definitions by id. Versions are immutable, so entries never go stale."""

    def __init__(self) -> None:
        self._by_id: dict[int, CompiledDefinition] = {}
        self._unloadable: dict[int, tuple[CompiledDefinition, str]] = {}  # a stand-in and why

    def get(self, conn: Connection, definition_id: int) -> CompiledDefinition:
        """The compiled definition; DefinitionUnloadable if it no longer compiles."""
        found = self._by_id.get(definition_id)
        if found is None:
            from flowdb.definitions import CompiledDefinition, parse_definition

            if definition_id in self._unloadable:
                raise DefinitionUnloadable(self._unloadable[definition_id][1])
            row = conn.execute(select(D.c.name, D.c.version, D.c.source).where(D.c.id == definition_id)).first()
            if row is None:
                raise NotFound(f"process definition #{definition_id} does not exist")
            try:
                found = parse_definition(row.source, f"{row.name} v{row.version}")
            except DefinitionError as exc:
                why = (f"{row.name} version {row.version} does not compile with this flowdb ({exc.problems[0]}); "
                       "deploy it again under the current rules")
                self._unloadable[definition_id] = (CompiledDefinition.unloadable(row.name), why)
                raise DefinitionUnloadable(why) from None
            self._by_id[definition_id] = found
        return found

    def cached(self, definition_id: int) -> CompiledDefinition:
        """A definition already loaded by get() (its stand-in if it did not compile; KeyError if never loaded)."""
        found = self._by_id.get(definition_id)
        return found if found is not None else self._unloadable[definition_id][0]

    def put(self, definition_id: int, definition: CompiledDefinition) -> None:
        self._by_id[definition_id] = definition


def find_definition(conn: Connection, name: str, version: int | None = None) -> tuple[int, int]:
    """(definition id, version) of a process: the given version, else the latest."""
    query = select(D.c.id, D.c.version).where(D.c.name == name)
    if version is not None:
        query = query.where(D.c.version == version)
    row = conn.execute(query.order_by(D.c.version.desc()).limit(1)).first()
    if row is None:
        known = conn.execute(select(D.c.name).distinct().order_by(D.c.name)).scalars().all()
        what = f"{name} version {version}" if version is not None else name
        if known:
            from flowdb.problems import suggest

            listed = f" (deployed: {', '.join(known)}){suggest(name, known)}"
            raise NotFound(f"process {what} is not deployed{listed}")
        raise NotFound(f"process {what} is not deployed (nothing is deployed yet; run flowdb deploy FILE)",
                       http=f"process {what} is not deployed (nothing is deployed yet; POST /v1/definitions "
                            "deploys one)")
    return row.id, row.version


@dataclass(frozen=True)
class StartRequest:
    inputs: dict[str, Any]
    idempotency_key: str | None = None
    line: int | None = None  # its line in an inputs file, for error messages


def start_instances(conn: Connection, definition_id: int, version: int, definition: CompiledDefinition,
                    requests: list[StartRequest], *, trigger: str = "cli", from_text: bool = False,
                    pinned_version: bool = False) -> list[tuple[int, bool]]:
    """Start one instance per request in the current transaction: [(instance id, created)].

    A request whose idempotency key already started an instance returns that instance (created
    False) when it asks for the same thing: the same process, the same inputs and, when the caller
    named a version (`pinned_version`), the same version; otherwise IdempotencyConflict. Identical
    starts racing with one key (concurrent API calls) all get the one instance: the insert that
    loses the race on the key's unique index waits for the winner to commit (PostgreSQL), then the
    keys are looked up again and the winner's instance is returned. A key whose instance still
    cannot be seen after that raises IdempotencyInProgress ("retry"), never IdempotencyConflict.
    """
    from flowdb.inputs import validate_inputs

    process = definition.process
    typed = [validate_inputs(process.inputs, r.inputs, from_text=from_text) for r in requests]
    for _ in range(KEY_RACE_ROUNDS):
        started = _start_once(conn, definition_id, version, definition, requests, typed, trigger, pinned_version)
        if started is not None:
            return started
    keys = sorted({r.idempotency_key for r in requests if r.idempotency_key})
    raise IdempotencyInProgress(f"idempotency key {', '.join(map(repr, keys))} is being used by a start that has "
                                "not committed yet; retry in a moment to get its instance")


def _start_once(conn: Connection, definition_id: int, version: int, definition: CompiledDefinition,
                requests: list[StartRequest], typed: list[dict[str, Any]], trigger: str, pinned_version: bool,
                ) -> list[tuple[int, bool]] | None:
    """start_instances' work; None when another transaction took one of the keys meanwhile (look again)."""
    results: list[tuple[int, bool] | None] = [None] * len(requests)
    fresh: list[int] = []
    keyed = {r.idempotency_key: i for i, r in enumerate(requests) if r.idempotency_key}
    if keyed:
        for row in conn.execute(select(I.c.id, I.c.idempotency_key, I.c.process_name, I.c.version, I.c.inputs)
                                .where(I.c.idempotency_key.in_(list(keyed)))):
            index = keyed[row.idempotency_key]
            _check_same(row, definition.name, version if pinned_version else None, typed[index])
            results[index] = (row.id, False)
    seen_keys: dict[str, int] = {}
    for index, request in enumerate(requests):
        key = request.idempotency_key
        if results[index] is not None:
            continue
        if key and key in seen_keys:
            continue  # the same key twice in one batch: one instance, filled in below
        if key:
            seen_keys[key] = index
        fresh.append(index)
    if fresh:
        ids = _insert_instances(conn, definition_id, version, definition, [typed[i] for i in fresh],
                                [requests[i].idempotency_key for i in fresh], trigger)
        if ids is None:
            return None
        for index, new_id in zip(fresh, ids, strict=True):
            results[index] = (new_id, True)
    for index, request in enumerate(requests):
        if results[index] is None and request.idempotency_key:
            first = seen_keys[request.idempotency_key]
            if typed[first] != typed[index]:
                raise IdempotencyConflict(f"idempotency key {request.idempotency_key!r} is given twice "
                                          "with different inputs")
            results[index] = (results[first][0], False)  # type: ignore[index]
    return [r for r in results if r is not None]


def _check_same(row: Any, name: str, version: int | None, inputs: dict[str, Any]) -> None:
    if row.process_name != name or row.inputs != inputs:
        raise IdempotencyConflict(
            f"idempotency key {row.idempotency_key!r} already started instance {row.id} "
            f"of {row.process_name} with other inputs; use a new key to start another instance"
        )
    if version is not None and row.version != version:
        raise IdempotencyConflict(
            f"idempotency key {row.idempotency_key!r} already started instance {row.id} of {row.process_name} "
            f"version {row.version}, not version {version}; use a new key to start another instance"
        )


def _insert_instances(conn: Connection, definition_id: int, version: int, definition: CompiledDefinition,
                      inputs: list[dict[str, Any]], keys: list[str | None], trigger: str) -> list[int] | None:
    """Insert the instances with their steps, edges and events; None when one of `keys` was taken
    by another transaction since they were looked up (nothing inserted)."""
    from flowdb.db.budgets import insert_budgets
    from flowdb.models import effective_retry

    clock = Clock(conn.dialect.name)
    budget = definition.process.budget.max_cost_usd if definition.process.budget else None
    rows = [{"definition_id": definition_id, "process_name": definition.name, "version": version,
             "status": "running", "inputs": values, "idempotency_key": key, "trigger": trigger,
             "budget_usd": budget, "open_steps": len(definition.steps)}
            for values, key in zip(inputs, keys, strict=True)]
    statement = (insert(I).values(created_at=clock.now, started_at=clock.now)
                 .returning(I.c.id, sort_by_parameter_order=True))
    try:
        with conn.begin_nested():
            ids = list(conn.execute(statement, rows).scalars())
    except IntegrityError:
        # The unique index on idempotency_key: another transaction took one of the keys since we
        # looked (on PostgreSQL the insert waited for it to commit). The caller looks them up again.
        if not any(keys):
            raise
        return None
    insert_budgets(conn, ids, definition)
    step_rows = []
    edge_rows = []
    event_rows: list[EventRow] = []
    for instance_id in ids:
        event_rows.append(event_row(instance_id, "instance.started", {"process": definition.name, "version": version}))
        for sid, step in definition.steps.items():
            retry = effective_retry(step.model)
            step_rows.append({
                "instance_id": instance_id, "definition_id": definition_id, "step_id": sid,
                "type": step.type, "status": "pending" if step.parents else "ready",
                "max_attempts": retry.max_attempts if retry else 1,
                "pending_parents": len(step.parents),
                "agent": getattr(step.model, "agent", None),
                "root": not step.parents,
            })
        for edge in definition.edges:
            edge_rows.append({"instance_id": instance_id, "from_step": edge.from_step, "to_step": edge.to_step,
                              "kind": edge.kind})
    roots = [r for r in step_rows if r.pop("root")]
    others = [r for r in step_rows if r["status"] == "pending"]
    if roots:
        inserted = conn.execute(
            insert(S).values(created_at=clock.now, ready_at=clock.now, claimable_at=clock.now)
            .returning(S.c.id, S.c.instance_id, sort_by_parameter_order=True), roots
        ).all()
        event_rows += [event_row(r.instance_id, "step.ready", None, r.id) for r in inserted]
    if others:
        conn.execute(insert(S).values(created_at=clock.now), others)
    if edge_rows:
        conn.execute(insert(E), edge_rows)
    EventWriter(conn.dialect.name).write(conn, event_rows)
    return ids


def instance_row(conn: Connection, instance_id: int) -> Any:
    row = conn.execute(select(I).where(I.c.id == instance_id)).first()
    if row is None:
        raise NotFound(f"instance {instance_id} does not exist")
    return row


def step_rows(conn: Connection, instance_id: int) -> list[Any]:
    return list(conn.execute(select(S).where(S.c.instance_id == instance_id).order_by(S.c.id)).all())


def count_by_status(conn: Connection) -> dict[str, int]:
    return {row[0]: row[1] for row in conn.execute(select(I.c.status, func.count()).group_by(I.c.status))}
