"""The broadcast actor: fans committed events out to subscribers, never waiting on one.

Memory. The storage actor hands over one commit's events at a time. They are held once,
as one tuple of entries (each event with its data as stored) shared by every subscriber:
a subscriber's :class:`EventFeed` queues references to the entries it matched and
decodes its own copy of an event's data when it takes it. A commit costs its memory once,
however many subscribers it goes to.

Lagging. A commit is handed to each subscriber whole, whatever its size, and pushing
never waits. When a commit comes, a subscriber may be behind by less than ``capacity``
(``subscriber_buffer``) events, or by any part of the last commit it was given: a
reader works through a large commit while the next one is being made, and one that
keeps up with the commits never lags because they are large. A subscriber that is
``capacity`` events behind and still has events of an earlier commit than the last
unread lags. It thus holds at most ``capacity - 1`` events or one commit's, whichever is
more, plus the commit being handed over (references, not copies). Overflow policy, per
subscription:

- ``error`` (default): the feed ends with a :class:`Lagged` marker after the events it
  holds, and the subscriber is dropped. Reading past its queued events raises
  :class:`SubscriberLaggedError` with the last sequence number it was given, from which
  it can replay the durable log without a gap.
- ``drop``: that commit's events are skipped for that subscriber and counted.

Matching. Subscriptions are indexed by what their pattern can match: one exact type
(``plan.completed``, or each of ``types``), a prefix (``task.*``), everything (``*``), or
any other glob (``*.completed``, ``task.?``, ``task.[cu]*``). The buckets an event type
leads to are worked out once per type and cached until a bucket appears or empties.
Within a bucket, a subscription with a filter on an event field (``task_id="..."``) is
filed under that field's value. An event is thus tested only against the subscriptions
that can match it, and ``*`` subscriptions without filters take each commit whole
without being tested at all.

A subscriber whose reader left is removed when it unsubscribes, or on the next event that
would have gone to it.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import anyio
import msgspec

from ..messages.events import (
    EVENT_FIELDS,
    BroadcastMessage,
    BroadcastStats,
    Entry,
    Event,
    EventFeed,
    GetBroadcastStats,
    Interest,
    InterestCell,
    JsonValue,
    Publish,
    Subscribe,
    Unsubscribe,
    compile_pattern,
)
from ..runtime import Actor

__all__ = ["BroadcastActor"]

log = logging.getLogger("hive_orchestration.broadcast")

#: Most event types whose buckets are cached (past it the cache starts over).
_ROUTES_CACHED = 4096

_GLOB = frozenset("*?[")


def _decode(data_json: bytes) -> dict[str, JsonValue]:
    return cast("dict[str, JsonValue]", msgspec.json.decode(data_json))


class _Subscriber:
    __slots__ = (
        "capacity",
        "data_filters",
        "dropped",
        "feed",
        "field_filters",
        "id",
        "internal",
        "key",
        "last_push",
        "last_seq",
        "overflow",
        "parts",
        "pattern",
        "require",
        "tested",
        "types",
    )

    def __init__(self, subscription_id: int, message: Subscribe) -> None:
        self.id = subscription_id
        self.pattern = message.pattern
        self.types = tuple(dict.fromkeys(message.types))
        self.internal = message.internal
        # Only event fields can be required (not data keys), checked here once.
        self.require = tuple(key for key in message.require if key in EVENT_FIELDS)
        fields = [(key, value) for key, value in message.filters if key in EVENT_FIELDS]
        #: The filter the subscriber is filed under in its bucket (the event must have
        #: this field equal to this value), and the filters still to test.
        self.key: tuple[str, str] | None = fields[0] if fields else None
        self.field_filters = tuple(fields[1:])
        self.data_filters = tuple(
            (key, value) for key, value in message.filters if key not in EVENT_FIELDS
        )
        #: Whether an event its bucket (and key) led to has tests left to pass.
        self.tested = bool(self.require or self.field_filters or self.data_filters)
        self.feed: EventFeed = message.sink
        self.capacity = message.capacity
        self.overflow = message.overflow
        self.last_seq = 0
        self.last_push = 0  # events of the last commit it was given
        self.dropped = 0
        #: Its part in what the subscribers could match (_Wants), worked out once.
        self.parts = _Wants.parts(self)

    @property
    def takes_everything(self) -> bool:
        """Every event matches: it takes each commit whole, untested."""
        return (
            self.pattern == "*"
            and not self.types
            and self.key is None
            and not self.data_filters
            and not self.require
        )

    def routes(self) -> list[tuple[str, str]]:
        """Where the index files it: ``(kind, text)`` with kind exact, prefix, all or glob."""
        pattern = self.pattern
        if self.types:
            # Narrowed to exact types: filed under each of them that the pattern allows.
            matches = compile_pattern(pattern)
            return [("exact", type_) for type_ in self.types if matches(type_)]
        if pattern == "*":
            return [("all", "")]
        if not _GLOB.intersection(pattern):
            return [("exact", pattern)]
        if pattern.endswith("*") and not _GLOB.intersection(pattern[:-1]):
            return [("prefix", pattern[:-1])]
        return [("glob", pattern)]

    def accepts(self, event: Event) -> bool:
        """Whether the event's fields pass the tests its bucket and key did not make."""
        for key in self.require:
            if getattr(event, key) is None:
                return False
        return all(getattr(event, key) == wanted for key, wanted in self.field_filters)

    def accepts_data(self, data: dict[str, JsonValue]) -> bool:
        for key, wanted in self.data_filters:
            if key not in data or str(data[key]) != wanted:
                return False
        return True


