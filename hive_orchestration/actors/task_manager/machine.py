"""The state machine of tasks: each transition, the runs it closes, requeues and attempts.

State machine (``pending`` is the extraction plan's name for ``queued``):

=========  =========  ==================================================  ==============
from       to         caused by                                           event
=========  =========  ==================================================  ==============
(new)      queued     create_task, a schedule's slot (the Scheduler)      task.created
queued     assigned   claim_task, update_task_status(assigned)            task.assigned
queued     running    update_task_status(running)                         task.started
queued     completed  update_task_status(completed): resolved by hand,    task.completed
queued     failed     update_task_status(failed)     with no run          task.failed
assigned   running    start_task, update_task_status(running)             task.started
assigned   queued     fail_task or timeout with attempts left, lease      task.retrying
running    queued     expiry, worker lost, release_task, recovery on
                      open, update_task_status(queued)
assigned   completed  complete_task, update_task_status(completed)        task.completed
running    completed
assigned   failed     fail_task with no attempt left (or not retryable),  task.failed
running    failed     lease expiry or worker lost with none left,
                      update_task_status(failed)
assigned   timed_out  timeout with no attempt left,                       task.timed_out
running    timed_out  update_task_status(timed_out)
queued     cancelled  cancel_task, update_task_status(cancelled), its     task.cancelled
assigned   cancelled  expiry while queued (data.reason: expired;
running    cancelled  delays.py)
(new)      blocked    a plan's subtasks are created (PlanExecutor)        task.created
blocked    queued     its plan's dependencies are all done (PlanExecutor  plan.subtask_ready
                      only, never update_task_status)
blocked    cancelled  cancel_task, its plan failed, was cancelled or      task.cancelled
                      skips it
failed     queued     retry_task only (control.py), attempts reset; not   task.retried
timed_out             a plan's subtask
cancelled
=========  =========  ==================================================  ==============

Everything else is refused with :class:`IllegalTransitionError` and changes nothing:
completed, failed, cancelled and timed_out are terminal (only ``retry_task``, which is not
in :data:`TRANSITIONS`, takes a task out of the last three), and a claimed task is started
before it completes. Setting a task's current status again is refused too, so that each
transition publishes exactly one event, with one exception: asking a finished task for
the status it already has, with nothing that contradicts it (the same result or error,
or none), is a no-op answered ``False`` with no event. An app that publishes a
``TaskCompletedEvent`` for a task it just completed (as the seeds' client does) is
telling the truth, not making a change. A requeue's ``task.retrying`` says why in ``data.reason``
(``failed``, ``timed_out``, ``lease_expired``, ``worker_lost``, ``released``,
``unclaimed``, ``recovered``, ``requeued``). Deleting a task publishes ``task.deleted``
(so does a task of a ``delete_on_success`` type, in the commit that completes it, with
``reason: delete_on_success``); a purge of finished tasks (retention.py) publishes one
``retention.purged`` per chunk instead; a progress report publishes ``task.progress`` (no
status change).

Attempts: every run that ends without success counts one (failed, timed out, lost),
except a released run (handed back by its worker, or never received by it). While
``attempts <= max_retries`` the task is queued again, after an exponential backoff with
jitter for failures and timeouts, at once for a lost run (lease expired, worker lost,
recovered: the worker went away, the task did nothing wrong); then it ends failed
(timed_out after a timeout) with the last error kept.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

import msgspec

from ...errors import IllegalTransitionError
from ...messages.events import Event, JsonValue
from ...messages.storage import AppendEvent, SetRunState, SetTaskState
from ...messages.tasks import TERMINAL, Run, RunStatus, Task, TaskStatus, UpdateTaskStatus
from . import control
from .retention import deletes_on_success
from .state import A, B, Q, R, _Batch

if TYPE_CHECKING:
    from .actor import TaskManager


#: (from, to) -> the event the transition publishes. The table above, as data.
TRANSITIONS: dict[tuple[TaskStatus, TaskStatus], str] = {
    (Q, A): "task.assigned",
    (Q, R): "task.started",
    (Q, TaskStatus.COMPLETED): "task.completed",
    (Q, TaskStatus.FAILED): "task.failed",
    (A, R): "task.started",
    (A, Q): "task.retrying",
    (R, Q): "task.retrying",
    (A, TaskStatus.COMPLETED): "task.completed",
    (R, TaskStatus.COMPLETED): "task.completed",
    (A, TaskStatus.FAILED): "task.failed",
    (R, TaskStatus.FAILED): "task.failed",
    (A, TaskStatus.TIMED_OUT): "task.timed_out",
    (R, TaskStatus.TIMED_OUT): "task.timed_out",
    (Q, TaskStatus.CANCELLED): "task.cancelled",
    (A, TaskStatus.CANCELLED): "task.cancelled",
    (R, TaskStatus.CANCELLED): "task.cancelled",
    (B, Q): "plan.subtask_ready",
    (B, TaskStatus.CANCELLED): "task.cancelled",
}


#: Each status's text: a dict lookup, where ``status.value`` runs the enum's property (two
#: Python calls), and each transition's event names two.
_TEXT = {status: status.value for status in TaskStatus}
_encode = msgspec.json.encode

#: Statuses that are not terminal (the live tasks).
LIVE = tuple(status.value for status in TaskStatus if status not in TERMINAL)


#: What a claimed run becomes when update_task_status moves its task by hand.
_RUN_FOR_TASK = {
    TaskStatus.COMPLETED: RunStatus.COMPLETED,
    TaskStatus.FAILED: RunStatus.FAILED,
    TaskStatus.TIMED_OUT: RunStatus.TIMED_OUT,
    TaskStatus.CANCELLED: RunStatus.CANCELLED,
    Q: RunStatus.RELEASED,
}


def _agrees(task: Task, message: UpdateTaskStatus) -> bool:
    """Whether every field ``message`` sets already holds on ``task`` (an empty result
    agrees with none: the seeds publish ``result={}`` for a task completed without one)."""
    result = message.result or None
    return (
        (result is None or result == task.result)
        and (message.error is None or message.error == task.error)
        and (message.assigned_worker is None or message.assigned_worker == task.assigned_worker)
        and (message.current_phase is None or message.current_phase == task.current_phase)
    )


def _run_data(run: Run) -> dict[str, JsonValue]:
    return {"run_id": run.id, "attempt": run.run_number}


def close_run(
    tm: TaskManager,
    run: Run,
    status: RunStatus,
    work: _Batch,
    now: datetime,
    *,
    error: str | None = None,
    result: dict[str, JsonValue] | None = None,
) -> Run:
    tm._touch(run.task_id, work)
    changes: dict[str, object] = {"status": status, "completed_at": now}
    if error is not None:
        changes["error"] = error
    if result is not None:
        changes["result"] = result
    closed = msgspec.structs.replace(run, **changes)
    tm._runs[run.id] = closed
    if tm._held.get(run.task_id) == run.id:
        del tm._held[run.task_id]
        tm._deadlines.discard(run.id)
        del tm._due[run.id]
    work.ops.append(SetRunState(closed))
    return closed


def requeue(
    tm: TaskManager,
    task: Task,
    run: Run | None,
    reason: str,
    error: str | None,
    work: _Batch,
    now: datetime,
    *,
    count: bool = True,
    retryable: bool = True,
    retry_after: float | None = None,
    source: str | None = None,
) -> Task:
    """After a run ended without success: queue the task again (after a backoff) while
    attempts remain, else end it failed (timed_out after a timeout)."""
    attempts = task.attempts + 1 if count else task.attempts
    changes: dict[str, object] = {"attempts": attempts, "assigned_worker": None}
    if error is not None:
        changes["error"] = error
    data: dict[str, JsonValue] = {"reason": reason, "attempts": attempts}
    if run is not None:
        data["run_id"] = run.id
        if run.worker_id is not None:
            data["worker_id"] = run.worker_id
    if error is not None:
        data["error"] = error
    if count and (not retryable or attempts > task.max_retries):
        final = TaskStatus.TIMED_OUT if reason == "timed_out" else TaskStatus.FAILED
        if not retryable:  # why it ended with attempts left (an agent's fail_on, say)
            data["retryable"] = False
        return tm._transition(task, final, work, now, source, changes, data)
    delay = 0.0
    if count:
        delay = tm._backoff(attempts) if retry_after is None else retry_after
    changes["available_at"] = None
    if delay > 0:
        # Decided here: its backoff ends on this node's monotonic clock, which the
        # claims' lock trusts (lock_claims); what is stored, and shown, is its end by the
        # clock every node reads it by (backoff_until: the database's, on a store several
        # nodes share). Memory holds the very value written.
        tm._touch(task.id, work)
        tm._ready_at[task.id] = tm._mono + delay
        changes["available_at"] = tm._backoff_until(delay)
    data["retry_in"] = delay
    queued = tm._transition(task, Q, work, now, source, changes, data)
    if delay > 0:
        tm._own_backoffs.add(task.id)
    return queued


def backoff(tm: TaskManager, attempts: int) -> float:
    """Exponential, capped, with jitter (half fixed, half random) so that tasks that
    failed together do not all come back at the same instant."""
    delay = min(tm._backoff_max, tm._backoff_base * 2.0 ** min(attempts - 1, 60))
    return delay * (0.5 + 0.5 * tm._rng.random())


def end_claim(
    tm: TaskManager, task: Task, status: RunStatus, work: _Batch, now: datetime, note: str | None
) -> None:
    """A task that a claim holds is being moved by hand: end the claim's run too."""
    run_id = tm._held.get(task.id)
    if run_id is not None:
        tm._close_run(tm._runs[run_id], status, work, now, error=note)


