"""How a plan reacts when one of its subtasks ends: the rules of a plan's progress.

Lifecycle of a subtask. When a plan starts (``mark_plan_execution_started``), every
subtask becomes a task created ``blocked``. A subtask whose dependencies have all
completed is *ready*: its task is queued (``blocked -> queued``, published as
``plan.subtask_ready``) at once, so agents just claim work; no one polls. When a task of
the plan ends, its subtask ends the same way and the plan reacts:

- completed: each dependent whose dependencies are now all complete is queued;
- failed (for good), timed out or cancelled, with the plan's failure policy:
  ``fail_fast`` fails the plan at once and cancels every subtask not yet started
  (running ones finish; their outcome is recorded); ``continue`` skips everything that
  depends on it, transitively (their tasks are cancelled), and lets the rest go on.

A plan whose subtasks have all ended is completed if they all completed, else failed.
A subtask marked ``always_run`` waits for its dependencies to end, whatever their
outcome, instead of to complete; the rules are in :mod:`hive_orchestration._plan_steps`.

These rules change memory (:mod:`.state`) and say what to write and whom to tell in a
batch's :class:`_Work`; the actor (:mod:`.actor`) applies that once the batch is handled.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime
from typing import TYPE_CHECKING

import msgspec

from ..._ids import new_id
from ..._plan_steps import PLAN_FAILED, failure_reason
from ...messages.events import Event, JsonValue
from ...messages.plans import (
    PLAN_FINAL,
    SUBTASK_FINAL,
    ExecutionPlan,
    FailurePolicy,
    PlanStatus,
    SubtaskStatus,
)
from ...messages.storage import AppendEvent, FetchPlan, SetPlanStatus, TakePlan
from ...messages.tasks import CancelTasks, CreateTask, TaskStatus
from .state import _ENDED, _NOT_STARTED, _executing, _Plan, _Sub, _Work

if TYPE_CHECKING:
    from .actor import PlanExecutor


async def on_task_event(pe: PlanExecutor, event: Event, work: _Work, now: datetime) -> None:
    if event.plan_id is None or event.task_id is None:
        return
    held = pe._plans.get(event.plan_id)
    if held is None:
        status = pe._status.get(event.plan_id)
        if status in PLAN_FINAL:
            return  # an ended plan not in memory has no task left running
        # A plan not in memory (a draft whose task was cancelled, say): load it, which
        # reconciles it, this task included; unless another live runtime drives it (a
        # database several nodes share: each follows the whole log).
        if driven_elsewhere(pe, event.plan_id):
            return
        if not await pe._storage.ask(TakePlan(event.plan_id)):
            pe._elsewhere[event.plan_id] = time.monotonic()
            pe._elsewhere.move_to_end(event.plan_id)
            while len(pe._elsewhere) > pe._cache_size:
                pe._elsewhere.popitem(last=False)
            return
        plan = await pe._storage.ask(FetchPlan(event.plan_id))
        if plan is None:
            return
        pe._cache(plan.id, plan.status)
        if plan.status not in PLAN_FINAL and plan.id not in pe._plans:
            await pe._load(plan, work)
        return
    subtask_id = held.by_task.get(event.task_id)
    if subtask_id is None:
        return  # the link is written after the task: a Resync reconciles it
    sub = held.subs[subtask_id]
    if sub.state.status in SUBTASK_FINAL:
        return  # settled already (skipped or cancelled by this plan, or reconciled)
    if event.type == "task.retrying":
        # (held.failure: failed fast, its always-run steps still to run)
        if held.plan.status in PLAN_FINAL or (held.failure is not None and not sub.always):
            # It was running when the plan stopped and now goes back to the queue:
            # the plan will not run it again.
            reason = held.plan.error or f"plan {held.plan.status.value}"
            work.cancels.append(
                CancelTasks(task_ids=(event.task_id,), statuses=(TaskStatus.QUEUED,), reason=reason)
            )
        return
    ended = _ENDED[event.type]
    error = event.data.get("error")
    if event.type == "task.deleted":
        # The row's task_id is already NULL (ON DELETE SET NULL): keep it so.
        error = "its task was deleted"
        update(held, sub, work, task_id=None)
        held.by_task.pop(event.task_id, None)
    settle(pe, held, sub, ended, error if isinstance(error, str) else None, work, now)


#: How long a node trusts that another live node drives a plan (TakePlan said so) before
#: it asks again on the plan's next task end. Without it a node pays a round trip to the
#: database (an update of no row) for every task end of every plan another node drives,
#: and the answers of the calls that ended them wait for it (the TaskManager holds them
#: until this actor has applied those ends). The price: a driver that dies is noticed
#: from a task end up to this much later; AdoptPlans (sent when a node is found dead)
#: forgets every such entry at once.
ELSEWHERE_FOR = 1.0


def driven_elsewhere(pe: PlanExecutor, plan_id: str) -> bool:
    """Whether TakePlan said, less than :data:`ELSEWHERE_FOR` ago, that another live
    node drives the plan."""
    asked = pe._elsewhere.get(plan_id)
    if asked is None:
        return False
    if time.monotonic() - asked < ELSEWHERE_FOR:
        return True
    del pe._elsewhere[plan_id]
    return False


def settle(
    pe: PlanExecutor,
    held: _Plan,
    sub: _Sub,
    status: SubtaskStatus,
    error: str | None,
    work: _Work,
    now: datetime,
) -> None:
    """A subtask's task ended: record it, then let the plan react."""
    update(held, sub, work, status=status, completed_at=now, error=error)
    held.unfinished -= 1
    plan = held.plan
    subtask_ended(pe, held, sub, work, now)
    if status is SubtaskStatus.COMPLETED:
        for dependent_id in sub.dependents:
            dependent = held.subs[dependent_id]
            if dependent.always:
                continue  # counted by _ended
            dependent.remaining -= 1
            if (
                dependent.remaining == 0
                and dependent.state.status is SubtaskStatus.PENDING
                and plan.status is PlanStatus.EXECUTING
            ):
                queue_ready(held, dependent, work, now)
    elif plan.status is PlanStatus.EXECUTING:
        apply_policy(pe, held, sub, work, now)
    maybe_finish(pe, held, work, now)


