"""The requests: each checked and applied to memory within its batch.

Reads of tasks that are no longer in memory are forwarded to the storage actor, queued
behind the batch's write, so they always see committed state; so are the listings.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

import msgspec

from ..._ids import new_id
from ...errors import HiveError, IllegalTransitionError, InvalidInputError, NotFoundError
from ...messages.events import JsonValue
from ...messages.storage import (
    DeleteTaskEvents,
    DeleteTaskRow,
    FetchRun,
    FetchRuns,
    FetchTask,
    FindPurgeable,
    PutRun,
    PutTask,
    QueryTasks,
    QueryUnroutable,
    SetRunState,
)
from ...messages.tasks import (
    TERMINAL,
    CancelTask,
    CancelTasks,
    ClaimTask,
    ClaimTasks,
    CompleteTask,
    CompleteTasks,
    CreateRun,
    CreateTask,
    CreateTasks,
    DeleteTask,
    FailTask,
    FailTasks,
    FlushQueue,
    GetQueuedTasks,
    GetRevokedTaskTypes,
    GetRun,
    GetRuns,
    GetTask,
    GetTasksByStatus,
    GetUnroutableTasks,
    Heartbeat,
    PlansSettled,
    PurgeOutcome,
    PurgeTasks,
    QueueTasks,
    Refusal,
    ReleaseTask,
    ReleaseWorker,
    RestoreTaskType,
    RetryTask,
    RevokeTaskType,
    Run,
    RunStatus,
    StartTask,
    Task,
    TaskManagerMessage,
    TaskOutcome,
    TaskStatus,
    Unclaimed,
    UpdateRunStatus,
    UpdateTaskStatus,
    Wake,
)
from . import control
from .idempotency import _refuse_unknown_keys
from .machine import _run_data
from .retention import purged_event
from .schedule_slots import slot_ops
from .state import _RUN_OPEN, B, Q, _Batch, _Forward

if TYPE_CHECKING:
    from .actor import TaskManager

#: The start time and expiry of a create that has neither (timers.times).
_NO_TIMES: tuple[datetime | None, datetime | None] = (None, None)
#: An item of a batch call that ends claims (complete_tasks, fail_tasks).
_Item = TypeVar("_Item", CompleteTask, FailTask)


async def handle(
    tm: TaskManager, message: TaskManagerMessage, work: _Batch, now: datetime
) -> object:
    match message:
        case CreateTask():
            _refuse_unknown_keys((message,), work)
            return tm._create(message, work, now, tm._times(message))
        case CreateTasks(tasks=items):
            _refuse_unknown_keys(items, work)  # before any is created: all or nothing
            # Most items have no start time nor expiry: nothing to work out (nor a field
            # name to make for a refusal).
            times = [
                _NO_TIMES
                if item.run_at is None
                and item.delay is None
                and item.expires_at is None
                and item.expires_in is None
                else tm._times(item, f"tasks[{i}].")
                for i, item in enumerate(items)
            ]
            pairs = zip(items, times, strict=True)
            return tuple(tm._create(item, work, now, when) for item, when in pairs)
        case QueueTasks(task_ids=task_ids, source_agent=source):
            queued = []
            known = await tm._fetch(task_ids, work)
            for task_id in task_ids:
                task = known.get(task_id)
                if task is not None:
                    task = tm._tasks.get(task_id, task)  # changed by an earlier item
                if task is not None and task.status is B and task_id not in work.deleted:
                    extra: dict[str, JsonValue] = {"subtask_id": task.subtask_id}
                    tm._transition(task, Q, work, now, source, {}, extra)
                    queued.append(task_id)
            return tuple(queued)
        case CancelTasks(task_ids=task_ids, statuses=statuses, reason=reason):
            cancelled = []
            known = await tm._fetch(task_ids, work)
            for task_id in task_ids:
                task = known.get(task_id)
                if task is not None:
                    task = tm._tasks.get(task_id, task)  # changed by an earlier item
                if task is None or task.status not in statuses or task_id in work.deleted:
                    continue
                tm._end_claim(task, RunStatus.CANCELLED, work, now, reason)
                tm._transition(
                    task,
                    TaskStatus.CANCELLED,
                    work,
                    now,
                    message.source_agent,
                    {"error": reason},
                )
                cancelled.append(task_id)
            return tuple(cancelled)
        case GetTask(task_id=task_id):
            task = tm._tasks.get(task_id)
            if task is None or (tm._fenced and task_id in tm._finished):
                # A finished task changes only as it is deleted, which on a store several
                # nodes share another node may have done (delete_task, the leader's
                # purges), telling this one nothing: memory would show it finished for
                # as long as it keeps it (the last 10 000 finished). Storage says.
                return _Forward(FetchTask(task_id))
            return task
        case UpdateTaskStatus():
            return tm._update(message, await tm._find(message.task_id, work), work, now)
        case CancelTask(task_id=task_id, reason=reason, source_agent=source):
            task = await tm._find(task_id, work)
            changes: dict[str, object] = {"error": reason} if reason else {}
            if task.status not in TERMINAL:
                tm._end_claim(task, RunStatus.CANCELLED, work, now, reason)
            return tm._transition(task, TaskStatus.CANCELLED, work, now, source, changes)
        case DeleteTask(task_id=task_id):
            return await tm._delete(task_id, work, now)
        case GetTasksByStatus(status=status, task_type=task_type, limit=limit, after=after):
            return await tm._list(status, task_type, limit, after)
        case GetQueuedTasks(limit=limit, task_type=task_type, after=after):
            return await tm._list(TaskStatus.QUEUED, task_type, limit, after)
        case CreateRun():
            return tm._create_run(message, await tm._find(message.task_id, work), work, now)
        case GetRun(run_id=run_id):
            run = tm._runs.get(run_id)
            return run if run is not None else _Forward(FetchRun(run_id))
        case GetRuns(task_id=task_id):
            if task_id in tm._tasks:  # every run of a task in memory is in memory
                return [tm._runs[run_id] for run_id in tm._runs_of.get(task_id, ())]
            return _Forward(FetchRuns(task_id))
        case UpdateRunStatus(run_id=run_id):
            run = tm._runs.get(run_id)
            if run is None:
                # A run of a task that finished long ago: look it up (rare), not cached.
                run = await tm._storage.ask(FetchRun(run_id))
            if run is None or run.task_id in work.deleted:
                raise NotFoundError("run", run_id)
            return tm._update_run(message, run, work, now)
        case Heartbeat():
            return tm._heartbeat(message, work, now)
        case StartTask(lease=lease):
            return tm._start(*tm._holding(lease, work), work, now)
        case CompleteTask():
            return complete(tm, message, work, now)
        case FailTask():
            return fail(tm, message, work, now)
        case CompleteTasks(items=items):
            return each(tm, items, work, now, complete)
        case FailTasks(items=items):
            return each(tm, items, work, now, fail)
        case ReleaseTask(lease=lease, reason=reason):
            task, run = tm._holding(lease, work)
            note = reason or "released by its worker"
            tm._close_run(run, RunStatus.RELEASED, work, now, error=note)
            return tm._requeue(
                task, run, "released", None, work, now, count=False, source=run.worker_id
            )
        case ReleaseWorker(worker_id=worker_id, reason=reason):
            return tm._release_worker(worker_id, reason, work, now)
        case GetUnroutableTasks(capability_sets=sets, limit=limit, after=after):
            # Memory holds only the heads of the queues: storage scans them all.
            start = None if after is None else await tm._cursor(after)
            key = None if start is None else (start.priority, start.created_at, start.id)
            return _Forward(QueryUnroutable(sets, limit=limit, after=key))
        case Wake():
            return None  # what was due was settled when the batch began
        case PlansSettled(seq=seq):
            tm._release_held_back(seq)
            return None
        case PurgeTasks():
            return await tm._purge(message, work, now)
        case Unclaimed(claims=claims):
            for claim in claims:
                tm._release_unclaimed(claim, work, now)
            return None
        case RetryTask() | RevokeTaskType() | RestoreTaskType() | FlushQueue():
            return await control.handle(tm, message, work, now)
        case GetRevokedTaskTypes():
            return list(tm._revoked.values())
        case ClaimTask() | ClaimTasks():  # pragma: no cover - parked by receive_batch
            raise HiveError("claims are parked, not handled")
    raise HiveError(f"the task manager does not handle {type(message).__name__}")


def complete(tm: TaskManager, message: CompleteTask, work: _Batch, now: datetime) -> Task:
    task, run = tm._holding(message.lease, work)
    result = message.result
    tm._close_run(run, RunStatus.COMPLETED, work, now, result=result)
    # Earlier attempts' errors stay on their runs; a completed task has none.
    changes: dict[str, object] = {"error": None}
    if result is not None:
        changes["result"] = result
    return tm._transition(
        task, TaskStatus.COMPLETED, work, now, run.worker_id, changes, _run_data(run)
    )


def fail(tm: TaskManager, message: FailTask, work: _Batch, now: datetime) -> Task:
    task, run = tm._holding(message.lease, work)
    tm._close_run(run, RunStatus.FAILED, work, now, error=message.error)
    return tm._requeue(
        task,
        run,
        "failed",
        message.error,
        work,
        now,
        retryable=message.retryable,
        retry_after=message.retry_after,
        source=run.worker_id,
    )


def each(
    tm: TaskManager,
    items: tuple[_Item, ...],
    work: _Batch,
    now: datetime,
    apply: Callable[[TaskManager, _Item, _Batch, datetime], Task],
) -> tuple[TaskOutcome, ...]:
    """A batch call's items, each decided on its own, in order, in this batch's one
    commit: an item refused (its lease no longer holds its task; :func:`leases.holding`
    refuses before anything is changed) changes nothing and says why, and the others
    are applied. A later item sees the earlier ones' changes: the same lease twice is
    refused the second time, as its run has ended."""
    outcomes = []
    for index, item in enumerate(items):
        try:
            task = apply(tm, item, work, now)
        except HiveError as exc:
            outcomes.append(TaskOutcome(refused=Refusal.of(exc, f"items[{index}].lease")))
        else:
            outcomes.append(TaskOutcome(task=task))
    return tuple(outcomes)


def create(
    tm: TaskManager,
    message: CreateTask,
    work: _Batch,
    now: datetime,
    times: tuple[datetime | None, datetime | None] = (None, None),
) -> str:
    key = message.idempotency_key
    if key is not None:
        owner = control.key_owner(tm, key, work)
        if owner is not None:
            if message.schedule is not None:
                work.ops += slot_ops(message.schedule, owner, None, now)
            return owner  # the first task's id; nothing is created
    task = Task(
        id=message.task_id or new_id(),
        title=message.title,
        description=message.description,
        task_type=message.task_type,
        status=B if message.blocked else Q,
        priority=message.priority,
        workflow=message.workflow,
        payload=message.payload,
        tags=message.tags,
        max_retries=message.max_retries,
        due_date=message.due_date,
        idempotency_key=key,
        idempotency_scope=message.idempotency_scope,
        correlation_id=message.correlation_id,
        source_agent=message.source_agent,
        timeout=message.timeout,
        concurrency_key=message.concurrency_key,
        concurrency_limit=message.concurrency_limit,
        requires=message.requires,
        plan_id=message.plan_id,
        subtask_id=message.subtask_id,
        traceparent=message.traceparent,
        tracestate=message.tracestate,
        created_at=now,
        updated_at=now,
        run_at=times[0],
        expires_at=times[1],
    )
    tm._touch(task.id, work)
    tm._tasks[task.id] = task
    tm._index(None, task)
    if key is not None:
        tm._set_key(key, task.id, work)
    work.ops.append(PutTask(task))
    data: dict[str, JsonValue] = {
        "task_type": task.task_type,
        "title": task.title,
        "priority": task.priority,
    }
    if task.run_at is not None:
        data["run_at"] = task.run_at.isoformat()
    if task.expires_at is not None:
        data["expires_at"] = task.expires_at.isoformat()
    work.ops.append(tm._event("task.created", task, now, message.source_agent, data))
    if message.schedule is not None:  # the slot's advance: in this very write
        work.ops += slot_ops(message.schedule, task.id, task, now)
    return task.id


def update_run(
    tm: TaskManager, message: UpdateRunStatus, run: Run, work: _Batch, now: datetime
) -> bool:
    if run.status not in _RUN_OPEN or message.status is run.status:
        raise IllegalTransitionError("run", run.id, run.status.value, message.status.value)
    if tm._held.get(run.task_id) == run.id:
        # The claim's own calls (complete, fail, release) also move its task.
        raise IllegalTransitionError(
            "run", run.id, "held by a claim", f"{message.status.value} by update_run_status"
        )
    changes: dict[str, object] = {"status": message.status}
    for name in ("result", "error", "phase", "output_log"):
        value = getattr(message, name)
        if value is not None:
            changes[name] = value
    if message.status not in _RUN_OPEN:
        changes["completed_at"] = now
    updated = msgspec.structs.replace(run, **changes)
    if run.id in tm._runs:  # a run fetched from storage is not cached
        tm._touch(run.task_id, work)
        tm._runs[run.id] = updated
    work.ops.append(SetRunState(updated))
    return True


def create_run(tm: TaskManager, message: CreateRun, task: Task, work: _Batch, now: datetime) -> str:
    if task.status in TERMINAL:
        raise IllegalTransitionError("task", task.id, task.status.value, "a new run")
    runs = tm._runs_of.get(task.id, ())
    run = Run(
        id=new_id(),
        task_id=task.id,
        worker_id=message.worker_id,
        run_number=len(runs) + 1,
        status=RunStatus.RUNNING,
        phase=message.phase,
        started_at=now,
    )
    tm._touch(task.id, work)
    tm._remember_run(run)
    work.ops.append(PutRun(run))
    return run.id


async def delete(tm: TaskManager, task_id: str, work: _Batch, now: datetime) -> bool:
    return tm._delete_task(await tm._find(task_id, work), work, now)


def delete_task(
    tm: TaskManager,
    task: Task,
    work: _Batch,
    now: datetime,
    source: str | None = None,
    extra: dict[str, JsonValue] | None = None,
) -> bool:
    tm._remove(task.id, work, task.idempotency_key)
    data: dict[str, JsonValue] = {"task_type": task.task_type, **(extra or {})}
    work.ops.append(tm._event("task.deleted", task, now, source, data))
    return True


async def purge(tm: TaskManager, message: PurgeTasks, work: _Batch, now: datetime) -> PurgeOutcome:
    """One chunk of a purge (docs/RETENTION.md): storage names the candidates, memory
    has the last word on those it holds (the recently finished), and the tasks go with
    their runs and events, in this batch's one commit."""
    before = now - timedelta(seconds=message.older_than)
    found = await tm._storage.ask(
        FindPurgeable(
            before,
            message.statuses,
            message.task_type,
            message.include_keyed,
            message.limit,
        )
    )
    purged: list[str] = []
    for task_id, key in found:
        if task_id in work.deleted or task_id in work.undo:
            continue  # changed by this batch: the next chunk judges it again
        known = tm._tasks.get(task_id)
        if known is not None and (known.status not in TERMINAL or known.updated_at >= before):
            continue
        tm._remove(task_id, work, key)
        purged.append(task_id)
    if purged:
        work.ops.append(DeleteTaskEvents(tuple(purged)))
        work.ops.append(purged_event(message, before, len(purged), now))
    return PurgeOutcome(len(purged), len(found) >= message.limit)


