"""The SQLite store's SQL families (:class:`~hive_orchestration.storage.port.StoreSql`):
the storage actor's own reads and the event statement, which were constants of
``storage/actor.py``, and the families of ``queues.py``, ``plans.py``,
``event_reads.py`` and ``retention.py`` beside this module.

SQLite's own spellings live here and only here: ``INDEXED BY``, ``rowid`` order, the
two-argument scalar ``max()``, ``LIMIT -1`` for "no limit", ``?N`` numbered marks.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import cast

from ...errors import HiveError
from ...messages.storage import (
    AppendEvent,
    CountQueued,
    CountTasks,
    FetchRun,
    FetchRuns,
    FetchTask,
    FindIdempotencyKeys,
    LoadLeaseHashes,
    LoadRuns,
    LoadTasks,
    LoadWorkers,
    LockedHeads,
    LockReady,
    QueryTasks,
    ReadEvents,
    StorageMessage,
)
from .. import retention
from ..port import Driver, QueueKey, Row, Statement
from ..rows import (
    RUN_COLUMNS,
    TASK_COLUMNS,
    WORKER_COLUMNS,
    decoded,
    event_values,
    run_from_row,
    task_from_row,
    time_text,
    worker_from_row,
)
from . import plans, queues
from .event_reads import read_event_rows
from .pages import tasks_page_sql
from .retention import RETENTION_SQL

__all__ = ["FIND_KEYS_SQL", "SqliteSql"]

_INSERT_EVENT = (
    "INSERT INTO events (seq, type, timestamp, source, correlation_id, task_id, plan_id,"
    " worker_id, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
#: Queued tasks by type, and the earliest time one of each became claimable: the
#: partial index ``idx_tasks_ready`` holds exactly the queued tasks that are not delayed,
#: by type first, and ``idx_tasks_delayed`` the delayed ones (claimable from run_at).
_COUNT_QUEUED = (
    "SELECT task_type, COUNT(*), MIN(since) FROM ("
    " SELECT task_type, max(updated_at, coalesce(available_at, updated_at)) AS since"
    " FROM tasks INDEXED BY idx_tasks_ready WHERE status = 'queued' AND run_at IS NULL"
    " UNION ALL SELECT task_type, run_at FROM tasks INDEXED BY idx_tasks_delayed"
    " WHERE status = 'queued' AND run_at IS NOT NULL"
    ") GROUP BY task_type"
)
#: The owners of some idempotency keys, through the unique index on the key.
#: A task of scope 'active' holds its key only while live: the index's own condition,
#: written as schema version 19 writes it (equalities joined by OR: schema.py).
FIND_KEYS_SQL = (
    "SELECT idempotency_key, id FROM tasks WHERE idempotency_key IN ({marks})"
    " AND idempotency_key IS NOT NULL AND (idempotency_scope IS NULL"
    " OR (status = 'queued' OR status = 'blocked' OR status = 'assigned'"
    " OR status = 'running'))"
)
#: Under SQLite's oldest limit on bound parameters (999).
_KEYS_PER_QUERY = 500


class SqliteSql:
    """The SQL families of the SQLite store (stateless: one instance serves all)."""

    def event_statement(self, seq: int, op: AppendEvent) -> Statement:
        return (_INSERT_EVENT, (seq, *event_values(op)))

    def numbered_events(self, ops: Sequence[AppendEvent], origin: str) -> Statement | None:
        # One runtime writes a SQLite file: the actor numbers events in memory.
        return None

    async def last_seq(self, db: Driver) -> int:
        rows = await db.fetchall("SELECT coalesce(max(seq), 0) FROM events")
        return cast(int, rows[0][0])

    async def read_events(self, db: Driver, read: ReadEvents) -> list[Row]:
        return await read_event_rows(db, read)

    async def query_tasks(self, db: Driver, message: StorageMessage) -> object:
        match message:
            case CountTasks():
                rows = await db.fetchall("SELECT status, COUNT(*) FROM tasks GROUP BY status")
                return {str(status): cast(int, count) for status, count in rows}
            case CountQueued():
                rows = await db.fetchall(_COUNT_QUEUED)
                return {
                    str(task_type): (cast(int, count), datetime.fromisoformat(str(since)))
                    for task_type, count, since in rows
                }
            case LoadTasks(statuses=statuses):
                rows = await db.fetchall(
                    f"SELECT {TASK_COLUMNS} FROM tasks WHERE status IN ({_marks(statuses)})"
                    " ORDER BY priority DESC, created_at, rowid",
                    statuses,
                )
                return tuple(task_from_row(row) for row in rows)
            case LoadRuns(statuses=statuses):
                rows = await db.fetchall(
                    f"SELECT {RUN_COLUMNS} FROM runs WHERE task_id IN"
                    f" (SELECT id FROM tasks WHERE status IN ({_marks(statuses)}))"
                    " ORDER BY rowid",
                    statuses,
                )
                return tuple(run_from_row(row) for row in rows)
            case LoadLeaseHashes(statuses=statuses):
                rows = await db.fetchall(
                    "SELECT id, lease_hash FROM runs WHERE task_id IN"
                    f" (SELECT id FROM tasks WHERE status IN ({_marks(statuses)}))"
                    " AND lease_hash IS NOT NULL AND status IN ('assigned', 'running')",
                    statuses,
                )
                return {str(run_id): bytes(cast(bytes, digest)) for run_id, digest in rows}
            case FindIdempotencyKeys(keys=keys):
                found: dict[str, str] = {}
                for start in range(0, len(keys), _KEYS_PER_QUERY):
                    chunk = keys[start : start + _KEYS_PER_QUERY]
                    rows = await db.fetchall(FIND_KEYS_SQL.format(marks=_marks(chunk)), chunk)
                    found.update((str(key), str(task_id)) for key, task_id in rows)
                return found
            case QueryTasks() as query:
                return await decoded(await db.fetchall(*_tasks_sql(query)), task_from_row)
            case FetchTask(task_id=task_id):
                rows = await db.fetchall(
                    f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,)
                )
                return task_from_row(rows[0]) if rows else None
            case FetchRun(run_id=run_id):
                rows = await db.fetchall(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,))
                return run_from_row(rows[0]) if rows else None
            case FetchRuns(task_id=task_id):
                rows = await db.fetchall(
                    f"SELECT {RUN_COLUMNS} FROM runs WHERE task_id = ? ORDER BY run_number, rowid",
                    (task_id,),
                )
                return [run_from_row(row) for row in rows]
            case LoadWorkers():
                rows = await db.fetchall(f"SELECT {WORKER_COLUMNS} FROM workers ORDER BY rowid")
                return tuple(worker_from_row(row) for row in rows)
        raise HiveError(f"not a task read: {type(message).__name__}")

    def ready_notice(self, queues: Collection[QueueKey], origin: str) -> Statement | None:
        return None  # one runtime: no other node to tell

    async def lock_ready(self, db: Driver, lock: LockReady) -> LockedHeads | None:
        # One owner, the only writer: memory is the truth, nothing to lock.
        return None

    async def query_queues(self, db: Driver, message: StorageMessage) -> object:
        return await queues.query_queues(db, message)

    async def query_plans(self, db: Driver, message: StorageMessage) -> object:
        return await plans.query_plans(db, message)

    async def query_retention(self, db: Driver, message: StorageMessage) -> object:
        return await retention.query_retention(db, RETENTION_SQL, message)


def _marks(values: tuple[str, ...]) -> str:
    return ", ".join("?" * len(values))


def _tasks_sql(query: QueryTasks) -> Statement:
    if query.after is not None and query.status is not None and not query.newest_first:
        return tasks_page_sql(query.status, query.task_type, query.after, query.limit)
    where: list[str] = []
    params: list[object] = []
    if query.status is not None:
        where.append("status = ?")
        params.append(query.status)
    if query.task_type is not None:
        where.append("task_type = ?")
        params.append(query.task_type)
    if query.after is not None and query.newest_first:
        where.append("(created_at, id) < (?, ?)")
        params += [time_text(query.after[1]), query.after[2]]
    sql = f"SELECT {TASK_COLUMNS} FROM tasks"
    if where:
        sql += " WHERE " + " AND ".join(where)
    if query.newest_first:
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
    else:
        sql += " ORDER BY priority DESC, created_at, id LIMIT ?"
    params.append(-1 if query.limit is None else query.limit)
    return sql, tuple(params)
