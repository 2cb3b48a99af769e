"""The runtime's event APIs: append an event to the durable log and fan it out, subscribe
to live events, tap the fan-out, read the log. :class:`Runtime` carries them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from typing import Literal

import msgspec

from .._validate import (
    MAX_NAMES,
    _show,
    check_event_read,
    check_identifier,
    check_int,
    check_optional_text,
    encode_json_object,
)
from ..config import RuntimeConfig
from ..errors import InvalidInputError, RuntimeStoppedError
from ..events import RUNTIME_NAMESPACES, check_pattern, reserved_namespace
from ..messages.events import (
    BroadcastMessage,
    Event,
    EventFeed,
    Subscribe,
    Unsubscribe,
    compile_pattern,
)
from ..messages.storage import AppendEvent, GetStorageStats, StorageMessage, Write
from ..messages.tap import EventTap, Fold
from ..runtime import ActorRef
from .subscription import Subscription

__all__ = ["RuntimeEvents"]


class RuntimeEvents:
    """Mixed into :class:`Runtime`, first: the operation mixins declare ``subscribe`` and
    ``read_events`` as stubs, which these must override. Needs ``_config``, ``_storage``,
    ``_broadcast`` and ``_thread``."""

    _config: RuntimeConfig
    _storage: ActorRef[StorageMessage]
    _broadcast: ActorRef[BroadcastMessage]
    _thread: int

    def _check_open(self) -> None:  # pragma: no cover - provided by Runtime
        raise NotImplementedError

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
        if len(filters) > MAX_NAMES:
            raise InvalidInputError("filters", f"holds {len(filters)} filters; at most {MAX_NAMES}")
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

    async def last_seq(self) -> int:
        """The sequence number of the last durable event (``0``: the log is empty).

        Read it to replay the log up to now, or to resume later from this point with
        ``client.events(after=...)``.
        """
        self._check_open()
        return (await self._storage.ask(GetStorageStats())).last_seq
