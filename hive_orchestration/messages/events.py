"""Events: what the runtime publishes, durably logged then fanned out in log order."""

from __future__ import annotations

import fnmatch
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, Union, cast

import anyio
import anyio.lowlevel
import msgspec

from ..errors import HiveError
from ..runtime import Request

__all__ = [
    "EVENT_FIELDS",
    "BroadcastMessage",
    "BroadcastStats",
    "Delivery",
    "Entry",
    "Event",
    "EventFeed",
    "GetBroadcastStats",
    "Interest",
    "InterestCell",
    "JsonValue",
    "Lagged",
    "Publish",
    "Subscribe",
    "Unsubscribe",
    "compile_pattern",
    "matches_filters",
]

if TYPE_CHECKING:
    JsonValue: TypeAlias = Union[  # noqa: UP007 - a recursive alias needs the Union form
        bool, int, float, str, list["JsonValue"], dict[str, "JsonValue"], None
    ]
else:
    # At run time a JSON value is Any: msgspec cannot decode through a recursive alias, and
    # the structs that hold JSON (tasks, events...) are decoded from the wire. What a JSON
    # value may be is checked where it enters (_validate), not by the decoder.
    JsonValue = Any


# Data only, so untracked by the cycle collector (``gc=False``: see messages/task_models.py).
class Event(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One entry of the event log.

    ``seq`` is the position in the durable log (1, 2, 3...), assigned by the storage actor
    at commit; subscribers see events in ``seq`` order. ``timestamp`` is Unix seconds.
    """

    seq: int = 0
    type: str
    timestamp: float
    source: str
    correlation_id: str | None = None
    task_id: str | None = None
    plan_id: str | None = None
    worker_id: str | None = None
    data: dict[str, JsonValue] = {}

    # The seeds' names for the same fields (read-only aliases).
    @property
    def event_type(self) -> str:
        """The event's type (alias of :attr:`type`, the seeds' name)."""
        return self.type

    @property
    def source_agent(self) -> str:
        """Who caused it (alias of :attr:`source`, the unified events' name)."""
        return self.source

    @property
    def payload(self) -> dict[str, JsonValue]:
        """The event's data (alias of :attr:`data`, the unified events' name)."""
        return self.data


class Lagged(msgspec.Struct, frozen=True):
    """Marker put in a subscriber's buffer when it overflowed: the last seq it was given."""

    last_seq: int


Delivery: TypeAlias = Event | Lagged

#: One committed event as the broadcast actor holds it, once for every subscriber: the
#: event and its data as stored. A subscriber decodes its own copy of the data when it
#: takes the event, so no two of them (nor the publisher) share a mutable dict.
Entry: TypeAlias = tuple[Event, bytes]

#: Most events a feed hands out in a row without a trip round the event loop.
_BURST = 64


class _End:
    """How a feed ends once everything queued was read (besides a :class:`Lagged`)."""


_CLEAN_END = _End()  # the runtime stopped
_FINISHED = _End()  # the end was handed out (or the reader left): every later read ends


def _cancellation_check() -> Callable[[], Awaitable[None]]:
    """The running backend's own check for a cancellation, found once per feed:
    ``anyio.lowlevel.checkpoint_if_cancelled`` looks the backend up (through sniffio) on
    every call, five Python calls on asyncio before the check itself, and a subscriber
    checks once per event. It is the very check anyio's function makes; anyio's function
    itself where the loop's token does not name its backend (anyio before 4.11)."""
    backend = getattr(anyio.lowlevel.current_token(), "backend_class", None)
    if backend is None:
        return anyio.lowlevel.checkpoint_if_cancelled
    return cast("Callable[[], Awaitable[None]]", backend.checkpoint_if_cancelled)


#: Decodes an entry's stored data (always a JSON object) for the subscriber taking it.
_decode_data = msgspec.json.Decoder().decode


def _data(event: Event, data_json: bytes) -> Any:
    """An entry's data, decoded. What this runtime stored always decodes; what a server
    sent a remote client may not (a broken or hostile one): then the package's error
    for this event, not msgspec's, nor the RecursionError of a value nested too deeply,
    and the subscriber reads on."""
    try:
        return _decode_data(data_json)
    except (msgspec.DecodeError, RecursionError) as exc:
        reason = "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise HiveError(f"event {event.seq}'s data cannot be read: {reason}") from None


class EventFeed:
    """What one subscriber has not read yet: written by the broadcast actor, read by the
    subscriber's task(s).

    The broadcast actor pushes one commit's matching events at a time, as a sequence of
    :data:`Entry` it shares with every other subscriber (references, not copies: a commit
    costs its memory once, whatever the number of subscribers). ``unread`` counts what
    the reader has not taken; the broadcast actor decides on it whether the subscriber
    lags (see :class:`~hive_orchestration.actors.broadcast.BroadcastActor`). Pushing never
    waits.

    The reader side reads like an anyio memory stream: :meth:`receive` gives the next
    event, then, once everything pushed was taken, either a :class:`Lagged` marker (the
    subscriber was dropped) or :class:`anyio.EndOfStream` (the runtime stopped);
    :meth:`close` (or leaving ``with feed:``) is the reader leaving, after which
    :meth:`receive` raises :class:`anyio.ClosedResourceError` and what was queued is
    released at once.
    """

    __slots__ = (
        "_burst",
        "_check",
        "_chunks",
        "_closed",
        "_end",
        "_event_type",
        "_index",
        "_waiter",
        "unread",
    )

    def __init__(self) -> None:
        self._chunks: deque[Sequence[Entry]] = deque()
        self._index = 0  # position of the next entry in the first chunk
        #: Events pushed and not yet taken by the reader.
        self.unread = 0
        self._end: Lagged | _End | Exception | None = None
        self._waiter: anyio.Event | None = None
        self._event_type: type[anyio.Event] | None = None
        self._burst = 0  # events handed out in a row without yielding
        self._check: Callable[[], Awaitable[None]] | None = None  # _cancellation_check()
        self._closed = False

    # -- the broadcast actor's side --------------------------------------------------------

    @property
    def reader_closed(self) -> bool:
        """The reader left: nothing more is wanted."""
        return self._closed

    def push(self, entries: Sequence[Entry]) -> None:
        """Queue ``entries`` (not empty, in ``seq`` order, not to be changed later)."""
        if self._end is not None:
            return
        self._chunks.append(entries)
        self.unread += len(entries)
        self._wake()

    def lag(self, last_seq: int) -> None:
        """End the feed, after what is queued, with a :class:`Lagged` marker."""
        if self._end is None:
            self._end = Lagged(last_seq)
            self._wake()

    def finish(self) -> None:
        """End the feed cleanly, after what is queued: the runtime stopped."""
        if self._end is None:
            self._end = _CLEAN_END
            self._wake()

    def fail(self, error: Exception) -> None:
        """End the feed, after what is queued, with ``error`` raised to every later read
        (the connection to a runtime in another process broke)."""
        if self._end is None:
            self._end = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set()

    # -- the reader's side -----------------------------------------------------------------

    def receive_nowait(self) -> Delivery:
        """The next event, or the end marker; :class:`anyio.WouldBlock` if none is queued."""
        if self._closed:
            raise anyio.ClosedResourceError
        chunks = self._chunks
        if chunks:
            chunk = chunks[0]
            event, data_json = chunk[self._index]
            self._index += 1
            self.unread -= 1
            if self._index == len(chunk):
                chunks.popleft()
                self._index = 0
            return msgspec.structs.replace(event, data=_data(event, data_json))
        end = self._end
        if end is None:
            raise anyio.WouldBlock
        if isinstance(end, Exception):
            raise end
        if isinstance(end, Lagged):
            self._end = _FINISHED
            return end
        self._end = _FINISHED
        raise anyio.EndOfStream

    def take_nowait(self, limit: int) -> list[Entry] | Lagged:
        """Up to ``limit`` queued entries as stored (not decoded: for a reader that passes
        them on as they are, such as a socket), or the end marker once all were taken:
        :class:`Lagged`, or :class:`anyio.EndOfStream`. :class:`anyio.WouldBlock` if
        nothing is queued; :class:`anyio.ClosedResourceError` once the reader closed it."""
        if self._closed:
            raise anyio.ClosedResourceError
        chunks = self._chunks
        if not chunks:
            end = self._end
            if end is None:
                raise anyio.WouldBlock
            if isinstance(end, Exception):
                raise end
            self._end = _FINISHED
            if isinstance(end, Lagged):
                return end
            raise anyio.EndOfStream
        taken: list[Entry] = []
        while chunks and len(taken) < limit:
            chunk = chunks[0]
            stop = min(len(chunk), self._index + limit - len(taken))
            taken.extend(chunk[self._index : stop])
            if stop == len(chunk):
                chunks.popleft()
                self._index = 0
            else:
                self._index = stop
        self.unread -= len(taken)
        return taken

    async def wait_readable(self) -> None:
        """Wait until something is queued or the feed has ended (or was closed)."""
        while not self._chunks and self._end is None and not self._closed:
            if self._waiter is None:
                if self._event_type is None:
                    self._event_type = type(anyio.Event())
                self._waiter = self._event_type()
            await self._waiter.wait()

    async def receive(self) -> Delivery:
        """The next event or end marker, waiting for one.

        A queued event is taken without a trip round the event loop (a loop round trip
        per event costs more than the rest of the delivery), at most ``_BURST`` in a row,
        so that a reader working through a backlog still lets other tasks run. Every
        call is a cancellation point, and a cancelled call takes nothing: with nothing
        queued the wait is that point (a reader that waits for each commit's events no
        longer checks for a cancellation before every wait as well).
        """
        if not self._chunks and self._end is None and not self._closed:
            self._burst = 0
        elif self._burst < _BURST:
            check = self._check
            if check is None:
                check = self._check = _cancellation_check()
            await check()
        else:
            self._burst = 0
            await anyio.lowlevel.checkpoint()
        while True:
            try:
                item = self.receive_nowait()
            except anyio.WouldBlock:
                self._burst = 0
                if self._waiter is None:
                    if self._event_type is None:
                        self._event_type = type(anyio.Event())
                    self._waiter = self._event_type()
                await self._waiter.wait()
                continue
            self._burst += 1
            return item

    def close(self) -> None:
        """The reader leaves (idempotent): what was queued is released now."""
        self._closed = True
        self._chunks.clear()
        self.unread = 0
        self._index = 0
        self._end = _FINISHED
        self._wake()

    def __enter__(self) -> EventFeed:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Publish(msgspec.Struct, frozen=True, gc=False):
    """Fan these events (one commit's) out, in this order (told; no reply).

    ``data_json`` holds each event's data as stored: every subscriber gets its own copy
    decoded from it, so that no two of them (nor the publisher) share a mutable dict.
    """

    events: tuple[Event, ...]
    data_json: tuple[bytes, ...]


class Interest(msgspec.Struct, frozen=True):
    """The events a runtime's subscribers could match, all of them together (a superset:
    an event outside it goes to none of them): every event if ``everything``; else those
    whose type is one of ``types`` with each field its entry names set (a type's entry
    names the fields every subscriber to it requires), and those whose type starts with
    one of ``prefixes``. The broadcast actor says it as its subscriptions change
    (:class:`InterestCell`); the log tailer of a runtime on a shared database reads only
    these of the other nodes' events (storage/pg/tailer.py)."""

    everything: bool = False
    types: tuple[tuple[str, tuple[str, ...]], ...] = ()
    prefixes: tuple[str, ...] = ()

    @property
    def nothing(self) -> bool:
        """No subscriber could match any event."""
        return not (self.everything or self.types or self.prefixes)


class InterestCell:
    """Where the broadcast actor leaves its current :class:`Interest` (an immutable value,
    replaced whole) for the log tailer to read: the broadcast actor is its only writer.
    Kept by the runtime across restarts of the broadcast actor (a new one starts with no
    subscriber: nothing)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = Interest()

    def get(self) -> Interest:
        return self.value


class Subscribe(Request[int], frozen=True):
    """Register a subscriber; the reply is its subscription id.

    ``pattern`` is a glob over event types (``"*"``, ``"task.*"``, ``"plan.completed"``);
    ``filters`` must all equal the event's field of that name (or its ``data`` key).
    ``sink`` is the subscriber's feed; ``capacity`` is how far behind it may be when a
    commit comes (any part of the last commit it was given is allowed too) before it lags
    (see :class:`~hive_orchestration.actors.broadcast.BroadcastActor`).
    ``types``, if given, narrows the pattern to exactly these types; ``require`` names
    event fields that must be set (``plan_id``: events of plans and their tasks).
    """

    pattern: str
    filters: tuple[tuple[str, str], ...]
    sink: EventFeed
    capacity: int
    overflow: Literal["error", "drop"]
    types: tuple[str, ...] = ()
    require: tuple[str, ...] = ()
    #: The runtime's own subscription (the plan feed): counted apart in the statistics.
    internal: bool = False


class Unsubscribe(msgspec.Struct, frozen=True):
    subscription_id: int


class BroadcastStats(msgspec.Struct, frozen=True):
    subscribers: int  # the app's, not counting the runtime's own (``internal``)
    published: int
    delivered: int
    dropped: int
    lagged: int
    internal: int = 0
    #: Subscriptions tested against an event (the index narrowed them to ones that can
    #: match). ``*`` subscriptions without filters take every event untested.
    examined: int = 0
    #: Most events one commit handed over (a subscriber may hold its buffer's worth
    #: less one or one commit's, plus the commit being handed over).
    largest_commit: int = 0


class GetBroadcastStats(Request[BroadcastStats], frozen=True):
    pass


BroadcastMessage: TypeAlias = Publish | Subscribe | Unsubscribe | GetBroadcastStats


#: The event fields a filter can name; any other filter key is looked up in ``data``.
EVENT_FIELDS = frozenset({"type", "source", "correlation_id", "task_id", "plan_id", "worker_id"})


def compile_pattern(pattern: str) -> Callable[[str], bool]:
    """A predicate over event types for a glob such as ``*``, ``task.*`` or ``plan.completed``."""
    if pattern == "*":
        return lambda _type: True
    if not any(ch in pattern for ch in "*?["):
        return pattern.__eq__
    if pattern.endswith(".*") and not any(ch in pattern[:-2] for ch in "*?["):
        prefix = pattern[:-1]
        return lambda type_: type_.startswith(prefix)
    return lambda type_: fnmatch.fnmatchcase(type_, pattern)


def matches_filters(event: Event, filters: tuple[tuple[str, str], ...]) -> bool:
    """Whether every ``(key, value)`` equals the event's field, or its ``data`` key, as text.

    The broadcast actor (live) and the client's replay of the log (past) both decide with
    this, so a replay-then-live stream sees exactly what one live subscription would.
    """
    for key, wanted in filters:
        if key in EVENT_FIELDS:
            if getattr(event, key) != wanted:
                return False
        elif key not in event.data or str(event.data[key]) != wanted:
            return False
    return True
