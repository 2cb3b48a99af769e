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
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import anyio
import msgspec
from anyio.abc import TaskGroup

from ._control_ops import ControlOps
from ._groups import leaves
from ._inspect_ops import InspectOps
from ._plan_ops import PlanOps
from ._retention_ops import RetentionOps, retain
from ._schedule_ops import ScheduleOps
from ._task_ops import TaskOps
from ._validate import (
    _show,
    check_event_read,
    check_identifier,
    check_int,
    check_optional_text,
    encode_json_object,
)
from ._worker_ops import WorkerOps
from .actors.broadcast import BroadcastActor
from .actors.plan_executor import PlanExecutor, PlanFeed
from .actors.scheduler import Scheduler
from .actors.task_manager import Frame, TaskManager
from .actors.worker_registry import WorkerRegistry
from .config import RuntimeConfig, resolve_db_path
from .errors import (
    InvalidInputError,
    RuntimeFailedError,
    RuntimeStoppedError,
    StorageError,
    SubscriberLaggedError,
    WrongEventLoopError,
)
from .events import RUNTIME_NAMESPACES, check_pattern, reserved_namespace
from .messages.events import (
    BroadcastMessage,
    BroadcastStats,
    Event,
    EventFeed,
    GetBroadcastStats,
    JsonValue,
    Lagged,
    Subscribe,
    Unsubscribe,
    compile_pattern,
)
from .messages.plans import PlanExecutorMessage
from .messages.schedules import SchedulerMessage, SchedulerWake
from .messages.storage import (
    AppendEvent,
    CheckReaders,
    GetStorageStats,
    StorageMessage,
    StorageStats,
    Write,
)
from .messages.tap import EventTap, Fold
from .messages.tasks import TaskManagerMessage, Wake
from .messages.workers import RegistryWake, WorkerRegistryMessage
from .runtime import ActorRef, Alarm, ChildRestart, ChildSpec, Supervisor
from .storage import StorageActor, open_store, publisher
from .storage.readers import ReaderPool

if TYPE_CHECKING:
    from .client import OrchestrationClient
    from .remote.server import Server

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


