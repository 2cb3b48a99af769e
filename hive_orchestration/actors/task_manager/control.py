"""Control by hand: what an operator does to tasks the state machine has settled, or to a
whole task type (docs/CONTROL.md). The TaskManager's own handlers call in here, inside a
batch, so each change is committed with its events and undone with the batch.

- ``retry_task``: a failed, timed-out or cancelled task goes back to the queue with a
  fresh attempt budget (``task.retried``, naming who). A plan's subtask is refused: its
  plan settled it when it ended (see :func:`_retry`).
- Idempotency keys held while the task is live only (scope ``active``): let go of when
  the task ends, taken again if it is retried and no other task took the key meanwhile.
- Revoked task types: their queued tasks stay queued and are not handed out (the ready
  queue treats the type as full), tasks of the type created meanwhile too, until it is
  restored; durable in ``revoked_task_types``.
- Flushing a queue: its queued tasks are deleted, a ``task.deleted`` each.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

import msgspec

from ...errors import IllegalTransitionError
from ...messages.events import Event, JsonValue
from ...messages.storage import (
    AppendEvent,
    DeleteRevokedType,
    FindIdempotencyKeys,
    LoadRevokedTypes,
    PutRevokedType,
    QueryTasks,
    SetTaskState,
)
from ...messages.tasks import (
    TERMINAL,
    FlushQueue,
    RestoreTaskType,
    RetryTask,
    RevokedTaskType,
    RevokeTaskType,
    Task,
    TaskStatus,
)

if TYPE_CHECKING:
    from .actor import TaskManager
    from .state import _Batch

__all__ = ["RETRYABLE", "handle", "holds_key", "key_owner", "let_go_of_key", "load_revoked"]

#: What retry_task takes a task from.
RETRYABLE = frozenset({TaskStatus.FAILED, TaskStatus.TIMED_OUT, TaskStatus.CANCELLED})
#: The source of an event caused by a call that named no agent.
_OPERATOR = "operator"
#: Past any id (ids are ASCII): a cursor that keeps every task created at its time.
_LAST_ID = "\U0010ffff"


async def load_revoked(tm: TaskManager) -> None:
    """At start-up: the revoked task types, as committed."""
    tm._revoked.clear()
    for revoked in await tm._storage.ask(LoadRevokedTypes()):
        tm._revoked[revoked.task_type] = revoked


def holds_key(task: Task, key: str) -> bool:
    """Whether ``task`` holds the idempotency key ``key``: it has it, and keeps it forever
    or has not ended."""
    return task.idempotency_key == key and (
        task.idempotency_scope == "forever" or task.status not in TERMINAL
    )


def key_owner(tm: TaskManager, key: str, work: _Batch) -> str | None:
    """The task that holds ``key`` for a create in this batch, if any. Memory knows the
    keys of the tasks it holds; storage answered for the others before the batch, and a
    task the batch has changed since (now in memory) is known better by memory."""
    owner = tm._keys.get(key)
    if owner is not None:
        return owner
    owner = work.stored_keys.get(key)
    if owner is None:
        return None
    task = tm._tasks.get(owner)
    if task is not None and not holds_key(task, key):
        return None  # it ended in this batch and held the key only while live
    return owner


def let_go_of_key(tm: TaskManager, task: Task, work: _Batch) -> None:
    """``task`` has just ended: a key it held only while live is free from this commit on
    (storage's unique index, on live keys only, agrees once its state is written)."""
    key = task.idempotency_key
    if key is not None and task.idempotency_scope == "active" and tm._keys.get(key) == task.id:
        tm._set_key(key, None, work)


async def handle(
    tm: TaskManager,
    message: RetryTask | RevokeTaskType | RestoreTaskType | FlushQueue,
    work: _Batch,
    now: datetime,
) -> object:
    match message:
        case RetryTask():
            return await _retry(tm, message, work, now)
        case RevokeTaskType():
            return _revoke(tm, message, work, now)
        case RestoreTaskType():
            return _restore(tm, message, work, now)
        case FlushQueue():
            return await _flush(tm, message, work, now)


async def _retry(tm: TaskManager, message: RetryTask, work: _Batch, now: datetime) -> Task:
    task = await tm._find(message.task_id, work)
    status = task.status.value
    if task.status not in RETRYABLE:
        raise IllegalTransitionError(
            "task",
            task.id,
            status,
            "queued by retry_task (only a failed, timed_out or"
            " cancelled task is retried; a live one is already in the queue's hands)",
        )
    if task.plan_id is not None:
        # Its end was its plan's to react to, and it has: fail_fast failed the plan and
        # cancelled the rest, continue skipped (cancelled) what depends on it. Run again
        # alone, its result would go to no one; requeued into a running plan, the skipped
        # dependents would not come back. The plan is the unit to run again.
        raise IllegalTransitionError(
            "task",
            task.id,
            status,
            f"queued by retry_task: it is subtask"
            f" {task.subtask_id!r} of plan {task.plan_id!r}, which settled it when it ended"
            " (failing or skipping what depends on it); create a new plan for the work",
        )
    key = task.idempotency_key
    if key is not None and task.idempotency_scope == "active":
        owner = await _live_owner(tm, key, work)
        if owner is not None and owner != task.id:
            raise IllegalTransitionError(
                "task",
                task.id,
                status,
                f"queued by retry_task: its idempotency key is held"
                f" by task {owner!r}, created with it after this one ended; retry that one,"
                " or create a new task",
            )
        tm._set_key(key, task.id, work)
    updated = msgspec.structs.replace(
        task,
        status=TaskStatus.QUEUED,
        attempts=0,  # a fresh budget: max_retries more attempts from now
        assigned_worker=None,
        available_at=None,
        result=None,
        updated_at=now,
    )
    tm._touch(task.id, work)
    tm._tasks[task.id] = updated
    tm._finished.pop(task.id, None)  # live again: not evicted as a finished task
    tm._index(task, updated)
    work.ops.append(SetTaskState(updated))
    data: dict[str, JsonValue] = {
        "status": TaskStatus.QUEUED.value,
        "previous": status,
        "task_type": task.task_type,
        "reason": "retried",
        "attempts": task.attempts,  # spent before the retry
        "by": message.source_agent,
    }
    if message.reason is not None:
        data["note"] = message.reason
    if task.error is not None:
        data["error"] = task.error  # what it ended with, kept on the task until it completes
    source = message.source_agent or _OPERATOR
    work.ops.append(tm._event("task.retried", updated, now, source, data))
    return updated


async def _live_owner(tm: TaskManager, key: str, work: _Batch) -> str | None:
    """The task that holds ``key`` now (in this batch), if any."""
    owner = tm._keys.get(key)
    if owner is not None:
        return owner
    stored = (await tm._storage.ask(FindIdempotencyKeys((key,)))).get(key)
    if stored is None or stored in work.deleted:
        return None
    task = tm._tasks.get(stored)
    if task is not None and not holds_key(task, key):
        return None
    return stored


def _snapshot(tm: TaskManager, work: _Batch) -> None:
    if work.revoked is None:
        work.revoked = dict(tm._revoked)  # put back if the commit fails


def _revoke(tm: TaskManager, message: RevokeTaskType, work: _Batch, now: datetime) -> bool:
    if message.task_type in tm._revoked:
        return False
    _snapshot(tm, work)
    revoked = RevokedTaskType(
        task_type=message.task_type,
        revoked_at=now,
        source_agent=message.source_agent,
        reason=message.reason,
    )
    tm._revoked[message.task_type] = revoked  # the ready queue reads the same dict
    work.ops.append(PutRevokedType(revoked))
    data: dict[str, JsonValue] = {
        "task_type": message.task_type,
        "reason": message.reason,
        "by": message.source_agent,
    }
    work.ops.append(_type_event("task.type_revoked", now, message.source_agent, data))
    return True


def _restore(tm: TaskManager, message: RestoreTaskType, work: _Batch, now: datetime) -> bool:
    if message.task_type not in tm._revoked:
        return False
    _snapshot(tm, work)
    del tm._revoked[message.task_type]
    tm._ready.restored(message.task_type)
    work.ops.append(DeleteRevokedType(message.task_type))
    data: dict[str, JsonValue] = {"task_type": message.task_type, "by": message.source_agent}
    work.ops.append(_type_event("task.type_restored", now, message.source_agent, data))
    return True


async def _flush(tm: TaskManager, message: FlushQueue, work: _Batch, now: datetime) -> int:
    """Delete up to ``limit`` queued tasks created at or before ``message.before``: those
    storage holds (committed state, newest first) as memory knows them now, then those
    only memory holds (created in this batch, or not yet read back)."""
    stored = await tm._storage.ask(
        QueryTasks(
            status=TaskStatus.QUEUED.value,
            task_type=message.task_type,
            limit=message.limit,
            newest_first=True,
            after=(0, message.before, _LAST_ID),
        )
    )
    candidates = {task.id: tm._tasks.get(task.id, task) for task in stored}
    for task in tm._tasks.values():
        if task.status is TaskStatus.QUEUED and task.id not in candidates:
            candidates[task.id] = task
    flushed = 0
    extra: dict[str, JsonValue] = {"reason": "flushed", "by": message.source_agent}
    for task in list(candidates.values()):
        if flushed >= message.limit:
            break
        if (
            task.id in work.deleted
            or task.status is not TaskStatus.QUEUED
            or (message.task_type is not None and task.task_type != message.task_type)
            or task.created_at > message.before
        ):
            continue
        tm._delete_task(task, work, now, message.source_agent or _OPERATOR, extra)
        flushed += 1
    if flushed:
        data: dict[str, JsonValue] = {
            "task_type": message.task_type,
            "deleted": flushed,
            "by": message.source_agent,
        }
        work.ops.append(_type_event("task.queue_flushed", now, message.source_agent, data))
    return flushed


def _type_event(
    event_type: str, now: datetime, source: str | None, data: dict[str, JsonValue]
) -> AppendEvent:
    """An event about a task type, not one task."""
    event = Event(type=event_type, timestamp=now.timestamp(), source=source or _OPERATOR, data=data)
    return AppendEvent(event, msgspec.json.encode(data))
