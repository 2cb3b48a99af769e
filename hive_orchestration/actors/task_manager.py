"""The TaskManager actor: the one owner of every task and every run.

It keeps the live tasks (not terminal) and their runs in memory, with the most recently
finished tasks, and is the only code that changes them. It handles a batch of requests at
a time: each is checked against the state machine below and applied in memory, and the
whole batch's changes (task rows, run rows and events, in order) go to the storage actor
as ONE write, so that state and event log are committed together. Only after that commit
does any requester get its answer. If the commit fails, memory is put back exactly as it
was before the batch (an undo record per task and per idempotency key) and every change
of the batch is refused with the storage error.

Reads of tasks that are no longer in memory are forwarded to the storage actor, queued
behind the batch's write, so they always see committed state.

State machine (``pending`` is the extraction plan's name for ``queued``):

=============  =============  ==================================  =================
from           to             caused by                           event
=============  =============  ==================================  =================
(new)          queued         create_task                         task.created
queued         assigned       update_task_status(assigned)        task.assigned
queued         running        update_task_status(running)         task.started
assigned       running        update_task_status(running)         task.started
assigned       queued         update_task_status(queued)          task.retrying
running        queued         update_task_status(queued)          task.retrying
assigned       completed      update_task_status(completed)       task.completed
running        completed      update_task_status(completed)       task.completed
assigned       failed         update_task_status(failed)          task.failed
running        failed         update_task_status(failed)          task.failed
assigned       timed_out      update_task_status(timed_out)       task.timed_out
running        timed_out      update_task_status(timed_out)       task.timed_out
queued         cancelled      cancel_task / update(cancelled)     task.cancelled
assigned       cancelled      cancel_task / update(cancelled)     task.cancelled
running        cancelled      cancel_task / update(cancelled)     task.cancelled
=============  =============  ==================================  =================

Everything else is refused with :class:`IllegalTransitionError` and changes nothing:
completed, failed, cancelled and timed_out are terminal, and a task is started before it
completes. Setting a task's current status again is refused too, so that each transition
publishes exactly one event. Deleting a task publishes ``task.deleted``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import anyio
import msgspec

from .._ids import new_id
from ..errors import HiveError, IllegalTransitionError, NotFoundError
from ..messages.events import Event, JsonValue
from ..messages.storage import (
    AppendEvent,
    DeleteTaskRow,
    FetchRun,
    FetchRuns,
    FetchTask,
    LoadIdempotencyKeys,
    LoadRuns,
    LoadTasks,
    PutRun,
    PutTask,
    QueryTasks,
    StorageMessage,
    Write,
    WriteOp,
)
from ..messages.tasks import (
    TERMINAL,
    CancelTask,
    CreateRun,
    CreateTask,
    DeleteTask,
    GetQueuedTasks,
    GetRun,
    GetRuns,
    GetTask,
    GetTasksByStatus,
    Run,
    RunStatus,
    Task,
    TaskManagerMessage,
    TaskStatus,
    UpdateRunStatus,
    UpdateTaskStatus,
)
from ..runtime import Actor, ActorRef, Envelope, Request

__all__ = ["TRANSITIONS", "TaskManager"]

log = logging.getLogger("hive_orchestration.tasks")

Q, A, R = TaskStatus.QUEUED, TaskStatus.ASSIGNED, TaskStatus.RUNNING

#: (from, to) -> the event the transition publishes. The table above, as data.
TRANSITIONS: dict[tuple[TaskStatus, TaskStatus], str] = {
    (Q, A): "task.assigned",
    (Q, R): "task.started",
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
}

#: Statuses kept in memory; the others are loaded from storage when asked for.
LIVE = tuple(status.value for status in TaskStatus if status not in TERMINAL)
_RUN_FINAL = frozenset(
    {
        RunStatus.COMPLETED,
        RunStatus.FAILED,
        RunStatus.TIMED_OUT,
        RunStatus.LOST,
        RunStatus.CANCELLED,
    }
)
_WRITES = (CreateTask, UpdateTaskStatus, CancelTask, DeleteTask, CreateRun, UpdateRunStatus)


@dataclass(frozen=True, slots=True)
class _Forward:
    """Answer this request from storage (queued behind the batch's write)."""

    request: Request[object]


@dataclass(frozen=True, slots=True)
class _Undo:
    """A task's memory state before a batch first changed it."""

    task: Task | None
    finished: bool
    run_ids: list[str] | None
    runs: dict[str, Run]


@dataclass(slots=True)
class _Batch:
    """What one batch changes: the writes, how to undo them in memory, what it deleted."""

    ops: list[WriteOp] = field(default_factory=list)
    undo: dict[str, _Undo] = field(default_factory=dict)
    keys: dict[str, str | None] = field(default_factory=dict)  # key -> owner before the batch
    deleted: set[str] = field(default_factory=set)


class TaskManager(Actor[TaskManagerMessage]):
    # Requests that arrive while a batch is being committed are handled as the next batch.
    max_batch = 1024

    def __init__(
        self,
        storage: ActorRef[StorageMessage],
        *,
        recent: int = 10_000,
        commit_timeout: float = 60.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._storage = storage
        self._clock = clock
        self._recent_limit = recent
        self._commit_timeout = commit_timeout
        self._tasks: dict[str, Task] = {}  # live tasks, and the recently finished ones
        self._finished: OrderedDict[str, None] = OrderedDict()  # finished, oldest first
        self._keys: dict[str, str] = {}  # idempotency key -> task id
        self._runs: dict[str, Run] = {}
        self._runs_of: dict[str, list[str]] = {}

    async def started(self) -> None:
        tasks = await self._storage.ask(LoadTasks(LIVE))
        runs = await self._storage.ask(LoadRuns(LIVE))
        keys = await self._storage.ask(LoadIdempotencyKeys())
        self._tasks = {task.id: task for task in tasks}
        self._keys = dict(keys)
        for run in runs:
            self._remember_run(run)
        log.info("task manager: %d live task(s), %d run(s)", len(tasks), len(runs))

    # -- the batch loop ----------------------------------------------------------------------

    async def receive_batch(self, batch: Sequence[Envelope[TaskManagerMessage]]) -> None:
        now = self._clock()
        work = _Batch()
        answers: list[tuple[Envelope[TaskManagerMessage], object]] = []
        forwards: list[tuple[Envelope[TaskManagerMessage], Request[object]]] = []
        for envelope in batch:
            envelope.started = True
            try:
                outcome = await self._handle(envelope.message, work, now)
            except HiveError as exc:
                outcome = exc
            if isinstance(outcome, _Forward):
                forwards.append((envelope, outcome.request))
            else:
                answers.append((envelope, outcome))
        error = await self._commit(work, forwards)
        if error is not None:
            self._restore(work)
        for envelope, outcome in answers:
            if error is not None and isinstance(envelope.message, _WRITES):
                envelope.fail(error)
            elif error is not None:
                # A read answered from state that included the failed changes: read again.
                try:
                    again = await self._handle(envelope.message, _Batch(), now)
                except HiveError as exc:
                    envelope.fail(exc)
                    continue
                if isinstance(again, _Forward):
                    assert envelope.reply is not None
                    await self._storage.forward(again.request, envelope.reply)
                else:
                    envelope.resolve(again)
            elif isinstance(outcome, HiveError):
                envelope.fail(outcome)
            else:
                envelope.resolve(outcome)
        self._evict()

    async def _commit(
        self,
        work: _Batch,
        forwards: list[tuple[Envelope[TaskManagerMessage], Request[object]]],
    ) -> HiveError | None:
        """Write the batch's changes, then queue the forwarded reads behind them."""
        reply = await self._storage.request(Write(tuple(work.ops))) if work.ops else None
        for envelope, request in forwards:
            assert envelope.reply is not None
            await self._storage.forward(request, envelope.reply)
        if reply is None:
            return None
        try:
            with anyio.fail_after(self._commit_timeout):
                await reply.wait()
        except HiveError as exc:
            return exc
        except TimeoutError:
            return HiveError(f"storage did not commit within {self._commit_timeout:g}s")
        return None

    def _touch(self, task_id: str, work: _Batch) -> None:
        """Remember a task's memory state before the batch first changes it."""
        if task_id not in work.undo:
            run_ids = self._runs_of.get(task_id)
            work.undo[task_id] = _Undo(
                task=self._tasks.get(task_id),
                finished=task_id in self._finished,
                run_ids=None if run_ids is None else list(run_ids),
                runs={run_id: self._runs[run_id] for run_id in run_ids or ()},
            )

    def _set_key(self, key: str, task_id: str | None, work: _Batch) -> None:
        work.keys.setdefault(key, self._keys.get(key))
        if task_id is None:
            self._keys.pop(key, None)
        else:
            self._keys[key] = task_id

    def _restore(self, work: _Batch) -> None:
        """After a failed commit: put memory back exactly as it was before the batch."""
        for task_id, undo in work.undo.items():
            for run_id in self._runs_of.pop(task_id, ()):
                self._runs.pop(run_id, None)
            if undo.run_ids is not None:
                self._runs_of[task_id] = undo.run_ids
                self._runs.update(undo.runs)
            if undo.task is None:
                self._tasks.pop(task_id, None)
            else:
                self._tasks[task_id] = undo.task
            if undo.finished:
                self._finished[task_id] = None
            else:
                self._finished.pop(task_id, None)
        for key, owner in work.keys.items():
            if owner is None:
                self._keys.pop(key, None)
            else:
                self._keys[key] = owner
        log.warning("commit failed; %d task(s) restored in memory", len(work.undo))

    # -- requests ----------------------------------------------------------------------------

    async def _handle(self, message: TaskManagerMessage, work: _Batch, now: datetime) -> object:
        match message:
            case CreateTask():
                return self._create(message, work, now)
            case GetTask(task_id=task_id):
                task = self._tasks.get(task_id)
                return task if task is not None else _Forward(FetchTask(task_id))
            case UpdateTaskStatus():
                return self._update(message, await self._find(message.task_id, work), work, now)
            case CancelTask(task_id=task_id, reason=reason, source_agent=source):
                task = await self._find(task_id, work)
                changes: dict[str, object] = {"error": reason} if reason else {}
                return self._transition(task, TaskStatus.CANCELLED, work, now, source, changes)
            case DeleteTask(task_id=task_id):
                return await self._delete(task_id, work, now)
            case GetTasksByStatus(status=status, task_type=task_type, limit=limit):
                return self._list(status, task_type, limit)
            case GetQueuedTasks(limit=limit, task_type=task_type):
                return self._list(TaskStatus.QUEUED, task_type, limit)
            case CreateRun():
                return self._create_run(message, await self._find(message.task_id, work), work, now)
            case GetRun(run_id=run_id):
                run = self._runs.get(run_id)
                return run if run is not None else _Forward(FetchRun(run_id))
            case GetRuns(task_id=task_id):
                if task_id in self._tasks:  # every run of a task in memory is in memory
                    return [self._runs[run_id] for run_id in self._runs_of.get(task_id, [])]
                return _Forward(FetchRuns(task_id))
            case UpdateRunStatus(run_id=run_id):
                run = self._runs.get(run_id)
                if run is None:
                    # A run of a task that finished long ago: look it up (rare), not cached.
                    run = await self._storage.ask(FetchRun(run_id))
                if run is None or run.task_id in work.deleted:
                    raise NotFoundError("run", run_id)
                return self._update_run(message, run, work, now)
        raise HiveError(f"the task manager does not handle {type(message).__name__}")

    def _create(self, message: CreateTask, work: _Batch, now: datetime) -> str:
        key = message.idempotency_key
        if key is not None and key in self._keys:
            return self._keys[key]  # the first task's id; nothing is created
        task = Task(
            id=new_id(),
            title=message.title,
            description=message.description,
            task_type=message.task_type,
            status=TaskStatus.QUEUED,
            priority=message.priority,
            workflow=message.workflow,
            payload=message.payload,
            tags=message.tags,
            max_retries=message.max_retries,
            due_date=message.due_date,
            idempotency_key=key,
            correlation_id=message.correlation_id,
            source_agent=message.source_agent,
            created_at=now,
            updated_at=now,
        )
        self._touch(task.id, work)
        self._tasks[task.id] = task
        if key is not None:
            self._set_key(key, task.id, work)
        work.ops.append(PutTask(task))
        work.ops.append(
            self._event(
                "task.created",
                task,
                now,
                message.source_agent,
                {"task_type": task.task_type, "title": task.title, "priority": task.priority},
            )
        )
        return task.id

    def _update(self, message: UpdateTaskStatus, task: Task, work: _Batch, now: datetime) -> bool:
        changes: dict[str, object] = {}
        if message.assigned_worker is not None:
            changes["assigned_worker"] = message.assigned_worker
        if message.current_phase is not None:
            changes["current_phase"] = message.current_phase
        if message.result is not None:
            changes["result"] = message.result
        if message.error is not None:
            changes["error"] = message.error
        self._transition(task, message.status, work, now, message.source_agent, changes)
        return True

    def _transition(
        self,
        task: Task,
        status: TaskStatus,
        work: _Batch,
        now: datetime,
        source: str | None,
        changes: dict[str, object],
    ) -> Task:
        event_type = TRANSITIONS.get((task.status, status))
        if event_type is None:
            raise IllegalTransitionError("task", task.id, task.status.value, status.value)
        updated = msgspec.structs.replace(task, status=status, updated_at=now, **changes)
        self._touch(task.id, work)
        self._tasks[task.id] = updated
        if status in TERMINAL:
            self._finished[task.id] = None
        work.ops.append(PutTask(updated))
        data: dict[str, JsonValue] = {
            "status": status.value,
            "previous": task.status.value,
            "task_type": task.task_type,
        }
        if updated.assigned_worker is not None:
            data["worker_id"] = updated.assigned_worker
        if status is TaskStatus.COMPLETED and updated.result is not None:
            data["result"] = updated.result
        if status in TERMINAL and updated.error is not None:
            data["error"] = updated.error
        work.ops.append(self._event(event_type, updated, now, source, data))
        return updated

    async def _delete(self, task_id: str, work: _Batch, now: datetime) -> bool:
        task = await self._find(task_id, work)
        self._touch(task_id, work)
        self._tasks.pop(task_id, None)
        self._finished.pop(task_id, None)
        for run_id in self._runs_of.pop(task_id, []):
            self._runs.pop(run_id, None)
        key = task.idempotency_key
        if key is not None and self._keys.get(key) == task_id:
            self._set_key(key, None, work)
        work.deleted.add(task_id)
        work.ops.append(DeleteTaskRow(task_id))
        work.ops.append(self._event("task.deleted", task, now, None, {"task_type": task.task_type}))
        return True

    def _list(self, status: TaskStatus, task_type: str | None, limit: int | None) -> object:
        if status in TERMINAL:
            return _Forward(QueryTasks(status=status.value, task_type=task_type, limit=limit))
        found = [
            task
            for task in self._tasks.values()
            if task.status is status and (task_type is None or task.task_type == task_type)
        ]
        found.sort(key=_priority_order)
        return found if limit is None else found[:limit]

    def _create_run(self, message: CreateRun, task: Task, work: _Batch, now: datetime) -> str:
        if task.status in TERMINAL:
            raise IllegalTransitionError("task", task.id, task.status.value, "a new run")
        runs = self._runs_of.get(task.id, [])
        run = Run(
            id=new_id(),
            task_id=task.id,
            worker_id=message.worker_id,
            run_number=len(runs) + 1,
            status=RunStatus.RUNNING,
            phase=message.phase,
            started_at=now,
        )
        self._touch(task.id, work)
        self._remember_run(run)
        work.ops.append(PutRun(run))
        return run.id

    def _update_run(self, message: UpdateRunStatus, run: Run, work: _Batch, now: datetime) -> bool:
        if run.status in _RUN_FINAL:
            raise IllegalTransitionError("run", run.id, run.status.value, message.status.value)
        if message.status is run.status:
            raise IllegalTransitionError("run", run.id, run.status.value, message.status.value)
        changes: dict[str, object] = {"status": message.status}
        for name in ("result", "error", "phase", "output_log"):
            value = getattr(message, name)
            if value is not None:
                changes[name] = value
        if message.status in _RUN_FINAL:
            changes["completed_at"] = now
        updated = msgspec.structs.replace(run, **changes)
        if run.id in self._runs:  # a run fetched from storage is not cached
            self._touch(run.task_id, work)
            self._runs[run.id] = updated
        work.ops.append(PutRun(updated))
        return True

    # -- helpers -----------------------------------------------------------------------------

    async def _find(self, task_id: str, work: _Batch) -> Task:
        """The task, from memory or, for one that finished long ago, from storage (rare).

        Every live task is in memory, so one found in storage is finished: any change to it
        is refused by the state machine, exactly as while it was in memory.
        """
        if task_id in work.deleted:  # deleted earlier in this batch, not yet committed
            raise NotFoundError("task", task_id)
        task = self._tasks.get(task_id)
        if task is None:
            task = await self._storage.ask(FetchTask(task_id))
            if task is None:
                raise NotFoundError("task", task_id)
        return task

    def _event(
        self,
        event_type: str,
        task: Task,
        now: datetime,
        source: str | None,
        data: dict[str, JsonValue],
    ) -> AppendEvent:
        event = Event(
            type=event_type,
            timestamp=now.timestamp(),
            source=source or task.source_agent or "task_manager",
            correlation_id=task.correlation_id,
            task_id=task.id,
            data=data,
        )
        return AppendEvent(event, msgspec.json.encode(data))

    def _remember_run(self, run: Run) -> None:
        if run.id not in self._runs:
            self._runs_of.setdefault(run.task_id, []).append(run.id)
        self._runs[run.id] = run

    def _evict(self) -> None:
        """Keep at most ``recent`` finished tasks in memory (their state is committed)."""
        while len(self._finished) > self._recent_limit:
            task_id, _ = self._finished.popitem(last=False)
            # The idempotency key stays: a finished task still owns its key.
            self._tasks.pop(task_id, None)
            for run_id in self._runs_of.pop(task_id, []):
                self._runs.pop(run_id, None)


def _priority_order(task: Task) -> tuple[int, datetime]:
    return (-task.priority, task.created_at)
