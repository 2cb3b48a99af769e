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

import logging
import os
from contextlib import AsyncExitStack
from types import TracebackType
from typing import TYPE_CHECKING, TypeAlias

import anyio

from .._validate import check_optional_text
from ..config import TLS_CA_ENV, TOKEN_ENV, URL_ENV, RuntimeConfig
from ..errors import (
    AccessDeniedError,
    ConfigError,
    HiveError,
    InvalidInputError,
    RuntimeStoppedError,
)
from ..remote.client import RemoteRuntime
from ..remote.status import ServerStatus
from ..remote.tcp import parse_url
from ..storage import SCHEMA_VERSION
from .client_events import ClientEvents
from .client_publish import ClientPublishing
from .client_remote import kept_operation, remote_operation, remote_operations
from .embedded import Runtime, RuntimeStatistics
from .keeper import Keeper, reach
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

if TYPE_CHECKING:
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
    ClientEvents,
    ClientPublishing,
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
            for name in remote_operations(OrchestrationClient):
                setattr(self, name, kept_operation(OrchestrationClient, self, self._keeper, name))
            return
        if isinstance(runtime, RemoteRuntime):
            # Each operation is sent as it is called, to run as the very same operation in
            # the owner's process: its checks, answer and errors are the owner's.
            for name in remote_operations(OrchestrationClient):
                setattr(self, name, remote_operation(OrchestrationClient, self, runtime, name))
            return
        # The operation mixins send to these actors; the runtime keeps them for its life.
        self._tasks = runtime._tasks
        self._workers = runtime._workers
        self._plans = runtime._plans
        self._storage = runtime._storage
        self._schedules = runtime._schedules
        self._wall = runtime._wall

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
                held=config.max_answer_bytes,
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


if TYPE_CHECKING:
    # The client satisfies the seeds' protocols (checked by mypy, not at run time).
    def _protocols(
        client: OrchestrationClient,
    ) -> tuple[TaskOperations, WorkerOperations, EventProtocol]:
        return client, client, client
