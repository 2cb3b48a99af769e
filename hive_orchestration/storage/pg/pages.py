"""The statements of listing pages from a cursor on PostgreSQL: the twin of
``storage/sqlite/pages.py`` (the same two-range pages of ``idx_tasks_status_order``;
``LIMIT NULL`` where SQLite says ``LIMIT -1`` for "no limit", and each subquery named).
"""

from __future__ import annotations

from datetime import datetime

from ...errors import InvalidInputError
from ...messages.plans import PlanStatus
from ..port import Driver, Statement
from ..rows import TASK_COLUMNS, time_text

__all__ = ["plan_page_sql", "request_page_sql", "tasks_page_sql"]


def tasks_page_sql(
    status: str, task_type: str | None, after: tuple[int, datetime, str], limit: int | None
) -> Statement:
    """A page of a status's tasks after the cursor: two ranges of
    ``idx_tasks_status_order`` (the rest of the cursor's priority, then the lower ones),
    as on SQLite (``storage/sqlite/pages.py``)."""
    priority, created_at, task_id = after
    typed = "" if task_type is None else " AND task_type = ?"
    kind: tuple[object, ...] = () if task_type is None else (task_type,)
    same = (
        f"SELECT {TASK_COLUMNS} FROM tasks WHERE status = ?{typed} AND priority = ?"
        " AND (created_at, id) > (?, ?) ORDER BY created_at, id LIMIT ?"
    )
    lower = (
        f"SELECT {TASK_COLUMNS} FROM tasks WHERE status = ?{typed} AND priority < ?"
        " ORDER BY priority DESC, created_at, id LIMIT ?"
    )
    sql = (
        f"SELECT * FROM ({same}) AS same_priority UNION ALL SELECT * FROM ({lower}) AS lower"
        " ORDER BY priority DESC, created_at, id LIMIT ?"
    )
    same_params = (status, *kind, priority, time_text(created_at), task_id, limit)
    lower_params = (status, *kind, priority, limit)
    return sql, (*same_params, *lower_params, limit)


async def _cursor(db: Driver, sql: str, after: str, what: str) -> list[object]:
    rows = await db.fetchall(sql, (after,))
    if not rows:
        raise InvalidInputError(
            "after",
            f"no {what} has the id {after!r}: pass the id of the last {what} of the previous"
            " page, or start again without after",
        )
    return list(rows[0])


async def plan_page_sql(
    db: Driver, select: str, status: PlanStatus | None, limit: int | None, after: str | None
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
    params.append(limit)
    return f"{select}{clause} ORDER BY generated_at DESC, id DESC LIMIT ?", tuple(params)


async def request_page_sql(
    db: Driver, select: str, status: str | None, limit: int | None, after: str | None
) -> Statement:
    """Planning requests by priority (highest first), then age, then id, from after the
    cursor."""
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
    params.append(limit)
    return f"{select}{clause} ORDER BY priority DESC, created_at, id LIMIT ?", tuple(params)
