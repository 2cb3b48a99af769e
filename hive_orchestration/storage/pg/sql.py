"""The PostgreSQL store's SQL families (:class:`~hive_orchestration.storage.port.StoreSql`):
the twins of ``storage/sqlite/sql.py``, ``pages.py`` and ``event_reads.py``, and the
families of ``queues.py``, ``plans.py`` and ``retention.py`` beside this module.

What differs from SQLite, and only here: no ``INDEXED BY`` (PostgreSQL's planner picks
the partial indexes from the repeated WHERE terms alone); no ``rowid``, so "insertion
order" is the time-ordered id (or ``seq``); ``GREATEST`` for SQLite's two-argument scalar
``max()``; ``LIMIT NULL`` for "no limit" (``LIMIT -1`` is an error); ``= ANY(?)`` with
one array for SQLite's ``IN (?, ?, ...)`` in chunks; a glob becomes an anchored regular
expression (PostgreSQL has no ``GLOB``); the loose index scan's ``LIMIT`` stands outside
its recursive query (PostgreSQL evaluates a recursive query only as far as it is read).
Statements keep SQLite's ``?`` marks: the driver translates them.
"""

from __future__ import annotations

import re
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
    QueryTasks,
    ReadEvents,
    StorageMessage,
)
from .. import retention
from ..port import Driver, Params, Row, Statement
from ..rows import (
    EVENT_COLUMNS,
    RUN_COLUMNS,
    TASK_COLUMNS,
    WORKER_COLUMNS,
    decoded,
    parse_time,
    run_from_row,
    task_from_row,
    time_text,
    worker_from_row,
)
from . import plans, queues
from .pages import tasks_page_sql
from .retention import RETENTION_SQL

__all__ = ["PostgresSql", "glob_regex"]