def release_worker(
    tm: TaskManager, worker_id: str, reason: str, work: _Batch, now: datetime
) -> int:
    released = 0
    for task_id, run_id in list(tm._held.items()):
        run = tm._runs[run_id]
        if run.worker_id != worker_id:
            continue
        error = f"worker {worker_id!r} lost: {reason}"
        tm._close_run(run, RunStatus.LOST, work, now, error=error)
        # A lost run says nothing against the task: claimable again at once.
        tm._requeue(tm._tasks[task_id], run, "worker_lost", error, work, now, retry_after=0.0)
        released += 1
    return released


def update(
    tm: TaskManager, message: UpdateTaskStatus, task: Task, work: _Batch, now: datetime
) -> bool:
    if task.status is message.status and task.status in TERMINAL and _agrees(task, message):
        return False  # already so: nothing to change, nothing to publish
    if task.status is B and message.status is not TaskStatus.CANCELLED:
        # Only its plan queues a blocked subtask, once its dependencies are done.
        raise IllegalTransitionError("task", task.id, task.status.value, message.status.value)
    changes: dict[str, object] = {}
    if message.assigned_worker is not None:
        changes["assigned_worker"] = message.assigned_worker
    if message.current_phase is not None:
        changes["current_phase"] = message.current_phase
    if message.result is not None:
        changes["result"] = message.result
    if message.error is not None:
        changes["error"] = message.error
    data: dict[str, JsonValue] = {}
    if message.status is Q:
        data["reason"] = "requeued"
        changes["available_at"] = None
        if message.assigned_worker is None:
            changes["assigned_worker"] = None  # back in the queue: nobody holds it
            if task.assigned_worker is not None:
                data["worker_id"] = task.assigned_worker
    if (task.status, message.status) in TRANSITIONS:
        run_status = _RUN_FOR_TASK.get(message.status)
        held = tm._held.get(task.id)
        if run_status is not None:
            tm._end_claim(task, run_status, work, now, f"task set to {message.status.value}")
        elif message.status is R and held is not None:
            tm._touch(task.id, work)
            started = msgspec.structs.replace(tm._runs[held], status=RunStatus.RUNNING)
            tm._runs[held] = started
            work.ops.append(SetRunState(started))
    tm._transition(task, message.status, work, now, message.source_agent, changes, data)
    return True


