"""The task and run operations of the seeds, as messages to the TaskManager.

Every argument is checked here, at the boundary, so that a bad one is an
:class:`InvalidInputError` naming it and nothing is sent, let alone written.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, cast

from ..._trace import outgoing
from ..._validate import (
    MIN_DELAY,
    MIN_LEASE,
    YEAR,
    _show,
    check_choice,
    check_delay,
    check_identifier,
    check_int,
    check_optional_text,
    check_seconds,
    check_str,
)
from ...errors import InvalidInputError
from ...listing import check_after, check_limit
from ...messages.tasks import (
    CancelTask,
    CreateRun,
    CreateTask,
    CreateTasks,
    DeleteTask,
    GetQueuedTasks,
    GetRun,
    GetRuns,
    GetTask,
    GetTasksByStatus,
    Run,
    RunStatus,
    Task,
    TaskStatus,
    UpdateRunStatus,
    UpdateTaskStatus,
)
from .task_base import (
    _LONGEST,
    _MAX_PRIORITY,
    TaskCalls,
    _batch_items,
    _rfc3339,
    _scope,
    _status,
    _tags,
    _types,
    _when,
)

__all__ = ["TaskOps"]


class TaskOps(TaskCalls):
    """Creating, reading and moving tasks and runs. Mixed into :class:`Runtime`; needs
    ``_tasks`` (the TaskManager) and ``_config``."""

    async def create_task(
        self,
        task_type: str,
        payload: Mapping[str, object] | None = None,
        *,
        title: str | None = None,
        description: str | None = None,
        priority: int = 1,
        workflow: Mapping[str, object] | None = None,
        tags: Iterable[str] | None = (),
        max_retries: int = 3,
        due_date: datetime | None = None,
        idempotency_key: str | None = None,
        correlation_id: str | None = None,
        source_agent: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the task's run timeout, not this call's
        concurrency_key: str | None = None,
        concurrency_limit: int | None = None,
        requires: str | Iterable[str] | None = (),
        idempotency_scope: str = "forever",
        run_at: datetime | None = None,
        delay: float | None = None,
        expires_at: datetime | None = None,
        expires_in: float | None = None,
    ) -> str:
        """Create a queued task and return its id (durable when this returns).

        With an ``idempotency_key`` already held, nothing is created and the holder's id
        is returned. A task holds its key forever (``idempotency_scope="forever"``, the
        default: until it is deleted) or while it is live (``"active"``: until it
        completes, fails, times out or is cancelled; docs/CONTROL.md).
        ``title`` defaults to the task type. ``timeout`` bounds each run,
        in seconds from its claim's answer. Tasks sharing a ``concurrency_key`` are held
        by at most ``concurrency_limit`` (default 1) claims at once. A task with ``requires`` (a
        capability or a list of them) goes only to a worker that has all of those
        capabilities (otherwise: one that handles its task type).

        A delayed task (``run_at``, a timezone-aware datetime, or ``delay`` seconds from
        now) is not handed out before then; a task with ``expires_at`` (or ``expires_in``
        seconds from now) is never handed out after it: still queued then, it ends
        ``cancelled`` with the reason ``expired``. See docs/TIMING.md.
        """
        self._check_open()
        return await self._tasks.ask(
            self._create_message(
                task_type,
                payload,
                title=title,
                description=description,
                priority=priority,
                workflow=workflow,
                tags=tags,
                max_retries=max_retries,
                due_date=due_date,
                idempotency_key=idempotency_key,
                correlation_id=correlation_id,
                source_agent=source_agent,
                timeout=timeout,
                concurrency_key=concurrency_key,
                concurrency_limit=concurrency_limit,
                requires=requires,
                idempotency_scope=idempotency_scope,
                run_at=run_at,
                delay=delay,
                expires_at=expires_at,
                expires_in=expires_in,
            )
        )

    async def create_tasks(self, tasks: Iterable[Mapping[str, object]]) -> list[str]:
        """Create several tasks in one durable commit and return their ids, in order.

        Each item holds :meth:`create_task`'s arguments by name (``{"task_type": "build",
        "payload": {...}, "priority": 5}``). All or nothing: if one item is refused
        (``InvalidInputError`` naming ``tasks[i].<field>``), no task is created. An item
        whose ``idempotency_key`` is known (or repeats an earlier item's) creates nothing
        and gives the first task's id. At most 1 000 items per call.
        """
        self._check_open()
        messages: list[CreateTask] = []
        for field, item in _batch_items(tasks, "tasks", _CREATE_ARGS, _NOT_CREATE_ARG):
            if "task_type" not in item:
                raise InvalidInputError(f"{field}.task_type", "is missing")
            arguments = dict(cast(Mapping[str, Any], item))
            for name in ("due_date", "run_at", "expires_at"):
                if isinstance(arguments.get(name), str):
                    # Items are JSON-shaped (they may come through the wire): a time may
                    # be RFC 3339 text, as create_task's is when sent as JSON.
                    arguments[name] = _rfc3339(arguments[name], f"{field}.{name}")
            try:
                messages.append(self._create_message(**arguments))
            except InvalidInputError as exc:
                raise InvalidInputError(f"{field}.{exc.field}", exc.reason) from None
        if not messages:
            return []
        return list(await self._tasks.ask(CreateTasks(tuple(messages))))

    def _create_message(
        self,
        task_type: str,
        payload: Mapping[str, object] | None = None,
        *,
        title: str | None = None,
        description: str | None = None,
        priority: int = 1,
        workflow: Mapping[str, object] | None = None,
        tags: Iterable[str] | None = (),
        max_retries: int = 3,
        due_date: datetime | None = None,
        idempotency_key: str | None = None,
        correlation_id: str | None = None,
        source_agent: str | None = None,
        timeout: float | None = None,
        concurrency_key: str | None = None,
        concurrency_limit: int | None = None,
        requires: str | Iterable[str] | None = (),
        idempotency_scope: str = "forever",
        run_at: datetime | None = None,
        delay: float | None = None,
        expires_at: datetime | None = None,
        expires_in: float | None = None,
    ) -> CreateTask:
        """create_task's arguments, checked, as the TaskManager's message."""
        task_type = check_identifier(task_type, "task_type")
        if run_at is not None and delay is not None:
            raise InvalidInputError("delay", "cannot be given with run_at: give one of them")
        if expires_at is not None and expires_in is not None:
            raise InvalidInputError(
                "expires_in", "cannot be given with expires_at: give one of them"
            )
        if concurrency_limit is not None:
            concurrency_limit = check_int(concurrency_limit, "concurrency_limit", minimum=1)
            if concurrency_key is None:
                raise InvalidInputError("concurrency_limit", "needs a concurrency_key to limit")
        trace = outgoing()
        # The arguments most creates leave at None (or ``()``) are tested here, not in a
        # call each: create_tasks checks up to 1 000 items a call.
        return CreateTask(
            traceparent=None if trace is None else trace[0],
            tracestate=None if trace is None else trace[1],
            title=check_str(task_type if title is None else title, "title", empty=False),
            task_type=task_type,
            payload=self._json(payload, "payload") or {},
            description=None if description is None else check_str(description, "description"),
            priority=check_int(priority, "priority", minimum=0, maximum=_MAX_PRIORITY),
            workflow=None if workflow is None else self._json(workflow, "workflow"),
            tags=_tags(tags),
            max_retries=check_int(max_retries, "max_retries", minimum=0, maximum=1000),
            due_date=None if due_date is None else _when(due_date, "due_date"),
            idempotency_key=None
            if idempotency_key is None
            else check_identifier(idempotency_key, "idempotency_key"),
            correlation_id=check_optional_text(self._correlation(correlation_id), "correlation_id"),
            source_agent=check_optional_text(self._agent(source_agent), "source_agent"),
            timeout=None
            if timeout is None
            else check_seconds(timeout, "timeout", minimum=MIN_LEASE, maximum=YEAR),
            concurrency_key=None
            if concurrency_key is None
            else check_identifier(concurrency_key, "concurrency_key"),
            concurrency_limit=concurrency_limit,
            requires=()
            if type(requires) is tuple and not requires
            else _types(requires, "requires") or (),
            idempotency_scope=_scope(idempotency_scope),
            run_at=None if run_at is None else _when(run_at, "run_at"),
            delay=None if delay is None else check_delay(delay, "delay", maximum=_LONGEST),
            expires_at=None if expires_at is None else _when(expires_at, "expires_at"),
            expires_in=None
            if expires_in is None
            else check_seconds(expires_in, "expires_in", minimum=MIN_DELAY, maximum=_LONGEST),
        )

    async def get_task(self, task_id: str) -> Task | None:
        """The task, or ``None`` if there is no task with this id."""
        self._check_open()
        return await self._tasks.ask(GetTask(check_identifier(task_id, "task_id")))

    async def update_task_status(
        self,
        task_id: str,
        status: TaskStatus | str,
        metadata: Mapping[str, object] | None = None,
        *,
        result: Mapping[str, object] | None = None,
        error: str | None = None,
        source_agent: str | None = None,
    ) -> bool:
        """Move a task to ``status`` through the state machine.

        ``metadata`` may set ``assigned_worker`` and ``current_phase`` (as in the seeds).
        Raises :class:`IllegalTransitionError` (nothing changed) for a move the state
        machine forbids and :class:`NotFoundError` for an unknown task.
        """
        self._check_open()
        if metadata is not None and not isinstance(metadata, Mapping):
            raise InvalidInputError(
                "metadata", f"must be an object with string keys, got {type(metadata).__name__}"
            )
        # Read no further than the first key that cannot be set: it holds at most two.
        unknown = next((key for key in metadata or () if key not in _METADATA_KEYS), None)
        if unknown is not None:
            if not isinstance(unknown, str):
                raise InvalidInputError(
                    "metadata", f"must have string keys, got {type(unknown).__name__}"
                )
            raise InvalidInputError(
                "metadata",
                f"only assigned_worker and current_phase can be set, not {_show(unknown)}",
            )
        fields = dict(metadata or {})
        message = UpdateTaskStatus(
            task_id=check_identifier(task_id, "task_id"),
            status=_status(status),
            assigned_worker=check_optional_text(
                fields.get("assigned_worker"), "metadata.assigned_worker"
            ),
            current_phase=check_optional_text(
                fields.get("current_phase"), "metadata.current_phase"
            ),
            result=self._json(result, "result"),
            error=None if error is None else check_str(error, "error"),
            source_agent=check_optional_text(self._agent(source_agent), "source_agent"),
        )
        return await self._tasks.ask(message)

    async def cancel_task(
        self, task_id: str, *, reason: str | None = None, source_agent: str | None = None
    ) -> Task:
        """Cancel a task that has not finished; returns it as cancelled."""
        self._check_open()
        message = CancelTask(
            task_id=check_identifier(task_id, "task_id"),
            reason=None if reason is None else check_str(reason, "reason"),
            source_agent=check_optional_text(self._agent(source_agent), "source_agent"),
        )
        return await self._tasks.ask(message)

    async def delete_task(self, task_id: str) -> bool:
        """Delete a task and its runs. Raises :class:`NotFoundError` if there is none."""
        self._check_open()
        return await self._tasks.ask(DeleteTask(check_identifier(task_id, "task_id")))

    async def get_tasks_by_status(
        self,
        status: TaskStatus | str,
        *,
        task_type: str | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> list[Task]:
        """Tasks in ``status``, highest priority first, then oldest first, then by id: at
        most ``limit`` (default 1000, at most 10 000). ``after``, the id of the last task
        of the previous page, gives the next page (see :mod:`hive_orchestration.listing`)."""
        self._check_open()
        message = GetTasksByStatus(
            status=_status(status),
            task_type=check_optional_text(task_type, "task_type"),
            limit=check_limit(limit),
            after=check_after(after),
        )
        return await self._tasks.ask(message)

    async def get_queued_tasks(
        self, limit: int = 10, task_type: str | None = None, *, after: str | None = None
    ) -> list[Task]:
        """Queued tasks (optionally of one type), highest priority first, then oldest: at
        most ``limit`` (at most 10 000), after the task ``after`` (a page's last)."""
        self._check_open()
        message = GetQueuedTasks(
            limit=check_limit(limit),
            task_type=check_optional_text(task_type, "task_type"),
            after=check_after(after),
        )
        return await self._tasks.ask(message)

    async def get_pending_tasks(
        self, *, limit: int | None = None, after: str | None = None
    ) -> list[Task]:
        """Tasks waiting to be picked up (``pending`` is the seeds' name for ``queued``),
        paged as :meth:`get_tasks_by_status`."""
        return await self.get_tasks_by_status(TaskStatus.QUEUED, limit=limit, after=after)

    async def create_run(
        self, task_id: str, worker_id: str | None = None, *, phase: str | None = None
    ) -> str:
        """Open a run (an execution attempt) of an unfinished task; returns its id."""
        self._check_open()
        message = CreateRun(
            task_id=check_identifier(task_id, "task_id"),
            worker_id=check_optional_text(worker_id, "worker_id"),
            phase=check_optional_text(phase, "phase"),
        )
        return await self._tasks.ask(message)

    async def get_run(self, run_id: str) -> Run | None:
        self._check_open()
        return await self._tasks.ask(GetRun(check_identifier(run_id, "run_id")))

    async def get_runs(self, task_id: str) -> list[Run]:
        """The runs of a task, oldest first."""
        self._check_open()
        return await self._tasks.ask(GetRuns(check_identifier(task_id, "task_id")))

    async def update_run_status(
        self,
        run_id: str,
        status: RunStatus | str,
        *,
        result: Mapping[str, object] | None = None,
        error: str | None = None,
        phase: str | None = None,
        output_log: str | None = None,
    ) -> bool:
        """Move an open run to ``status``; a finished run cannot change."""
        self._check_open()
        run_status = check_choice(status, RunStatus, "status")
        message = UpdateRunStatus(
            run_id=check_identifier(run_id, "run_id"),
            status=run_status,
            result=self._json(result, "result"),
            error=None if error is None else check_str(error, "error"),
            phase=check_optional_text(phase, "phase"),
            output_log=None
            if output_log is None
            else check_str(output_log, "output_log", limit=self._config.max_payload_bytes),
        )
        return await self._tasks.ask(message)


#: What update_task_status's metadata may set.
_METADATA_KEYS = frozenset({"assigned_worker", "current_phase"})
#: The argument names an item of create_tasks may hold.
_NOT_CREATE_ARG = "is not an argument of create_task"
_CREATE_ARGS = frozenset(inspect.signature(TaskOps._create_message).parameters) - {"self"}
