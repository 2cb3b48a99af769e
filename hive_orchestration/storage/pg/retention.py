"""The storage side of retention (docs/RETENTION.md) on PostgreSQL: the twin of
``storage/sqlite/retention.py`` (no ``INDEXED BY``: the partial index idx_tasks_finished
is chosen by its repeated WHERE term; ``octet_length`` for SQLite's
``length(CAST(x AS BLOB))``). The statements that delete are every store's
(``storage/retention.py``).

Deleting is done by the callers in chunks (one transaction each, a few thousand rows), so
that a purge of a million rows never holds the write connection for long: the storage
actor commits other writers' batches between two chunks. What is read here is read once
per chunk (a purge) or once per trim (the trim's end point), never the whole table in one
transaction of the write connection.
"""

from __future__ import annotations

from datetime import datetime
from typing import cast

from ...messages.storage import EventTrimPlan, FindPurgeable, PlanEventTrim
from ..port import Driver
from ..retention import TERMINAL_SQL
from ..rows import parse_time, time_text

__all__ = ["find_purgeable", "plan_event_trim", "retention_due"]

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
#: An event's size for ``max_bytes``: its text columns' bytes plus 16 for seq and time,
#: as on SQLite (the same figure for the same log, whichever store holds it).
_SIZE_SQL = (
    "octet_length(data) + octet_length(type) + octet_length(source)"
    " + coalesce(length(correlation_id), 0) + coalesce(length(task_id), 0)"
    " + coalesce(length(plan_id), 0) + coalesce(length(worker_id), 0) + 16"
)
_PAGE = 4096


async def find_purgeable(db: Driver, query: FindPurgeable) -> tuple[tuple[str, str | None], ...]:
    where = [TERMINAL_SQL, "updated_at < ?", _PLAN_DONE]
    params: list[object] = [time_text(query.before)]
    where.append(f"status IN ({', '.join('?' * len(query.statuses))})")
    params += query.statuses
    if query.task_type is not None:
        where.append("task_type = ?")
        params.append(query.task_type)
    if not query.include_keyed:
        # A key held only while its task lived ('active') was freed when it ended.
        where.append("(idempotency_key IS NULL OR idempotency_scope = 'active')")
    params.append(query.limit)
    rows = await db.fetchall(
        "SELECT id, idempotency_key FROM tasks"
        f" WHERE {' AND '.join(where)}"
        " ORDER BY updated_at LIMIT ?",
        tuple(params),
    )
    return tuple((str(id_), None if key is None else str(key)) for id_, key in rows)


async def retention_due(db: Driver, include_keyed: bool) -> tuple[datetime | None, float | None]:
    keyed = (
        "" if include_keyed else " AND (idempotency_key IS NULL OR idempotency_scope = 'active')"
    )
    rows = await db.fetchall(
        f"SELECT min(updated_at) FROM tasks WHERE {TERMINAL_SQL}{keyed} AND updated_at IS NOT NULL"
    )
    oldest_task = rows[0][0]
    rows = await db.fetchall(
        "SELECT timestamp FROM events WHERE seq = (SELECT min(seq) FROM events)"
    )
    oldest_event = cast(float, rows[0][0]) if rows else None
    when = parse_time(oldest_task)
    return when, oldest_event


async def plan_event_trim(db: Driver, plan: PlanEventTrim) -> EventTrimPlan:
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
        through = max(through, await _over_bytes(db, last, plan.max_bytes))
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


async def _over_bytes(db: Driver, last: int, max_bytes: int) -> int:
    """The last seq to delete so that the newest events kept weigh at most ``max_bytes``."""
    total = 0
    below = last + 1
    while True:
        rows = await db.fetchall(
            f"SELECT seq, {_SIZE_SQL} FROM events WHERE seq < ? ORDER BY seq DESC LIMIT ?",
            (below, _PAGE),
        )
        if not rows:
            return 0
        for seq, size in rows:
            total += cast(int, size)
            if total > max_bytes:
                return cast(int, seq)
        below = cast(int, rows[-1][0])