class Subscription:
    """Live events matching a pattern, in log order. Iterate it with ``async for``.

    Iteration ends when the runtime stops, after every event committed before it stopped.
    If a commit comes while the subscriber is its buffer's worth behind, not just on the
    last commit it was given, iteration raises :class:`SubscriberLaggedError` once it has
    read what it was given (unless it subscribed with ``overflow="drop"``); replay the log
    from ``error.last_seq`` to catch up.
    """

    def __init__(
        self, feed: EventFeed, pattern: str, close: Callable[[], None], thread: int
    ) -> None:
        self._feed = feed
        self._close = close
        self._thread = thread  # the runtime's event loop thread (see Runtime._check_loop)
        self.pattern = pattern
        #: The sequence number of the last event received.
        self.last_seq = 0
        self._lagged: SubscriberLaggedError | None = None

    @property
    def unread(self) -> int:
        """Events handed to this subscription and not received yet."""
        return self._feed.unread

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.receive()
        except RuntimeStoppedError:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stop receiving (idempotent); ``async with runtime.subscribe(...)`` does it for you."""
        self._close()

    async def receive(self) -> Event:
        """The next event; :class:`RuntimeStoppedError` once the runtime stopped, and
        :class:`SubscriberLaggedError` (every time) once the subscriber was dropped."""
        if threading.get_ident() != self._thread:
            raise _wrong_loop(self._thread)
        if self._lagged is not None:
            raise SubscriberLaggedError(self._lagged.last_seq)
        try:
            item = await self._feed.receive()
        except anyio.EndOfStream:
            raise RuntimeStoppedError("the subscription ended: the runtime stopped") from None
        except anyio.ClosedResourceError:
            raise RuntimeStoppedError("the subscription was closed") from None
        if isinstance(item, Lagged):
            self._lagged = SubscriberLaggedError(item.last_seq)
            raise self._lagged
        self.last_seq = item.seq
        return item


class Runtime(TaskOps, WorkerOps, PlanOps, InspectOps, ControlOps, RetentionOps, ScheduleOps):
    """An embedded, durable orchestration runtime on one SQLite database.

    Create it with :meth:`open`; every method sends a typed message to an actor.
    """

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
        self._server: Server | None = None
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
            from .remote.tcp import prepare_tcp

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
        if readers is not None:

            def poke_storage() -> None:
                with suppress(RuntimeStoppedError):  # a full mailbox: the next batch checks
                    storage.try_tell(CheckReaders())

            readers.poke = poke_storage
        # Where several runtimes write one database (PostgreSQL): what publishes every
        # node's events, beside the storage actor (None: the storage actor publishes).
        feed = store.log_feed(publisher(broadcast))
        storage_services = tuple(service.run for service in (readers, feed) if service is not None)
        subscription_ids = itertools.count(1)
        wall = wall_clock or _utc_now
        # Every deadline (leases, timeouts, backoffs, liveness, claim waits) runs on the
        # event loop's monotonic clock, the alarms' and the actors' alike; the wall clock
        # only stamps what is stored and shown, so stepping it moves no deadline.
        monotonic = anyio.current_time
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
                ChildSpec(broadcast, lambda: BroadcastActor(subscription_ids)),
                ChildSpec(
                    storage,
                    lambda: StorageActor(store, config, broadcast, readers=readers, feed=feed),
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
                    ),
                    services=(scheduler_alarm.run,),
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
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(supervisor.run)
                server = None
                if unix or tcp is not None:
                    from .remote.server import Server

                    # This user's other processes reach the runtime through it; it stops
                    # first, so that the calls it still runs find the actors running.
                    server = Server(runtime, claim, tcp)
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
                            callbacks.start_soon(retain, runtime, config.retention)
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

    # -- events ---------------------------------------------------------------------------

    async def publish(
        self,
        event_type: str,
        data: Mapping[str, object] | None = None,
        *,
        source: str = "runtime",
        correlation_id: str | None = None,
        task_id: str | None = None,
        plan_id: str | None = None,
        worker_id: str | None = None,
    ) -> Event:
        """Append an event to the durable log and fan it out; returns it with its ``seq``.

        Returns once the event is durable.
        """
        self._check_open()
        data, data_json = encode_json_object(
            data,
            "data",
            max_bytes=self._config.max_payload_bytes,
            max_depth=self._config.max_payload_depth,
        )
        event_type = check_identifier(event_type, "event_type")
        namespace = reserved_namespace(event_type)
        if namespace is not None:
            where = (
                f"in the runtime's own namespace {namespace!r}"
                if event_type.split(".", 1)[0] == namespace
                # A look-alike (case, width, plural...) would pass for the runtime's own
                # event with every reader, and with subscribers matching loosely.
                else f"reads as the runtime's own namespace {namespace!r}"
            )
            raise InvalidInputError(
                "event_type",
                f"{_show(event_type)} is {where} (one of {', '.join(RUNTIME_NAMESPACES)}, "
                "compared without case, width, accents or a plural): the runtime logs "
                "those when the change happens. Make the change (e.g. update_task_status, "
                "or publish_task_event with a TaskCompletedEvent), or publish an app event "
                "in a namespace of the app's own, such as 'review.completed'",
            )
        event = Event(
            type=event_type,
            timestamp=time.time(),
            source=check_identifier(source, "source"),
            correlation_id=check_optional_text(correlation_id, "correlation_id"),
            task_id=check_optional_text(task_id, "task_id"),
            plan_id=check_optional_text(plan_id, "plan_id"),
            worker_id=check_optional_text(worker_id, "worker_id"),
            data=data,  # a plain copy decoded from what is stored
        )
        committed = await self._storage.ask(Write(ops=(AppendEvent(event, data_json),)))
        return msgspec.structs.replace(event, seq=committed.seqs[0])

    @asynccontextmanager
    async def subscribe(
        self,
        pattern: str = "*",
        *,
        buffer: int | None = None,
        overflow: Literal["error", "drop"] | None = None,
        **filters: str,
    ) -> AsyncIterator[Subscription]:
        """Receive live events whose type matches ``pattern`` and whose fields equal
        ``filters`` (``task_id="..."``, or any key of the event's data), for the block.
        """
        subscription = await self._open_subscription(
            pattern, buffer=buffer, overflow=overflow, filters=filters
        )
        try:
            yield subscription
        finally:
            subscription.close()

    @asynccontextmanager
    async def tap(self, fold: Fold) -> AsyncIterator[EventTap]:
        """Fold every event committed from now on, for the block, in this process: ``fold``
        is called with each commit's events as the broadcast actor fans them out (see
        :mod:`hive_orchestration.messages.tap`: it must be quick, never block, and only
        read them). Cheaper than :meth:`subscribe` for an observer that only counts (the
        Prometheus exporter). ``await tap.receive()`` waits for its end: ``EndOfStream``
        when the runtime stops, a ``Lagged`` marker if the fan-out broke, or what
        ``fold`` raised."""
        self._check_open()
        tap = EventTap(fold)
        try:
            subscription_id = await self._broadcast.ask(
                Subscribe("*", (), tap, 1, "error", internal=True)
            )
        except BaseException:
            tap.close()
            raise
        try:
            yield tap
        finally:
            tap.close()
            with suppress(RuntimeStoppedError):
                self._broadcast.try_tell(Unsubscribe(subscription_id))

    async def _open_subscription(
        self,
        pattern: str,
        *,
        buffer: int | None,
        overflow: Literal["error", "drop"] | None,
        filters: Mapping[str, str],
    ) -> Subscription:
        """A registered subscription; the caller must :meth:`Subscription.close` it."""
        self._check_open()
        check_pattern(check_identifier(pattern, "pattern"))
        compile_pattern(pattern)
        capacity = check_int(
            self._config.subscriber_buffer if buffer is None else buffer,
            "buffer",
            minimum=1,
            maximum=1_000_000,
        )
        policy = self._config.subscriber_overflow if overflow is None else overflow
        if policy not in ("error", "drop"):
            raise InvalidInputError("overflow", f"must be 'error' or 'drop', got {_show(policy)}")
        checked = tuple(
            (check_identifier(key, "filters"), check_identifier(value, f"filters.{key}"))
            for key, value in sorted(filters.items())
        )
        feed = EventFeed()
        try:
            subscription_id = await self._broadcast.ask(
                Subscribe(pattern, checked, feed, capacity, policy)
            )
        except BaseException:
            feed.close()
            raise

        def close() -> None:
            feed.close()
            with suppress(RuntimeStoppedError):
                self._broadcast.try_tell(Unsubscribe(subscription_id))

        return Subscription(feed, pattern, close, self._thread)

    async def read_events(
        self,
        after: int = 0,
        *,
        limit: int = 1000,
        pattern: str = "*",
        task_id: str | None = None,
        plan_id: str | None = None,
        correlation_id: str | None = None,
    ) -> list[Event]:
        """Durable events with ``seq > after``, oldest first, at most ``limit`` of them;
        only those whose type matches ``pattern`` (``*`` and ``?`` globs) and whose
        ``task_id``, ``plan_id`` and ``correlation_id`` equal those given."""
        self._check_open()
        read = check_event_read(after, limit, pattern, task_id, plan_id, correlation_id)
        if "[" in read.pattern:
            # SQLite's GLOB negates a class with ^, fnmatch (the live side) with !: refuse
            # rather than answer a replay and a subscription differently.
            raise InvalidInputError("pattern", "bracket classes are not supported in reads")
        events = await self._storage.ask(read)
        return list(events)

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
        from .client import OrchestrationClient

        self._check_running()
        return OrchestrationClient._bound(
            self,
            source_agent=check_optional_text(source_agent, "source_agent"),
            correlation_id=check_optional_text(correlation_id, "correlation_id"),
        )

    def _spawn(self, function: Callable[[], Coroutine[Any, Any, object]]) -> None:
        """Run ``function`` in the runtime's callback group (stopped before the actors)."""
        self._check_open()
        if self._callbacks is None:  # pragma: no cover - set before the runtime is handed out
            raise RuntimeStoppedError("the runtime is not running")
        self._callbacks.start_soon(function)

    async def last_seq(self) -> int:
        """The sequence number of the last durable event (``0``: the log is empty).

        Read it to replay the log up to now, or to resume later from this point with
        ``client.events(after=...)``.
        """
        self._check_open()
        return (await self._storage.ask(GetStorageStats())).last_seq

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
            raise _wrong_loop(self._thread)

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
            raise _wrong_loop(self._thread)


