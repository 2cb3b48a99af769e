"""Events: what the runtime publishes, durably logged then fanned out in log order."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Literal, TypeAlias, Union

import msgspec
from anyio.streams.memory import MemoryObjectSendStream

from ..runtime import Request

__all__ = [
    "EVENT_FIELDS",
    "BroadcastMessage",
    "BroadcastStats",
    "Delivery",
    "Event",
    "GetBroadcastStats",
    "JsonValue",
    "Lagged",
    "Publish",
    "Subscribe",
    "Unsubscribe",
    "compile_pattern",
    "matches_filters",
]

JsonValue: TypeAlias = Union[  # noqa: UP007 - a recursive alias needs the Union form
    bool, int, float, str, list["JsonValue"], dict[str, "JsonValue"], None
]


class Event(msgspec.Struct, frozen=True, kw_only=True):
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


class Publish(msgspec.Struct, frozen=True):
    """Fan these events out, in this order (told; no reply).

    ``data_json`` holds each event's data as stored: every subscriber gets its own copy
    decoded from it, so that no two of them (nor the publisher) share a mutable dict.
    """

    events: tuple[Event, ...]
    data_json: tuple[bytes, ...]


class Subscribe(Request[int], frozen=True):
    """Register a subscriber; the reply is its subscription id.

    ``pattern`` is a glob over event types (``"*"``, ``"task.*"``, ``"plan.completed"``);
    ``filters`` must all equal the event's field of that name (or its ``data`` key).
    ``sink`` holds ``capacity`` events plus one slot for the :class:`Lagged` marker.
    ``types``, if given, narrows the pattern to exactly these types; ``require`` names
    event fields that must be set (``plan_id``: events of plans and their tasks).
    """

    pattern: str
    filters: tuple[tuple[str, str], ...]
    sink: MemoryObjectSendStream[Delivery]
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