def remove(tm: TaskManager, task_id: str, work: _Batch, key: str | None) -> None:
    """Delete a task and its runs, in memory and (in this batch's write) in storage."""
    tm._touch(task_id, work)
    task = tm._tasks.pop(task_id, None)
    tm._index(task, None)
    held = tm._held.pop(task_id, None)
    if held is not None:
        tm._deadlines.discard(held)
        del tm._due[held]
    tm._finished.pop(task_id, None)
    for run_id in tm._runs_of.pop(task_id, ()):
        tm._runs.pop(run_id, None)
    if key is not None and tm._keys.get(key) == task_id:
        tm._set_key(key, None, work)
    elif key is not None and work.stored_keys.get(key) == task_id:
        del work.stored_keys[key]  # a later create in this batch may take the key
    work.deleted.add(task_id)
    work.ops.append(DeleteTaskRow(task_id))


async def cursor(tm: TaskManager, after: str) -> Task:
    """The task a page starts after: in memory, or read (a task that left memory)."""
    start = tm._tasks.get(after) or await tm._storage.ask(FetchTask(after))
    if start is None:
        raise InvalidInputError(
            "after",
            f"no task has the id {after!r} (deleted since?): pass the id of the last"
            " task of the previous page, or start again without after",
        )
    return start


async def list_page(
    tm: TaskManager, status: TaskStatus, task_type: str | None, limit: int, after: str | None
) -> object:
    """A page of a status's tasks (see listing.py) in (priority, created_at, id) order
    from ``after``. Memory holds only the heads of the queues, so storage answers,
    behind the batch's commit: the page sees the batch's changes."""
    start = None if after is None else await tm._cursor(after)
    key = None if start is None else (start.priority, start.created_at, start.id)
    return _Forward(QueryTasks(status=status.value, task_type=task_type, limit=limit, after=key))


async def find(tm: TaskManager, task_id: str, work: _Batch) -> Task:
    """The task, from memory or else from storage: one of a queue's backlog, a
    blocked subtask, or one that finished long ago (with its runs: see _fetch)."""
    if task_id in work.deleted:  # deleted earlier in this batch, not yet committed
        raise NotFoundError("task", task_id)
    task = tm._tasks.get(task_id)
    if task is None:
        task = (await tm._fetch((task_id,), work)).get(task_id)
        if task is None:
            raise NotFoundError("task", task_id)
    return task
