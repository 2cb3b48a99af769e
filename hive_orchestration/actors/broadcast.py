"""The broadcast actor: fans published events out to subscribers, never waiting on one.

Each subscriber has its own bounded buffer (an anyio memory stream) and the actor only ever
uses ``send_nowait`` on it, so a slow, stuck or crashed subscriber cannot block the
publisher or any other subscriber, and memory stays bounded by the buffer sizes.

Overflow policy, per subscription:

- ``error`` (default): when the buffer is full, the subscriber is given a :class:`Lagged`
  marker (its buffer keeps one slot for it) and is dropped. Reading past its buffered events
  raises :class:`SubscriberLaggedError` with the last sequence number it received, from
  which it can replay the durable log without a gap.
- ``drop``: events that do not fit are skipped for that subscriber and counted.

A subscriber whose receiving end is closed (it exited or crashed) is removed on the next
event that would have gone to it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from contextlib import suppress
from typing import cast

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectSendStream

from ..messages.events import (
    EVENT_FIELDS,
    BroadcastMessage,
    BroadcastStats,
    Delivery,
    Event,
    GetBroadcastStats,
    JsonValue,
    Lagged,
    Publish,
    Subscribe,
    Unsubscribe,
    compile_pattern,
    matches_filters,
)
from ..runtime import Actor

__all__ = ["BroadcastActor"]

log = logging.getLogger("hive_orchestration.broadcast")


def _decode(data_json: bytes) -> dict[str, JsonValue]:
    return cast("dict[str, JsonValue]", msgspec.json.decode(data_json))


def _matches_filters(event: Event, subscriber: _Subscriber) -> bool:
    if subscriber.types and event.type not in subscriber.types:
        return False
    for key in subscriber.require:
        if getattr(event, key) is None:
            return False
    return matches_filters(event, subscriber.filters)


class _Subscriber:
    __slots__ = (
        "capacity",
        "dropped",
        "filters",
        "internal",
        "last_seq",
        "matches",
        "overflow",
        "require",
        "sink",
        "types",
    )

    def __init__(self, message: Subscribe) -> None:
        self.matches = compile_pattern(message.pattern)
        self.filters = message.filters
        self.types = frozenset(message.types)
        self.internal = message.internal
        # Only event fields can be required (not data keys), checked here once.
        self.require = tuple(key for key in message.require if key in EVENT_FIELDS)
        self.sink: MemoryObjectSendStream[Delivery] = message.sink
        self.capacity = message.capacity
        self.overflow = message.overflow
        self.last_seq = 0
        self.dropped = 0


class BroadcastActor(Actor[BroadcastMessage]):
    # Publishes arrive in bursts from the storage actor; take them together.
    max_batch = 256

    def __init__(self, ids: Iterator[int] | None = None) -> None:
        """``ids`` numbers the subscriptions. Pass one that outlives the actor: after a
        restart, a subscriber whose stream broke still unsubscribes by its old id, which
        must not have been handed to someone else by the new incarnation."""
        self._subscribers: dict[int, _Subscriber] = {}
        self._ids = itertools.count(1) if ids is None else ids
        self._published = 0
        self._delivered = 0
        self._dropped = 0
        self._lagged = 0

    async def receive(self, message: BroadcastMessage) -> object:
        match message:
            case Publish(events=events, data_json=data_json):
                for event, data in zip(events, data_json, strict=True):
                    self._fan_out(event, data)
                return None
            case Subscribe():
                subscription_id = next(self._ids)
                self._subscribers[subscription_id] = _Subscriber(message)
                return subscription_id
            case Unsubscribe(subscription_id=subscription_id):
                subscriber = self._subscribers.pop(subscription_id, None)
                if subscriber is not None:
                    subscriber.sink.close()
                return None
            case GetBroadcastStats():
                internal = sum(s.internal for s in self._subscribers.values())
                return BroadcastStats(
                    subscribers=len(self._subscribers) - internal,
                    internal=internal,
                    published=self._published,
                    delivered=self._delivered,
                    dropped=self._dropped,
                    lagged=self._lagged,
                )

    async def stopped(self, error: BaseException | None) -> None:
        # The registry dies with this instance. After a crash the runtime goes on, so each
        # subscriber is told where its stream broke (a replayable SubscriberLaggedError)
        # rather than seeing a clean end, which means the runtime stopped.
        crashed = error is not None and not isinstance(error, anyio.get_cancelled_exc_class())
        for subscriber in self._subscribers.values():
            if crashed:
                with suppress(anyio.WouldBlock, anyio.BrokenResourceError):
                    subscriber.sink.send_nowait(Lagged(subscriber.last_seq))
            subscriber.sink.close()
        self._subscribers.clear()

    def _fan_out(self, event: Event, data_json: bytes) -> None:
        self._published += 1
        gone: list[int] = []
        for subscription_id, subscriber in self._subscribers.items():
            if not subscriber.matches(event.type) or not _matches_filters(event, subscriber):
                continue
            sink = subscriber.sink
            try:
                if sink.statistics().current_buffer_used >= subscriber.capacity:
                    if subscriber.overflow == "drop":
                        subscriber.dropped += 1
                        self._dropped += 1
                        continue
                    # The buffer keeps one slot for this marker, so this cannot block.
                    sink.send_nowait(Lagged(subscriber.last_seq))
                    sink.close()
                    self._lagged += 1
                    gone.append(subscription_id)
                    log.warning(
                        "subscriber %d lagged after event %d; dropped",
                        subscription_id,
                        subscriber.last_seq,
                    )
                    continue
                # Each subscriber gets its own copy of the data (see Publish).
                copy = (
                    msgspec.structs.replace(event, data=_decode(data_json)) if event.data else event
                )
                sink.send_nowait(copy)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                gone.append(subscription_id)
                continue
            except anyio.WouldBlock:  # pragma: no cover - capacity is checked first
                gone.append(subscription_id)
                continue
            subscriber.last_seq = event.seq
            self._delivered += 1
        for subscription_id in gone:
            self._subscribers.pop(subscription_id, None)