_INSERT_EVENT = (
    "INSERT INTO events (seq, type, timestamp, source, correlation_id, task_id, plan_id,"
    " worker_id, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
#: Queued tasks by type, and the earliest time one of each became claimable (the twin of
#: SQLite's, through the same two partial indexes, named by their WHERE terms).
_COUNT_QUEUED = (
    "SELECT task_type, COUNT(*), MIN(since) FROM ("
    " SELECT task_type, GREATEST(updated_at, coalesce(available_at, updated_at)) AS since"
    " FROM tasks WHERE status = 'queued' AND run_at IS NULL"
    " UNION ALL SELECT task_type, run_at FROM tasks"
    " WHERE status = 'queued' AND run_at IS NOT NULL"
    ") AS queued GROUP BY task_type"
)
#: The owners of some idempotency keys, through the unique index on the key (whose own
#: condition is repeated, so that the planner uses it).
_FIND_KEYS = (
    "SELECT idempotency_key, id FROM tasks WHERE idempotency_key = ANY(?)"
    " AND idempotency_key IS NOT NULL AND (idempotency_scope IS NULL"
    " OR status IN ('queued', 'blocked', 'assigned', 'running'))"
)


def _when(value: object) -> datetime:
    parsed = parse_time(value)
    assert parsed is not None
    return parsed


class PostgresSql:
    """The SQL families of the PostgreSQL store (stateless: one instance serves all)."""

    def event_statement(self, seq: int, op: AppendEvent) -> Statement:
        event = op.event
        return (
            _INSERT_EVENT,
            (
                seq,
                event.type,
                event.timestamp,
                event.source,
                event.correlation_id,
                event.task_id,
                event.plan_id,
                event.worker_id,
                op.data_json.decode(),
            ),
        )

    async def last_seq(self, db: Driver) -> int:
        rows = await db.fetchall("SELECT coalesce(max(seq), 0) FROM events")
        return int(cast(int, rows[0][0]))

    async def read_events(self, db: Driver, read: ReadEvents) -> list[Row]:
        return await read_event_rows(db, read)

    async def query_tasks(self, db: Driver, message: StorageMessage) -> object:
        match message:
            case CountTasks():
                rows = await db.fetchall("SELECT status, COUNT(*) FROM tasks GROUP BY status")
                return {str(status): int(cast(int, count)) for status, count in rows}
            case CountQueued():
                rows = await db.fetchall(_COUNT_QUEUED)
                return {
                    str(task_type): (int(cast(int, count)), _when(since))
                    for task_type, count, since in rows
                }
            case LoadTasks(statuses=statuses):
                rows = await db.fetchall(
                    f"SELECT {TASK_COLUMNS} FROM tasks WHERE status = ANY(?)"
                    " ORDER BY priority DESC, created_at, id",
                    (list(statuses),),
                )
                return tuple(task_from_row(row) for row in rows)
            case LoadRuns(statuses=statuses):
                rows = await db.fetchall(
                    f"SELECT {RUN_COLUMNS} FROM runs WHERE task_id IN"
                    " (SELECT id FROM tasks WHERE status = ANY(?)) ORDER BY id",
                    (list(statuses),),
                )
                return tuple(run_from_row(row) for row in rows)
            case LoadLeaseHashes(statuses=statuses):
                rows = await db.fetchall(
                    "SELECT id, lease_hash FROM runs WHERE task_id IN"
                    " (SELECT id FROM tasks WHERE status = ANY(?))"
                    " AND lease_hash IS NOT NULL AND status IN ('assigned', 'running')",
                    (list(statuses),),
                )
                return {str(run_id): bytes(cast(bytes, digest)) for run_id, digest in rows}
            case FindIdempotencyKeys(keys=keys):
                if not keys:
                    return {}
                rows = await db.fetchall(_FIND_KEYS, (list(keys),))
                return {str(key): str(task_id) for key, task_id in rows}
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
                    f"SELECT {RUN_COLUMNS} FROM runs WHERE task_id = ? ORDER BY run_number, id",
                    (task_id,),
                )
                return [run_from_row(row) for row in rows]
            case LoadWorkers():
                rows = await db.fetchall(
                    f"SELECT {WORKER_COLUMNS} FROM workers ORDER BY registered_at, id"
                )
                return tuple(worker_from_row(row) for row in rows)
        raise HiveError(f"not a task read: {type(message).__name__}")

    async def query_queues(self, db: Driver, message: StorageMessage) -> object:
        return await queues.query_queues(db, message)

    async def query_plans(self, db: Driver, message: StorageMessage) -> object:
        return await plans.query_plans(db, message)

    async def query_retention(self, db: Driver, message: StorageMessage) -> object:
        return await retention.query_retention(db, RETENTION_SQL, message)


# -- listings ----------------------------------------------------------------------------


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
    params.append(query.limit)  # LIMIT NULL: no limit
    return sql, tuple(params)


# -- the event log by type ---------------------------------------------------------------

#: Most distinct types a pattern is resolved into through the type index.
MAX_TYPES = 64
_GLOB_SPECIAL = frozenset("*?[")
# The loose index scan of ``storage/sqlite/event_reads.py``, the LIMIT outside: a
# recursive query is evaluated only as far as its reader reads it.
_WALK = """
WITH RECURSIVE found(type) AS (
    SELECT (SELECT min(type) FROM events WHERE type >= ?{upper})
    UNION ALL
    SELECT (SELECT min(type) FROM events WHERE type > found.type{upper})
    FROM found WHERE found.type IS NOT NULL
)
SELECT type, type ~ ?, (SELECT coalesce(max(seq), 0) FROM events) FROM found
WHERE type IS NOT NULL LIMIT ?
"""
_TYPES_SQL = _WALK.format(upper=" AND type < ?")
_ALL_TYPES_SQL = _WALK.format(upper="")


