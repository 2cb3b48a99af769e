"""Tasks and runs to and from rows. Timestamps are ISO-8601 UTC text, JSON columns text."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import anyio.lowlevel
import msgspec

from ..messages.events import Event
from ..messages.storage_writes import AppendEvent
from ..messages.tasks import JsonObject, Run, RunStatus, Task, TaskStatus
from ..messages.workers import Worker, WorkerStatus
from .port import Params, Row, Statement

__all__ = [
    "DELETE_TASK",
    "FENCE_CLAIM",
    "KEY_LOCK",
    "FENCE_TASK",
    "EVENT_COLUMNS",
    "EventValues",
    "event_values",
    "decoded",
    "EPOCH",
    "parse_json",
    "parse_time",
    "time_text",
    "upsert",
    "DELETE_WORKER",
    "WORKER_COLUMNS",
    "RUN_COLUMNS",
    "TASK_COLUMNS",
    "run_from_row",
    "run_state_statement",
    "run_statement",
    "RUN_STATE_COLUMNS",
    "SET_RUN_STATE",
    "SET_TASK_STATE",
    "SET_TASK_STATE_FENCED",
    "TASK_STATE_COLUMNS",
    "task_state_statement",
    "fenced_task_state_statement",
    "update",
    "task_from_row",
    "task_statement",
    "worker_from_row",
    "worker_statement",
]

_encode = msgspec.json.Encoder().encode
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

TASK_COLUMNS = (
    "id, title, description, task_type, priority, status, current_phase, workflow, payload,"
    " created_at, updated_at, assigned_worker, due_date, max_retries, tags, attempts, result,"
    " error, idempotency_key, correlation_id, source_agent, timeout, available_at,"
    " concurrency_key, concurrency_limit, requires, plan_id, subtask_id, idempotency_scope,"
    " traceparent, tracestate, run_at, expires_at"
)
RUN_COLUMNS = (
    "id, task_id, worker_id, run_number, status, phase, result_data, error_message,"
    " output_log, started_at, completed_at, lease_seconds, lease_expires_at, progress"
)
WORKER_COLUMNS = (
    "id, role, status, last_heartbeat, capabilities, current_task_id, metadata,"
    " registered_at, incarnation"
)
DELETE_TASK = "DELETE FROM tasks WHERE id = ?"
#: A fenced write's condition (messages.storage.FenceTask): no row updated (the version
#: moved on) fails the write, as every UPDATE that misses its row does (check_updated).
FENCE_TASK = "UPDATE tasks SET version = version + 1 WHERE id = ? AND version = ?"
#: A fenced claim of a task with a concurrency key (PostgreSQL only: SQLite sends no fence),
#: after KEY_LOCK on its key, so that the count sees every other node's committed claim.
FENCE_CLAIM = (
    "UPDATE tasks SET version = version + 1 WHERE id = ? AND version = ? AND (SELECT count(*)"
    " FROM tasks WHERE concurrency_key = ? AND status IN ('assigned', 'running') AND id <> ?) < ?"
)
KEY_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended(?, 0))"
DELETE_WORKER = "DELETE FROM workers WHERE id = ?"


def upsert(table: str, columns: str, *, values: str | None = None) -> str:
    """INSERT of every column that replaces every column but the id on conflict.
    ``values`` replaces the plain ``?`` marks (one expression per column)."""
    names = [name.strip() for name in columns.split(",")]
    updates = ", ".join(f"{name} = excluded.{name}" for name in names if name != "id")
    marks = ", ".join("?" * len(names)) if values is None else values
    return (
        f"INSERT INTO {table} ({columns}) VALUES ({marks}) ON CONFLICT (id) DO UPDATE SET {updates}"
    )


_PUT_TASK = upsert("tasks", TASK_COLUMNS)
# The hash of a lease's secret is written, never read back with the run (RUN_COLUMNS):
# no read can hand it out.
_PUT_RUN = upsert("runs", f"{RUN_COLUMNS}, lease_hash")
_PUT_WORKER = upsert("workers", WORKER_COLUMNS)

#: The columns of a task that change after it is created (the state machine's); the
#: others are fixed at creation. A state change writes only these: an UPDATE that leaves
#: the priority index alone and encodes no payload costs a third of a whole-row upsert.
TASK_STATE_COLUMNS = (
    "status, current_phase, updated_at, assigned_worker, attempts, result, error, available_at,"
    " run_at"
)
#: The columns of a run that change after it is opened.
RUN_STATE_COLUMNS = (
    "status, phase, result_data, error_message, output_log, started_at, completed_at,"
    " lease_expires_at, progress"
)


def update(table: str, columns: str) -> str:
    """UPDATE of ``columns`` of the row with the given id (the id is the last parameter)."""
    sets = ", ".join(f"{name.strip()} = ?" for name in columns.split(","))
    return f"UPDATE {table} SET {sets} WHERE id = ?"


SET_TASK_STATE = update("tasks", TASK_STATE_COLUMNS)
#: A task's state write fenced by the version its writer read (FenceTask and SetTaskState
#: of one task in one write, PostgreSQL only): one UPDATE of the row, not two (the fence's
#: and the state's), which is half the row versions. Missing the row (the version moved
#: on) fails the write as FENCE_TASK does (check_updated).
SET_TASK_STATE_FENCED = (
    SET_TASK_STATE.removesuffix(" WHERE id = ?")
    + ", version = version + 1 WHERE id = ? AND version = ?"
)
SET_RUN_STATE = update("runs", RUN_STATE_COLUMNS)


def time_text(value: datetime | None) -> str | None:
    return None if value is None else _utc_text(value)


# A batch's changes share one ``now`` (and ``now`` plus a lease, and the times of the
# batches that created or claimed its tasks): each one's text is worked out once, not
# once per row. One entry was not enough: a run's row alternates its start, its end and
# its lease's expiry, and missed every time.
@functools.lru_cache(maxsize=256)
def _utc_text(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _json(value: object) -> str | None:
    return None if value is None else _encode(value).decode()


# The statements of the task path (a task's row, its run's, their state changes) are
# built for every task several times over: the enums' text comes from a dict (their
# ``value`` property is two Python calls) and an empty column is tested inline rather
# than in a call to time_text or _json (most of a task's optional columns are empty).
_TASK_TEXT = {status: status.value for status in TaskStatus}
_RUN_TEXT = {status: status.value for status in RunStatus}


def task_statement(task: Task) -> Statement:
    text = _utc_text
    params: Params = (
        task.id,
        task.title,
        task.description,
        task.task_type,
        task.priority,
        _TASK_TEXT[task.status],
        task.current_phase,
        None if task.workflow is None else _encode(task.workflow).decode(),
        None if task.payload is None else _encode(task.payload).decode(),
        text(task.created_at),
        text(task.updated_at),
        task.assigned_worker,
        None if task.due_date is None else text(task.due_date),
        task.max_retries,
        _encode(task.tags).decode() if task.tags else "[]",
        task.attempts,
        None if task.result is None else _encode(task.result).decode(),
        task.error,
        task.idempotency_key,
        task.correlation_id,
        task.source_agent,
        task.timeout,
        None if task.available_at is None else text(task.available_at),
        task.concurrency_key,
        task.concurrency_limit,
        _encode(task.requires).decode() if task.requires else None,
        task.plan_id,
        task.subtask_id,
        None if task.idempotency_scope == "forever" else task.idempotency_scope,
        task.traceparent,
        task.tracestate,
        None if task.run_at is None else text(task.run_at),
        None if task.expires_at is None else text(task.expires_at),
    )
    return _PUT_TASK, params


def run_statement(run: Run, lease_hash: bytes | None = None) -> Statement:
    text = _utc_text
    params: Params = (
        run.id,
        run.task_id,
        run.worker_id,
        run.run_number,
        _RUN_TEXT[run.status],
        run.phase,
        None if run.result is None else _encode(run.result).decode(),
        run.error,
        run.output_log,
        None if run.started_at is None else text(run.started_at),
        None if run.completed_at is None else text(run.completed_at),
        run.lease_seconds,
        None if run.lease_expires_at is None else text(run.lease_expires_at),
        None if run.progress is None else _encode(run.progress).decode(),
        lease_hash,
    )
    return _PUT_RUN, params


def task_state_statement(task: Task) -> Statement:
    """Write the state columns of a task whose row exists (see TASK_STATE_COLUMNS)."""
    params: Params = (
        _TASK_TEXT[task.status],
        task.current_phase,
        _utc_text(task.updated_at),
        task.assigned_worker,
        task.attempts,
        None if task.result is None else _encode(task.result).decode(),
        task.error,
        None if task.available_at is None else _utc_text(task.available_at),
        None if task.run_at is None else _utc_text(task.run_at),
        task.id,
    )
    return SET_TASK_STATE, params


def fenced_task_state_statement(task: Task, version: int) -> Statement:
    """:func:`task_state_statement` and the task's fence at ``version``, as one UPDATE."""
    _, params = task_state_statement(task)
    return SET_TASK_STATE_FENCED, (*params, version)