def transition(
    tm: TaskManager,
    task: Task,
    status: TaskStatus,
    work: _Batch,
    now: datetime,
    source: str | None,
    changes: dict[str, object],
    extra: dict[str, JsonValue] | None = None,
) -> Task:
    previous = task.status
    event_type = TRANSITIONS.get((previous, status))
    if event_type is None:
        raise IllegalTransitionError("task", task.id, previous.value, status.value)
    updated = msgspec.structs.replace(task, status=status, updated_at=now, **changes)
    task_id = task.id
    # Every change of a batch touches its task first; the later ones (a claim's start,
    # a completion after its run closed) find it touched, unless a refill is in flight,
    # which must hear of every one.
    if task_id not in work.undo or tm._refilling is not None:
        tm._touch(task_id, work)
    tm._tasks[task_id] = updated
    tm._index(task, updated)
    terminal = status in TERMINAL
    if terminal:
        tm._finished[task_id] = None
        control.let_go_of_key(tm, updated, work)
    work.ops.append(SetTaskState(updated))
    data: dict[str, JsonValue] = {
        "status": _TEXT[status],
        "previous": _TEXT[previous],
        "task_type": task.task_type,
    }
    if updated.assigned_worker is not None:
        data["worker_id"] = updated.assigned_worker
    if terminal:
        if status is TaskStatus.COMPLETED and updated.result is not None:
            data["result"] = updated.result
        if updated.error is not None:
            data["error"] = updated.error
    if extra:
        data.update(extra)
    work.ops.append(tm._event(event_type, updated, now, source, data))
    if (
        status is TaskStatus.COMPLETED
        and tm._delete_on_success
        and deletes_on_success(updated, tm._delete_on_success)
    ):
        # Its completion is logged and answered; the row goes in the same commit.
        tm._remove(updated.id, work, None)
        deleted = {"task_type": updated.task_type, "reason": "delete_on_success"}
        work.ops.append(tm._event("task.deleted", updated, now, source, dict(deleted)))
    return updated


def event(
    tm: TaskManager,
    event_type: str,
    task: Task,
    now: datetime,
    source: str | None,
    data: dict[str, JsonValue],
) -> AppendEvent:
    worker = data.get("worker_id")
    event = Event(
        type=event_type,
        timestamp=now.timestamp(),
        source=source or task.source_agent or "task_manager",
        correlation_id=task.correlation_id,
        task_id=task.id,
        plan_id=task.plan_id,
        worker_id=worker if isinstance(worker, str) else None,
        data=data,
    )
    return AppendEvent(event, _encode(data))