def apply_policy(pe: PlanExecutor, held: _Plan, sub: _Sub, work: _Work, now: datetime) -> None:
    """A subtask of an executing plan ended without completing: fail fast, or skip
    what depends on it."""
    subtask_id = sub.state.subtask_id
    why = failure_reason(sub.state)
    if held.plan.failure_policy is FailurePolicy.FAIL_FAST:
        stop_subtasks(
            pe, held, _NOT_STARTED, SubtaskStatus.CANCELLED, PLAN_FAILED + why, work, now, True
        )
        if any(s.always and s.state.status not in SUBTASK_FINAL for s in held.subs.values()):
            # Its always-run steps run first; the plan fails when they have ended.
            if held.failure is None:
                held.failure, held.failure_subtask = why, subtask_id
            return
        if held.failure is not None:  # the first failure's, not its cleanup's
            subtask_id, why = held.failure_subtask or subtask_id, held.failure
        data: dict[str, JsonValue] = {"subtask_id": subtask_id, "reason": why}
        set_status(pe, held, PlanStatus.FAILED, "plan.failed", None, data, work, now, why)
    else:
        skip_dependents(pe, held, sub, work, now)


def skip_dependents(
    pe: PlanExecutor, held: _Plan, failed: _Sub, work: _Work, now: datetime
) -> None:
    """Continue policy: everything downstream of ``failed`` will never run."""
    reason = f"skipped: dependency {failed.state.subtask_id!r} did not complete"
    skipped: list[str] = []
    stack = list(failed.dependents)
    while stack:
        sub = held.subs[stack.pop()]
        if sub.state.status is not SubtaskStatus.PENDING or sub.always:
            continue  # an always-run step is not skipped: it runs once they all ended
        update(held, sub, work, status=SubtaskStatus.SKIPPED, completed_at=now, error=reason)
        held.unfinished -= 1
        subtask_ended(pe, held, sub, work, now)
        if sub.state.task_id is not None:
            skipped.append(sub.state.task_id)
        stack.extend(sub.dependents)
    if skipped:
        work.cancels.append(
            CancelTasks(task_ids=tuple(skipped), statuses=(TaskStatus.BLOCKED,), reason=reason)
        )


def stop_subtasks(
    pe: PlanExecutor,
    held: _Plan,
    statuses: tuple[TaskStatus, ...],
    status: SubtaskStatus,
    reason: str,
    work: _Work,
    now: datetime,
    spare_always: bool = False,
) -> None:
    """Cancel the plan's tasks in ``statuses``. Subtasks still pending (never queued,
    so never started) end at once; ready ones end when their task's cancellation (or
    its own end, if it had started) comes back as an event. With ``spare_always``
    (failing fast), always-run subtasks are left to run once their dependencies end."""
    task_ids: list[str] = []
    for sub in held.subs.values():
        state = sub.state
        if state.status in SUBTASK_FINAL or (spare_always and sub.always):
            continue
        if state.task_id is not None:
            task_ids.append(state.task_id)
        if state.status is SubtaskStatus.PENDING:
            update(held, sub, work, status=status, completed_at=now, error=reason)
            held.unfinished -= 1
            subtask_ended(pe, held, sub, work, now, ready=spare_always)
    if task_ids:
        work.cancels.append(CancelTasks(task_ids=tuple(task_ids), statuses=statuses, reason=reason))


