"""A client's event APIs: live subscriptions, the durable log then live events
(:class:`EventStream`), reads of the log, and callbacks (:class:`CallbackSubscription`).
:class:`OrchestrationClient` carries them.
"""

from __future__ import annotations

# EventHandler (on_event's callback) spells its result "Awaitable[object] | object", which
# typing.get_type_hints (carried.py reads every operation's hints) resolves in this module.
from collections.abc import Awaitable  # noqa: F401
from typing import TYPE_CHECKING, Literal

from .._validate import check_identifier, check_int
from ..errors import InvalidInputError
from ..events import EventHandler, TopicRegistry
from ..messages.events import Event
from .keeper import Backend, Keeper
from .streams import CallbackSubscription, EventStream
from .subscription import Subscription

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager


__all__ = ["ClientEvents"]


class ClientEvents:
    """Mixed into :class:`OrchestrationClient`, first: the operation mixins declare
    ``subscribe`` and ``read_events`` as stubs, which these must override. Needs
    ``_keeper``, ``_handles``, ``_backend``, ``_live`` and ``_check_open``."""

    _keeper: Keeper | None
    _handles: set[CallbackSubscription]

    def _check_open(self) -> None:  # pragma: no cover - provided by the client
        raise NotImplementedError

    def _backend(self) -> Backend:  # pragma: no cover - provided by the client
        raise NotImplementedError

    async def _live(self) -> Backend:  # pragma: no cover - provided by the client
        raise NotImplementedError

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