def run_state_statement(run: Run) -> Statement:
    """Write the state columns of a run whose row exists (see RUN_STATE_COLUMNS)."""
    text = _utc_text
    params: Params = (
        _RUN_TEXT[run.status],
        run.phase,
        None if run.result is None else _encode(run.result).decode(),
        run.error,
        run.output_log,
        None if run.started_at is None else text(run.started_at),
        None if run.completed_at is None else text(run.completed_at),
        None if run.lease_expires_at is None else text(run.lease_expires_at),
        None if run.progress is None else _encode(run.progress).decode(),
        run.id,
    )
    return SET_RUN_STATE, params


def parse_time(value: object) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        # A store whose driver answers timestamps as datetimes (PostgreSQL's timestamptz):
        # in UTC, as the ISO text SQLite keeps.
        return value if value.tzinfo is None else value.astimezone(UTC)
    return datetime.fromisoformat(str(value))


def parse_json(value: object) -> JsonObject | None:
    return None if value is None else cast(JsonObject, msgspec.json.decode(str(value)))


#: Each status by its stored text: a dict lookup, where ``TaskStatus(text)`` walks the
#: enum's machinery (a page of 10 000 tasks decodes 10 000 of them).
_STATUSES = {status.value: status for status in TaskStatus}
_decode_json = msgspec.json.decode


