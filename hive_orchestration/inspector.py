"""A read-only view of a database, beside the runtime that owns it.

A runtime holds an exclusive claim on its database (a ``flock`` on ``<db>.lock``), so no
second runtime can open it, yet looking into a live app is what the command line is for.
The inspector takes no claim: it runs one actor, a storage actor opened read-only
(``mode=ro``), under its own supervisor, and asks it the storage queries. SQLite in WAL
mode lets readers in other processes work alongside the one writer, so the inspector
sees every commit of the app as it lands, and the app never waits for it.

    async with Inspector.open("hive.db") as inspector:
        print(await inspector.task_counts())

The inspector writes nothing to the file: no pragma that changes it, no migration. A
database at an older schema version is refused (``hive-orchestration db upgrade``
migrates it), as is a newer one and a missing file. It does not see what lives only in
the app's memory (heartbeats not yet written, the cache of plan statuses).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

import anyio

from ._groups import leaves
from ._validate import (
    check_choice,
    check_event_read,
    check_identifier,
    check_optional_text,
)
from .config import RuntimeConfig, resolve_db_path
from .errors import ConfigError, InvalidInputError, NotFoundError, RuntimeStoppedError
from .listing import check_after, check_limit
from .messages.events import Event
from .messages.plans import ExecutionPlan, PlanProgress, PlanStatus, SubtaskState
from .messages.storage import (
    CountSubtasks,
    CountTasks,
    FetchPlan,
    FetchRuns,
    FetchTask,
    GetStorageStats,
    LoadPlanTasks,
    LoadSubtasks,
    LoadWorkers,
    QueryPlans,
    QueryTasks,
    StorageMessage,
    StorageStats,
)
from .messages.tasks import Run, Task, TaskStatus
from .messages.workers import Worker, WorkerStatus
from .runtime import ActorRef, ChildSpec, Request, Supervisor
from .storage import StorageActor, open_store

__all__ = ["Inspector"]

#: The most rows one call returns (the runtime's read limit).

R = TypeVar("R")


class Inspector:
    """Typed, read-only queries on a database that a runtime may be using meanwhile.

    Create it with :meth:`open`; every method asks the read-only storage actor. Each
    answer is one consistent snapshot (one SQLite read); two answers may straddle a
    commit of the app.
    """

    def __init__(self, *, path: str, storage: ActorRef[StorageMessage]) -> None:
        self._path = path
        self._storage = storage
        self._closed = False

    @property
    def path(self) -> str:
        """The database file, as an absolute path."""
        return self._path

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        config: RuntimeConfig | None = None,
    ) -> AsyncIterator[Inspector]:
        """Open the database at ``path`` read-only for the duration of the block (without
        ``path``, the one ``Runtime.open`` would open: ``config.db_path``, else
        ``$HIVE_ORCHESTRATION_DB_PATH``, else ``hive/db/hive-internal.db``).

        Raises :class:`StorageError` if there is no database file there, if it cannot be
        read, or if its schema is older than this package's (``NewerSchemaError`` if newer).
        From ``config`` only the storage driver, busy timeout, ask timeout and restart
        intensity matter.
        """
        config = RuntimeConfig.checked(config)
        db_path = _normalize_path(path, config)
        store = open_store(db_path, config, field="path" if path is not None else "db_path")
        storage: ActorRef[StorageMessage] = ActorRef(
            "storage", mailbox_size=config.mailbox_size, ask_timeout=config.ask_timeout
        )
        supervisor = Supervisor(
            # events=None: a reader commits nothing, so it has nothing to broadcast.
            [ChildSpec(storage, lambda: StorageActor(store, config, None, read_only=True))],
            max_restarts=config.max_restarts,
            restart_window=config.restart_window,
            shutdown_timeout=config.shutdown_timeout,
        )
        inspector = cls(path=db_path, storage=storage)
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(supervisor.run)
                try:
                    yield inspector
                finally:
                    inspector._closed = True
                    await supervisor.stop()
        except BaseExceptionGroup as group:
            cause = _unwrap(group)
            raise cause from cause.__cause__

    # -- tasks and runs -------------------------------------------------------------------

    async def task_counts(self) -> dict[str, int]:
        """Every task counted by status; statuses without a task are left out."""
        return await self._ask(CountTasks())

    async def tasks(
        self,
        status: TaskStatus | str | None = None,
        *,
        task_type: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[Task]:
        """Tasks in ``status`` and of ``task_type`` (any if None), newest first (then by
        id): at most ``limit``, from just after the task ``after`` (the last of the
        previous page; see :mod:`hive_orchestration.listing`)."""
        checked_status = None if status is None else check_choice(status, TaskStatus, "status")
        checked_type = check_optional_text(task_type, "task_type")
        checked_limit = check_limit(limit)
        cursor = check_after(after)
        key = None
        if cursor is not None:
            start = await self._ask(FetchTask(cursor))
            if start is None:
                raise InvalidInputError(
                    "after",
                    f"no task has the id {cursor!r} (deleted since?): pass the id of the last"
                    " task of the previous page, or start again without after",
                )
            key = (start.priority, start.created_at, start.id)
        query = QueryTasks(
            status=None if checked_status is None else checked_status.value,
            task_type=checked_type,
            limit=checked_limit,
            newest_first=True,
            after=key,
        )
        return await self._ask(query)

    async def task(self, task_id: str) -> Task | None:
        return await self._ask(FetchTask(check_identifier(task_id, "task_id")))

    async def runs(self, task_id: str) -> list[Run]:
        """The task's runs, first attempt first."""
        return await self._ask(FetchRuns(check_identifier(task_id, "task_id")))

    # -- workers --------------------------------------------------------------------------

    async def workers(self, status: WorkerStatus | str | None = None) -> list[Worker]:
        """Registered workers (of ``status``, or all), newest heartbeat first.

        The status is the one last written: a worker of an app that died without
        unregistering stays ``active`` until a runtime opens the database again, so
        look at ``last_heartbeat`` too.
        """
        wanted = None if status is None else check_choice(status, WorkerStatus, "status")
        workers = await self._ask(LoadWorkers())
        found = [worker for worker in workers if wanted is None or worker.status is wanted]
        return sorted(found, key=lambda worker: worker.last_heartbeat, reverse=True)

    # -- plans ----------------------------------------------------------------------------

    async def plans(
        self, status: PlanStatus | str | None = None, *, limit: int = 100, after: str | None = None
    ) -> list[ExecutionPlan]:
        """Plans in ``status`` (all if None), newest first (then by id), from just after
        the plan ``after``."""
        query = QueryPlans(
            status=None if status is None else check_choice(status, PlanStatus, "status"),
            limit=check_limit(limit),
            after=check_after(after),
        )
        return await self._ask(query)

    async def plan(self, plan_id: str) -> ExecutionPlan | None:
        return await self._ask(FetchPlan(check_identifier(plan_id, "plan_id")))

    async def plan_subtasks(self, plan_id: str) -> list[SubtaskState]:
        """Each subtask of the plan: its status, its task once created, its dependencies."""
        return list(await self._ask(LoadSubtasks(check_identifier(plan_id, "plan_id"))))

    async def plan_task_statuses(self, plan_id: str) -> dict[str, TaskStatus]:
        """The status of the task of each subtask that has one, by subtask id."""
        rows = await self._ask(LoadPlanTasks(check_identifier(plan_id, "plan_id")))
        return {subtask_id: TaskStatus(status) for _, subtask_id, status in rows}

    async def plan_progress(self, plan_id: str) -> PlanProgress:
        """The plan's subtasks counted by status, as ``Runtime.get_plan_progress`` counts
        them; :class:`NotFoundError` for an unknown plan."""
        plan = await self.plan(plan_id)
        if plan is None:
            raise NotFoundError("plan", plan_id)
        counts = await self._ask(CountSubtasks(plan_id))
        return PlanProgress(
            plan_id=plan_id, status=plan.status, total=sum(counts.values()), counts=counts
        )

    # -- events ---------------------------------------------------------------------------

    async def events(
        self,
        after: int = 0,
        *,
        limit: int = 1000,
        pattern: str = "*",
        task_id: str | None = None,
        plan_id: str | None = None,
        correlation_id: str | None = None,
        newest: bool = False,
    ) -> list[Event]:
        """Durable events with ``seq > after`` whose type matches the glob ``pattern`` and
        whose fields equal every filter given, in ``seq`` order: the oldest ``limit`` of
        them, or the newest with ``newest``."""
        read = check_event_read(
            after, limit, pattern, task_id, plan_id, correlation_id, newest=newest
        )
        return list(await self._ask(read))

    async def last_seq(self) -> int:
        """The sequence number of the last event in the log now (0 for an empty log)."""
        return (await self._ask(GetStorageStats())).last_seq

    async def schema_version(self) -> int:
        """The file's schema version (this package's: an older or newer one is refused
        at open)."""
        return (await self._ask(GetStorageStats())).schema_version

    async def statistics(self) -> StorageStats:
        """The storage actor's view: path, driver, schema version, last event seq."""
        return await self._ask(GetStorageStats())

    async def _ask(self, message: Request[R]) -> R:
        if self._closed:
            raise RuntimeStoppedError("the inspector is closed; use it inside `async with`")
        return await self._storage.ask(message)


def _normalize_path(path: str | os.PathLike[str] | None, config: RuntimeConfig) -> str:
    """The database to read, as an absolute path: chosen as ``Runtime.open`` chooses it."""
    chosen, _ = resolve_db_path(path, config)
    if chosen == ":memory:":
        field = "path" if path is not None else "db_path"
        error = InvalidInputError if path is not None else ConfigError
        raise error(field, "':memory:' lives inside its runtime's process; inspect a database file")
    return chosen


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """anyio wraps every failure of a task group in a group; give the caller the cause."""
    cancelled = anyio.get_cancelled_exc_class()
    real = [leaf for leaf in leaves(group) if not isinstance(leaf, cancelled)]
    # A RuntimeStoppedError in the caller's block is a consequence of the real failure.
    causes = [leaf for leaf in real if not isinstance(leaf, RuntimeStoppedError)] or real
    return causes[0] if len(causes) == 1 else group
