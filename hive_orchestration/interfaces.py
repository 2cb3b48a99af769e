"""The seeds' protocols: what an implementation of the orchestration operations offers.

:class:`OrchestrationClient` satisfies all three (mypy checks it). They live here, in the
package, so that an app can type against them and write its own implementation, a test
double say, without depending on the runtime::

    from hive_orchestration.interfaces import TaskOperations

    class Queen:
        def __init__(self, tasks: TaskOperations) -> None:
            self.tasks = tasks

The methods are the seeds' names with their positional arguments; implementations may
take more keyword arguments.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

from .messages.events import Event
from .messages.tasks import Task, TaskStatus
from .messages.workers import Worker, WorkerStatus

__all__ = ["EventProtocol", "TaskOperations", "WorkerOperations"]


@runtime_checkable
class TaskOperations(Protocol):
    """Tasks: create, read, move through the state machine, list, delete."""

    async def create_task(
        self, task_type: str, payload: Mapping[str, object] | None = None
    ) -> str: ...

    async def get_task(self, task_id: str) -> Task | None: ...

    async def update_task_status(
        self,
        task_id: str,
        status: TaskStatus | str,
        metadata: Mapping[str, object] | None = None,
    ) -> bool: ...

    async def get_tasks_by_status(self, status: TaskStatus | str) -> list[Task]: ...

    async def get_queued_tasks(
        self, limit: int = 10, task_type: str | None = None
    ) -> list[Task]: ...

    async def get_pending_tasks(self) -> list[Task]: ...

    async def delete_task(self, task_id: str) -> bool: ...


@runtime_checkable
class WorkerOperations(Protocol):
    """Workers: register, heartbeat, list, read, unregister."""

    async def register_worker(
        self,
        worker_id: str,
        role: str = "worker",
        capabilities: Iterable[str] = (),
        metadata: Mapping[str, object] | None = None,
    ) -> Worker: ...

    async def update_worker_heartbeat(
        self, worker_id: str, status: WorkerStatus | str | None = None
    ) -> bool: ...

    async def get_active_workers(self, role: str | None = None) -> list[Worker]: ...

    async def get_worker(self, worker_id: str) -> Worker | None: ...

    async def unregister_worker(self, worker_id: str) -> bool: ...


@runtime_checkable
class EventProtocol(Protocol):
    """Events: publish one, and call back on the events of a task (``"*"``: of all)."""

    async def publish_task_event(self, event: Any) -> None: ...

    async def subscribe_to_task_events(
        self, task_id: str, callback: Callable[[Event], Awaitable[object] | object]
    ) -> object: ...
