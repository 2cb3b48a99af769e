"""The statements of listing pages from a cursor (see ``hive_orchestration/listing.py``).

The task listing's order is (priority DESC, created_at, id), and the cursor's key is
its last task's. "After the key" is an OR over that order (a lower priority, or the same
one and a later (created_at, id)), which SQLite cannot turn into one range of an index:
it would read the status's tasks from the start to the cursor, O(position) a page. So a
page is two ranges of ``idx_tasks_status_order`` (schema version 8), each in index order
and at most ``limit`` long: the rest of the cursor's priority, then the lower priorities.
"""

from __future__ import annotations

from datetime import datetime

from .drivers import Statement
from .rows import TASK_COLUMNS, time_text

__all__ = ["tasks_page_sql"]


def tasks_page_sql(
    status: str, task_type: str | None, after: tuple[int, datetime, str], limit: int | None
) -> Statement:
    priority, created_at, task_id = after
    typed = "" if task_type is None else " AND task_type = ?"
    kind: tuple[object, ...] = () if task_type is None else (task_type,)
    count = -1 if limit is None else limit
    same = (
        f"SELECT {TASK_COLUMNS} FROM tasks WHERE status = ?{typed} AND priority = ?"
        " AND (created_at, id) > (?, ?) ORDER BY created_at, id LIMIT ?"
    )
    lower = (
        f"SELECT {TASK_COLUMNS} FROM tasks WHERE status = ?{typed} AND priority < ?"
        " ORDER BY priority DESC, created_at, id LIMIT ?"
    )
    sql = (
        f"SELECT * FROM ({same}) UNION ALL SELECT * FROM ({lower})"
        " ORDER BY priority DESC, created_at, id LIMIT ?"
    )
    same_params = (status, *kind, priority, time_text(created_at), task_id, count)
    lower_params = (status, *kind, priority, count)
    return sql, (*same_params, *lower_params, count)
