"""The plan, subtask and planning-queue reads on PostgreSQL: the twin of
``storage/sqlite/plans.py``, with ``jsonb_array_elements_text`` for SQLite's
``json_each`` and the time-ordered ids for its rowid order.

Rows to and from plans are every store's (``storage/plans.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import cast

import msgspec

from ...errors import HiveError
from ...messages.storage import (
    CheckDependencies,
    CountSubtasks,
    FetchPlan,
    FetchPlanningRequest,
    LoadActivePlans,
    LoadPlanningRequests,
    LoadPlanTasks,
    LoadSubtasks,
    NextPlannedTask,
    QueryPlanningRequests,
    QueryPlans,
    StorageMessage,
    TakePlan,
)
from .. import pages
from ..plans import (
    PLAN_COLUMNS,
    REQUEST_COLUMNS,
    SUBTASK_COLUMNS,
    plan_from_row,
    request_from_row,
    subtask_from_row,
)
from ..port import Driver, Row
from ..rows import TASK_COLUMNS, task_from_row
from .claim import NODE_SETTING, recoverable_sql
from .pages import PAGE_SQL

# A plan is driven by one node: the one that created it (``execution_plans.node_id``,
# stamped by a trigger from the writer's session, schema version 15) while it lives, else
# the first to take it. Autocommitted on the write connection, where the node is named;
# the row lock makes two nodes taking a dead node's plan at once take it once.
_TAKE_PLAN = (
    f"UPDATE execution_plans SET node_id = current_setting('{NODE_SETTING}', true)"
    f" WHERE id = ? AND {recoverable_sql()} RETURNING 1"
)

__all__ = ["check_dependencies", "count_subtasks", "next_planned_task", "query_plans"]

log = logging.getLogger("hive_orchestration.storage")

# Readiness of many tasks in one statement: each task's subtask row, its dependencies
# (the JSON list, as rows), and the status of each dependency: its row's, or its task's
# (which the row follows an instant later).
_CHECK_DEPENDENCIES = """
SELECT t.id,
       COUNT(dep.value) = SUM(
           CASE WHEN d.status = 'completed' OR dt.status = 'completed' THEN 1 ELSE 0 END
       )
FROM tasks AS t
LEFT JOIN plan_execution AS pe ON pe.plan_id = t.plan_id AND pe.subtask_id = t.subtask_id
LEFT JOIN LATERAL jsonb_array_elements_text(COALESCE(pe.dependencies, '[]')::jsonb)
    AS dep(value) ON true
LEFT JOIN plan_execution AS d ON d.plan_id = t.plan_id AND d.subtask_id = dep.value
LEFT JOIN tasks AS dt ON dt.id = d.task_id
WHERE t.id = ANY(?)
GROUP BY t.id
"""

_NEXT_PLANNED = (
    f"SELECT {TASK_COLUMNS} FROM tasks WHERE plan_id = ? AND status = 'queued'"
    " ORDER BY priority DESC, created_at, id LIMIT 1"
)

# A ready subtask is counted by its task's status; any other by its own.
_COUNT_SUBTASKS = """
SELECT CASE WHEN pe.status = 'ready' AND t.status IS NOT NULL THEN t.status
            WHEN pe.status = 'pending' AND t.status = 'queued' THEN 'queued'
            ELSE pe.status END AS s,
       COUNT(*)
