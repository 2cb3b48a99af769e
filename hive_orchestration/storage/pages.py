"""The statements of listing pages from a cursor (see ``hive_orchestration/listing.py``),
every store's: each gives its few spellings as a :class:`PageSql` (``storage/sqlite/pages.py``,
``storage/pg/pages.py``).

The task listing's order is (priority DESC, created_at, id), and the cursor's key is
its last task's. "After the key" is an OR over that order (a lower priority, or the same
one and a later (created_at, id)), which SQLite cannot turn into one range of an index:
it would read the status's tasks from the start to the cursor, O(position) a page. So a
page is two ranges of ``idx_tasks_status_order`` (schema version 8), each in index order
and at most ``limit`` long: the rest of the cursor's priority, then the lower priorities.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ..errors import InvalidInputError
from ..messages.plans import PlanStatus
from .port import Driver, Statement
from .rows import TASK_COLUMNS, time_text

__all__ = ["PageSql", "plan_page_sql", "request_page_sql", "tasks_page_sql"]


@dataclass(frozen=True, slots=True)
class PageSql:
    """What a store spells its own way in a page's statement."""

    #: The LIMIT bound that means "no limit" (SQLite's -1; PostgreSQL's NULL).
    no_limit: int | None
    #: The names given to the task page's two subqueries (PostgreSQL requires them).
    same_priority: str
    lower_priorities: str


def tasks_page_sql(
    spelling: PageSql,
    status: str,
    task_type: str | None,
    after: tuple[int, datetime, str],
    limit: int | None,
) -> Statement:
    priority, created_at, task_id = after
    typed = "" if task_type is None else " AND task_type = ?"
    kind: tuple[object, ...] = () if task_type is None else (task_type,)
    count = spelling.no_limit if limit is None else limit
    same = (
        f"SELECT {TASK_COLUMNS} FROM tasks WHERE status = ?{typed} AND priority = ?"
        " AND (created_at, id) > (?, ?) ORDER BY created_at, id LIMIT ?"
    )
    lower = (
        f"SELECT {TASK_COLUMNS} FROM tasks WHERE status = ?{typed} AND priority < ?"
        " ORDER BY priority DESC, created_at, id LIMIT ?"
    )
    sql = (
        f"SELECT * FROM ({same}){spelling.same_priority}"
        f" UNION ALL SELECT * FROM ({lower}){spelling.lower_priorities}"
        " ORDER BY priority DESC, created_at, id LIMIT ?"
    )
    same_params = (status, *kind, priority, time_text(created_at), task_id, count)
    lower_params = (status, *kind, priority, count)
    return sql, (*same_params, *lower_params, count)


async def _cursor(db: Driver, sql: str, after: str, what: str) -> list[object]:
    """The order keys of the cursor's row; an InvalidInputError naming ``after`` if no row
    has that id. The keys never change, so a later statement may use them."""
    rows = await db.fetchall(sql, (after,))
    if not rows:
        raise InvalidInputError(
            "after",
            f"no {what} has the id {after!r}: pass the id of the last {what} of the previous"
            " page, or start again without after",
        )
    return list(rows[0])


async def plan_page_sql(
    spelling: PageSql,
    db: Driver,
    select: str,
    status: PlanStatus | None,
    limit: int | None,
    after: str | None,
) -> Statement:
    """Plans newest first: (generated_at, id) descending, from after the cursor."""
    where: list[str] = []
    params: list[object] = []
    if status is not None:
        where.append("status = ?")
        params.append(status.value)
    if after is not None:
        key = await _cursor(
            db, "SELECT generated_at, id FROM execution_plans WHERE id = ?", after, "plan"
        )
        where.append("(generated_at, id) < (?, ?)")
        params += key
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    params.append(spelling.no_limit if limit is None else limit)
    return f"{select}{clause} ORDER BY generated_at DESC, id DESC LIMIT ?", tuple(params)


async def request_page_sql(
    spelling: PageSql,
    db: Driver,
    select: str,
    status: str | None,
    limit: int | None,
    after: str | None,
) -> Statement:
    """Planning requests by priority (highest first), then age, then id, from after the
    cursor. Few rows wait in a planning queue: one OR, no two-range split as for tasks."""
    where: list[str] = []
    params: list[object] = []
    if status is not None:
        where.append("status = ?")
        params.append(status)
    if after is not None:
        priority, created_at, request_id = await _cursor(
            db,
            "SELECT priority, created_at, id FROM planning_queue WHERE id = ?",
            after,
            "planning request",
        )
        where.append("(priority < ? OR (priority = ? AND (created_at, id) > (?, ?)))")
        params += [priority, priority, created_at, request_id]
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    params.append(spelling.no_limit if limit is None else limit)
    return f"{select}{clause} ORDER BY priority DESC, created_at, id LIMIT ?", tuple(params)