def task_from_row(row: tuple[object, ...]) -> Task:
    """A ``tasks`` row (``TASK_COLUMNS``) as its Task.

    Written for speed, as every listing page, refill and fetch runs it on each row: no
    call where a column is NULL or holds its value as it is (the row is typed ``Any``
    rather than ``cast`` column by column: a ``cast`` is a call at run time too). About
    half the time it took written plainly; ``tests/test_rows.py`` checks it decodes as
    the plain form did."""
    values: tuple[Any, ...] = row
    (id_, title, description, task_type, priority, status, phase, workflow, payload,
     created_at, updated_at, assigned_worker, due_date, max_retries, tags, attempts,
     result, error, idempotency_key, correlation_id, source_agent, timeout, available_at,
     concurrency_key, concurrency_limit, requires, plan_id, subtask_id,
     idempotency_scope, traceparent, tracestate, run_at, expires_at) = values  # fmt: skip
    # Rows written by other tools may leave the seed schema's nullable columns empty.
    created = parse_time(created_at) or parse_time(updated_at) or EPOCH
    return Task(
        id=str(id_),
        title=str(title),
        description=description,
        task_type=str(task_type),
        priority=1 if priority is None else priority,
        status=_STATUSES.get(status) or TaskStatus(str(status)),
        current_phase="start" if phase is None else str(phase),
        workflow=None if workflow is None else _decode_json(str(workflow)),
        payload={} if payload is None else (_decode_json(str(payload)) or {}),
        created_at=created,
        updated_at=created if updated_at is None else (parse_time(updated_at) or created),
        assigned_worker=assigned_worker,
        due_date=None if due_date is None else parse_time(due_date),
        max_retries=3 if max_retries is None else max_retries,
        tags=tuple(_decode_json(str(tags))) if tags else (),
        attempts=0 if attempts is None else attempts,
        result=None if result is None else _decode_json(str(result)),
        error=error,
        idempotency_key=idempotency_key,
        correlation_id=correlation_id,
        source_agent=source_agent,
        timeout=timeout,
        available_at=None if available_at is None else parse_time(available_at),
        concurrency_key=concurrency_key,
        concurrency_limit=concurrency_limit,
        requires=tuple(_decode_json(str(requires))) if requires else (),
        plan_id=plan_id,
        subtask_id=subtask_id,
        idempotency_scope="active" if idempotency_scope == "active" else "forever",
        traceparent=traceparent,
        tracestate=tracestate,
        run_at=None if run_at is None else parse_time(run_at),
        expires_at=None if expires_at is None else parse_time(expires_at),
    )


def _parse_list(value: object) -> tuple[str, ...]:
    return tuple(cast("list[str]", msgspec.json.decode(str(value)))) if value else ()


