"""Control by hand (docs/CONTROL.md): wait for a task's end, send a finished task back to
the queue, hold a task type's queue back and let it go again, empty a queue, and count
tasks by status and type.

Every argument is checked here, at the boundary, so that a bad one is an
:class:`InvalidInputError` naming it and nothing is sent.
"""

from __future__ import annotations

import math
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

import anyio
import msgspec

from ..._validate import (
    MIN_DEADLINE,
    YEAR,
    check_identifier,
    check_optional_text,
    check_seconds,
    check_str,
)
from ...errors import NotFoundError, RequestTimeoutError
from ...messages.events import Event
from ...messages.storage import CountTasksByType, StorageMessage
from ...messages.tasks import (
    TERMINAL,
    FlushQueue,
    GetRevokedTaskTypes,
    GetTask,
    RestoreTaskType,
    RetryTask,
    RevokedTaskType,
    RevokeTaskType,
    Task,
    TaskManagerMessage,
    TaskStatus,
)
from ...runtime import ActorRef
from .caller import Caller

if TYPE_CHECKING:
    from ..subscription import Subscription

__all__ = ["ControlOps"]


def _completed(task: Task, event: Event) -> Task:
    """A task deleted as it completed, as its ``task.completed`` event tells it."""
    result = event.data.get("result")
    return msgspec.structs.replace(
        task,
        status=TaskStatus.COMPLETED,
        result=result if isinstance(result, dict) else None,
        updated_at=datetime.fromtimestamp(event.timestamp, UTC),
    )


#: Tasks one flush deletes per commit: each chunk is durable on its own.
_FLUSH_CHUNK = 1000


