"""A client's publishing: app events appended to the log and fanned out, and the
seeds' lifecycle events made true through the state machine.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

from .._validate import check_identifier, check_optional_text
from ..errors import InvalidInputError, NotFoundError
from ..events import (
    OrchestrationEvent,
    TaskCancelledEvent,
    TaskCompletedEvent,
    TaskCreatedEvent,
    TaskFailedEvent,
    TaskRetriedEvent,
    TaskStartedEvent,
    UnifiedEvent,
    UnifiedEventType,
    WorkerHeartbeatEvent,
    WorkerOfflineEvent,
    WorkerRegisteredEvent,
)
from ..messages.events import Event
from ..messages.tasks import TaskStatus
from ..messages.workers import WorkerStatus
from .keeper import Backend
from .ops.control import ControlOps
from .ops.tasks import TaskOps
from .ops.workers import WorkerOps

if TYPE_CHECKING:
    from .client import OrchestrationClient

__all__ = ["ClientPublishing"]


class ClientPublishing(TaskOps, WorkerOps, ControlOps):
    """Mixed into :class:`OrchestrationClient`; built on the task, worker and control
    operations, through which a lifecycle event it is given is made true. Needs
    ``_live``, ``_check_open`` and ``bind``."""

    def _check_open(self) -> None:  # pragma: no cover - provided by the client
        raise NotImplementedError

    async def _live(self) -> Backend:  # pragma: no cover - provided by the client
        raise NotImplementedError

    def bind(  # pragma: no cover - provided by the client
        self, *, source_agent: str | None = None, correlation_id: str | None = None
    ) -> OrchestrationClient:
        raise NotImplementedError

    async def publish(
        self,
        event_type: str,
        data: Mapping[str, object] | None = None,
        *,
        correlation_id: str | None = None,
        task_id: str | None = None,
        plan_id: str | None = None,
        worker_id: str | None = None,
    ) -> Event:
        """Append an app event (``review.completed``...) to the durable log and fan it
        out; returns it with its ``seq``, once durable. The runtime's own event types
        (``task.*``, ``plan.*``...) are refused: see :meth:`publish_task_event`."""
        return await (await self._live()).publish(
            event_type,
            data,
            source=self._default_agent or "client",
            correlation_id=self._correlation(correlation_id),
            task_id=task_id,
            plan_id=plan_id,
            worker_id=worker_id,
        )

    async def publish_task_event(self, event: OrchestrationEvent | UnifiedEvent) -> None:
        """Publish one of the seeds' events (the seeds' name for :meth:`publish_event`)."""
        await self.publish_event(event)

    async def publish_event(self, event: OrchestrationEvent | UnifiedEvent) -> Event | None:
        """Publish an event.

        - A lifecycle event (:class:`TaskStartedEvent`, :class:`TaskCompletedEvent`,
          :class:`TaskFailedEvent`, :class:`TaskCancelledEvent`, the worker events, or a
          :class:`UnifiedEvent` of those types) is made true: the change goes through the
          state machine, and the runtime logs the event as it commits. Returns ``None``.
        - Any other event (an app event) is appended to the log and fanned out; returns
          it as logged.

        :class:`TaskCreatedEvent` is refused: a task exists only through
        :meth:`create_task`, which logs it.
        """
        self._check_open()
        match event:
            case UnifiedEvent():
                return await self._publish_unified(event)
            case TaskStartedEvent(task_id=task_id, worker_id=worker_id):
                metadata = None if worker_id is None else {"assigned_worker": worker_id}
                await self.update_task_status(task_id, TaskStatus.RUNNING, metadata)
            case TaskCompletedEvent(task_id=task_id, result=result):
                await self.update_task_status(task_id, TaskStatus.COMPLETED, result=result)
            case TaskFailedEvent(task_id=task_id, error=error):
                await self.update_task_status(task_id, TaskStatus.FAILED, error=error)
            case TaskCancelledEvent(task_id=task_id, reason=reason):
                await self.cancel_task(task_id, reason=reason)
            case TaskRetriedEvent(task_id=task_id, reason=reason):
                await self.retry_task(task_id, reason=reason)
            case TaskCreatedEvent():
                raise InvalidInputError(
                    "event",
                    "task.created is logged by create_task when it creates the task: "
                    "call `await client.create_task(task_type, payload)` instead",
                )
            case WorkerRegisteredEvent(worker_id=worker_id, role=role, capabilities=caps):
                await self.register_worker(worker_id, role, caps)
            case WorkerHeartbeatEvent(worker_id=worker_id, status=status):
                if not await self.update_worker_heartbeat(worker_id, status):
                    raise NotFoundError("worker", worker_id)
            case WorkerOfflineEvent(worker_id=worker_id):
                if not await self.update_worker_heartbeat(worker_id, WorkerStatus.OFFLINE):
                    raise NotFoundError("worker", worker_id)
            case _:
                raise InvalidInputError(
                    "event",
                    "must be a UnifiedEvent or one of the seeds' events (TaskCompletedEvent, "
                    f"WorkerHeartbeatEvent...), got {type(event).__name__}",
                )
        return None

    async def _publish_unified(self, event: UnifiedEvent) -> Event | None:
        # A UnifiedEvent is a plain Struct an app fills in: check what is read of it.
        event_type = check_identifier(event.event_type, "event_type")
        if not isinstance(event.payload, dict):
            raise InvalidInputError(
                "payload", f"must be an object, got {type(event.payload).__name__}"
            )
        source_agent = check_optional_text(event.source_agent, "source_agent")
        task_id = event.subject
        payload = event.payload
        if event_type in _TASK_CHANGES and task_id is not None:
            client = self.bind(source_agent=source_agent)
            event_worker = check_optional_text(event.worker_id, "worker_id")
            # The change's event carries the task's own correlation and plan ids, as
            # every event of a task does; the worker is the payload's, else the event's.
            if event_type == UnifiedEventType.TASK_STARTED:
                worker = payload.get("worker_id")
                if isinstance(worker, str):
                    worker = check_identifier(worker, "payload.worker_id")
                else:
                    worker = event_worker
                metadata = None if worker is None else {"assigned_worker": worker}
                await client.update_task_status(task_id, TaskStatus.RUNNING, metadata)
            elif event_type == UnifiedEventType.TASK_COMPLETED:
                result = payload.get("result")
                await client.update_task_status(
                    task_id,
                    TaskStatus.COMPLETED,
                    result=cast("Mapping[str, object]", result)
                    if isinstance(result, Mapping)
                    else _without_task_id(payload),
                )
            elif event_type == UnifiedEventType.TASK_FAILED:
                error = payload.get("error")
                await client.update_task_status(
                    task_id, TaskStatus.FAILED, error=error if isinstance(error, str) else None
                )
            else:
                reason = payload.get("reason")
                await client.cancel_task(
                    task_id, reason=reason if isinstance(reason, str) else None
                )
            return None
        return await (await self._live()).publish(
            event_type,
            payload,
            source=source_agent or self._default_agent or "client",
            correlation_id=self._correlation(event.correlation_id),
            task_id=task_id,
            plan_id=event.plan_id,
            worker_id=event.worker_id,
        )


_TASK_CHANGES = frozenset(
    {
        UnifiedEventType.TASK_STARTED,
        UnifiedEventType.TASK_COMPLETED,
        UnifiedEventType.TASK_FAILED,
        UnifiedEventType.TASK_CANCELLED,
    }
)


def _without_task_id(payload: Mapping[str, Any]) -> Mapping[str, Any] | None:
    # A view, not a copy: the payload may be over the limit, which the result's check
    # finds without reading it whole; a copy here would read it whole first.
    rest = _Without(payload, "task_id")
    return rest or None


class _Without(Mapping[str, Any]):
    """``mapping`` without ``key``, read through."""

    def __init__(self, mapping: Mapping[str, Any], key: str) -> None:
        self._mapping = mapping
        self._key = key

    def __getitem__(self, key: str) -> Any:
        if key == self._key:
            raise KeyError(key)
        return self._mapping[key]

    def __iter__(self) -> Iterator[str]:
        return (key for key in self._mapping if key != self._key)

    def __len__(self) -> int:
        return len(self._mapping) - (self._key in self._mapping)
