"""The embedded runtime: the composition root that wires the actors together.

``async with Runtime.open(path) as runtime:`` starts the supervisor, which starts each
actor in order (broadcast, then storage) and reports ready only once the database is open
and migrated. Leaving the block drains every mailbox within ``shutdown_timeout`` and
stops the actors in reverse order; no task outlives the block.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import msgspec
from anyio.abc import TaskGroup

from .._groups import raise_cause
from .._validate import check_optional_text
from ..actors.broadcast import BroadcastActor
from ..actors.plan_executor import PlanExecutor, PlanFeed
from ..actors.scheduler import Scheduler
from ..actors.task_manager import Frame, TaskManager
from ..actors.worker_registry import WorkerRegistry
from ..config import RuntimeConfig, resolve_db_path
from ..errors import RuntimeStoppedError, StorageError
from ..messages.events import (
    BroadcastMessage,
    BroadcastStats,
    Event,
    GetBroadcastStats,
    InterestCell,
    JsonValue,
)
from ..messages.plans import PlanExecutorMessage
from ..messages.schedules import SchedulerMessage, SchedulerWake
from ..messages.storage import (
    AppendEvent,
    CheckReaders,
    GetStorageStats,
    StorageMessage,
    StorageStats,
    Write,
)
from ..messages.tasks import ReadyElsewhere, TaskManagerMessage, Wake
from ..messages.workers import RegistryWake, WorkerRegistryMessage
from ..runtime import ActorRef, Alarm, ChildRestart, ChildSpec, Supervisor, loop_clock
from ..storage import StorageActor, open_store, publisher
from ..storage.leader import ActorDuties
from ..storage.port import QueueKey
from ..storage.readers import ReaderPool
from .front import Front, Serving
from .ops.claims import ClaimOps
from .ops.control import ControlOps
from .ops.planning import PlanningOps
from .ops.plans import PlanOps
from .ops.reads import InspectOps
from .ops.retention import RetentionOps, retain
from .ops.schedules import ScheduleOps
from .ops.tasks import TaskOps
from .ops.workers import WorkerOps
from .runtime_events import RuntimeEvents
from .subscription import Subscription, wrong_loop

if TYPE_CHECKING:
    from .client import OrchestrationClient  # for the annotation of Runtime.client alone

__all__ = ["MailboxStats", "Runtime", "RuntimeStatistics", "Subscription"]

log = logging.getLogger("hive_orchestration")


class MailboxStats(msgspec.Struct, frozen=True):
    """One mailbox: messages queued, its capacity, and senders waiting for room."""

    queued: int
    capacity: int
    waiting_senders: int


class RuntimeStatistics(msgspec.Struct, frozen=True):
    """A snapshot for introspection: mailboxes, restarts, storage and broadcast counters."""

    mailboxes: dict[str, MailboxStats]
    restarts: dict[str, int]
    storage: StorageStats
    broadcast: BroadcastStats


class Runtime(
    RuntimeEvents,
    TaskOps,
    ClaimOps,
    WorkerOps,
    PlanOps,
    PlanningOps,
    InspectOps,
    ControlOps,
    RetentionOps,
    ScheduleOps,
):
    """An embedded, durable orchestration runtime on one SQLite database.

    Create it with :meth:`open`; every method sends a typed message to an actor.
    """

    #: Given by ``hive_orchestration.api`` (see :class:`Front`).
    _front: ClassVar[Front]

    def __init__(
        self,
        *,
        path: str,
        config: RuntimeConfig,
        storage: ActorRef[StorageMessage],
        broadcast: ActorRef[BroadcastMessage],
        tasks: ActorRef[TaskManagerMessage],
        workers: ActorRef[WorkerRegistryMessage],
        plans: ActorRef[PlanExecutorMessage],
        supervisor: Supervisor,
        schedules: ActorRef[SchedulerMessage],
    ) -> None:
        self._path = path
        self._config = config
        self._storage = storage
        self._broadcast = broadcast
        self._tasks = tasks
        self._workers = workers
        self._plans = plans
        self._schedules = schedules
        self._supervisor = supervisor
        self._closed = False
        self._callbacks: TaskGroup | None = None
        self._server: Serving | None = None
        self._wall: Callable[[], datetime] = _utc_now  # open sets the one it was given
        # Built inside ``open``, on the thread whose event loop runs the actors: every entry
        # point compares the caller's thread with it (see _check_loop).
        self._thread = threading.get_ident()

    @property
    def path(self) -> str:
        """The database file, as an absolute path, or ``":memory:"``."""
        return self._path

    @property
    def config(self) -> RuntimeConfig:
        return self._config

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        config: RuntimeConfig | None = None,
        wall_clock: Callable[[], datetime] | None = None,
    ) -> AsyncIterator[Runtime]:
        """Start a runtime on ``path`` (``":memory:"`` for a throwaway database) for the
        duration of the block.

        Without ``path``: ``config.db_path``, else ``$HIVE_ORCHESTRATION_DB_PATH``, else
        ``hive/db/hive-internal.db``; a relative path is resolved against the working
        directory once, here, and the absolute path opened is logged at INFO (logger
        ``hive_orchestration``) and is :attr:`path`. Missing folders are created (mode
        0700), and the file (mode 0600).

        ``wall_clock`` (default ``datetime.now(UTC)``) is where the times that are stored
        and shown come from (``created_at``, ``lease_expires_at``, ``last_heartbeat``...);
        a parameter so that tests can step it without changing the machine's clock. No
        deadline follows it: they all run on the event loop's monotonic clock.

        Raises :class:`StorageError` (or :class:`NewerSchemaError`) if the database cannot
        be opened, and :class:`RuntimeFailedError` if an actor crashes past the restart
        intensity while the block runs.
        """
        config = RuntimeConfig.checked(config)
        db_path, source = resolve_db_path(path, config)
        tcp = None
        if config.listen:
            from ..remote.tcp import prepare_tcp

            # Refused (ConfigError) before the database is touched or a port bound.
            tcp = await anyio.to_thread.run_sync(prepare_tcp, config)
        store = open_store(db_path, config, field="path" if path is not None else "db_path")
        unix = config.serve_socket and not store.memory and sys.platform != "win32"
        claim = store.claim(serving=unix)
        try:
            await anyio.to_thread.run_sync(claim.acquire)
        except OSError as exc:
            raise StorageError(f"cannot create database {db_path!r}: {exc}") from exc
        log.info("runtime opening database %s (from %s)", db_path, source)

        broadcast: ActorRef[BroadcastMessage] = ActorRef(
            "broadcast", mailbox_size=config.mailbox_size, ask_timeout=config.ask_timeout
        )
        storage: ActorRef[StorageMessage] = ActorRef(
            "storage", mailbox_size=config.mailbox_size, ask_timeout=config.ask_timeout
        )
        tasks: ActorRef[TaskManagerMessage] = ActorRef(
            "tasks", mailbox_size=config.mailbox_size, ask_timeout=config.ask_timeout
        )
        workers: ActorRef[WorkerRegistryMessage] = ActorRef(
            "workers", mailbox_size=config.mailbox_size, ask_timeout=config.ask_timeout
        )
        plans: ActorRef[PlanExecutorMessage] = ActorRef(
            "plans", mailbox_size=config.mailbox_size, ask_timeout=config.ask_timeout
        )
        schedules: ActorRef[SchedulerMessage] = ActorRef(
            "schedules", mailbox_size=config.mailbox_size, ask_timeout=config.ask_timeout
        )

        def on_restart(restart: ChildRestart) -> None:
            # Never wait here: the restarted child may be the storage actor itself.
            data: dict[str, JsonValue] = {
                "actor": restart.actor,
                "restarts": restart.restarts,
                "error_type": restart.error_type,
                "error": _describe(restart.error),
            }
            event = Event(
                type="actor.restarted", timestamp=time.time(), source="supervisor", data=data
            )
            write = Write(ops=(AppendEvent(event, msgspec.json.encode(data)),))
            try:
                if not storage.try_tell(write):
                    log.warning("storage mailbox full; actor.restarted event not logged")
            except RuntimeStoppedError:
                pass

        # The large reads' own connections (storage/readers.py), where the store has them
        # (a SQLite file: not ``:memory:``).
        readers = (
            ReaderPool(store, size=config.read_connections, queue=config.mailbox_size)
            if config.read_connections and store.readers
            else None
        )
        # The TaskManager's refills: a reader of their own, where the store allows it
        # (one refill is in flight at a time; a few more wait while a restarted
        # TaskManager's first comes).
        heads = (
            ReaderPool(store, size=1, queue=8)
            if config.read_connections and store.readers and store.head_reader
            else None
        )

        def poke_storage() -> None:
            with suppress(RuntimeStoppedError):  # a full mailbox: the next batch checks
                storage.try_tell(CheckReaders())

        for pool in (readers, heads):
            if pool is not None:
                pool.poke = poke_storage

        # Where several runtimes write one database (PostgreSQL): what publishes every
        # node's events, beside the storage actor (None: the storage actor publishes).
        def ready_elsewhere(queues: tuple[QueueKey, ...] | None) -> None:
            # Best effort: with its mailbox full, the next sweep of the heads finds them.
            with suppress(RuntimeStoppedError):
                tasks.try_tell(ReadyElsewhere(queues))

        # What this node's subscribers could match, as the broadcast actor says it: the
        # other nodes' events the feed reads (across the broadcast actor's restarts).
        interest = InterestCell()
        feed = store.log_feed(publisher(broadcast), ready_elsewhere, interest.get)
        storage_services = tuple(
            service.run for service in (readers, heads, feed) if service is not None
        )
        # Where several runtimes share one database: one leads, doing what dead nodes leave
        # (a service of the last actor: every actor it tells has started by then).
        leader = store.leadership(ActorDuties(tasks, workers, schedules, plans))
        subscription_ids = itertools.count(1)
        wall = wall_clock or _utc_now
        # Every deadline (leases, timeouts, backoffs, liveness, claim waits) runs on the
        # event loop's monotonic clock, the alarms' and the actors' alike; the wall clock
        # only stamps what is stored and shown, so stepping it moves no deadline.
        # (anyio.current_time's readings, without its look-up of the backend per call.)
        monotonic = loop_clock()
        alarm: Alarm[TaskManagerMessage] = Alarm(tasks, Wake(), clock=monotonic)
        registry_alarm: Alarm[WorkerRegistryMessage] = Alarm(
            workers, RegistryWake(), clock=monotonic
        )
        scheduler_alarm: Alarm[SchedulerMessage] = Alarm(
            schedules, SchedulerWake(), clock=monotonic
        )
        recovered = False
        # The TaskManager's reading of the clocks at its first start, kept across its
        # restarts: the process's monotonic clock goes on (actors/task_manager/delays.py).
        frame = Frame()

        def mark_recovered() -> None:
            nonlocal recovered
            recovered = True

        def task_manager() -> TaskManager:
            return TaskManager(
                storage,
                workers=workers,
                alarm=alarm,
                # Claims die with the process, so the first start requeues what was held;
                # a restart after a crash keeps the claims of the workers still running.
                recover=not recovered,
                on_recovered=mark_recovered,
                retry_backoff=config.retry_backoff,
                retry_backoff_max=config.retry_backoff_max,
                concurrency_limits=config.concurrency_limits,
                ready_head=config.ready_queue_head,
                rate_limits={t: (r.starts, r.per) for t, r in config.rate_limits.items()},
                key_rate_limits={k: (r.starts, r.per) for k, r in config.key_rate_limits.items()},
                frame=frame,
                delete_on_success=frozenset(config.delete_on_success),
                # A call that ends a plan's task answers once its plan has reacted.
                plan_barrier=True,
                clock=wall,
                monotonic=monotonic,
            )

        supervisor = Supervisor(
            [
                # Subscription ids are numbered across restarts (see BroadcastActor).
                ChildSpec(broadcast, lambda: BroadcastActor(subscription_ids, interest)),
                ChildSpec(
                    storage,
                    lambda: StorageActor(
                        store, config, broadcast, readers=readers, feed=feed, heads=heads
                    ),
                    services=storage_services,
                ),
                ChildSpec(tasks, task_manager, services=(alarm.run,)),
                ChildSpec(
                    workers,
                    lambda: WorkerRegistry(
                        storage,
                        tasks,
                        alarm=registry_alarm,
                        timeout=config.worker_timeout,
                        publish_heartbeats=config.publish_heartbeats,
                        clock=wall,
                        monotonic=monotonic,
                    ),
                    services=(registry_alarm.run,),
                ),
                # Last: it asks the TaskManager to create, queue and cancel tasks.
                ChildSpec(
                    plans,
                    lambda: PlanExecutor(storage, tasks),
                    services=(PlanFeed(broadcast, plans).run,),
                ),
                # It asks the TaskManager to create each slot's task.
                ChildSpec(
                    schedules,
                    lambda: Scheduler(
                        storage,
                        tasks,
                        alarm=scheduler_alarm,
                        clock=wall,
                        monotonic=monotonic,
                        clock_check=config.schedule_clock_check,
                        # Several nodes: slots fire on the leader only.
                        leads=leader is None,
                    ),
                    services=(scheduler_alarm.run,) + (() if leader is None else (leader.run,)),
                ),
            ],
            max_restarts=config.max_restarts,
            restart_window=config.restart_window,
            shutdown_timeout=config.shutdown_timeout,
            on_restart=on_restart,
        )
        runtime = cls(
            path=db_path,
            config=config,
            storage=storage,
            broadcast=broadcast,
            tasks=tasks,
            workers=workers,
            plans=plans,
            supervisor=supervisor,
            schedules=schedules,
        )
        runtime._wall = wall
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(supervisor.run)
                if leader is not None:
                    # Whether this node leads is known (and told) before it is open.
                    with anyio.move_on_after(config.ask_timeout):
                        await leader.polled()
                server = None
                if unix or tcp is not None:
                    # This user's other processes reach the runtime through it; it stops
                    # first, so that the calls it still runs find the actors running.
                    server = cls._front.serve(runtime, claim, tcp)
                    if tcp is not None:  # first: an address it cannot bind stops the open
                        await tg.start(server.run_tcp)
                    if unix:
                        await tg.start(server.run)
                try:
                    # The app's event callbacks live here: they stop before the actors do.
                    async with anyio.create_task_group() as callbacks:
                        runtime._callbacks = callbacks
                        runtime._server = server
                        if config.retention is not None:
                            # Stops with the callbacks, before the actors it calls.
                            # On a database several nodes share: the leader's only.
                            leading = None if leader is None else (lambda: leader.epoch)
                            callbacks.start_soon(retain, runtime, config.retention, leading)
                        try:
                            yield runtime
                        finally:
                            callbacks.cancel_scope.cancel()
                finally:
                    if server is not None:
                        await server.stop(grace=min(config.shutdown_timeout, 2.0))
                    runtime._closed = True
                    await supervisor.stop()
        except BaseExceptionGroup as group:
            raise_cause(group)
        finally:
            if readers is not None:
                readers.close()  # its service may never have started
            claim.release()

    # -- clients --------------------------------------------------------------------------

    def client(
        self, *, source_agent: str | None = None, correlation_id: str | None = None
    ) -> OrchestrationClient:
        """A client of this runtime for one agent or app (the message-sending API).

        Everything it creates and causes is stamped with ``source_agent`` (the events'
        ``source``) and ``correlation_id`` (given to the tasks it creates and the events it
        publishes), unless a call names its own. It lives as long as the runtime; use it
        as ``async with`` to stop its event callbacks at the end of a block.
        """
        self._check_running()
        return self._front.client(
            self,
            check_optional_text(source_agent, "source_agent"),
            check_optional_text(correlation_id, "correlation_id"),
        )

    def _spawn(self, function: Callable[[], Coroutine[Any, Any, object]]) -> None:
        """Run ``function`` in the runtime's callback group (stopped before the actors)."""
        self._check_open()
        if self._callbacks is None:  # pragma: no cover - set before the runtime is handed out
            raise RuntimeStoppedError("the runtime is not running")
        self._callbacks.start_soon(function)

    # -- introspection --------------------------------------------------------------------

    async def statistics(self) -> RuntimeStatistics:
        self._check_open()
        mailboxes = {}
        for ref in (
            self._broadcast,
            self._storage,
            self._tasks,
            self._workers,
            self._plans,
            self._schedules,
        ):
            stats = ref.statistics()
            mailboxes[ref.name] = MailboxStats(
                queued=stats.current_buffer_used,
                capacity=int(stats.max_buffer_size),
                waiting_senders=stats.tasks_waiting_send,
            )
        return RuntimeStatistics(
            mailboxes=mailboxes,
            restarts=self._supervisor.restarts,
            storage=await self._storage.ask(GetStorageStats()),
            broadcast=await self._broadcast.ask(GetBroadcastStats()),
        )

    def _check_open(self) -> None:
        """Before every call that talks to an actor: the runtime runs, and the caller is
        on its event loop's thread."""
        if self._closed:
            raise RuntimeStoppedError("the runtime is closed; use it inside `async with`")
        if threading.get_ident() != self._thread:
            raise wrong_loop(self._thread)

    def _check_running(self) -> None:
        """For what only builds objects (a client): the runtime runs, from any thread."""
        if self._closed:
            raise RuntimeStoppedError("the runtime is closed; use it inside `async with`")

    def _check_loop(self) -> None:
        """The caller is on the runtime's event loop thread.

        Mailboxes, replies and subscriptions wake their waiters through that event loop: a
        caller on another thread's loop would never be woken (asyncio), or would corrupt
        the loop's state (trio). A thread id compare, so it costs next to nothing.
        """
        if threading.get_ident() != self._thread:
            raise wrong_loop(self._thread)


def _normalize_path(
    path: str | os.PathLike[str] | None, config: RuntimeConfig | None = None
) -> str:
    """The database ``Runtime.open(path, config=config)`` opens, as an absolute path."""
    return resolve_db_path(path, config)[0]


def _describe(error: BaseException, limit: int = 500) -> str:
    """An exception as bounded, encodable text for a durable event (no lone surrogates)."""
    text = f"{error}".encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _utc_now() -> datetime:
    return datetime.now(UTC)
