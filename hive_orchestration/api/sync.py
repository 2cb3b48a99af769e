"""The client for synchronous apps: the same operations, blocking.

    with SyncOrchestrationClient(db_path="hive.db", source_agent="cron") as client:
        task_id = client.create_task("report", {"day": "monday"})

The ``with`` block starts an event loop in a thread of its own (anyio's blocking portal),
runs an embedded runtime on it and stops both at the end. Every method sends its message
through the portal and waits for the reply, so it may be called from any thread. Given
``url=`` and ``token=`` (or ``$HIVE_ORCHESTRATION_URL``), it connects to a runtime served
over TCP instead, as :class:`~hive_orchestration.OrchestrationClient` does.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Coroutine, Iterator
from contextlib import AbstractContextManager, contextmanager
from types import TracebackType
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar, cast

import anyio
import anyio.to_thread
from anyio.from_thread import BlockingPortal, start_blocking_portal

from ..config import RuntimeConfig
from ..errors import HiveError, InvalidInputError, RuntimeStoppedError
from ..events import TopicRegistry
from ..messages.events import Event
from .client import CallbackSubscription, EventStream, OrchestrationClient
from .subscription import Subscription

__all__ = ["BlockingEvents", "SyncCallbackSubscription", "SyncOrchestrationClient"]

P = ParamSpec("P")
R = TypeVar("R")


def _blocking(
    method: Callable[Concatenate[Any, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[SyncOrchestrationClient, P], R]:
    """The async client's ``method``, run through the portal (same arguments and docs)."""

    def call(self: SyncOrchestrationClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        client, portal = self._open()
        try:
            # Looked up on the client: one that talks to another process's runtime has
            # its operations replaced by ones that send them there.
            bound = getattr(client, method.__name__)
            result: R = portal.call(functools.partial(bound, *args, **kwargs))
        except HiveError as exc:
            # Raised afresh in the caller's thread: the portal's and the event loop's
            # frames say nothing the caller can act on (the cause, if any, is kept).
            raise exc.with_traceback(None) from exc.__cause__
        return result

    call.__name__ = call.__qualname__ = method.__name__
    call.__doc__ = method.__doc__
    call.__wrapped__ = method  # type: ignore[attr-defined]  # for inspect.signature and pydoc
    return call


class BlockingEvents:
    """Events to iterate in a plain ``for`` loop (it ends when the runtime stops)."""

    def __init__(self, portal: BlockingPortal, source: Subscription | EventStream) -> None:
        self._portal = portal
        self._source = source

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        try:
            return self._portal.call(self._source.receive)
        except RuntimeStoppedError:
            raise StopIteration from None

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event, or ``None`` if none came within ``timeout`` seconds."""

        async def receive() -> Event | None:
            with anyio.move_on_after(timeout):
                return await self._source.receive()
            return None

        return self._portal.call(receive)


class SyncCallbackSubscription:
    """A callback subscription of the sync client."""

    def __init__(self, portal: BlockingPortal, handle: CallbackSubscription) -> None:
        self._portal = portal
        self._handle = handle

    @property
    def delivered(self) -> int:
        return self._handle.delivered

    @property
    def errors(self) -> int:
        return self._handle.errors

    @property
    def active(self) -> bool:
        return self._handle.active

    def cancel(self) -> None:
        """Stop, and wait until the callback is no longer running."""
        self._portal.call(self._handle.aclose)


class SyncOrchestrationClient:
    """:class:`OrchestrationClient` for synchronous code (see the module docs).

    Callbacks given to :meth:`subscribe_to_task_events` run in worker threads, one call
    at a time and in log order, so a slow one never stalls the runtime's loop.
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
        backend: Literal["asyncio", "trio"] = "asyncio",
    ) -> None:
        if backend not in ("asyncio", "trio"):
            raise InvalidInputError("backend", f"must be 'asyncio' or 'trio', got {backend!r}")
        self._async = OrchestrationClient(
            db_path,
            url=url,
            token=token,
            tls_ca=tls_ca,
            config=config,
            source_agent=source_agent,
            correlation_id=correlation_id,
        )
        self._backend = backend
        self._portal: BlockingPortal | None = None
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self._client_cm: AbstractContextManager[OrchestrationClient] | None = None

    def __enter__(self) -> SyncOrchestrationClient:
        if self._portal is not None:
            raise RuntimeStoppedError("this client is already open (nested `with`)")
        portal_cm = start_blocking_portal(self._backend)
        portal = portal_cm.__enter__()
        try:
            client_cm = portal.wrap_async_context_manager(self._async)
            client_cm.__enter__()
        except BaseException as exc:
            portal_cm.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._portal, self._portal_cm, self._client_cm = portal, portal_cm, client_cm
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        client_cm, portal_cm = self._client_cm, self._portal_cm
        self._portal = self._portal_cm = self._client_cm = None
        try:
            if client_cm is not None:
                client_cm.__exit__(exc_type, exc, traceback)
        finally:
            if portal_cm is not None:
                portal_cm.__exit__(None, None, None)

    def _open(self) -> tuple[OrchestrationClient, BlockingPortal]:
        if self._portal is None:
            raise RuntimeStoppedError(
                "the client is not open: use `with SyncOrchestrationClient(...) as client:`"
            )
        return self._async, self._portal

    @property
    def db_path(self) -> str:
        return self._async.db_path

    @property
    def source_agent(self) -> str | None:
        return self._async.source_agent

    @property
    def remote(self) -> bool:
        """Whether the runtime is in another process (see :attr:`OrchestrationClient.remote`)."""
        return self._async.remote

    @property
    def correlation_id(self) -> str | None:
        return self._async.correlation_id

    # -- events -----------------------------------------------------------------------------

    @contextmanager
    def subscribe(self, pattern: str = "*", **filters: str) -> Iterator[BlockingEvents]:
        """Live events for the ``with`` block: ``for event in events: ...``."""
        client, portal = self._open()
        with portal.wrap_async_context_manager(
            client.subscribe(pattern, **cast("dict[str, Any]", filters))
        ) as sub:
            yield BlockingEvents(portal, sub)

    @contextmanager
    def events(
        self, after: int | None = None, pattern: str = "*", **filters: str
    ) -> Iterator[BlockingEvents]:
        """The durable log from ``after``, then live events, with no gap (see
        :meth:`OrchestrationClient.events`)."""
        client, portal = self._open()
        with portal.wrap_async_context_manager(
            client.events(after, pattern, **cast("dict[str, Any]", filters))
        ) as s:
            yield BlockingEvents(portal, s)

    def subscribe_to_task_events(
        self, task_id: str, callback: Callable[[Event], object], *, pattern: str = "task.*"
    ) -> SyncCallbackSubscription:
        """Call ``callback`` for every event of ``task_id`` (``"*"``: all tasks) from now
        on, in a worker thread, one event at a time, in log order."""
        client, portal = self._open()
        if not callable(callback):
            raise InvalidInputError("callback", f"must be callable, got {type(callback).__name__}")

        async def in_thread(event: Event) -> None:
            await anyio.to_thread.run_sync(callback, event)

        handle = portal.call(
            functools.partial(client.subscribe_to_task_events, task_id, in_thread, pattern=pattern)
        )
        return SyncCallbackSubscription(portal, handle)

    def attach(self, registry: TopicRegistry, pattern: str = "*") -> SyncCallbackSubscription:
        """Feed ``registry`` every event matching ``pattern`` from now on (handlers run on
        the runtime's loop thread: keep plain ones quick)."""
        client, portal = self._open()
        handle = portal.call(client.attach, registry, pattern)
        return SyncCallbackSubscription(portal, handle)

    # -- every other operation, blocking ----------------------------------------------------

    # Tasks and runs.
    create_task = _blocking(OrchestrationClient.create_task)
    create_tasks = _blocking(OrchestrationClient.create_tasks)
    get_task = _blocking(OrchestrationClient.get_task)
    update_task_status = _blocking(OrchestrationClient.update_task_status)
    cancel_task = _blocking(OrchestrationClient.cancel_task)
    delete_task = _blocking(OrchestrationClient.delete_task)
    purge_tasks = _blocking(OrchestrationClient.purge_tasks)
    trim_events = _blocking(OrchestrationClient.trim_events)
    get_tasks_by_status = _blocking(OrchestrationClient.get_tasks_by_status)
    count_tasks = _blocking(OrchestrationClient.count_tasks)
    list_tasks = _blocking(OrchestrationClient.list_tasks)
    queue_depths = _blocking(OrchestrationClient.queue_depths)
    get_queued_tasks = _blocking(OrchestrationClient.get_queued_tasks)
    get_pending_tasks = _blocking(OrchestrationClient.get_pending_tasks)
    get_unroutable_tasks = _blocking(OrchestrationClient.get_unroutable_tasks)
    create_run = _blocking(OrchestrationClient.create_run)
    get_run = _blocking(OrchestrationClient.get_run)
    get_runs = _blocking(OrchestrationClient.get_runs)
    update_run_status = _blocking(OrchestrationClient.update_run_status)
    # Claims: what a worker calls.
    claim_task = _blocking(OrchestrationClient.claim_task)
    claim_tasks = _blocking(OrchestrationClient.claim_tasks)
    heartbeat = _blocking(OrchestrationClient.heartbeat)
    report_progress = _blocking(OrchestrationClient.report_progress)
    start_task = _blocking(OrchestrationClient.start_task)
    complete_task = _blocking(OrchestrationClient.complete_task)
    complete_tasks = _blocking(OrchestrationClient.complete_tasks)
    fail_task = _blocking(OrchestrationClient.fail_task)
    fail_tasks = _blocking(OrchestrationClient.fail_tasks)
    release_task = _blocking(OrchestrationClient.release_task)
    release_worker_tasks = _blocking(OrchestrationClient.release_worker_tasks)
    # Workers.
    register_worker = _blocking(OrchestrationClient.register_worker)
    update_worker_heartbeat = _blocking(OrchestrationClient.update_worker_heartbeat)
    get_active_workers = _blocking(OrchestrationClient.get_active_workers)
    list_workers = _blocking(OrchestrationClient.list_workers)
    get_worker = _blocking(OrchestrationClient.get_worker)
    unregister_worker = _blocking(OrchestrationClient.unregister_worker)
    # Plans and the planning queue.
    queue_planning_request = _blocking(OrchestrationClient.queue_planning_request)
    claim_planning_request = _blocking(OrchestrationClient.claim_planning_request)
    get_planning_request = _blocking(OrchestrationClient.get_planning_request)
    get_planning_queue = _blocking(OrchestrationClient.get_planning_queue)
    cancel_planning_request = _blocking(OrchestrationClient.cancel_planning_request)
    fail_planning_request = _blocking(OrchestrationClient.fail_planning_request)
    create_execution_plan = _blocking(OrchestrationClient.create_execution_plan)
    approve_plan = _blocking(OrchestrationClient.approve_plan)
    create_planned_subtasks_from_plan = _blocking(
        OrchestrationClient.create_planned_subtasks_from_plan
    )
    mark_plan_execution_started = _blocking(OrchestrationClient.mark_plan_execution_started)
    cancel_plan = _blocking(OrchestrationClient.cancel_plan)
    get_execution_plan = _blocking(OrchestrationClient.get_execution_plan)
    get_execution_plans = _blocking(OrchestrationClient.get_execution_plans)
    get_execution_plan_status = _blocking(OrchestrationClient.get_execution_plan_status)
    get_execution_plan_status_cached = _blocking(
        OrchestrationClient.get_execution_plan_status_cached
    )
    get_plan_subtasks = _blocking(OrchestrationClient.get_plan_subtasks)
    get_plan_progress = _blocking(OrchestrationClient.get_plan_progress)
    check_subtask_dependencies = _blocking(OrchestrationClient.check_subtask_dependencies)
    check_subtask_dependencies_batch = _blocking(
        OrchestrationClient.check_subtask_dependencies_batch
    )
    get_next_planned_subtask = _blocking(OrchestrationClient.get_next_planned_subtask)
    get_dependency_results = _blocking(OrchestrationClient.get_dependency_results)
    wait_for_plan = _blocking(OrchestrationClient.wait_for_plan)
    # Control by hand (docs/CONTROL.md).
    wait_for_task = _blocking(OrchestrationClient.wait_for_task)
    retry_task = _blocking(OrchestrationClient.retry_task)
    revoke_task_type = _blocking(OrchestrationClient.revoke_task_type)
    restore_task_type = _blocking(OrchestrationClient.restore_task_type)
    get_revoked_task_types = _blocking(OrchestrationClient.get_revoked_task_types)
    flush_queue = _blocking(OrchestrationClient.flush_queue)
    get_task_counts = _blocking(OrchestrationClient.get_task_counts)
    # Events.
    publish = _blocking(OrchestrationClient.publish)
    publish_event = _blocking(OrchestrationClient.publish_event)
    publish_task_event = _blocking(OrchestrationClient.publish_task_event)
    read_events = _blocking(OrchestrationClient.read_events)
    last_seq = _blocking(OrchestrationClient.last_seq)
    server_status = _blocking(OrchestrationClient.server_status)
    statistics = _blocking(OrchestrationClient.statistics)
    # periodic schedules (docs/SCHEDULES.md)
    create_schedule = _blocking(OrchestrationClient.create_schedule)
    get_schedule = _blocking(OrchestrationClient.get_schedule)
    list_schedules = _blocking(OrchestrationClient.list_schedules)
    pause_schedule = _blocking(OrchestrationClient.pause_schedule)
    resume_schedule = _blocking(OrchestrationClient.resume_schedule)
    delete_schedule = _blocking(OrchestrationClient.delete_schedule)