class ControlOps(Caller):
    """Mixed into :class:`Runtime`; needs ``_tasks``, ``_storage`` and ``subscribe``."""

    _tasks: ActorRef[TaskManagerMessage]
    _storage: ActorRef[StorageMessage]

    def _check_open(self) -> None:  # pragma: no cover - provided by Runtime
        raise NotImplementedError

    async def read_events(  # pragma: no cover - provided by Runtime
        self,
        after: int = 0,
        *,
        limit: int = 1000,
        pattern: str = "*",
        task_id: str | None = None,
        plan_id: str | None = None,
        correlation_id: str | None = None,
    ) -> list[Event]:
        raise NotImplementedError

    def subscribe(  # pragma: no cover - provided by Runtime
        self,
        pattern: str = "*",
        *,
        buffer: int | None = None,
        overflow: Literal["error", "drop"] | None = None,
        **filters: str,
    ) -> AbstractAsyncContextManager[Subscription]:
        raise NotImplementedError

    async def wait_for_task(
        self,
        task_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - a convenience with a documented bound
    ) -> Task:
        """Wait until the task has ended (completed, failed, timed_out or cancelled) and
        return it, with its ``result`` or ``error``.

        Woken by the task's own events, no polling; it subscribes before it reads the
        task, so an end committed between the two is not missed. Raises
        :class:`RequestTimeoutError` (a :class:`TimeoutError`) after ``timeout`` seconds
        (``None``: no limit) and :class:`NotFoundError` for an unknown task (or one
        deleted while waited for). A task that ended already is returned at once.
        """
        self._check_open()
        task_id = check_identifier(task_id, "task_id")
        limit = (
            math.inf
            if timeout is None
            else check_seconds(timeout, "timeout", minimum=MIN_DEADLINE, maximum=YEAR)
        )
        with anyio.move_on_after(limit):
            # One event buffered is enough: each wakes a read of the task, which sees
            # every change committed before the event that woke it (and any dropped).
            changes = self.subscribe("task.*", buffer=1, overflow="drop", task_id=task_id)
            async with changes as changed:
                last: Task | None = None
                while True:
                    task = await self._tasks.ask(GetTask(task_id))
                    if task is None:
                        if last is not None:
                            # Deleted as it completed (RuntimeConfig.delete_on_success):
                            # its completion stays in the log, with its result.
                            done = await self.read_events(
                                pattern="task.completed", task_id=task_id, limit=10
                            )
                            if done:
                                return _completed(last, done[-1])
                        raise NotFoundError("task", task_id)
                    last = task
                    if task.status in TERMINAL:
                        return task
                    await changed.receive()
        raise RequestTimeoutError("tasks", f"wait_for_task({task_id!r})", limit)

    async def retry_task(
        self, task_id: str, *, reason: str | None = None, source_agent: str | None = None
    ) -> Task:
        """Send a failed, timed-out or cancelled task back to the queue with a fresh
        attempt budget (``max_retries`` more attempts) and return it, queued.

        Publishes ``task.retried``, whose ``data.by`` names ``source_agent`` (``reason``
        goes in ``data.note``). Raises :class:`IllegalTransitionError` for a task that
        has not ended or completed, a subtask of a plan (its plan settled it), or one
        whose idempotency key (held only while live) another task took since; and
        :class:`NotFoundError` for an unknown task.
        """
        self._check_open()
        message = RetryTask(
            task_id=check_identifier(task_id, "task_id"),
            reason=None if reason is None else check_str(reason, "reason"),
            source_agent=check_optional_text(self._agent(source_agent), "source_agent"),
        )
        return await self._tasks.ask(message)

    async def revoke_task_type(
        self, task_type: str, *, reason: str | None = None, source_agent: str | None = None
    ) -> bool:
        """Stop handing out tasks of ``task_type`` until :meth:`restore_task_type`.

        Its queued tasks stay queued, in their order, and so do the tasks of the type
        created while it is revoked; claims pass them over. Claimed ones are left to
        finish. Durable (it survives a restart); publishes ``task.type_revoked``.
        Returns ``False`` (and publishes nothing) if the type was revoked already.
        """
        self._check_open()
        message = RevokeTaskType(
            task_type=check_identifier(task_type, "task_type"),
            reason=None if reason is None else check_str(reason, "reason"),
            source_agent=check_optional_text(self._agent(source_agent), "source_agent"),
        )
        return await self._tasks.ask(message)

    async def restore_task_type(self, task_type: str, *, source_agent: str | None = None) -> bool:
        """Hand out the tasks of a revoked ``task_type`` again, in their order, to the
        claims waiting now as to later ones. Publishes ``task.type_restored``. Returns
        ``False`` (and publishes nothing) if the type was not revoked."""
        self._check_open()
        message = RestoreTaskType(
            task_type=check_identifier(task_type, "task_type"),
            source_agent=check_optional_text(self._agent(source_agent), "source_agent"),
        )
        return await self._tasks.ask(message)

    async def get_revoked_task_types(self) -> list[RevokedTaskType]:
        """The revoked task types (since when, by whom, why), oldest first."""
        self._check_open()
        return await self._tasks.ask(GetRevokedTaskTypes())

    async def flush_queue(
        self, task_type: str | None = None, *, source_agent: str | None = None
    ) -> int:
        """Delete every queued task of ``task_type`` (of every type if ``None``) that
        exists when the call starts, and return how many.

        Each is deleted as :meth:`delete_task` deletes it, with its runs and a
        ``task.deleted`` event (``data.reason`` ``"flushed"``, ``data.by`` the
        ``source_agent``), a plan's subtask included (its plan withdraws it); each commit
        of up to 1 000 of them also publishes ``task.queue_flushed`` with the count.
        Claimed, blocked and finished tasks are left alone, and so are tasks created
        after the call started. Each chunk is durable when the next starts: a caller
        cancelled midway leaves the chunks done deleted and the rest queued.
        """
        self._check_open()
        kind = check_optional_text(task_type, "task_type")
        agent = check_optional_text(self._agent(source_agent), "source_agent")
        before = datetime.now(UTC)
        flushed = 0
        while True:
            message = FlushQueue(
                task_type=kind, before=before, limit=_FLUSH_CHUNK, source_agent=agent
            )
            done = await self._tasks.ask(message)
            flushed += done
            if not done:
                return flushed

    async def get_task_counts(self) -> dict[str, dict[str, int]]:
        """Every task counted by status, then by task type, in one query: ``{"queued":
        {"build": 3}, "completed": {...}}`` (empty ones are left out)."""
        self._check_open()
        return await self._storage.ask(CountTasksByType())