def worker_statement(worker: Worker) -> Statement:
    params: Params = (
        worker.id,
        worker.role,
        worker.status.value,
        time_text(worker.last_heartbeat),
        _json(list(worker.capabilities)),
        worker.current_task_id,
        _json(worker.metadata),
        time_text(worker.registered_at),
        worker.incarnation,
    )
    return _PUT_WORKER, params


def worker_from_row(row: tuple[object, ...]) -> Worker:
    (id_, role, status, last_heartbeat, capabilities, current_task_id, metadata,
     registered_at, incarnation) = row  # fmt: skip
    # Seed-era rows may lack times (or hold SQLite's "YYYY-MM-DD HH:MM:SS", in UTC).
    heartbeat = _parse_utc(last_heartbeat) or _parse_utc(registered_at) or EPOCH
    return Worker(
        id=str(id_),
        role=str(role),
        status=WorkerStatus(str(status)) if status in _WORKER_STATUSES else WorkerStatus.ACTIVE,
        last_heartbeat=heartbeat,
        capabilities=_parse_list(capabilities),
        current_task_id=cast("str | None", current_task_id),
        metadata=parse_json(metadata) or {},
        registered_at=_parse_utc(registered_at) or heartbeat,
        incarnation=str(incarnation) if incarnation is not None else "seed",
    )


_WORKER_STATUSES = frozenset(status.value for status in WorkerStatus)


def _parse_utc(value: object) -> datetime | None:
    parsed = parse_time(value)
    if parsed is not None and parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def run_from_row(row: tuple[object, ...]) -> Run:
    (id_, task_id, worker_id, run_number, status, phase, result, error, output_log,
     started_at, completed_at, lease_seconds, lease_expires_at, progress) = row  # fmt: skip
    return Run(
        id=str(id_),
        task_id=str(task_id),
        worker_id=cast("str | None", worker_id),
        run_number=cast(int, run_number),
        status=RunStatus(str(status)),
        phase=cast("str | None", phase),
        result=parse_json(result),
        error=cast("str | None", error),
        output_log=cast("str | None", output_log),
        started_at=parse_time(started_at),
        completed_at=parse_time(completed_at),
        lease_seconds=cast("float | None", lease_seconds),
        lease_expires_at=parse_time(lease_expires_at),
        progress=parse_json(progress),
    )


#: The event log's columns, in the order every store's event reads answer them.
EVENT_COLUMNS = "seq, type, timestamp, source, correlation_id, task_id, plan_id, worker_id, data"

#: An event's row but its seq (EVENT_COLUMNS after the first), as both stores insert it.
EventValues = tuple[str, float, str, str | None, str | None, str | None, str | None, str]


def event_values(op: AppendEvent) -> EventValues:
    """The row of an appended event, but its seq (the store numbers it)."""
    event = op.event
    return (
        event.type,
        event.timestamp,
        event.source,
        event.correlation_id,
        event.task_id,
        event.plan_id,
        event.worker_id,
        op.data_json.decode(),
    )


#: Rows decoded between two yields to the event loop: about 2.5 ms of tasks.
_DECODE_CHUNK = 256
_T = TypeVar("_T")


async def decoded(rows: list[Row], decode: Callable[[Row], _T]) -> list[_T]:
    """Decode a page's rows, letting the event loop run between chunks: a page of 10 000
    tasks is about 95 ms of decoding, which in one go would hold every writer up that
    long (the rows themselves are read on the reader's thread)."""
    if len(rows) <= _DECODE_CHUNK:
        return [decode(row) for row in rows]
    result: list[_T] = []
    for start in range(0, len(rows), _DECODE_CHUNK):
        if start:
            await anyio.lowlevel.checkpoint()
        result += [decode(row) for row in rows[start : start + _DECODE_CHUNK]]
    return result


def event_from_row(row: tuple[object, ...]) -> Event:
    seq, type_, timestamp, source, correlation_id, task_id, plan_id, worker_id, data = row
    """An ``events`` row (seq, type, timestamp, source, correlation, task, plan, worker,
    data) as its Event."""
    # Rows were written by a storage actor from validated events, so no re-validation here
    # (and msgspec cannot convert through the recursive JsonValue alias anyway).
    return Event(
        seq=cast(int, seq),
        type=cast(str, type_),
        timestamp=cast(float, timestamp),
        source=cast(str, source),
        correlation_id=cast("str | None", correlation_id),
        task_id=cast("str | None", task_id),
        plan_id=cast("str | None", plan_id),
        worker_id=cast("str | None", worker_id),
        data=msgspec.json.decode(cast(str, data)),
    )
