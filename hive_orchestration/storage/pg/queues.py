"""The ready queues' reads on PostgreSQL: the twin of ``storage/sqlite/queues.py``.

The same reads in the same order (priority highest first, then ``created_at``, then
id), as range scans of the partial index ``idx_tasks_ready``. What differs: PostgreSQL
spells SQLite's null-safe ``IS ?`` as ``IS NOT DISTINCT FROM ?`` (and its planner still
uses the index for it only when the value is not NULL, so a queue's NULL columns are
written ``IS NULL``); it needs no ``INDEXED BY`` (the partial indexes' own WHERE terms are
repeated); a list of ids is one array parameter; "the last rows inserted" is the greatest
ids (time-ordered), as it has no rowid.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import cast

import msgspec

from ..._ids import is_new_id
from ...messages.storage import (
    DatabaseClock,
    FetchTasks,
    LastTaskId,
    LoadQueueHeads,
    LoadStarts,
    LoadTimers,
    LockedHeads,
    LockReady,
    QueryUnroutable,
    QueueHead,
    QueueHeads,
    StorageMessage,
    StoreFences,
    TasksWithRuns,
)
from ...messages.tasks import Run, Task
from ..port import Driver, Row
from ..rows import (
    RUN_COLUMNS,
    TASK_COLUMNS,
    parse_time,
    run_from_row,
    task_from_row,
    time_text,
)

__all__ = ["lock_ready", "query_queues", "requires_text"]

_encode = msgspec.json.Encoder().encode
_READY = "status = 'queued' AND run_at IS NULL"
_ROUTES = f"SELECT DISTINCT task_type, requires FROM tasks WHERE {_READY}"
_QUEUES = f"SELECT DISTINCT task_type, requires, concurrency_key FROM tasks WHERE {_READY}"
# The earliest start times (expiries) of queued tasks after a (time, id), in that order.
# With no cursor, from the start: '-infinity' is before every time (SQLite's '' is
# before every text).
_TIMERS = {
    "run_at": (
        "SELECT id, run_at, created_at FROM tasks"
        " WHERE status = 'queued' AND run_at IS NOT NULL AND (run_at, id) > (?, ?)"
        " ORDER BY run_at, id LIMIT ?"
    ),
    "expires_at": (
        "SELECT id, expires_at, created_at FROM tasks"
        " WHERE status = 'queued' AND expires_at IS NOT NULL AND (expires_at, id) > (?, ?)"
        " ORDER BY expires_at, id LIMIT ?"
    ),
}


#: A queue's claim order (priority highest first, then ``created_at``, then id) spelled
#: with the queue's own columns first, as ``idx_tasks_ready`` orders them. The queue's
#: columns are fixed by its WHERE, so the order is the same; but PostgreSQL takes
#: ``requires IS NULL`` (and ``concurrency_key IS NULL``) for no constant when it matches
#: an ORDER BY to an index, so the bare order sorted every ready task of the queue to lock
#: or read a few of them (measured at 10 000 queued: 8-18 ms a lock, growing with the
#: backlog, in the generic plan psycopg's prepared statements settle on), where the
#: index walked in order stops after ``limit`` rows (0.6 ms).
_QUEUE_ORDER = "task_type, requires, concurrency_key, priority DESC, created_at, id"


def _equal(column: str, value: object) -> str:
    """``column`` equal to ``value``, NULL included (SQLite's ``IS ?``)."""
    return f"{column} IS NULL" if value is None else f"{column} = ?"


def _queue_where(task_type: str, requires: str | None, key: str | None) -> tuple[str, list[object]]:
    where = f"{_READY} AND task_type = ? AND {_equal('requires', requires)}"
    where += f" AND {_equal('concurrency_key', key)}"
    params: list[object] = [task_type]
    params += [v for v in (requires, key) if v is not None]
    return where, params


def _queue(task_type: str, requires: str | None, key: str | None) -> tuple[str, list[object]]:
    where, params = _queue_where(task_type, requires, key)
    return f"SELECT {TASK_COLUMNS}, version FROM tasks WHERE {where}", params


def requires_text(requires: Sequence[str]) -> str | None:
    """The ``requires`` column of a task that requires ``requires`` (as ``rows`` writes it)."""
    return _encode(list(requires)).decode() if requires else None


async def query_queues(db: Driver, message: StorageMessage) -> object:
    """A message of :data:`~hive_orchestration.storage.port.QUEUE_READS`."""
    match message:
        case LoadQueueHeads(heads=heads, limit=limit):
            if heads is None:
                heads = tuple(await _all_queues(db))
            loaded: list[tuple[QueueHead, tuple[Task, ...]]] = []
            # Each task read with its version in one row: a write fenced by it was
            # decided on exactly that state.
            versions: dict[str, int] = {}
            for head in heads:
                rows = await _head(db, head, limit)
                versions.update((str(row[0]), int(cast(int, row[-1]))) for row in rows)
                loaded.append((head, tuple(task_from_row(row[:-1]) for row in rows)))
            ids = [task.id for _, tasks in loaded for task in tasks]
            return QueueHeads(tuple(loaded), tuple(await _runs_of(db, ids)), versions)
        case FetchTasks(task_ids=task_ids):
            rows = await db.fetchall(
                f"SELECT {TASK_COLUMNS}, version FROM tasks WHERE id = ANY(?)", (list(task_ids),)
            )
            tasks = [task_from_row(row[:-1]) for row in rows]
            versions = {str(row[0]): int(cast(int, row[-1])) for row in rows}
            runs = await _runs_of(db, [task.id for task in tasks])
            return TasksWithRuns(tuple(tasks), tuple(runs), versions)
        case DatabaseClock():
            # The clock itself, not now(): a transaction's start, were the read one.
            ((now,),) = await db.fetchall("SELECT clock_timestamp()")
            return _when(now)
        case StoreFences():
            return True  # several nodes may share the database
        case QueryUnroutable(capability_sets=sets, limit=limit, after=after):
            stuck: list[Task] = []
            for task_type, requires in await db.fetchall(_ROUTES):
                needs = _parse_requires(requires)
                if any(_takes(task_type, needs, caps) for caps in sets):
                    continue
                sql = (
                    f"SELECT {TASK_COLUMNS} FROM tasks WHERE status = 'queued'"
                    f" AND task_type = ? AND {_equal('requires', requires)}"
                    " ORDER BY priority DESC, created_at, id"
                )
                params = (task_type,) if requires is None else (task_type, requires)
                stuck += [task_from_row(row) for row in await db.fetchall(sql, params)]
            if after is not None:
                bound = (-after[0], after[1], after[2])
                stuck = [t for t in stuck if (-t.priority, t.created_at, t.id) > bound]
            stuck.sort(key=lambda task: (-task.priority, task.created_at, task.id))
            return stuck if limit is None else stuck[:limit]
        case LastTaskId():
            return await _last_new_id(db)
        case LoadStarts(task_types=types, keys=keys, since=since):
            sql = (
                "SELECT t.task_type, t.concurrency_key, r.started_at"
                " FROM runs r JOIN tasks t ON t.id = r.task_id"
                " WHERE r.lease_seconds IS NOT NULL AND r.started_at >= ?"
                " AND (t.task_type = ANY(?) OR t.concurrency_key = ANY(?))"
                " ORDER BY r.started_at"
            )
            rows = await db.fetchall(sql, (_text(since), list(types), list(keys)))
            return tuple(
                (str(kind), cast("str | None", key), cast(datetime, parse_time(started)))
                for kind, key, started in rows
            )
        case LoadTimers(column=column, after=after, limit=limit):
            at, task_id = ("-infinity", "") if after is None else (_text(after[0]), after[1])
            rows = await db.fetchall(_TIMERS[column], (at, task_id, limit))
            return tuple(
                (str(id_), cast(datetime, parse_time(when)), cast(datetime, parse_time(created)))
                for id_, when, created in rows
            )
    raise TypeError(f"not a queue query: {type(message).__name__}")  # pragma: no cover


#: A locked row: the task's columns, its version, and how many runs it has. The count is
#: of the statement's snapshot, while the row is its latest version (a row changed since
#: the snapshot is read again as it is now, as it is locked); a change since is a fenced
#: write, which raised the version: so a task's runs are read when it has any or its
#: version is not 0, and a task at version 0 with none (never written since it was
#: created: the common case) costs no read of runs.
_LOCKED = (
    f"SELECT {TASK_COLUMNS}, version,"
    " (SELECT count(*) FROM runs WHERE runs.task_id = tasks.id) AS runs FROM tasks WHERE "
)
#: The columns of a locked row, for the marker row that follows them (all NULL).
_NULLS = ", ".join(["NULL"] * (len(TASK_COLUMNS.split(",")) + 2))


def _lock_sql(where: str) -> str:
    """One queue's lock, in one statement: its best ``limit`` ready rows by the
    database's clock (``now()``: the transaction's start, a moment ago), each locked
    ``FOR UPDATE SKIP LOCKED``; then, only when fewer than ``limit`` were locked (the
    queue holds no other free row that is due), a marker row (``part`` 1) saying in how
    many seconds, by the same clock, the queue's first task still in a retry backoff
    comes due (NULL: none is). No write marks a backoff's end, so the writer sets an
    alarm for it: one per queue, whatever the number of tasks backing off. Every row
    carries that clock's reading (``now``): the writer tells by it whether a task it
    holds beyond the rows locked is past its stored backoff (:func:`take_locked`). The marker
    costs nothing when the lock took ``limit`` rows (PostgreSQL does not run a branch
    whose one-time filter is false), and otherwise a second scan of what the lock just
    scanned: the whole queue, in ``idx_tasks_ready``."""
    return (
        f"WITH locked AS MATERIALIZED ({_LOCKED}{where}"
        " AND (available_at IS NULL OR available_at <= now() OR id = ANY(?))"
        f" ORDER BY {_QUEUE_ORDER} LIMIT ? FOR UPDATE SKIP LOCKED)"
        " SELECT 0 AS part, NULL::float8 AS due_in, now() AS now, * FROM locked"
        " UNION ALL SELECT 1, extract(epoch FROM"
        f" (SELECT min(available_at) FROM tasks WHERE {where} AND available_at > now()"
        "  AND id NOT IN (SELECT id FROM locked)) - now())::float8, now(),"
        f" {_NULLS} WHERE (SELECT count(*) FROM locked) < ?"
        " ORDER BY part, priority DESC, created_at, id"
    )


async def lock_ready(db: Driver, lock: LockReady) -> LockedHeads:
    """The claims of a node's write (:class:`LockReady`): BEGIN, then the best ``limit``
    ready rows of each queue (past any backoff by the database's clock, or among
    ``ready``, which the writer holds as past theirs by its own clock), in claim order,
    each locked ``FOR UPDATE SKIP LOCKED`` to the commit: a row another node's
    transaction holds (its claim, or any write of it) is passed over, never waited for, so
    two nodes' claims never take one task nor wait for each other. The rows come back
    whole, as locked (the row's latest version: what a write fenced by its version
    changes), in the same round trip; the writer is answered their keys, and the tasks it
    does not hold at their version (``known``) in full, with their runs (read in the same
    transaction, which stays open for the write: :meth:`Driver.begin`, and only for tasks
    that have runs); and, for each queue it took fewer than ``limit`` rows of, when its
    next task still in a backoff comes due (:func:`_lock_sql`).

    Due by the database's clock, not the writer's: every node then agrees on when a task
    comes due whatever its own clock says (the end of a backoff is stored by that clock
    too: the database's time plus the span, as the node that set it reckons that time
    from its last reading of it, this lock's ``now`` among them).
    """
    statements = []
    for head in lock.heads:
        where, queue = _queue_where(
            head.task_type, requires_text(head.requires), head.concurrency_key
        )
        params = (*queue, list(lock.ready), lock.limit, *queue, lock.limit)
        statements.append((_lock_sql(where), params))
    found = await db.begin(statements)
    heads: list[tuple[QueueHead, tuple[tuple[str, int, int, datetime], ...]]] = []
    due_in: list[tuple[QueueHead, float]] = []
    now: datetime | None = None
    tasks: list[Task] = []
    with_runs: list[str] = []
    for head, rows in zip(lock.heads, found, strict=True):
        keys: list[tuple[str, int, int, datetime]] = []
        for marked in rows:
            if now is None:
                now = _when(marked[2])  # one transaction: one reading for every row
            if marked[0]:  # the marker: when the queue's next backoff ends, if any does
                if marked[1] is not None:
                    due_in.append((head, float(cast(float, marked[1]))))
                continue
            row = marked[3:]
            task_id, version = str(row[0]), int(cast(int, row[-2]))
            keys.append((task_id, version, int(cast(int, row[4])), _when(row[9])))
            if lock.known.get(task_id) != version:
                tasks.append(task_from_row(row[:-2]))
                if row[-1] or version:
                    with_runs.append(task_id)
        heads.append((head, tuple(keys)))
    runs = await _runs_of(db, with_runs) if with_runs else []
    return LockedHeads(tuple(heads), tuple(tasks), tuple(runs), tuple(due_in), now)


def _when(value: object) -> datetime:
    parsed = parse_time(value)
    assert parsed is not None
    return parsed


#: Above every id :func:`~hive_orchestration._ids.new_id` makes (a version 7 UUID).
_NEW_ID_CEILING = "ffffffff-ffff-7fff-bfff-ffffffffffff"
_ID_PAGE = 256


async def _last_new_id(db: Driver) -> str | None:
    """The greatest id of the form ``new_id`` makes (which compare in the order they were
    made), down the primary key: no rowid here to find the last rows inserted by, and an
    id of another form (given by an app) may sort anywhere, so those are passed over."""
    sql, bound = "SELECT id FROM tasks WHERE id <= ? ORDER BY id DESC LIMIT ?", _NEW_ID_CEILING
    while True:
        rows = await db.fetchall(sql, (bound, _ID_PAGE))
        for (id_,) in rows:
            if is_new_id(str(id_)):
                return str(id_)
        if len(rows) < _ID_PAGE:
            return None
        sql, bound = "SELECT id FROM tasks WHERE id < ? ORDER BY id DESC LIMIT ?", str(rows[-1][0])


async def _all_queues(db: Driver) -> list[QueueHead]:
    rows = await db.fetchall(_QUEUES)
    return [
        QueueHead(str(task_type), _parse_requires(requires), cast("str | None", key))
        for task_type, requires, key in rows
    ]


async def _head(db: Driver, head: QueueHead, limit: int) -> list[Row]:
    select, queue = _queue(head.task_type, requires_text(head.requires), head.concurrency_key)
    if head.after is None:
        sql = f"{select} ORDER BY {_QUEUE_ORDER} LIMIT ?"
        return await db.fetchall(sql, (*queue, limit))
    priority, created_at, task_id = head.after
    # After (p, c, i): the rest of priority p after (c, i), then the lower priorities.
    same = (
        f"{select} AND priority = ? AND (created_at, id) > (?, ?) ORDER BY {_QUEUE_ORDER} LIMIT ?"
    )
    rows = await db.fetchall(same, (*queue, priority, _text(created_at), task_id, limit))
    if len(rows) < limit:
        lower = f"{select} AND priority < ? ORDER BY {_QUEUE_ORDER} LIMIT ?"
        rows += await db.fetchall(lower, (*queue, priority, limit - len(rows)))
    return rows


async def _runs_of(db: Driver, task_ids: Sequence[str]) -> list[Run]:
    if not task_ids:
        return []
    rows = await db.fetchall(
        f"SELECT {RUN_COLUMNS} FROM runs WHERE task_id = ANY(?) ORDER BY task_id, run_number, id",
        (list(task_ids),),
    )
    return [run_from_row(row) for row in rows]


def _text(value: datetime) -> str:
    text = time_text(value)
    assert text is not None
    return text


def _parse_requires(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    return tuple(cast("list[str]", msgspec.json.decode(str(value))))


def _takes(task_type: object, requires: tuple[str, ...], capabilities: Sequence[str]) -> bool:
    """Whether a worker that can do ``capabilities`` takes the queue's tasks (as
    :func:`~hive_orchestration.actors.task_manager.ready.can_take`)."""
    if requires:
        return all(need in capabilities for need in requires)
    return task_type in capabilities
