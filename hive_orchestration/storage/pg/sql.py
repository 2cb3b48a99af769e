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
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import cast

import msgspec

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
from .. import event_reads, pages, retention
from ..port import Driver, QueueKey, Row, Statement
from ..rows import (
    RUN_COLUMNS,
    TASK_COLUMNS,
    WORKER_COLUMNS,
    decoded,
    event_values,
    parse_time,
    run_from_row,
    task_from_row,
    time_text,
    worker_from_row,
)
from . import plans, queues
from .claim import recoverable_sql
from .pages import PAGE_SQL
from .retention import RETENTION_SQL

__all__ = [
    "EVENTS_CHANNEL",
    "NOTICE_FIELDS",
    "READY_CHANNEL",
    "Kinds",
    "PostgresSql",
    "glob_regex",
    "parse_events_notice",
    "parse_ready",
]

#: The channel each commit that appends events notifies (sql.py: parse_events_notice).
EVENTS_CHANNEL = "hive_events"
#: The channel each commit that makes tasks ready notifies, once per commit: its payload
#: the JSON ``[origin, [[task_type, requires, concurrency_key], ...]]`` (the queues), or
#: ``[origin, null]`` when they do not fit (NOTIFY's payload is under 8000 bytes).
READY_CHANNEL = "hive_ready"
_READY_NOTICE = f"SELECT pg_notify('{READY_CHANNEL}', ?)"
_NOTICE_MAX = 7000
_encode = msgspec.json.Encoder().encode


def _queue_key(queue: QueueKey) -> tuple[str, tuple[str, ...], str]:
    return (queue[0], queue[1], queue[2] or "")


def parse_ready(payload: str) -> tuple[str, tuple[QueueKey, ...] | None] | None:
    """A :data:`READY_CHANNEL` payload: (origin, queues or None); None if malformed."""
    try:
        origin, named = msgspec.json.decode(
            payload, type=tuple[str, list[tuple[str, list[str], str | None]] | None]
        )
    except msgspec.DecodeError:  # not one of ours (ValidationError is one too)
        return None
    if named is None:
        return origin, None
    return origin, tuple((kind, tuple(needs), key) for kind, needs, key in named)


