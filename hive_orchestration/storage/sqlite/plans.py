"""The plan, subtask and planning-queue reads on SQLite (``json_each``, rowid order).

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
from ..plans import (
    PLAN_COLUMNS,
    REQUEST_COLUMNS,
    SUBTASK_COLUMNS,
    plan_from_row,
    request_from_row,
    subtask_from_row,
)
from ..port import Driver
from ..rows import TASK_COLUMNS, task_from_row
from .pages import plan_page_sql, request_page_sql

__all__ = ["check_dependencies", "count_subtasks", "next_planned_task", "query_plans"]

log = logging.getLogger("hive_orchestration.storage")

_encode = msgspec.json.Encoder().encode

# Readiness of many tasks in one statement: each task's subtask row, its dependencies
# (json_each), and the status of each dependency: its row's, or its task's (which the row
# follows an instant later).
_CHECK_DEPENDENCIES = """
SELECT t.id,
       COUNT(dep.value) = SUM(
           CASE WHEN d.status = 'completed' OR dt.status = 'completed' THEN 1 ELSE 0 END
       )
FROM tasks AS t
LEFT JOIN plan_execution AS pe ON pe.plan_id = t.plan_id AND pe.subtask_id = t.subtask_id
LEFT JOIN json_each(COALESCE(pe.dependencies, '[]')) AS dep
LEFT JOIN plan_execution AS d ON d.plan_id = t.plan_id AND d.subtask_id = dep.value
LEFT JOIN tasks AS dt ON dt.id = d.task_id
WHERE t.id IN (SELECT value FROM json_each(?))
GROUP BY t.id
"""

_NEXT_PLANNED = (
    f"SELECT {TASK_COLUMNS} FROM tasks WHERE plan_id = ? AND status = 'queued'"
    " ORDER BY priority DESC, created_at, rowid LIMIT 1"
)

# A ready subtask is counted by its task's status; any other by its own.
_COUNT_SUBTASKS = """
SELECT CASE WHEN pe.status = 'ready' AND t.status IS NOT NULL THEN t.status
            WHEN pe.status = 'pending' AND t.status = 'queued' THEN 'queued'
            ELSE pe.status END AS s,
       COUNT(*)
FROM plan_execution AS pe LEFT JOIN tasks AS t ON t.id = pe.task_id
WHERE pe.plan_id = ?
GROUP BY s
"""


async def check_dependencies(db: Driver, task_ids: Sequence[str]) -> dict[str, bool]:
    rows = await db.fetchall(_CHECK_DEPENDENCIES, (_encode(list(task_ids)).decode(),))
    return {str(task_id): bool(ready) for task_id, ready in rows}


async def next_planned_task(db: Driver, plan_id: str) -> object:
    rows = await db.fetchall(_NEXT_PLANNED, (plan_id,))
    return task_from_row(rows[0]) if rows else None


async def count_subtasks(db: Driver, plan_id: str) -> dict[str, int]:
    rows = await db.fetchall(_COUNT_SUBTASKS, (plan_id,))
    return {str(status): cast(int, count) for status, count in rows}


async def query_plans(db: Driver, message: StorageMessage) -> object:
    """A message of :data:`~hive_orchestration.storage.port.PLAN_READS`."""
    plan_sql = f"SELECT {PLAN_COLUMNS} FROM execution_plans"
    request_sql = f"SELECT {REQUEST_COLUMNS} FROM planning_queue"
    match message:
        case FetchPlan(plan_id=plan_id):
            rows = await db.fetchall(f"{plan_sql} WHERE id = ?", (plan_id,))
            return plan_from_row(rows[0]) if rows else None
        case QueryPlans(status=status, limit=limit, after=after):
            rows = await db.fetchall(*await plan_page_sql(db, plan_sql, status, limit, after))
            return [plan_from_row(row) for row in rows]
        case TakePlan():
            return True  # one runtime owns a SQLite file and drives all its plans
        case LoadActivePlans():
            rows = await db.fetchall(
                f"{plan_sql} WHERE status = 'executing' OR (status IN ('failed', 'cancelled')"
                " AND id IN (SELECT plan_id FROM tasks WHERE plan_id IS NOT NULL"
                " AND status IN ('blocked', 'queued', 'assigned', 'running')))"
                " ORDER BY generated_at, rowid"
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
                f"SELECT {SUBTASK_COLUMNS} FROM plan_execution WHERE plan_id = ? ORDER BY rowid",
                (plan_id,),
            )
            return tuple(subtask_from_row(row) for row in rows)
        case LoadPlanTasks(plan_id=plan_id):
            rows = await db.fetchall(
                "SELECT id, subtask_id, status FROM tasks WHERE plan_id = ?", (plan_id,)
            )
            return tuple((str(a), str(b), str(c)) for a, b, c in rows)
        case FetchPlanningRequest(request_id=request_id):
            rows = await db.fetchall(f"{request_sql} WHERE id = ?", (request_id,))
            return request_from_row(rows[0]) if rows else None
        case QueryPlanningRequests(status=status, limit=limit, after=after):
            statement = await request_page_sql(db, request_sql, status, limit, after)
            return [request_from_row(row) for row in await db.fetchall(*statement)]
        case LoadPlanningRequests(statuses=statuses, limit=limit):
            rows = await db.fetchall(
                f"{request_sql} WHERE status IN ({_marks(statuses)})"
                " ORDER BY priority DESC, created_at, rowid LIMIT ?",
                (*statuses, -1 if limit is None else limit),  # LIMIT -1: no limit
            )
            return tuple(request_from_row(row) for row in rows)
        case CheckDependencies(task_ids=task_ids):
            return await check_dependencies(db, task_ids)
        case NextPlannedTask(plan_id=plan_id):
            return await next_planned_task(db, plan_id)
        case CountSubtasks(plan_id=plan_id):
            return await count_subtasks(db, plan_id)
    raise HiveError(f"the storage actor does not handle {type(message).__name__}")


def _marks(values: tuple[str, ...]) -> str:
    return ", ".join("?" * len(values))