class _Bucket:
    """The subscriptions one route (an exact type, a prefix, ``*``, a glob) leads to."""

    __slots__ = ("fields", "keyed", "matches", "plain")

    def __init__(self, matches: Callable[[str], bool] | None = None) -> None:
        self.matches = matches  # a glob's bucket: whether an event type leads here
        self.plain: dict[int, _Subscriber] = {}  # no filter on an event field
        self.keyed: dict[tuple[str, str], dict[int, _Subscriber]] = {}
        self.fields: Counter[str] = Counter()  # the fields keyed on, with how many use each

    def add(self, subscriber: _Subscriber) -> None:
        key = subscriber.key
        if key is None:
            self.plain[subscriber.id] = subscriber
        else:
            self.keyed.setdefault(key, {})[subscriber.id] = subscriber
            self.fields[key[0]] += 1

    def remove(self, subscriber: _Subscriber) -> None:
        key = subscriber.key
        if key is None:
            self.plain.pop(subscriber.id, None)
            return
        group = self.keyed.get(key)
        if group is None or group.pop(subscriber.id, None) is None:
            return
        if not group:
            del self.keyed[key]
        self.fields[key[0]] -= 1
        if not self.fields[key[0]]:
            del self.fields[key[0]]

    def __bool__(self) -> bool:
        return bool(self.plain or self.keyed)

    def candidates(self, event: Event) -> Iterator[_Subscriber]:
        yield from self.plain.values()
        for field in self.fields:
            value = getattr(event, field)
            if value is not None:
                group = self.keyed.get((field, value))
                if group:
                    yield from group.values()


class _Index:
    """Subscriptions filed by what their pattern can match (see the module's docstring)."""

    __slots__ = ("_globs", "_prefix_lengths", "_routes", "buckets", "everything")

    def __init__(self) -> None:
        self.buckets: dict[tuple[str, str], _Bucket] = {}
        self._globs: dict[tuple[str, str], _Bucket] = {}  # the glob buckets among them
        #: ``*`` subscriptions without filters: handed each commit whole.
        self.everything: dict[int, _Subscriber] = {}
        self._prefix_lengths: Counter[int] = Counter()
        self._routes: dict[str, tuple[_Bucket, ...]] = {}

    def add(self, subscriber: _Subscriber) -> None:
        if subscriber.takes_everything:
            self.everything[subscriber.id] = subscriber
            return
        for route in subscriber.routes():
            bucket = self.buckets.get(route)
            if bucket is None:
                kind, text = route
                matches = compile_pattern(text) if kind == "glob" else None
                bucket = self.buckets[route] = _Bucket(matches)
                if kind == "glob":
                    self._globs[route] = bucket
                if kind == "prefix":
                    self._prefix_lengths[len(route[1])] += 1
                self._routes.clear()
            bucket.add(subscriber)

    def remove(self, subscriber: _Subscriber) -> None:
        if self.everything.pop(subscriber.id, None) is not None:
            return
        for route in subscriber.routes():
            bucket = self.buckets.get(route)
            if bucket is None:
                continue
            bucket.remove(subscriber)
            if not bucket:
                del self.buckets[route]
                self._globs.pop(route, None)
                if route[0] == "prefix":
                    self._prefix_lengths[len(route[1])] -= 1
                    if not self._prefix_lengths[len(route[1])]:
                        del self._prefix_lengths[len(route[1])]
                self._routes.clear()

    def route(self, event_type: str) -> tuple[_Bucket, ...]:
        """The buckets whose subscriptions' patterns match ``event_type``."""
        found = self._routes.get(event_type)
        if found is not None:
            return found
        buckets = self.buckets
        matched: list[_Bucket] = []
        if (bucket := buckets.get(("exact", event_type))) is not None:
            matched.append(bucket)
        for length in self._prefix_lengths:
            if length <= len(event_type):
                bucket = buckets.get(("prefix", event_type[:length]))
                if bucket is not None:
                    matched.append(bucket)
        if (bucket := buckets.get(("all", ""))) is not None:
            matched.append(bucket)
        for bucket in self._globs.values():
            # Each glob is tested once per event type, then cached.
            if bucket.matches is not None and bucket.matches(event_type):
                matched.append(bucket)
        if len(self._routes) >= _ROUTES_CACHED:
            self._routes.clear()
        found = self._routes[event_type] = tuple(matched)
        return found