FROM plan_execution AS pe LEFT JOIN tasks AS t ON t.id = pe.task_id
WHERE pe.plan_id = ?
GROUP BY 1
"""


async def check_dependencies(db: Driver, task_ids: Sequence[str]) -> dict[str, bool]:
    rows = await db.fetchall(_CHECK_DEPENDENCIES, (list(task_ids),))
    return {str(task_id): bool(ready) for task_id, ready in rows}


async def next_planned_task(db: Driver, plan_id: str) -> object:
    rows = await db.fetchall(_NEXT_PLANNED, (plan_id,))
    return task_from_row(rows[0]) if rows else None


async def count_subtasks(db: Driver, plan_id: str) -> dict[str, int]:
    rows = await db.fetchall(_COUNT_SUBTASKS, (plan_id,))
    return {str(status): cast(int, count) for status, count in rows}


async def _in_plan_order(db: Driver, plan_id: str, rows: list[Row]) -> list[Row]:
    """A plan's subtask rows in the order its plan lists them: the order SQLite gives by
    rowid (the rows are written in that order when the plan starts), where PostgreSQL
    has no insertion order to read. Rows the plan does not list come last, by id."""
    found = await db.fetchall("SELECT plan_data FROM execution_plans WHERE id = ?", (plan_id,))
    order: dict[str, int] = {}
    try:
        data = msgspec.json.decode(str(found[0][0])) if found else None
    except msgspec.DecodeError:
        data = None
    listed = data.get("subtasks") if isinstance(data, dict) else None
    if isinstance(listed, list):
        for position, item in enumerate(listed):
            if isinstance(item, dict) and isinstance(item.get("id"), str):
                order.setdefault(item["id"], position)
    last = len(order)
    return sorted(rows, key=lambda row: (order.get(str(row[2]), last), str(row[0])))


async def query_plans(db: Driver, message: StorageMessage) -> object:
    """A message of :data:`~hive_orchestration.storage.port.PLAN_READS`."""
    plan_sql = f"SELECT {PLAN_COLUMNS} FROM execution_plans"
    request_sql = f"SELECT {REQUEST_COLUMNS} FROM planning_queue"
    match message:
        case FetchPlan(plan_id=plan_id):
            rows = await db.fetchall(f"{plan_sql} WHERE id = ?", (plan_id,))
            return plan_from_row(rows[0]) if rows else None
        case QueryPlans(status=status, limit=limit, after=after):
            rows = await db.fetchall(
                *await pages.plan_page_sql(PAGE_SQL, db, plan_sql, status, limit, after)
            )
            return [plan_from_row(row) for row in rows]
        case TakePlan(plan_id=plan_id):
            return bool(await db.fetchall(_TAKE_PLAN, (plan_id,)))
        case LoadActivePlans():
            rows = await db.fetchall(
                f"{plan_sql} WHERE status = 'executing' OR (status IN ('failed', 'cancelled')"
                " AND id IN (SELECT plan_id FROM tasks WHERE plan_id IS NOT NULL"
                " AND status IN ('blocked', 'queued', 'assigned', 'running')))"
                " ORDER BY generated_at, id"
            )
            active = []
            for row in rows:
                try:
                    active.append(plan_from_row(row))
                except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
                    # One bad row must not keep the runtime from opening.
                    log.error("plan %s cannot be decoded, not resumed: %s", row[0], exc)
            return tuple(active)
        case LoadSubtasks(plan_id=plan_id):
            rows = await db.fetchall(
                f"SELECT {SUBTASK_COLUMNS} FROM plan_execution WHERE plan_id = ? ORDER BY id",
                (plan_id,),
            )
            return tuple(subtask_from_row(row) for row in await _in_plan_order(db, plan_id, rows))
        case LoadPlanTasks(plan_id=plan_id):
            rows = await db.fetchall(
                "SELECT id, subtask_id, status FROM tasks WHERE plan_id = ?", (plan_id,)
            )
            return tuple((str(a), str(b), str(c)) for a, b, c in rows)
        case FetchPlanningRequest(request_id=request_id):
            rows = await db.fetchall(f"{request_sql} WHERE id = ?", (request_id,))
            return request_from_row(rows[0]) if rows else None
        case QueryPlanningRequests(status=status, limit=limit, after=after):
            statement = await pages.request_page_sql(
                PAGE_SQL, db, request_sql, status, limit, after
            )
            return [request_from_row(row) for row in await db.fetchall(*statement)]
        case LoadPlanningRequests(statuses=statuses, limit=limit):
            rows = await db.fetchall(
                f"{request_sql} WHERE status = ANY(?) ORDER BY priority DESC, created_at, id"
                " LIMIT ?",
                (list(statuses), limit),  # LIMIT NULL: no limit
            )
            return tuple(request_from_row(row) for row in rows)
        case CheckDependencies(task_ids=task_ids):
            return await check_dependencies(db, task_ids)
        case NextPlannedTask(plan_id=plan_id):
            return await next_planned_task(db, plan_id)
        case CountSubtasks(plan_id=plan_id):
            return await count_subtasks(db, plan_id)
    raise HiveError(f"the storage actor does not handle {type(message).__name__}")
