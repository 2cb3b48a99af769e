"""What the storage actor is asked to do. A reply to a :class:`Write` means durable."""

from __future__ import annotations

from typing import Literal, TypeAlias

import msgspec

from ..runtime import Request
from .events import Event

__all__ = [
    "AppendEvent",
    "Committed",
    "GetStorageStats",
    "ReadEvents",
    "StorageMessage",
    "StorageStats",
    "Write",
    "WriteOp",
]


class AppendEvent(msgspec.Struct, frozen=True, tag="append_event"):
    """Append ``event`` to the log; ``data_json`` is its ``data``, encoded at the boundary.

    The storage actor assigns the sequence number and, once committed, publishes the event.
    """

    event: Event
    data_json: bytes


WriteOp: TypeAlias = AppendEvent


class Committed(msgspec.Struct, frozen=True):
    """The write is durable. ``seqs``: the sequence number of each appended event, in order."""

    seqs: tuple[int, ...]


class Write(Request[Committed], frozen=True):
    """Apply ``ops`` in order, all or nothing, in the next group commit."""

    ops: tuple[WriteOp, ...]


class ReadEvents(Request[tuple[Event, ...]], frozen=True):
    """Durable events with ``seq > after``, oldest first, at most ``limit``."""

    after: int = 0
    limit: int = 1000


class StorageStats(msgspec.Struct, frozen=True):
    path: str
    driver: str
    synchronous: Literal["FULL", "NORMAL"]
    schema_version: int
    transactions: int
    writes: int
    failed_writes: int
    largest_batch: int
    last_seq: int


class GetStorageStats(Request[StorageStats], frozen=True):
    pass


StorageMessage: TypeAlias = Write | ReadEvents | GetStorageStats