class _Wants:
    """What the subscribers could match, together, kept as they come and go (each
    subscriber's part counted, so a change costs its own routes, not a look at all of
    them), said as an :class:`Interest`: a subscriber of every type (``*`` without
    ``types``, or any other glob) makes it everything; one of exact types adds them, each
    requiring the fields all of its subscribers require; one of a prefix (``task.*``)
    adds the prefix. Filters on values are left out (a superset)."""

    __slots__ = ("everything", "exact", "prefixes")

    def __init__(self) -> None:
        self.everything = 0
        self.exact: Counter[tuple[str, frozenset[str]]] = Counter()
        self.prefixes: Counter[str] = Counter()

    @staticmethod
    def parts(subscriber: _Subscriber) -> tuple[tuple[str, str, frozenset[str]], ...]:
        """The subscriber's part: ``(kind, text, required)`` with kind all, prefix or exact."""
        if subscriber.takes_everything:
            return (("all", "", frozenset()),)
        needs = frozenset(subscriber.require)
        parts = []
        for kind, text in subscriber.routes():
            if kind in ("all", "glob"):
                return (("all", "", frozenset()),)
            parts.append((kind, text, needs))
        return tuple(parts)

    def change(self, parts: tuple[tuple[str, str, frozenset[str]], ...], step: int) -> bool:
        """Count a subscriber's parts in (1) or out (-1); whether what is said changes."""
        changed = False
        for kind, text, needs in parts:
            if kind == "all":
                self.everything += step
                changed |= self.everything == (1 if step > 0 else 0)
                continue
            counter: Counter[Any] = self.prefixes if kind == "prefix" else self.exact
            key: Any = text if kind == "prefix" else (text, needs)
            counter[key] += step
            if counter[key] <= 0:
                del counter[key]
                changed = True
            elif counter[key] == 1 and step > 0:
                changed = True
        return changed

    def interest(self) -> Interest:
        if self.everything:
            return Interest(everything=True)
        required: dict[str, frozenset[str]] = {}
        for type_, needs in self.exact:
            required[type_] = required[type_] & needs if type_ in required else needs
        return Interest(
            types=tuple((t, tuple(sorted(needs))) for t, needs in sorted(required.items())),
            prefixes=tuple(sorted(self.prefixes)),
        )