def subtask_ended(
    pe: PlanExecutor, held: _Plan, sub: _Sub, work: _Work, now: datetime, *, ready: bool = True
) -> None:
    """``sub`` has just ended, one way or another: its always-run dependents have one
    dependency less to wait for, and run once they wait for none (not ``ready``: the
    plan is being cancelled, they are cancelled too)."""
    for dependent_id in sub.dependents:
        dependent = held.subs[dependent_id]
        if not dependent.always:
            continue
        dependent.remaining -= 1
        if (
            ready
            and dependent.remaining == 0
            and dependent.state.status is SubtaskStatus.PENDING
            and _executing(held)
        ):
            queue_ready(held, dependent, work, now)


def maybe_finish(pe: PlanExecutor, held: _Plan, work: _Work, now: datetime) -> None:
    if held.unfinished or held.plan.status is not PlanStatus.EXECUTING:
        return
    not_done = [
        sub.state.subtask_id
        for sub in held.subs.values()
        if sub.state.status is not SubtaskStatus.COMPLETED
    ]
    counts: dict[str, JsonValue] = dict(
        Counter(sub.state.status.value for sub in held.subs.values())
    )
    if not not_done:
        set_status(
            pe, held, PlanStatus.COMPLETED, "plan.completed", None, {"counts": counts}, work, now
        )
    elif held.failure is not None:  # failed fast, then ran its always-run steps
        failed: dict[str, JsonValue] = {
            "counts": counts,
            "subtask_id": held.failure_subtask,
            "reason": held.failure,
        }
        set_status(
            pe, held, PlanStatus.FAILED, "plan.failed", None, failed, work, now, held.failure
        )
    else:
        why = f"{len(not_done)} subtask(s) did not complete: {', '.join(not_done[:5])}"
        if len(not_done) > 5:
            why += ", ..."
        data: dict[str, JsonValue] = {"counts": counts, "reason": why}
        set_status(pe, held, PlanStatus.FAILED, "plan.failed", None, data, work, now, why)


def set_status(
    pe: PlanExecutor,
    held: _Plan,
    status: PlanStatus,
    event_type: str,
    source: str | None,
    data: dict[str, JsonValue],
    work: _Work,
    now: datetime,
    error: str | None = None,
) -> None:
    previous = held.plan.status
    changes: dict[str, object] = {"status": status}
    if status is PlanStatus.EXECUTING:
        changes["started_at"] = now
    if status in PLAN_FINAL:
        changes["completed_at"] = now
        changes["error"] = error
    plan = held.plan = msgspec.structs.replace(held.plan, **changes)
    pe._cache(plan.id, status)
    work.ops.append(SetPlanStatus(plan.id, status, plan.started_at, plan.completed_at, plan.error))
    work.touched.add(plan.id)
    event_data: dict[str, JsonValue] = {"status": status.value, "previous": previous.value}
    event_data.update(data)
    work.ops.append(plan_event(event_type, plan, source, event_data, now))


def update(held: _Plan, sub: _Sub, work: _Work, **changes: object) -> None:
    sub.state = msgspec.structs.replace(sub.state, **changes)
    work.dirty[held.plan.id, sub.state.subtask_id] = None
    work.touched.add(held.plan.id)


def plan_event(
    event_type: str,
    plan: ExecutionPlan,
    source: str | None,
    data: dict[str, JsonValue],
    now: datetime,
) -> AppendEvent:
    event = Event(
        type=event_type,
        timestamp=now.timestamp(),
        source=source or plan.source_agent or "plan_executor",
        correlation_id=plan.id,
        plan_id=plan.id,
        data=data,
    )
    return AppendEvent(event, msgspec.json.encode(data))


def queue_ready(held: _Plan, sub: _Sub, work: _Work, now: datetime) -> None:
    """Its dependencies are done: queue its task (published as plan.subtask_ready)."""
    update(held, sub, work, status=SubtaskStatus.READY, started_at=now)
    task_id = sub.state.task_id
    assert task_id is not None  # an executing plan's subtasks all have tasks
    work.release[task_id] = (held.plan.id, sub.state.subtask_id)


def materialize(held: _Plan, work: _Work) -> int:
    """Create a blocked task for every subtask that has none; returns how many."""
    plan = held.plan
    created = 0
    for spec in plan.subtasks:
        sub = held.subs[spec.id]
        if sub.state.task_id is not None or sub.state.status in SUBTASK_FINAL:
            continue
        task_id = new_id()
        work.creates.append(
            CreateTask(
                title=spec.title or spec.id,
                task_type=spec.task_type,
                payload=spec.payload,
                description=spec.description,
                priority=spec.priority,
                max_retries=spec.max_retries,
                timeout=spec.timeout,
                requires=spec.requires,
                correlation_id=plan.id,
                source_agent=plan.source_agent,
                task_id=task_id,
                plan_id=plan.id,
                subtask_id=spec.id,
                blocked=True,
            )
        )
        update(held, sub, work, task_id=task_id)
        held.by_task[task_id] = spec.id
        created += 1
    return created
