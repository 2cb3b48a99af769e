"""Reconciling a plan with the database: the repair that makes recovery work.

A crash between two of the steps a batch applies (:mod:`.actor`) loses nothing: on
start, and whenever its event feed may have missed something, each active plan is
reconciled with the database (tasks are linked to their subtasks, subtasks whose task
ended are settled, ready subtasks still blocked are queued, a plan whose subtasks all
ended is finished). Reconciling is idempotent, so a subtask is never created twice nor
forgotten.

Separate from the rules of :mod:`.progress`, which react to one event: this reads the
plan's tasks back from the database and repairs whatever memory missed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..._plan_steps import PLAN_FAILED, failing, first_failure
from ...messages.plans import SUBTASK_FINAL, PlanStatus, SubtaskStatus
from ...messages.storage import LoadActivePlans, LoadPlanTasks, TakePlan
from ...messages.tasks import CancelTasks
from .state import (
    _NOT_ENDED,
    _NOT_STARTED,
    _STOPPING,
    _TASK_ENDED,
    _TASK_WORKING,
    _executing,
    _Plan,
    _statuses,
    _Work,
)

if TYPE_CHECKING:
    from .actor import PlanExecutor
from .progress import maybe_finish, queue_ready, settle, stop_subtasks, update

log = logging.getLogger("hive_orchestration.plans")


async def reconcile(pe: PlanExecutor, held: _Plan, work: _Work) -> None:
    """Make memory agree with the tasks in the database; idempotent."""
    plan_id = held.plan.id
    now = pe._clock()
    task_status: dict[str, str] = {}
    for task_id, subtask_id, status in await pe._storage.ask(LoadPlanTasks(plan_id)):
        sub = held.subs.get(subtask_id)
        if sub is None:  # pragma: no cover - tasks are only created for known subtasks
            continue
        task_status[subtask_id] = status
        if sub.state.task_id != task_id:
            update(held, sub, work, task_id=task_id)
            held.by_task[task_id] = subtask_id
    if held.failure is None and failing(held.plan.failure_policy, _statuses(held)):
        # Failed fast before a restart, its always-run steps still to end: the cause
        # is read back from the rows, before settling what it cancelled meanwhile.
        cause = first_failure(sub.state for sub in held.subs.values())
        if cause is not None:
            held.failure_subtask, held.failure = cause
    if held.plan.status not in (PlanStatus.DRAFT, PlanStatus.APPROVED):
        # A started plan's subtasks all got their tasks in the write that started it
        # (their rows name them), so an unfinished subtask without a task had it
        # deleted (the row's task_id was set to NULL): it is withdrawn, not re-created.
        for sub in held.subs.values():
            state = sub.state
            if state.status in SUBTASK_FINAL or state.subtask_id in task_status:
                continue
            if state.task_id is not None:
                held.by_task.pop(state.task_id, None)
                update(held, sub, work, task_id=None)
            settle(pe, held, sub, SubtaskStatus.CANCELLED, "its task was deleted", work, now)
    plan_status = held.plan.status
    stray: list[str] = []  # tasks this plan meant to cancel, not cancelled yet
    for subtask_id, status in task_status.items():
        sub = held.subs[subtask_id]
        if sub.state.status in SUBTASK_FINAL:
            if status == "blocked" and sub.state.status is not SubtaskStatus.COMPLETED:
                stray.append(sub.state.task_id or "")
            continue
        if (status in _TASK_WORKING or status == "blocked") and plan_status in _STOPPING.get(
            status, ()
        ):
            stray.append(sub.state.task_id or "")
        ended = _TASK_ENDED.get(status)
        if ended is not None:
            settle(pe, held, sub, ended, None, work, now)
        elif status in _TASK_WORKING and sub.state.status is SubtaskStatus.PENDING:
            update(held, sub, work, status=SubtaskStatus.READY, started_at=now)
    if _executing(held) and failing(held.plan.failure_policy, _statuses(held)):
        # Failed fast, waiting for its always-run steps: what the failure cancels
        # may not all have been cancelled when the process died.
        note = PLAN_FAILED + (held.failure or "a subtask did not complete")
        stop_subtasks(pe, held, _NOT_STARTED, SubtaskStatus.CANCELLED, note, work, now, True)
    if held.plan.status is PlanStatus.EXECUTING:
        for sub in held.subs.values():
            state = sub.state
            if sub.remaining or task_status.get(state.subtask_id, "blocked") != "blocked":
                continue
            if state.status is SubtaskStatus.PENDING:
                queue_ready(held, sub, work, now)
            elif state.status is SubtaskStatus.READY and state.task_id is not None:
                work.release[state.task_id] = (plan_id, state.subtask_id)  # not queued yet
    if stray:
        reason = held.plan.error or f"plan {plan_status.value}"
        statuses = _NOT_ENDED if plan_status is PlanStatus.CANCELLED else _NOT_STARTED
        work.cancels.append(CancelTasks(task_ids=tuple(stray), statuses=statuses, reason=reason))
    maybe_finish(pe, held, work, now)


async def adopt(pe: PlanExecutor, work: _Work) -> int:
    """Take and reconcile the active plans of no live node (:class:`AdoptPlans`)."""
    adopted = 0
    for plan in await pe._storage.ask(LoadActivePlans()):
        if plan.id not in pe._plans and await pe._storage.ask(TakePlan(plan.id)):
            await pe._load(plan, work)
            adopted += 1
    if adopted:
        log.info("plan executor: adopted %d plan(s) of no live node", adopted)
    return adopted
