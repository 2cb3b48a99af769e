"""The message-sending API: what agents and apps hold to talk to the runtime.

Two ways to get one:

    async with OrchestrationClient(db_path="hive.db", source_agent="ai-planner") as client:
        ...  # the client starts an embedded runtime and owns it for the block

    async with Runtime.open("hive.db") as runtime:
        planner = runtime.client(source_agent="ai-planner")  # one per agent, shared runtime

Either way every operation is a typed message to an actor; the client adds who is calling
(``source_agent``, the events' ``source``) and, for the work it starts, a
``correlation_id``, and the event APIs: live subscriptions, a replay-then-live stream of the
durable log, and callbacks.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import typing
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import AsyncExitStack
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, cast

import anyio

from .._validate import check_identifier, check_int, check_optional_text
from ..config import TLS_CA_ENV, TOKEN_ENV, URL_ENV, RuntimeConfig
from ..errors import (
    AccessDeniedError,
    ConfigError,
    ConnectionLostError,
    HiveError,
    InvalidInputError,
    NotFoundError,
    OutcomeUnknownError,
    RuntimeStoppedError,
)
from ..events import (
    EventHandler,
    OrchestrationEvent,
    TaskCancelledEvent,
    TaskCompletedEvent,
    TaskCreatedEvent,
    TaskFailedEvent,
    TaskRetriedEvent,
    TaskStartedEvent,
    TopicRegistry,
    UnifiedEvent,
    UnifiedEventType,
    WorkerHeartbeatEvent,
    WorkerOfflineEvent,
    WorkerRegisteredEvent,
)
from ..messages.events import Event
from ..messages.tasks import TaskStatus
from ..messages.workers import WorkerStatus
from ..remote.client import RemoteRuntime
from ..remote.status import ServerStatus
from ..remote.tcp import parse_url
from ..storage import SCHEMA_VERSION
from .carried import EXCLUSIVE, carried
from .embedded import Runtime, RuntimeStatistics
from .keeper import Keeper, reach, usable
from .ops.claims import ClaimOps
from .ops.control import ControlOps
from .ops.planning import PlanningOps
from .ops.plans import PlanOps
from .ops.reads import InspectOps
from .ops.retention import RetentionOps
from .ops.schedules import ScheduleOps
from .ops.tasks import TaskOps
from .ops.workers import WorkerOps
from .streams import CallbackSubscription, EventStream
from .subscription import Subscription

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from ..interfaces import EventProtocol, TaskOperations, WorkerOperations

__all__ = ["CallbackSubscription", "EventStream", "OrchestrationClient"]

log = logging.getLogger("hive_orchestration.client")

#: What a client talks to: the runtime in this process, or the one that owns the database
#: in another process, through its socket.
_Backend: TypeAlias = Runtime | RemoteRuntime
_NOT_OPEN = (
    "the client is not open: use `async with OrchestrationClient(...) as client:`, "
    "or get one from a running runtime with `runtime.client()`"
)


class OrchestrationClient(
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
    """Every operation of the seeds, with their names and arguments, as typed messages.

    ``OrchestrationClient(db_path=...)`` starts and owns an embedded runtime for its
    ``async with`` block (``":memory:"`` for a throwaway one; the default is
    ``hive/db/hive-internal.db``). If a runtime in another process of this user owns that
    database already, the client connects to it through the socket it serves instead,
    and works the same: every operation, with the same checks, answers and errors, its
    subscriptions, event streams and callbacks (``client.remote`` says which it is).
    ``runtime.client()`` returns one bound to a running runtime instead.

    ``OrchestrationClient(url="hives://host:7000", token=...)`` connects to a runtime
    served over TCP (``hive-orchestration serve``) and never opens a database itself:
    ``hive://`` for a server on this machine's loopback, ``hives://`` (TLS, the server's
    certificate checked against ``tls_ca`` or the system's authorities) for any other.
    Given neither ``url`` nor ``db_path``, a client connects to
    ``$HIVE_ORCHESTRATION_URL`` when it is set, before any database setting
    (``config.db_path``, ``$HIVE_ORCHESTRATION_DB_PATH``, the default); ``token`` and
    ``tls_ca`` default to ``$HIVE_ORCHESTRATION_TOKEN`` and
    ``$HIVE_ORCHESTRATION_TLS_CA``. An agent token acts as its own identity: a client
    without ``source_agent`` takes it, one with another is refused at open.

    ``source_agent`` is recorded as the ``source`` of the events its calls cause (calls
    that hold a lease record the worker's id instead, and worker events the worker's own
    id) and of the tasks, plans and planning requests it creates; ``correlation_id`` is
    given to every task it creates and every event it publishes, and so to every event of
    those tasks.
    """

    def __init__(
        self,
        db_path: str | os.PathLike[str] | None = None,
        *,
        url: str | None = None,
        token: str | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        config: RuntimeConfig | None = None,
        source_agent: str | None = None,
        correlation_id: str | None = None,
    ) -> None:
        if url is not None:
            if db_path is not None:
                raise InvalidInputError(
                    "url", "give url or db_path, not both: a client with a url opens no database"
                )
            parse_url(url)  # refused now if malformed, or off loopback without TLS
        if token is not None and not isinstance(token, str):
            raise InvalidInputError("token", f"must be a string, got {type(token).__name__}")
        if tls_ca is not None and not isinstance(tls_ca, str | os.PathLike):
            raise InvalidInputError("tls_ca", f"must be a path, got {type(tls_ca).__name__}")
        self._url = url
        self._token = token
        self._tls_ca = None if tls_ca is None else os.fspath(tls_ca)
        self._db_path = db_path
        self._open_config = config
        self._owns = True
        self._runtime: _Backend | None = None
        self._stack: AsyncExitStack | None = None
        self._closed = False
        self._handles: set[CallbackSubscription] = set()
        #: With ``take_over``: what holds the runtime the client talks to, and replaces it.
        self._keeper: Keeper | None = None
        self._default_agent = check_optional_text(source_agent, "source_agent")
        self._default_correlation = check_optional_text(correlation_id, "correlation_id")

    @classmethod
    def _bound(
        cls,
        runtime: _Backend,
        *,
        source_agent: str | None,
        correlation_id: str | None,
    ) -> OrchestrationClient:
        client = cls(source_agent=source_agent, correlation_id=correlation_id)
        client._owns = False
        client._attach(runtime)
        return client

    def _attach(self, runtime: _Backend) -> None:
        self._runtime = runtime
        self._config = runtime.config
        if self._keeper is not None:
            # Each operation goes to whatever the keeper holds when it is called: the
            # owner through its socket, or the runtime this client took over.
            for name in _remote_operations():
                setattr(self, name, _kept_operation(self, self._keeper, name))
            return
        if isinstance(runtime, RemoteRuntime):
            # Each operation is sent as it is called, to run as the very same operation in
            # the owner's process: its checks, answer and errors are the owner's.
            for name in _remote_operations():
                setattr(self, name, _remote_operation(self, runtime, name))
            return
        # The operation mixins send to these actors; the runtime keeps them for its life.
        self._tasks = runtime._tasks
        self._workers = runtime._workers
        self._plans = runtime._plans
        self._storage = runtime._storage
        self._schedules = runtime._schedules

    def bind(
        self, *, source_agent: str | None = None, correlation_id: str | None = None
    ) -> OrchestrationClient:
        """A client of the same runtime with other defaults (say, one per workflow).

        Unnamed defaults are kept; it does not own the runtime.
        """
        if self._keeper is not None:  # it follows the keeper's runtime as this one does
            client = OrchestrationClient(
                source_agent=self._agent(check_optional_text(source_agent, "source_agent")),
                correlation_id=self._correlation(
                    check_optional_text(correlation_id, "correlation_id")
                ),
            )
            client._owns = False
            client._keeper = self._keeper
            client._attach(self._backend())
            return client
        return OrchestrationClient._bound(
            self._backend(),
            source_agent=self._agent(check_optional_text(source_agent, "source_agent")),
            correlation_id=self._correlation(check_optional_text(correlation_id, "correlation_id")),
        )

    # -- lifetime ---------------------------------------------------------------------------

    async def __aenter__(self) -> OrchestrationClient:
        if self._closed:
            raise RuntimeStoppedError("this client was closed; create a new one")
        if self._owns:
            if self._stack is not None:
                raise RuntimeStoppedError("this client is already open (nested `async with`)")
            stack = AsyncExitStack()
            try:
                backend = await self._open(stack)
            except BaseException:
                await stack.aclose()
                raise
            self._stack = stack
            self._attach(backend)
        return self

    def _target_url(self) -> str | None:
        """The url this client connects to, or None: it opens (or reaches) a database."""
        if self._url is not None:
            return self._url
        if self._db_path is not None:
            return None
        value = os.environ.get(URL_ENV)
        if value is not None and not value.strip():
            raise ConfigError("url", f"${URL_ENV} is empty: unset it or name a server")
        return value

    async def _connect_url(self, stack: AsyncExitStack, url: str) -> RemoteRuntime:
        config = RuntimeConfig.checked(self._open_config)
        token = self._token if self._token is not None else os.environ.get(TOKEN_ENV)
        tls_ca = self._tls_ca if self._tls_ca is not None else os.environ.get(TLS_CA_ENV)
        remote = await stack.enter_async_context(
            RemoteRuntime.connect_url(
                url,
                token=token or None,
                tls_ca=tls_ca or None,
                name=self._default_agent,
                silence=config.remote_timeout,
            )
        )
        identity = remote.identity
        if remote.role != "admin" and identity is not None:
            if self._default_agent is None:
                self._default_agent = identity  # what the server records anyway
            elif self._default_agent != identity:
                raise AccessDeniedError(
                    "connect",
                    f"the token acts as {identity!r}, and every call of this client as"
                    f" source_agent {self._default_agent!r} would be refused: leave"
                    " source_agent out, or use that agent's token",
                )
        return remote

    async def _open(self, stack: AsyncExitStack) -> _Backend:
        """Connect to the runtime served at the url; else start the runtime on the
        database, or, if a runtime of another process owns it and serves its socket,
        connect to that one (with ``take_over``, through a keeper that replaces it when
        its owner goes away)."""
        url = self._target_url()
        if url is not None:
            return await self._connect_url(stack, url)
        if RuntimeConfig.checked(self._open_config).take_over:
            keeper = Keeper(self._db_path, self._open_config, self._default_agent)
            backend = await stack.enter_async_context(keeper.running())
            self._keeper = keeper
            return backend
        return await reach(stack, self._db_path, self._open_config, self._default_agent)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        with anyio.CancelScope(shield=True):
            await self.aclose_callbacks()
        self._closed = True
        stack, self._stack = self._stack, None
        if stack is not None:
            return await stack.__aexit__(exc_type, exc, traceback)
        return None

    async def aclose_callbacks(self) -> None:
        """Stop every callback subscription this client started."""
        for handle in list(self._handles):
            await handle.aclose()

    @property
    def runtime(self) -> Runtime:
        """The runtime this client talks to (in this process: see :attr:`remote`)."""
        backend = self._backend()
        if isinstance(backend, RemoteRuntime):
            raise HiveError(
                f"this client talks to the runtime of process {backend.owner_pid} through its"
                " socket: that Runtime object lives in that process. Use the client's own"
                " operations, which reach it"
            )
        return backend

    @property
    def remote(self) -> bool:
        """Whether the runtime this client talks to is in another process (reached through
        the socket it serves) rather than in this one."""
        runtime = self._runtime if self._keeper is None else self._keeper.current
        return isinstance(runtime, RemoteRuntime)

    @property
    def db_path(self) -> str:
        """The database file (``":memory:"`` for a throwaway database); for a client
        with a url, the server's file once open, the url until then."""
        if self._runtime is not None:
            return self._runtime.path
        url = self._target_url()
        if url is not None:
            return url
        from .embedded import _normalize_path

        return _normalize_path(self._db_path, self._open_config)

    @property
    def source_agent(self) -> str | None:
        return self._default_agent

    @property
    def correlation_id(self) -> str | None:
        return self._default_correlation

    def _check_open(self) -> None:
        """Before every call that talks to the runtime (from its event loop's thread)."""
        if self._keeper is not None and not self._closed:
            # The runtime may be changing hands: the call waits for the next (_live).
            self._keeper.check()
            assert self._runtime is not None
            self._runtime._check_loop()
            return
        self._backend()._check_open()

    def _backend(self) -> _Backend:
        runtime = self._runtime
        if self._keeper is not None and not self._closed:
            self._keeper.check()
            runtime = self._keeper.current
        if runtime is None:
            raise RuntimeStoppedError(_NOT_OPEN)
        if self._closed:
            raise RuntimeStoppedError("this client was closed; create a new one")
        runtime._check_running()
        return runtime

    async def _live(self) -> _Backend:
        """:meth:`_backend`, once there is one to call (with ``take_over``, a call made
        while the database changes hands waits for its next owner)."""
        if self._keeper is None or self._closed:
            return self._backend()
        backend = await self._keeper.live()
        backend._check_open()
        return backend

    def subscribe(
        self,
        pattern: str = "*",
        *,
        buffer: int | None = None,
        overflow: Literal["error", "drop"] | None = None,
        **filters: str,
    ) -> AbstractAsyncContextManager[Subscription]:
        """Live events matching ``pattern`` and ``filters`` for the ``async with`` block:

            async with client.subscribe("task.*", task_id=task_id) as events:
                async for event in events:
                    ...

        Only events committed after the subscription began; to start from a point of the
        log, use :meth:`events`.
        """
        return self._backend().subscribe(pattern, buffer=buffer, overflow=overflow, **filters)

    def events(
        self,
        after: int | None = None,
        pattern: str = "*",
        *,
        buffer: int | None = None,
        **filters: str,
    ) -> EventStream:
        """The durable log from ``after`` (a sequence number; ``0``: from the start;
        ``None``: from now), then live events, with no gap and no duplicate:

            async with client.events(after=last_seen, pattern="plan.*") as stream:
                async for event in stream:
                    last_seen = event.seq

        A stream that falls behind catches up from the log instead of losing events.
        """
        # Only builds the stream (the sync client does it from its own thread): reading
        # it checks the event loop.
        if self._keeper is not None:
            self._keeper.check()  # the stream waits for the next runtime if this one goes
            backend = self._keeper.current
        else:
            backend = self._backend()
        assert backend is not None
        if after is not None:
            check_int(after, "after", minimum=0)
        return EventStream(
            backend,
            pattern=pattern,
            after=after,
            buffer=buffer,
            filters=filters,
            keeper=self._keeper,
        )

    async def last_seq(self) -> int:
        """The sequence number of the last durable event (``0``: the log is empty)."""
        return await (await self._live()).last_seq()

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
        """Durable events with ``seq > after``, oldest first, at most ``limit`` (see
        :meth:`Runtime.read_events` for the filters)."""
        return await (await self._live()).read_events(
            after,
            limit=limit,
            pattern=pattern,
            task_id=task_id,
            plan_id=plan_id,
            correlation_id=correlation_id,
        )

    async def server_status(self) -> ServerStatus:
        """Who is connected to the runtime through its socket now: the owning process,
        the address it serves on (None if it serves none), and each client connection
        (its name, the client's pid, since when, its calls in flight and subscriptions).
        From a client of another process it is asked of the owner, and lists that client
        too. ``hive-orchestration status`` shows it."""
        self._check_open()
        runtime = self.runtime  # a client of another process sends this call to its owner
        server = runtime._server
        if server is None:
            return ServerStatus(
                pid=os.getpid(),
                db_path=runtime.path,
                schema_version=SCHEMA_VERSION,
                address=None,
                connections=[],
            )
        return server.status()

    async def statistics(self) -> RuntimeStatistics:
        """The runtime's own figures (:meth:`Runtime.statistics`): each actor's mailbox,
        the supervisor's restarts, the storage actor's commits and writes with their
        histograms, the broadcast actor's deliveries and lags. From a client of another
        process it is asked of the owner (what the Prometheus exporter of a runtime
        reached through its socket or over TCP serves)."""
        self._check_open()
        return await self.runtime.statistics()

    async def subscribe_to_task_events(
        self,
        task_id: str,
        callback: EventHandler,
        *,
        pattern: str = "task.*",
    ) -> CallbackSubscription:
        """Call ``callback`` (a plain or an async function) for every event of ``task_id``
        (``"*"``: of every task) from now on, one at a time, in log order, until the
        client or the runtime closes or the returned handle is cancelled.

        It is registered when this returns: no later event is missed, and a slow
        callback catches up from the durable log rather than losing events. A plain
        callback runs on the event loop, so keep it quick (or make it async). An
        exception in the callback is logged and counted (``handle.errors``); delivery goes
        on with the next event.
        """
        filters = {} if task_id == "*" else {"task_id": check_identifier(task_id, "task_id")}
        return await self.on_event(pattern, callback, **filters)

    async def on_event(
        self, pattern: str, callback: EventHandler, **filters: str
    ) -> CallbackSubscription:
        """Call ``callback`` for every event matching ``pattern`` and ``filters`` from now
        on (see :meth:`subscribe_to_task_events` for the delivery rules)."""
        self._check_open()
        if not callable(callback):
            raise InvalidInputError("callback", f"must be callable, got {type(callback).__name__}")
        backend = await self._live()
        stream = EventStream(
            backend, pattern=pattern, after=None, filters=filters, keeper=self._keeper
        )
        await stream.open()
        handle = CallbackSubscription(stream, callback, self._handles)
        try:
            if self._keeper is not None and self._keeper.group is not None:
                # The keeper's task group: the callback outlives a change of runtime.
                self._keeper.group.start_soon(handle._run)
            else:
                backend._spawn(handle._run)
        except BaseException:
            await stream.aclose()
            raise
        self._handles.add(handle)
        return handle

    async def attach(self, registry: TopicRegistry, pattern: str = "*") -> CallbackSubscription:
        """Feed ``registry`` every event matching ``pattern`` from now on, in log order."""
        if not isinstance(registry, TopicRegistry):
            raise InvalidInputError(
                "registry", f"must be a TopicRegistry, got {type(registry).__name__}"
            )
        return await self.on_event(pattern, registry.dispatch)

    # -- publishing -------------------------------------------------------------------------

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


