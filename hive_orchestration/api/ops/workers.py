"""The worker operations of the seeds, as messages to the WorkerRegistry.

Every argument is checked here, at the boundary: a bad one is an
:class:`InvalidInputError` naming it, and nothing is sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import cast

from ..._validate import (
    check_choice,
    check_identifier,
    check_names,
    check_optional_text,
    encode_json_object,
)
from ...config import RuntimeConfig
from ...listing import check_after, check_limit
from ...messages.events import JsonValue
from ...messages.tasks import GetUnroutableTasks, Task, TaskManagerMessage
from ...messages.workers import (
    GetActiveWorkers,
    GetWorker,
    RegisterWorker,
    UnregisterWorker,
    Worker,
    WorkerHeartbeat,
    WorkerRegistryMessage,
    WorkerStatus,
)
from ...runtime import ActorRef
from .caller import Caller

__all__ = ["WorkerOps"]


class WorkerOps(Caller):
    """Mixed into :class:`Runtime`; needs ``_workers``, ``_tasks`` and ``_config``."""

    _workers: ActorRef[WorkerRegistryMessage]
    _tasks: ActorRef[TaskManagerMessage]
    _config: RuntimeConfig

    def _check_open(self) -> None:  # pragma: no cover - provided by Runtime
        raise NotImplementedError

    async def register_worker(
        self,
        worker_id: str,
        role: str = "worker",
        capabilities: Iterable[str] = (),
        metadata: Mapping[str, object] | None = None,
    ) -> Worker:
        """Register a worker, or register it again: the same id, its role, capabilities
        and metadata updated, and a new incarnation. Registering again means the worker
        restarted, so the tasks its previous incarnation held go back to the queue.

        A registered worker with capabilities is handed only tasks it can take (see
        :meth:`claim_task`). Durable when this returns.
        """
        self._check_open()
        checked, _ = encode_json_object(
            {} if metadata is None else metadata,
            "metadata",
            max_bytes=self._config.max_payload_bytes,
            max_depth=self._config.max_payload_depth,
        )
        message = RegisterWorker(
            worker_id=check_identifier(worker_id, "worker_id"),
            role=check_identifier(role, "role"),
            capabilities=capability_list(capabilities, "capabilities"),
            metadata=cast("dict[str, JsonValue]", checked),
        )
        return await self._workers.ask(message)

    async def get_worker(self, worker_id: str) -> Worker | None:
        """The worker, or ``None`` if no worker has this id."""
        self._check_open()
        return await self._workers.ask(GetWorker(check_identifier(worker_id, "worker_id")))

    async def get_active_workers(self, role: str | None = None) -> list[Worker]:
        """Live workers (every status but offline), of ``role`` or all, newest heartbeat
        first."""
        self._check_open()
        return await self._workers.ask(GetActiveWorkers(check_optional_text(role, "role")))

    async def update_worker_heartbeat(
        self, worker_id: str, status: WorkerStatus | str | None = None
    ) -> bool:
        """Record that the worker is alive (and, optionally, its new status). Returns
        whether the worker exists. A worker declared offline is live again; a heartbeat
        with status ``offline`` takes it offline now (what it holds is released)."""
        self._check_open()
        message = WorkerHeartbeat(
            worker_id=check_identifier(worker_id, "worker_id"),
            status=None if status is None else check_choice(status, WorkerStatus, "status"),
        )
        return await self._workers.ask(message)

    async def unregister_worker(self, worker_id: str) -> bool:
        """Remove the worker; the tasks it held go back to the queue. Returns whether it
        existed."""
        self._check_open()
        return await self._workers.ask(UnregisterWorker(check_identifier(worker_id, "worker_id")))

    async def get_unroutable_tasks(
        self, *, limit: int | None = None, after: str | None = None
    ) -> list[Task]:
        """Queued tasks that no live registered worker can take (by its capabilities),
        highest priority first: work that waits for a kind of worker nobody runs. At most
        ``limit`` (default 1000, at most 10 000), from just after the task ``after``
        (see :mod:`hive_orchestration.listing`)."""
        self._check_open()
        checked_limit, cursor = check_limit(limit), check_after(after)
        workers = await self._workers.ask(GetActiveWorkers())
        if any(not worker.capabilities for worker in workers):
            return []  # a worker without declared capabilities takes anything
        sets = tuple(worker.capabilities for worker in workers)
        return await self._tasks.ask(GetUnroutableTasks(sets, limit=checked_limit, after=cursor))


def capability_list(value: Iterable[str], field: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(check_names(value, field)))