def _normalize_path(
    path: str | os.PathLike[str] | None, config: RuntimeConfig | None = None
) -> str:
    """The database ``Runtime.open(path, config=config)`` opens, as an absolute path."""
    return resolve_db_path(path, config)[0]


def raise_cause(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Raise what failed a block that ran in task groups (the app's error, as it raised it)."""
    cause = _unwrap(group)
    if isinstance(cause, KeyboardInterrupt | SystemExit) and _loop_shutting_down():
        # asyncio already raised this one out of its loop, from the task it ended, and is
        # now cancelling every task to close the loop. Raised bare again, it would abort
        # that shutdown too, before anyio's worker threads are told to stop, and the process
        # would never exit. In its group it ends this task like any failure; the loop's
        # owner raises the original.
        raise group
    raise cause from cause.__cause__


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """anyio wraps every failure of a task group in a group; give the caller the cause."""
    found = leaves(group)
    for leaf in found:
        if isinstance(leaf, RuntimeFailedError):
            return leaf
    cancelled = anyio.get_cancelled_exc_class()
    real = [leaf for leaf in found if not isinstance(leaf, cancelled)]
    # A RuntimeStoppedError in the app's block is a consequence of the real failure.
    causes = [leaf for leaf in real if not isinstance(leaf, RuntimeStoppedError)] or real
    return causes[0] if len(causes) == 1 else group


def _wrong_loop(owner: int) -> WrongEventLoopError:
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    caller = threading.current_thread().name
    return WrongEventLoopError(names.get(owner, f"thread {owner}"), caller)


def _loop_shutting_down() -> bool:
    """Whether asyncio is cancelling this task to close its loop (asyncio.run's shutdown
    after a KeyboardInterrupt or SystemExit ended another task).

    That cancellation is asyncio's own ``Task.cancel()``: anyio takes back every
    cancellation it makes as its scope exits, so a request still counted by
    ``Task.cancelling()`` out here is not anyio's. Trio has no such shutdown.
    """
    import asyncio  # noqa: TID251 - only asyncio's tasks count cancellation requests

    try:
        task = asyncio.current_task()
    except RuntimeError:  # no asyncio loop in this thread: trio
        return False
    return task is not None and task.cancelling() > 0


def _describe(error: BaseException, limit: int = 500) -> str:
    """An exception as bounded, encodable text for a durable event (no lone surrogates)."""
    text = f"{error}".encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _utc_now() -> datetime:
    return datetime.now(UTC)
