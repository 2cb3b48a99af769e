"""The storage side of retention (docs/RETENTION.md) that every store shares: the
statements that delete a purged task's events and trim the log, how far it was trimmed,
and the reads of what a purge may take and where a trim ends. Those reads differ between
stores only in a few spellings (:class:`RetentionSql`), which each store gives from its
own ``retention.py`` (``storage/sqlite/``, ``storage/pg/``).

Deleting is done by the callers in chunks (one transaction each, a few thousand rows), so
that a purge of a million rows never holds the write connection for long: the storage
actor commits other writers' batches between two chunks. What is read here is read once
per chunk (a purge) or once per trim (the trim's end point), never the whole table in one
transaction of the write connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import cast

from ..errors import HiveError
from ..messages.storage import (
    EventTrimPlan,
    FindPurgeable,
    PlanEventTrim,
    RetentionDue,
    StorageMessage,
)
from ..messages.tasks import TERMINAL
from .port import Driver, Statement
from .rows import parse_time, time_text

__all__ = [
    "RetentionSql",
    "delete_events_statements",
    "find_purgeable",
    "plan_event_trim",
    "query_retention",
    "retention_due",
    "trim_statements",
    "trimmed_through",
]

#: The terminal statuses, as each store's ``RetentionSql.terminal`` names them.
assert {s.value for s in TERMINAL} == {"completed", "failed", "cancelled", "timed_out"}

_STATE_SQL = "SELECT trimmed_through FROM event_log WHERE id = 1"
_TRIM_SQL = "DELETE FROM events WHERE seq <= ?"
# The mark only moves forward (a CASE, not SQLite's two-argument max(), so that the
# statement is the same on every store).
_REMEMBER_SQL = (
    "INSERT INTO event_log (id, trimmed_through) VALUES (1, ?)"
    " ON CONFLICT (id) DO UPDATE SET trimmed_through = CASE"
    " WHEN excluded.trimmed_through > event_log.trimmed_through"
    " THEN excluded.trimmed_through ELSE event_log.trimmed_through END"
)
_DELETE_EVENTS_SQL = "DELETE FROM events WHERE task_id = ?"


async def trimmed_through(db: Driver) -> int:
    """How far the log was trimmed (0: never)."""
    rows = await db.fetchall(_STATE_SQL)
    return cast(int, rows[0][0]) if rows else 0


def trim_statements(through: int) -> list[Statement]:
    return [(_TRIM_SQL, (through,)), (_REMEMBER_SQL, (through,))]


def delete_events_statements(task_ids: tuple[str, ...]) -> list[Statement]:
    return [(_DELETE_EVENTS_SQL, (task_id,)) for task_id in task_ids]


@dataclass(frozen=True, slots=True)
class RetentionSql:
    """What a store spells its own way in the retention reads."""

    #: The FROM of the reads of finished tasks: ``tasks``, with whatever makes the store's
    #: planner use the partial index idx_tasks_finished (the WHERE repeats its term).
    finished_tasks: str
    #: The terminal statuses as a WHERE term, written exactly as the condition of the
    #: store's partial index idx_tasks_finished: a planner uses a partial index only for
    #: a query that repeats its condition.
    terminal: str
    #: An event's size for ``max_bytes``, an expression over the events row: its text
    #: columns' bytes plus 16 for seq and time (the same figure on every store).
    event_size: str


_LIVE_SQL = "('blocked', 'queued', 'assigned', 'running')"
# A plan's tasks are its subtasks' results, read by its later steps and its status: they
# stay while the plan has not ended, or while any task of it is still live (a failed plan
# whose cancelled-but-running tasks have not ended yet).
# Correlated, both: a lookup by key per candidate, never a list of every ended plan.
_PLAN_DONE = (
    "(plan_id IS NULL OR (EXISTS (SELECT 1 FROM execution_plans AS plan"
    " WHERE plan.id = tasks.plan_id AND plan.status IN ('completed', 'failed', 'cancelled'))"
    f" AND NOT EXISTS (SELECT 1 FROM tasks AS live WHERE live.plan_id = tasks.plan_id"
    f" AND live.status IN {_LIVE_SQL})))"
)
# A key held only while its task lived ('active') was freed when it ended.
_KEY_FREED = "(idempotency_key IS NULL OR idempotency_scope = 'active')"
_PAGE = 4096


async def query_retention(db: Driver, sql: RetentionSql, message: StorageMessage) -> object:
    """A message of the retention family, read with ``sql``'s spellings."""
    match message:
        case FindPurgeable() as find:
            return await find_purgeable(db, sql, find)
        case PlanEventTrim() as plan:
            return await plan_event_trim(db, sql, plan)
        case RetentionDue(include_keyed=include_keyed):
            return await retention_due(db, sql, include_keyed)
    raise HiveError(f"not a retention read: {type(message).__name__}")