class BroadcastActor(Actor[BroadcastMessage]):
    # Publishes arrive in bursts from the storage actor; take them together.
    max_batch = 256

    def __init__(
        self, ids: Iterator[int] | None = None, interest: InterestCell | None = None
    ) -> None:
        """``ids`` numbers the subscriptions. Pass one that outlives the actor: after a
        restart, a subscriber whose stream broke still unsubscribes by its old id, which
        must not have been handed to someone else by the new incarnation. ``interest``
        is kept saying what the subscribers could match, as they come and go (what a log
        tailer reads of other nodes' events)."""
        self._interest = interest
        self._wants = _Wants()
        self._subscribers: dict[int, _Subscriber] = {}
        self._index = _Index()
        self._ids = itertools.count(1) if ids is None else ids
        self._published = 0
        self._delivered = 0
        self._dropped = 0
        self._lagged = 0
        self._examined = 0
        self._largest_commit = 0
        self._said()

    def _counted(self, subscriber: _Subscriber, step: int) -> None:
        """A subscriber came (1) or went (-1): the interest cell says it if that changes
        what the subscribers could match."""
        if self._wants.change(subscriber.parts, step):
            self._said()

    def _said(self) -> None:
        if self._interest is not None:
            self._interest.value = self._wants.interest()

    def receive_inline(self, message: BroadcastMessage) -> bool:
        # A commit's events are fanned out in the storage actor's task when this actor is
        # idle: pushing never waits, and it saves waking this actor once per commit.
        if isinstance(message, Publish):
            self._fan_out(tuple(zip(message.events, message.data_json, strict=True)))
            return True
        return False

    async def receive(self, message: BroadcastMessage) -> object:
        match message:
            case Publish(events=events, data_json=data_json):
                self._fan_out(tuple(zip(events, data_json, strict=True)))
                return None
            case Subscribe():
                added = _Subscriber(next(self._ids), message)
                self._subscribers[added.id] = added
                self._index.add(added)
                self._counted(added, 1)
                return added.id
            case Unsubscribe(subscription_id=subscription_id):
                removed = self._subscribers.pop(subscription_id, None)
                if removed is not None:
                    self._index.remove(removed)
                    removed.feed.finish()
                    self._counted(removed, -1)
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
                    examined=self._examined,
                    largest_commit=self._largest_commit,
                )

    async def stopped(self, error: BaseException | None) -> None:
        # The registry dies with this instance. After a crash the runtime goes on, so each
        # subscriber is told where its stream broke (a replayable SubscriberLaggedError)
        # rather than seeing a clean end, which means the runtime stopped. Either way it
        # first reads everything it was handed.
        crashed = error is not None and not isinstance(error, anyio.get_cancelled_exc_class())
        for subscriber in self._subscribers.values():
            if crashed:
                subscriber.feed.lag(subscriber.last_seq)
            else:
                subscriber.feed.finish()
        self._subscribers.clear()
        self._index = _Index()
        self._wants = _Wants()
        self._said()

    def _fan_out(self, entries: tuple[Entry, ...]) -> None:
        """Hand one commit's events to their subscribers."""
        self._published += len(entries)
        self._largest_commit = max(self._largest_commit, len(entries))
        index = self._index
        matched: dict[_Subscriber, list[Entry]] = {}
        examined = 0
        for entry in entries:
            event = entry[0]
            data: dict[str, JsonValue] | None = None
            for bucket in index.route(event.type):
                # A bucket none of whose subscribers is keyed on a field (``task.*`` and
                # the like) leads to its plain ones alone: read without a generator, and
                # a subscriber with no filter left is not called to test the event (two
                # generators and three calls an event and subscriber, the fan-out's most).
                candidates = bucket.candidates(event) if bucket.fields else bucket.plain.values()
                for subscriber in candidates:
                    examined += 1
                    if subscriber.tested:
                        if not subscriber.accepts(event):
                            continue
                        if subscriber.data_filters:
                            if data is None:
                                # Decoded from what is stored, once per event: the
                                # publisher may have changed its own dict since.
                                data = _decode(entry[1])
                            if not subscriber.accepts_data(data):
                                continue
                    batch = matched.get(subscriber)
                    if batch is None:
                        matched[subscriber] = [entry]
                    else:
                        batch.append(entry)
        self._examined += examined
        gone: list[_Subscriber] = []
        if entries:
            for subscriber in index.everything.values():
                self._deliver(subscriber, entries, gone)
        for subscriber, batch in matched.items():
            self._deliver(subscriber, batch, gone)
        for subscriber in gone:
            if self._subscribers.pop(subscriber.id, None) is not None:
                index.remove(subscriber)
                self._counted(subscriber, -1)

    def _deliver(
        self, subscriber: _Subscriber, batch: Sequence[Entry], gone: list[_Subscriber]
    ) -> None:
        feed = subscriber.feed
        if feed.reader_closed:
            gone.append(subscriber)
            return
        unread = feed.unread
        # FIFO: the last ``last_push`` events given are the newest, so it is behind on an
        # earlier commit exactly when more than those are unread.
        if unread >= subscriber.capacity and unread > subscriber.last_push:
            if subscriber.overflow == "drop":
                subscriber.dropped += len(batch)
                self._dropped += len(batch)
                return
            feed.lag(subscriber.last_seq)
            self._lagged += 1
            gone.append(subscriber)
            log.warning(
                "subscriber %d lagged after event %d (%d unread); dropped",
                subscriber.id,
                subscriber.last_seq,
                unread,
            )
            return
        feed.push(batch)
        subscriber.last_seq = batch[-1][0].seq
        subscriber.last_push = len(batch)
        self._delivered += len(batch)