def glob_regex(pattern: str) -> str | None:
    """SQLite's ``GLOB`` ``pattern`` as an anchored PostgreSQL regular expression (None:
    it matches nothing, as a ``[`` never closed does in SQLite).

    ``*`` is any text, ``?`` one character, ``[...]`` a set (``[^...]`` its complement; a
    ``]`` first in it is itself, as in SQLite); everything else is itself, case and all.
    """
    out: list[str] = ["^"]
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        if char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        elif char == "[":
            end = i + 1
            if end < n and pattern[end] == "^":
                end += 1
            if end < n and pattern[end] == "]":
                end += 1
            while end < n and pattern[end] != "]":
                end += 1
            if end >= n:  # no closing bracket: SQLite matches nothing then
                return None
            body = pattern[i + 1 : end]
            negated = body.startswith("^")
            if negated:
                body = body[1:]
            body = body.replace("\\", "\\\\")
            out.append("[" + ("^" if negated else "") + body + "]")
            i = end
        else:
            out.append(re.escape(char) if not char.isalnum() else char)
        i += 1
    out.append("$")
    return "".join(out)


def literal_prefix(pattern: str) -> str:
    for i, char in enumerate(pattern):
        if char in _GLOB_SPECIAL:
            return pattern[:i]
    return pattern


def _upper_bound(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix``: code point order,
    which the C collation of ``events.type`` keeps (schema)."""
    if not prefix or ord(prefix[-1]) == 0x10FFFF:
        return None
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def events_sql(read: ReadEvents, regex: str | None) -> tuple[str, Params]:
    where = ["seq > ?"]
    params: list[object] = [read.after]
    for column, value in (
        ("task_id", read.task_id),
        ("plan_id", read.plan_id),
        ("correlation_id", read.correlation_id),
    ):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if regex is not None:
        where.append("type ~ ?")
        params.append(regex)
    params.append(read.limit)
    select = f"SELECT {EVENT_COLUMNS} FROM events WHERE {' AND '.join(where)}"
    if read.newest:
        return (
            f"SELECT * FROM ({select} ORDER BY seq DESC LIMIT ?) AS newest ORDER BY seq",
            tuple(params),
        )
    return f"{select} ORDER BY seq LIMIT ?", tuple(params)


def _merged_sql(read: ReadEvents, types: list[str], last_seq: int) -> tuple[str, Params]:
    order = "DESC" if read.newest else ""
    parts: list[str] = []
    params: list[object] = []
    for n, type_ in enumerate(types):
        parts.append(
            f"SELECT * FROM (SELECT {EVENT_COLUMNS} FROM events"
            f" WHERE type = ? AND seq > ? AND seq <= ? ORDER BY seq {order} LIMIT ?) AS t{n}"
        )
        params += [type_, read.after, last_seq, read.limit]
    union = " UNION ALL ".join(parts)
    params.append(read.limit)
    if read.newest:
        sql = f"SELECT * FROM ({union} ORDER BY seq DESC LIMIT ?) AS newest ORDER BY seq"
    else:
        sql = f"{union} ORDER BY seq LIMIT ?"
    return sql, tuple(params)


async def read_event_rows(db: Driver, read: ReadEvents) -> list[Row]:
    """The rows of ``read``: by the id's index, or by the type index one matching type at
    a time (``storage/sqlite/event_reads.py`` says why and how)."""
    regex = None
    if read.pattern != "*":
        regex = glob_regex(read.pattern)
        if regex is None:
            return []
    if regex is None or any(
        value is not None for value in (read.task_id, read.plan_id, read.correlation_id)
    ):
        return await db.fetchall(*events_sql(read, regex))
    prefix = literal_prefix(read.pattern)
    upper = _upper_bound(prefix)
    if upper is None:
        rows = await db.fetchall(_ALL_TYPES_SQL, (prefix, regex, MAX_TYPES + 1))
    else:
        rows = await db.fetchall(_TYPES_SQL, (prefix, upper, upper, regex, MAX_TYPES + 1))
    if len(rows) > MAX_TYPES:
        return await db.fetchall(*events_sql(read, regex))  # too many types to resolve
    types = [str(type_) for type_, matches, _ in rows if matches]
    if not types:
        return []  # no event in the log has a type the pattern matches
    last_seq = rows[0][2]
    assert isinstance(last_seq, int)
    return await db.fetchall(*_merged_sql(read, types, last_seq))
