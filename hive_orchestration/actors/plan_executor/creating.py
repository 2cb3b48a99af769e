"""A plan is created: its rows, its ``plan.created``, and the planning request it answers.

Every plan answers a planning request: the one named (``planned`` with the plan, if it is
still open), or one made for it, already planned. On one node the plan's rows join the
batch's write; on a store several nodes share, the request's ``planned`` status, the plan,
its subtasks and ``plan.created`` are one write fenced by the request as read
(:mod:`.planning`), so that two nodes never both answer one request.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

import msgspec

from ..._ids import new_id
from ...errors import StorageError
from ...messages.events import JsonValue
from ...messages.plans import (
    CreatePlan,
    ExecutionPlan,
    PlanningRequest,
    PlanningStatus,
    PlanStatus,
)
from ...messages.storage import PutPlan, PutPlanningRequest, PutSubtask
from .planning import ATTEMPTS, find_request, request_changed, write_fenced
from .progress import plan_event
from .state import _REQUEST_OPEN, _Plan, _Work

if TYPE_CHECKING:
    from .actor import PlanExecutor

__all__ = ["create_plan"]


async def create_plan(
    pe: PlanExecutor, message: CreatePlan, work: _Work, now: datetime
) -> ExecutionPlan:
    """A new plan (``plan.created``) that answers its planning request, or one made for it."""
    plan_id = new_id()
    for _ in range(ATTEMPTS):
        request_id = message.planning_task_id
        own = work
        read: PlanningRequest | None = None
        if request_id is None:
            # Every plan answers a request: one made for it, already planned.
            title = message.plan_data.get("title")
            described = title if isinstance(title, str) and title else "execution plan"
            request = PlanningRequest(
                id=new_id(),
                task_description=described,
                requestor=message.source_agent,
                status=PlanningStatus.PLANNED,
                completed_at=now,
                created_at=now,
            )
            work.ops.append(PutPlanningRequest(request))
            request_id = request.id
        else:
            request = await find_request(pe, request_id)
            if request.status.value in _REQUEST_OPEN:
                planned = msgspec.structs.replace(
                    request, status=PlanningStatus.PLANNED, completed_at=now
                )
                pe._requests.pop(request_id, None)
                if pe._shared:
                    # Planned with the plan's own rows in one write fenced by the
                    # request as read (planning.py): another node may end it meanwhile.
                    own, read = _Work(), request
                data: dict[str, JsonValue] = {"plan_id": plan_id}
                request_changed(pe, planned, "planning.planned", data, own, now)
        plan = ExecutionPlan(
            id=plan_id,
            planning_task_id=request_id,
            status=PlanStatus.APPROVED if message.approved else PlanStatus.DRAFT,
            plan_data=message.plan_data,
            subtasks=message.subtasks,
            failure_policy=message.failure_policy,
            estimated_duration=message.estimated_duration,
            estimated_complexity=message.estimated_complexity,
            generated_workflow=message.generated_workflow,
            subtask_count=len(message.subtasks),
            dependency_count=sum(len(spec.dependencies) for spec in message.subtasks),
            source_agent=message.source_agent,
            generated_at=now,
        )
        own.ops.append(PutPlan(plan, message.plan_data_json))
        held = _Plan.build(plan, ())
        created: dict[str, JsonValue] = {
            "status": plan.status.value,
            "planning_task_id": request_id,
            "subtask_count": plan.subtask_count,
            "dependency_count": plan.dependency_count,
            "failure_policy": plan.failure_policy.value,
        }
        own.ops.append(plan_event("plan.created", plan, message.source_agent, created, now))
        if read is None:
            for sub in held.subs.values():
                work.dirty[plan_id, sub.state.subtask_id] = None
        else:
            own.ops += [PutSubtask(sub.state) for sub in held.subs.values()]
            if not await write_fenced(pe, read, own.ops):
                continue  # the request changed on another node: decide again
        pe._plans[plan_id] = held
        pe._cache(plan_id, plan.status)
        return plan
    raise StorageError(
        f"planning request {message.planning_task_id!r} kept changing on other nodes;"
        " no plan was created"
    )
