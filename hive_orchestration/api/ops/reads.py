"""The reads an operator's view needs and the seeds' operations do not give: every task
counted by status, the queued ones counted by type, the newest tasks of any status, and
every registered worker.

``hive-orchestration status``, ``tasks`` and ``workers`` ask them of the runtime that
owns a database, through its socket or over TCP, where they would otherwise read the
file (the read-only :class:`~hive_orchestration.inspector.Inspector` answers the same
questions the same way, but for ``queue_depths``). Each is one bounded read: a count, a
page of at most ``MAX_READ`` rows, or the registry's own list of workers.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from ..._validate import MAX_READ, check_choice, check_int, check_optional_text
from ...messages.storage import CountQueued, CountTasks, QueryTasks, StorageMessage
from ...messages.tasks import Task, TaskStatus
from ...messages.workers import GetWorkers, Worker, WorkerRegistryMessage, WorkerStatus
from ...runtime import ActorRef
from .caller import Caller

__all__ = ["InspectOps"]


class InspectOps(Caller):
    """Mixed into :class:`Runtime`; needs ``_storage`` and ``_workers``."""

    _storage: ActorRef[StorageMessage]
    _workers: ActorRef[WorkerRegistryMessage]
    _wall: Callable[[], datetime]  # the runtime's wall clock

    def _check_open(self) -> None:  # pragma: no cover - provided by Runtime
        raise NotImplementedError

    async def count_tasks(self) -> dict[str, int]:
        """Every task counted by status (one query); statuses without a task are left
        out."""
        self._check_open()
        return await self._storage.ask(CountTasks())

    async def queue_depths(self) -> dict[str, tuple[int, datetime]]:
        """The queued tasks by type: how many, and since when the longest-waiting one has
        been claimable (a delayed task from its start time, a retried one from the end
        of its backoff). One aggregate query on a reader connection, whatever the depth:
        the Prometheus exporter's ``hive_queue_depth``, in the runtime's process or
        through its socket. By this runtime's wall clock (``wall_clock``): on PostgreSQL,
        the end of a backoff, stored by the database's clock, is turned into it."""
        self._check_open()
        return await self._storage.ask(CountQueued(self._wall()))

    async def list_tasks(
        self,
        status: TaskStatus | str | None = None,
        *,
        task_type: str | None = None,
        limit: int = 100,
    ) -> list[Task]:
        """Tasks in ``status`` and of ``task_type`` (any if None), newest first, at most
        ``limit`` (up to 10,000)."""
        self._check_open()
        query = QueryTasks(
            status=None if status is None else check_choice(status, TaskStatus, "status").value,
            task_type=check_optional_text(task_type, "task_type"),
            limit=check_int(limit, "limit", minimum=1, maximum=MAX_READ),
            newest_first=True,
        )
        return await self._storage.ask(query)

    async def list_workers(self, status: WorkerStatus | str | None = None) -> list[Worker]:
        """Every registered worker in ``status`` (all if None, offline ones too), newest
        heartbeat first, as the registry knows them now (its heartbeats included)."""
        self._check_open()
        wanted = None if status is None else check_choice(status, WorkerStatus, "status")
        return await self._workers.ask(GetWorkers(wanted))