_INSERT_EVENT = (
    "INSERT INTO events (seq, type, timestamp, source, correlation_id, task_id, plan_id,"
    " worker_id, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
#: A batch's events, numbered as the transaction commits (pg-design 4.4; the driver runs
#: it last, Driver.append): the counter row is raised by the batch's count, and the events
#: take the numbers up to its new value, in order (the array's ordinality). From this
#: statement to the end of COMMIT the transaction holds the counter's row lock, so commits
#: that append events follow each other in the order of their numbers. The NOTIFY, sent at
#: commit, wakes the other nodes' log feeds (pg/tailer.py): "<origin>:<last>:<first>:<kinds>"
#: (:func:`parse_events_notice`), so that a node none of whose subscribers could want
#: a commit's events moves past them without reading them.
#: The events come as one JSON array of rows (:func:`_event_rows`), encoded by msgspec:
#: eight text arrays cost psycopg's array dumper ~15 us per event in Python, the JSON ~1.
_NUMBERED_EVENTS = (
    "WITH s AS (UPDATE hive_event_seq SET last = last + ? WHERE id = 1 RETURNING last),"
    " i AS (INSERT INTO events (seq, type, timestamp, source, correlation_id, task_id,"
    " plan_id, worker_id, data)"
    " SELECT s.last - ? + e.n, e.j->>0, (e.j->>1)::float8, e.j->>2, e.j->>3, e.j->>4,"
    " e.j->>5, e.j->>6, e.j->>7"
    " FROM s, jsonb_array_elements(?::jsonb) WITH ORDINALITY AS e(j, n)),"
    # No counter row: fail (as the driver's checked UPDATEs do), never commit unnumbered.
    " g AS (SELECT ('hive:missing-row:hive_event_seq:' || count(*))::bigint AS x FROM s"
    " HAVING count(*) <> 1)"
    f" SELECT last, pg_notify('{EVENTS_CHANNEL}',"
    " ? || ':' || last || ':' || (last - ? + 1) || ':' || ?) FROM s"
    " UNION ALL SELECT x, NULL FROM g"
)
#: The fields an event may have set or not, as a commit's notice names them (one letter
#: each); its source is always set.
NOTICE_FIELDS = {"correlation_id": "c", "task_id": "t", "plan_id": "p", "worker_id": "w"}
#: The longest kinds a notice carries; a commit of more says "*" (read it).
_KINDS_MAX = 6000


def _kinds(ops: Sequence[AppendEvent]) -> str:
    """A commit's event types, each with the fields set on any event of it (letters,
    :data:`NOTICE_FIELDS`), as JSON ``[[type, letters], ...]``; ``*`` if too long."""
    found: dict[str, set[str]] = {}
    for op in ops:
        event = op.event
        letters = found.setdefault(event.type, set())
        if event.correlation_id is not None:
            letters.add("c")
        if event.task_id is not None:
            letters.add("t")
        if event.plan_id is not None:
            letters.add("p")
        if event.worker_id is not None:
            letters.add("w")
    text = _encode([[type_, "".join(sorted(letters))] for type_, letters in found.items()])
    return "*" if len(text) > _KINDS_MAX else text.decode()


#: A commit's kinds, as :func:`parse_events_notice` gives them: each event type with the
#: letters of the fields set on any event of it; None: not said (read the commit).
Kinds = tuple[tuple[str, str], ...] | None


def parse_events_notice(payload: str) -> tuple[str, int, int, Kinds] | None:
    """An :data:`EVENTS_CHANNEL` payload: (origin, last seq, first seq, kinds); None if
    malformed. A notice of the older form ``<origin>:<last>`` says neither its first
    seq (0) nor its kinds (None)."""
    origin, _, rest = payload.partition(":")
    last, _, rest = rest.partition(":")
    if not last.isdigit():
        return None
    first, _, kinds = rest.partition(":")
    if not first.isdigit():
        return origin, int(last), 0, None
    if kinds == "*":
        return origin, int(last), int(first), None
    try:
        named = msgspec.json.decode(kinds, type=list[tuple[str, str]])
    except msgspec.DecodeError:
        return origin, int(last), int(first), None
    return origin, int(last), int(first), tuple(named)


def _event_rows(ops: Sequence[AppendEvent]) -> str:
    return _encode([event_values(op) for op in ops]).decode()


#: Queued tasks by type, and the earliest time one of each became claimable (the twin of
#: SQLite's, through the same two partial indexes, named by their WHERE terms).
_MINE = recoverable_sql()
#: A backoff's end is by the database's clock (TaskManager.backoff_until), the other
#: times by the writers' wall clocks: it is turned into the asker's wall clock (the
#: parameter: its time as it sent the read) by how far that was from the database's when
#: the statement started (statement_timestamp(), one reading for every row), then
#: compared. Without an asker's time, by the database's (the parameter is NULL).
_COUNT_QUEUED = (
    "SELECT task_type, COUNT(*), MIN(since) FROM ("
    " SELECT task_type, GREATEST(updated_at, coalesce(available_at"
    " + (coalesce(?::timestamptz, statement_timestamp()) - statement_timestamp()),"
    " updated_at)) AS since"
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
        return (_INSERT_EVENT, (seq, *event_values(op)))

    def numbered_events(self, ops: Sequence[AppendEvent], origin: str) -> Statement | None:
        count = len(ops)
        return (_NUMBERED_EVENTS, (count, count, _event_rows(ops), origin, count, _kinds(ops)))

    async def last_seq(self, db: Driver) -> int:
        # The counter, not max(seq): what it says is committed, and all below it too.
        rows = await db.fetchall("SELECT last FROM hive_event_seq WHERE id = 1")
        return int(cast(int, rows[0][0])) if rows else 0

    async def read_events(self, db: Driver, read: ReadEvents) -> list[Row]:
        return await read_event_rows(db, read)

    async def query_tasks(self, db: Driver, message: StorageMessage) -> object:
        match message:
            case CountTasks():
                rows = await db.fetchall("SELECT status, COUNT(*) FROM tasks GROUP BY status")
                return {str(status): int(cast(int, count)) for status, count in rows}
            case CountQueued(wall=wall):
                rows = await db.fetchall(_COUNT_QUEUED, (time_text(wall),))
                return {
                    str(task_type): (int(cast(int, count)), _when(since))
                    for task_type, count, since in rows
                }
            # The task manager's claims at start-up: its node's, no node's and dead nodes'
            # only, never another live node's (claim.py).
            case LoadTasks(statuses=statuses):
                rows = await db.fetchall(
                    f"SELECT {TASK_COLUMNS} FROM tasks WHERE status = ANY(?) AND {_MINE}"
                    " ORDER BY priority DESC, created_at, id",
                    (list(statuses),),
                )
                return tuple(task_from_row(row) for row in rows)
            case LoadRuns(statuses=statuses):
                rows = await db.fetchall(
                    f"SELECT {RUN_COLUMNS} FROM runs WHERE task_id IN"
                    f" (SELECT id FROM tasks WHERE status = ANY(?) AND {_MINE}) ORDER BY id",
                    (list(statuses),),
                )
                return tuple(run_from_row(row) for row in rows)
            case LoadLeaseHashes(statuses=statuses):
                rows = await db.fetchall(
                    "SELECT id, lease_hash FROM runs WHERE task_id IN"
                    f" (SELECT id FROM tasks WHERE status = ANY(?) AND {_MINE})"
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
            case LoadWorkers(watched=watched):
                # Another live node's workers heartbeat to it, not to this one (schema 15).
                where = f" WHERE {_MINE}" if watched else ""
                rows = await db.fetchall(
                    f"SELECT {WORKER_COLUMNS} FROM workers{where} ORDER BY registered_at, id"
                )
                return tuple(worker_from_row(row) for row in rows)
        raise HiveError(f"not a task read: {type(message).__name__}")

    def ready_notice(self, queues: Collection[QueueKey], origin: str) -> Statement | None:
        if not queues:
            return None
        named: list[object] = [
            [kind, list(needs), key] for kind, needs, key in sorted(queues, key=_queue_key)
        ]
        payload = _encode([origin, named]).decode()
        if len(payload) > _NOTICE_MAX:  # NOTIFY's payload is short: "read them all"
            payload = _encode([origin, None]).decode()
        return (_READY_NOTICE, (payload,))

    async def lock_ready(self, db: Driver, lock: LockReady) -> LockedHeads | None:
        return await queues.lock_ready(db, lock)

    async def query_queues(self, db: Driver, message: StorageMessage) -> object:
        return await queues.query_queues(db, message)

    async def query_plans(self, db: Driver, message: StorageMessage) -> object:
        return await plans.query_plans(db, message)

    async def query_retention(self, db: Driver, message: StorageMessage) -> object:
        return await retention.query_retention(db, RETENTION_SQL, message)


# -- listings ----------------------------------------------------------------------------


def _tasks_sql(query: QueryTasks) -> Statement:
    if query.after is not None and query.status is not None and not query.newest_first:
        return pages.tasks_page_sql(
            PAGE_SQL, query.status, query.task_type, query.after, query.limit
        )
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


def _walk(prefix: str, upper: str | None, regex: object, limit: int) -> Statement:
    if upper is None:
        return _ALL_TYPES_SQL, (prefix, regex, limit)
    return _TYPES_SQL, (prefix, upper, upper, regex, limit)


_EVENT_READ_SQL = event_reads.EventReadSql(type_match="type ~ ?", name_subqueries=True, walk=_walk)


async def read_event_rows(db: Driver, read: ReadEvents) -> list[Row]:
    """The rows of ``read`` (``storage/event_reads.py``), the pattern as a regular
    expression: a pattern that no type can match reads nothing."""
    regex = None
    if read.pattern != "*":
        regex = glob_regex(read.pattern)
        if regex is None:
            return []
    return await event_reads.read_event_rows(_EVENT_READ_SQL, db, read, regex)