@functools.cache
def _remote_operations() -> Mapping[str, tuple[inspect.Signature, Any]]:
    """Every operation a client sends to a runtime in another process: its signature
    (without ``self``), to bind a call's arguments as Python would, and its return type,
    to decode the answer into."""
    found = {}
    for name in sorted(carried(OrchestrationClient)):
        method = getattr(OrchestrationClient, name)
        signature = inspect.signature(method)
        parameters = list(signature.parameters.values())[1:]
        found[name] = (
            signature.replace(parameters=parameters),
            typing.get_type_hints(method)["return"],
        )
    return found


def _remote_operation(
    client: OrchestrationClient, remote: RemoteRuntime, name: str
) -> Callable[..., Awaitable[Any]]:
    """``client``'s operation ``name``, sent to ``remote`` as it is called."""
    signature, returns = _remote_operations()[name]
    exclusive = name in EXCLUSIVE

    async def operation(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{name}(): {exc}") from None
        return await remote.call(
            name,
            bound.arguments,
            agent=client._default_agent,
            correlation=client._default_correlation,
            returns=returns,
            exclusive=exclusive,
        )

    operation.__name__ = operation.__qualname__ = name
    operation.__doc__ = getattr(OrchestrationClient, name).__doc__
    operation.__signature__ = signature  # type: ignore[attr-defined]
    return operation


def _kept_operation(
    client: OrchestrationClient, keeper: Keeper, name: str
) -> Callable[..., Awaitable[Any]]:
    """``client``'s operation ``name``, sent to whatever ``keeper`` holds when it is
    called: the owner in another process, or the runtime this client took over. A call
    made while the database changes hands waits for its next owner; one that could not go
    out to an owner that went away goes to the next."""
    signature, returns = _remote_operations()[name]
    exclusive = name in EXCLUSIVE
    method = getattr(OrchestrationClient, name)

    async def operation(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{name}(): {exc}") from None
        backend = await client._live()
        while True:
            if isinstance(backend, Runtime):
                local = backend.client(
                    source_agent=client._default_agent,
                    correlation_id=client._default_correlation,
                )
                return await method(local, *args, **kwargs)
            try:
                return await backend.call(
                    name,
                    bound.arguments,
                    agent=client._default_agent,
                    correlation=client._default_correlation,
                    returns=returns,
                    exclusive=exclusive,
                )
            except OutcomeUnknownError:
                raise  # it went out: it may have been applied
            except ConnectionLostError:
                if usable(backend):
                    raise
                backend = await keeper.replaced(backend)  # it never went out

    operation.__name__ = operation.__qualname__ = name
    operation.__doc__ = method.__doc__
    operation.__signature__ = signature  # type: ignore[attr-defined]
    return operation


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


if TYPE_CHECKING:
    # The client satisfies the seeds' protocols (checked by mypy, not at run time).
    def _protocols(
        client: OrchestrationClient,
    ) -> tuple[TaskOperations, WorkerOperations, EventProtocol]:
        return client, client, client
