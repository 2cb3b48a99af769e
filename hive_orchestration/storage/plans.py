"""Plans, subtasks and planning requests to and from rows (every store's; the plan
queries are each store's own: ``storage/sqlite/plans.py``).

Timestamps are ISO-8601 UTC text and JSON columns text, as for tasks (see :mod:`.rows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import msgspec

from ..messages.plans import (
    ExecutionPlan,
    FailurePolicy,
    PlanningRequest,
    PlanningStatus,
    PlanStatus,
    Subtask,
    SubtaskState,
    SubtaskStatus,
)
from ..messages.storage import PutPlan, SetPlanStatus
from .port import Params, Statement
from .rows import EPOCH, parse_json, parse_time, time_text, upsert

__all__ = [
    "PLAN_COLUMNS",
    "REQUEST_COLUMNS",
    "SUBTASK_COLUMNS",
    "plan_from_row",
    "plan_statement",
    "plan_status_statement",
    "request_from_row",
    "request_statement",
    "subtask_from_row",
    "subtask_statement",
]

_encode = msgspec.json.Encoder().encode
_subtasks = msgspec.json.Decoder(list[Subtask])

PLAN_COLUMNS = (
    "id, planning_task_id, plan_data, estimated_duration, estimated_complexity,"
    " generated_workflow, subtask_count, dependency_count, generated_at, status,"
    " failure_policy, source_agent, started_at, completed_at, error"
)
SUBTASK_COLUMNS = (
    "id, plan_id, subtask_id, task_id, status, started_at, completed_at, dependencies, error"
)
REQUEST_COLUMNS = (
    "id, task_description, priority, requestor, context_data, complexity_estimate, status,"
    " assigned_agent, assigned_at, completed_at, created_at, error"
)


# A plan is inserted once; afterwards only its status and times change (SetPlanStatus),
# so its plan data, which may be large, is written once.
_INSERT_PLAN = (
    f"INSERT INTO execution_plans ({PLAN_COLUMNS})"
    f" VALUES ({', '.join('?' * len(PLAN_COLUMNS.split(',')))})"
)
_SET_PLAN_STATUS = (
    "UPDATE execution_plans SET status = ?, started_at = ?, completed_at = ?, error = ?"
    " WHERE id = ?"
)
# A subtask row names its task only while that task exists. A task deleted just before
# the PlanExecutor's write lands is written as NULL, as ON DELETE SET NULL would have made
# it a moment later, instead of failing the whole write on the foreign key (the executor
# hears of the deletion from the task's events and withdraws the subtask).
_PUT_SUBTASK = upsert(
    "plan_execution",
    SUBTASK_COLUMNS,
    values="?, ?, ?, (SELECT id FROM tasks WHERE id = ?), ?, ?, ?, ?, ?",
)
_PUT_REQUEST = upsert("planning_queue", REQUEST_COLUMNS)


def plan_statement(put: PutPlan) -> Statement:
    plan = put.plan
    params: Params = (
        plan.id,
        plan.planning_task_id,
        put.plan_data_json.decode(),
        plan.estimated_duration,
        plan.estimated_complexity,
        plan.generated_workflow,
        plan.subtask_count,
        plan.dependency_count,
        time_text(plan.generated_at),
        plan.status.value,
        plan.failure_policy.value,
        plan.source_agent,
        time_text(plan.started_at),
        time_text(plan.completed_at),
        plan.error,
    )
    return _INSERT_PLAN, params


def plan_status_statement(op: SetPlanStatus) -> Statement:
    return _SET_PLAN_STATUS, (
        op.status.value,
        time_text(op.started_at),
        time_text(op.completed_at),
        op.error,
        op.plan_id,
    )


def plan_from_row(row: Sequence[object]) -> ExecutionPlan:
    (id_, planning_task_id, plan_data, estimated_duration, estimated_complexity,
     generated_workflow, subtask_count, dependency_count, generated_at, status,
     failure_policy, source_agent, started_at, completed_at, error) = row  # fmt: skip
    data = parse_json(plan_data) or {}
    raw: object = data.get("subtasks")
    if isinstance(raw, list):  # rows written by other tools may use the "type" alias
        raw = [_with_task_type(item) for item in raw]
    # Plans stored by this package were checked first; a row that does not decode raises
    # msgspec.ValidationError, which the storage actor reports as a StorageError.
    subtasks = tuple(_subtasks.decode(_encode(raw))) if isinstance(raw, list) else ()
    generated = parse_time(generated_at) or EPOCH
    return ExecutionPlan(
        id=str(id_),
        planning_task_id=str(planning_task_id),
        status=PlanStatus(str(status)),
        plan_data=data,
        subtasks=subtasks,
        failure_policy=FailurePolicy(str(failure_policy)),
        estimated_duration=cast("int | None", estimated_duration),
        estimated_complexity=cast("str | None", estimated_complexity),
        generated_workflow=cast("str | None", generated_workflow),
        subtask_count=cast(int, subtask_count or 0),
        dependency_count=cast(int, dependency_count or 0),
        source_agent=cast("str | None", source_agent),
        generated_at=generated,
        started_at=parse_time(started_at),
        completed_at=parse_time(completed_at),
        error=cast("str | None", error),
    )


def _with_task_type(item: object) -> object:
    if isinstance(item, dict) and "type" in item and "task_type" not in item:
        item = dict(item)
        item["task_type"] = item.pop("type")
    return item


def subtask_statement(state: SubtaskState) -> Statement:
    params: Params = (
        f"{state.plan_id}:{state.subtask_id}",
        state.plan_id,
        state.subtask_id,
        state.task_id,
        state.status.value,
        time_text(state.started_at),
        time_text(state.completed_at),
        _encode(list(state.dependencies)).decode(),
        state.error,
    )
    return _PUT_SUBTASK, params


def subtask_from_row(row: Sequence[object]) -> SubtaskState:
    (_id, plan_id, subtask_id, task_id, status, started_at, completed_at, dependencies,
     error) = row  # fmt: skip
    return SubtaskState(
        plan_id=str(plan_id),
        subtask_id=str(subtask_id),
        task_id=cast("str | None", task_id),
        status=SubtaskStatus(str(status)),
        dependencies=tuple(cast("list[str]", msgspec.json.decode(str(dependencies or "[]")))),
        started_at=parse_time(started_at),
        completed_at=parse_time(completed_at),
        error=cast("str | None", error),
    )


def request_statement(request: PlanningRequest) -> Statement:
    params: Params = (
        request.id,
        request.task_description,
        request.priority,
        request.requestor,
        None if request.context_data is None else _encode(request.context_data).decode(),
        request.complexity_estimate,
        request.status.value,
        request.assigned_agent,
        time_text(request.assigned_at),
        time_text(request.completed_at),
        time_text(request.created_at),
        request.error,
    )
    return _PUT_REQUEST, params


def request_from_row(row: Sequence[object]) -> PlanningRequest:
    (id_, description, priority, requestor, context_data, complexity, status,
     assigned_agent, assigned_at, completed_at, created_at, error) = row  # fmt: skip
    created = parse_time(created_at) or EPOCH
    return PlanningRequest(
        id=str(id_),
        task_description=str(description),
        priority=50 if priority is None else cast(int, priority),
        requestor=cast("str | None", requestor),
        context_data=parse_json(context_data),
        complexity_estimate=cast("str | None", complexity),
        status=PlanningStatus(str(status)),
        assigned_agent=cast("str | None", assigned_agent),
        assigned_at=parse_time(assigned_at),
        completed_at=parse_time(completed_at),
        created_at=created,
        error=cast("str | None", error),
    )
