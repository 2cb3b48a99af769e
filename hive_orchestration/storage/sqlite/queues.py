"""The ready queues' reads: the TaskManager's heads, refilled from ``idx_tasks_ready``.

A ready queue is the queued tasks of one (task type, requirement list, concurrency key),
in claim order: priority highest first, then ``created_at``, then id (time-ordered ids:
creation order). The TaskManager keeps the best tasks of each queue in memory and asks
for the next ones after the last it holds; each ask is a range scan of the partial index
``idx_tasks_ready`` (schema version 9), whatever the size of the backlog. A read of
heads runs whole on the connection's thread (a :data:`~..port.ReadJob`: its statements
in one read transaction), on a reader of its own for a refill (``storage/readers.py``),
so the commits do not wait for it; its rows are decoded on the loop, a slice at a time.
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
    QueryUnroutable,
    QueueHead,
    QueueHeads,
    StorageMessage,
    StoreFences,
    TasksWithRuns,
)
from ...messages.tasks import Run, Task
from ..port import Driver, ReadJob, Row, Statement
from ..rows import (
    RUN_COLUMNS,
    TASK_COLUMNS,
    decoded,
    parse_time,
    run_from_row,
    task_from_row,
    time_text,
)

__all__ = ["QUEUE_QUERIES", "query_queues", "requires_text"]

QUEUE_QUERIES = (FetchTasks, LoadQueueHeads, QueryUnroutable, LoadTimers, LoadStarts, LastTaskId)
#: Under SQLite's oldest limit on bound parameters (999).
_IDS_PER_QUERY = 500
_encode = msgspec.json.Encoder().encode
# Each condition names the partial index's own WHERE (status = 'queued', and no start
# time still to come: a delayed task joins the index when it comes due) so that the
# planner may use it, and the queue's three columns by equality (IS: they may be NULL).
_READY = "status = 'queued' AND run_at IS NULL"
_QUEUE = (
    f"SELECT {TASK_COLUMNS} FROM tasks WHERE {_READY}"
    " AND task_type = ? AND requires IS ? AND concurrency_key IS ?"
)
_FIRST = f"{_QUEUE} ORDER BY priority DESC, created_at, id LIMIT ?"
# After (p, c, i): the rest of priority p after (c, i), then the lower priorities. Two
# range scans, as the index is ordered (priority DESC, created_at, id).
_SAME_PRIORITY = (
    f"{_QUEUE} AND priority = ? AND (created_at, id) > (?, ?) ORDER BY created_at, id LIMIT ?"
)
_LOWER = f"{_QUEUE} AND priority < ? ORDER BY priority DESC, created_at, id LIMIT ?"
_QUEUES = (
    "SELECT DISTINCT task_type, requires, concurrency_key FROM tasks"
    f" INDEXED BY idx_tasks_ready WHERE {_READY}"
)
_ROUTES = (
    f"SELECT DISTINCT task_type, requires FROM tasks INDEXED BY idx_tasks_ready WHERE {_READY}"
)
# The earliest start times (expiries) of queued tasks after a (time, id), in that order:
# a range scan of idx_tasks_delayed (idx_tasks_expiring).
_TIMERS = {
    "run_at": (
        "SELECT id, run_at, created_at FROM tasks INDEXED BY idx_tasks_delayed"
        " WHERE status = 'queued' AND run_at IS NOT NULL AND (run_at, id) > (?, ?)"
        " ORDER BY run_at, id LIMIT ?"
    ),
    "expires_at": (
        "SELECT id, expires_at, created_at FROM tasks INDEXED BY idx_tasks_expiring"
        " WHERE status = 'queued' AND expires_at IS NOT NULL AND (expires_at, id) > (?, ?)"
        " ORDER BY expires_at, id LIMIT ?"
    ),
}
_OF_ROUTE = (
    f"SELECT {TASK_COLUMNS} FROM tasks WHERE status = 'queued'"
    " AND task_type = ? AND requires IS ? ORDER BY priority DESC, created_at, id"
)


def requires_text(requires: Sequence[str]) -> str | None:
    """The ``requires`` column of a task that requires ``requires`` (as ``rows`` writes it)."""
    return _encode(list(requires)).decode() if requires else None


async def query_queues(db: Driver, message: StorageMessage) -> object:
    match message:
        case LoadQueueHeads(heads=heads, limit=limit):
            # One read transaction, run whole on the connection's thread: a reader's, for a
            # refill (storage/actor.py), so no commit waits for it. Decoded here, a slice
            # at a time (rows.decoded): decoded on the reader's thread, the rows held the
            # GIL there in turns of the switch interval (5 ms), which the loop waited out.
            read, run_rows = await db.snapshot(_load_heads(heads, limit))
            loaded = [(head, tuple(await decoded(rows, task_from_row))) for head, rows in read]
            runs = await decoded(run_rows, run_from_row)
            return QueueHeads(tuple(loaded), tuple(runs))
        case FetchTasks(task_ids=task_ids):
            tasks: list[Task] = []
            for start in range(0, len(task_ids), _IDS_PER_QUERY):
                chunk = task_ids[start : start + _IDS_PER_QUERY]
                marks = ", ".join("?" * len(chunk))
                sql = f"SELECT {TASK_COLUMNS} FROM tasks WHERE id IN ({marks})"
                tasks += [task_from_row(row) for row in await db.fetchall(sql, chunk)]
            runs = await _runs_of(db, [task.id for task in tasks])
            return TasksWithRuns(tuple(tasks), tuple(runs))
        case QueryUnroutable(capability_sets=sets, limit=limit, after=after):
            stuck: list[Task] = []
            for task_type, requires in await db.fetchall(_ROUTES):
                needs = _parse_requires(requires)
                if any(_takes(task_type, needs, caps) for caps in sets):
                    continue
                rows = await db.fetchall(_OF_ROUTE, (task_type, requires))
                stuck += [task_from_row(row) for row in rows]
            if after is not None:
                bound = (-after[0], after[1], after[2])
                stuck = [t for t in stuck if (-t.priority, t.created_at, t.id) > bound]
            stuck.sort(key=lambda task: (-task.priority, task.created_at, task.id))
            return stuck if limit is None else stuck[:limit]
        case DatabaseClock():
            return None  # one owner: its own clock is the only one
        case StoreFences():
            return False  # one owner: its memory is the truth, nothing to fence
        case LastTaskId():
            # The last rows inserted, by the table's own b-tree: the open reads no index
            # it does not need (a damaged one fails only what uses it). Ids are made in
            # insertion order (each process makes its ids greater than those before it),
            # so the greatest is among them, but for the few a batch made out of order.
            rows = await db.fetchall("SELECT id FROM tasks ORDER BY rowid DESC LIMIT 64")
            return max((str(r[0]) for r in rows if is_new_id(str(r[0]))), default=None)
        case LoadStarts(task_types=types, keys=keys, since=since):
            marks = ", ".join("?" * len(types))
            key_marks = ", ".join("?" * len(keys))
            sql = (
                "SELECT t.task_type, t.concurrency_key, r.started_at"
                " FROM runs r INDEXED BY idx_runs_started JOIN tasks t ON t.id = r.task_id"
                " WHERE r.lease_seconds IS NOT NULL AND r.started_at >= ?"
                f" AND (t.task_type IN ({marks}) OR t.concurrency_key IN ({key_marks}))"
                " ORDER BY r.started_at"
            )
            rows = await db.fetchall(sql, (_text(since), *types, *keys))
            return tuple(
                (str(kind), cast("str | None", key), cast(datetime, parse_time(started)))
                for kind, key, started in rows
            )
        case LoadTimers(column=column, after=after, limit=limit):
            at, task_id = ("", "") if after is None else (_text(after[0]), after[1])
            rows = await db.fetchall(_TIMERS[column], (at, task_id, limit))
            return tuple(
                (str(id_), cast(datetime, parse_time(when)), cast(datetime, parse_time(created)))
                for id_, when, created in rows
            )
    raise TypeError(f"not a queue query: {type(message).__name__}")  # pragma: no cover


def _load_heads(
    heads: tuple[QueueHead, ...] | None, limit: int
) -> ReadJob[tuple[list[tuple[QueueHead, list[Row]]], list[Row]]]:
    """The rows of the next ``limit`` tasks of each of ``heads`` (``None``: every ready
    queue's first), and of their runs, as one :data:`~..port.ReadJob`."""
    if heads is None:
        heads = tuple(
            QueueHead(str(task_type), _parse_requires(requires), cast("str | None", key))
            for task_type, requires, key in (yield (_QUEUES, ()))
        )
    loaded: list[tuple[QueueHead, list[Row]]] = []
    for head in heads:
        queue = (head.task_type, requires_text(head.requires), head.concurrency_key)
        if head.after is None:
            rows = yield (_FIRST, (*queue, limit))
        else:
            priority, created_at, task_id = head.after
            rows = yield (_SAME_PRIORITY, (*queue, priority, _text(created_at), task_id, limit))
            if len(rows) < limit:
                rows += yield (_LOWER, (*queue, priority, limit - len(rows)))
        loaded.append((head, rows))
    ids = [str(row[0]) for _, rows in loaded for row in rows]  # TASK_COLUMNS: id first
    runs: list[Row] = []
    for start in range(0, len(ids), _IDS_PER_QUERY):
        runs += yield _runs_statement(ids[start : start + _IDS_PER_QUERY])
    return loaded, runs


async def _runs_of(db: Driver, task_ids: Sequence[str]) -> list[Run]:
    runs: list[Run] = []
    for start in range(0, len(task_ids), _IDS_PER_QUERY):
        rows = await db.fetchall(*_runs_statement(task_ids[start : start + _IDS_PER_QUERY]))
        runs += await decoded(rows, run_from_row)
    return runs


def _runs_statement(task_ids: Sequence[str]) -> Statement:
    marks = ", ".join("?" * len(task_ids))
    sql = (
        f"SELECT {RUN_COLUMNS} FROM runs WHERE task_id IN ({marks})"
        " ORDER BY task_id, run_number, rowid"
    )
    return sql, tuple(task_ids)


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