async def find_purgeable(
    db: Driver, sql: RetentionSql, query: FindPurgeable
) -> tuple[tuple[str, str | None], ...]:
    where = [sql.terminal, "updated_at < ?", _PLAN_DONE]
    params: list[object] = [time_text(query.before)]
    where.append(f"status IN ({', '.join('?' * len(query.statuses))})")
    params += query.statuses
    if query.task_type is not None:
        where.append("task_type = ?")
        params.append(query.task_type)
    if not query.include_keyed:
        where.append(_KEY_FREED)
    params.append(query.limit)
    rows = await db.fetchall(
        f"SELECT id, idempotency_key FROM {sql.finished_tasks}"
        f" WHERE {' AND '.join(where)}"
        " ORDER BY updated_at LIMIT ?",
        tuple(params),
    )
    return tuple((str(id_), None if key is None else str(key)) for id_, key in rows)


async def retention_due(
    db: Driver, sql: RetentionSql, include_keyed: bool
) -> tuple[datetime | None, float | None]:
    keyed = "" if include_keyed else f" AND {_KEY_FREED}"
    rows = await db.fetchall(
        f"SELECT min(updated_at) FROM {sql.finished_tasks}"
        f" WHERE {sql.terminal}{keyed} AND updated_at IS NOT NULL"
    )
    oldest_task = rows[0][0]
    rows = await db.fetchall(
        "SELECT timestamp FROM events WHERE seq = (SELECT min(seq) FROM events)"
    )
    oldest_event = cast(float, rows[0][0]) if rows else None
    return parse_time(oldest_task), oldest_event


async def plan_event_trim(db: Driver, sql: RetentionSql, plan: PlanEventTrim) -> EventTrimPlan:
    """The last seq to delete: the largest of what each bound asks (each trims a prefix
    of the log in seq order)."""
    rows = await db.fetchall("SELECT coalesce(min(seq), 0), coalesce(max(seq), 0) FROM events")
    first, last = cast(int, rows[0][0]), cast(int, rows[0][1])
    if last == 0:
        return EventTrimPlan(first, 0)
    through = first - 1
    if plan.before is not None:
        through = max(through, await _older_than(db, first, last, plan.before))
    if plan.max_events is not None:
        rows = await db.fetchall(
            "SELECT seq FROM events ORDER BY seq DESC LIMIT 1 OFFSET ?", (plan.max_events,)
        )
        if rows:
            through = max(through, cast(int, rows[0][0]))
    if plan.max_bytes is not None:
        through = max(through, await _over_bytes(db, sql, last, plan.max_bytes))
    return EventTrimPlan(first, through if through >= first else 0)


async def _older_than(db: Driver, first: int, last: int, before: float) -> int:
    """The last seq of the log's prefix older than ``before``, by bisection over seq: the
    log is appended in time order (a clock stepped back can keep a few old events a
    little longer; it never trims a newer one ahead of an older one it keeps)."""
    lo, hi = first - 1, last
    while lo < hi:
        mid = (lo + hi + 1) // 2
        rows = await db.fetchall(
            "SELECT seq, timestamp FROM events WHERE seq >= ? ORDER BY seq LIMIT 1", (mid,)
        )
        if rows and cast(int, rows[0][0]) <= hi and cast(float, rows[0][1]) < before:
            lo = cast(int, rows[0][0])
        else:
            hi = mid - 1
    return lo


async def _over_bytes(db: Driver, sql: RetentionSql, last: int, max_bytes: int) -> int:
    """The last seq to delete so that the newest events kept weigh at most ``max_bytes``."""
    total = 0
    below = last + 1
    while True:
        rows = await db.fetchall(
            f"SELECT seq, {sql.event_size} FROM events WHERE seq < ? ORDER BY seq DESC LIMIT ?",
            (below, _PAGE),
        )
        if not rows:
            return 0
        for seq, size in rows:
            total += cast(int, size)
            if total > max_bytes:
                return cast(int, seq)
        below = cast(int, rows[-1][0])
