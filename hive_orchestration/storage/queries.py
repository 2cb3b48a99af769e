"""The reads the storage actor answers, each on its connection.

The reads of a batch start after its writes committed. The large ones (listings, counts,
the event log) are handed to a pool of read-only connections (:mod:`.readers`), so that
the actor goes on committing while they run; the others run here, in order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING

import msgspec

from ..errors import EventsTrimmedError, HiveError, StorageError
from ..messages.events import Event
from ..messages.plan_data import LoadDependencyResults
from ..messages.storage import (
    COMMIT_BATCH_BOUNDS,
    COMMIT_SECONDS_BOUNDS,
    Buckets,
    CheckReaders,
    GetStorageStats,
    LoadSchedules,
    ReadEvents,
    StorageMessage,
    StorageStats,
)
from ..runtime import Envelope
from .control import CONTROL_QUERIES, query_control
from .plan_data import load_dependency_results
from .port import PLAN_READS, QUEUE_READS, RETENTION_READS, TASK_READS, Driver, StoreError
from .retention import trimmed_through
from .rows import decoded, event_from_row
from .schedules import load_schedules
from .sqlite.schema import SCHEMA_VERSION

if TYPE_CHECKING:
    from .actor import StorageActor

#: The read-only connection of the reader task running a read (readers.py); unset in the
#: actor's own task, whose reads run on the write connection.
_READER: ContextVar[Driver | None] = ContextVar("hive_storage_reader", default=None)


def _reader_job(
    self: StorageActor, envelope: Envelope[StorageMessage]
) -> Callable[[Driver], Awaitable[None]]:
    async def job(db: Driver) -> None:
        # Only this reader's task sees the variable: the actor's reads stay on its own.
        _READER.set(db)
        await self._answer(envelope)

    return job


def _connection(self: StorageActor) -> Driver:
    """The connection a read runs on: a reader's, in a reader's task, else the writer's."""
    reader = _READER.get()
    return self._require_db() if reader is None else reader


async def _answer(self: StorageActor, envelope: Envelope[StorageMessage]) -> None:
    message = envelope.message
    try:
        envelope.resolve(await self._query(message))
    except StoreError as exc:
        action = f"cannot read ({type(message).__name__})"
        envelope.fail(self._error(exc, action))
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        # A row another tool wrote, that does not decode: refuse the read, stay up.
        reason = f"cannot decode a row ({type(message).__name__}): {exc}"
        envelope.fail(StorageError(reason))
    except HiveError as exc:
        envelope.fail(exc)


async def _query(self: StorageActor, message: StorageMessage) -> object:
    db = self._connection()
    match message:
        case ReadEvents() as read:
            return await self._read_events(read)
        case CheckReaders():
            return None  # what it checks was done as the batch began
        case GetStorageStats():
            if self._read_only:
                # Another process appends to the log: report where it stands now.
                self._trimmed = await trimmed_through(db)
                self._last_seq = max(await self._sql.last_seq(db), self._trimmed)
            elif self._feed is not None:
                # Other nodes append to the log too: its end is the database's.
                self._last_seq = max(self._last_seq, await self._sql.last_seq(db))
            return self._statistics()
        case _ if isinstance(message, TASK_READS):
            return await self._sql.query_tasks(db, message)
        case _ if isinstance(message, RETENTION_READS):
            return await self._sql.query_retention(db, message)
        case LoadSchedules():
            return await load_schedules(db)
        case LoadDependencyResults():
            return await load_dependency_results(db, message)
        case _ if isinstance(message, PLAN_READS):
            return await self._sql.query_plans(db, message)
        case _ if isinstance(message, QUEUE_READS):
            return await self._sql.query_queues(db, message)
        case _ if isinstance(message, CONTROL_QUERIES):
            return await query_control(db, message)
        case other:
            raise HiveError(f"the storage actor does not handle {type(other).__name__}")


async def _read_events(self: StorageActor, read: ReadEvents) -> tuple[Event, ...]:
    # ``after=0`` reads from wherever the log starts; a later ``after`` that the log
    # no longer reaches back to would miss events: refused, before and after the read
    # (a trim that committed while it ran may have taken what it was about to read).
    await self._check_trimmed(read)
    rows = await self._sql.read_events(self._connection(), read)
    await self._check_trimmed(read)
    return tuple(await decoded(rows, event_from_row))


async def _check_trimmed(self: StorageActor, read: ReadEvents) -> None:
    if read.after <= 0 or read.newest:
        return
    if self._read_only:
        # The runtime of another process trims: ask the file how far, each time.
        self._trimmed = await trimmed_through(self._connection())
    elif self._feed is not None:
        # Other nodes may trim the log too (never lower: this actor raises it before
        # its own trim commits).
        self._trimmed = max(self._trimmed, await trimmed_through(self._connection()))
    if read.after < self._trimmed:
        raise EventsTrimmedError(read.after, self._trimmed + 1)


def _statistics(self: StorageActor) -> StorageStats:
    return StorageStats(
        path=self._store.display,
        driver=self._require_db().name,
        synchronous=self._config.synchronous,
        schema_version=SCHEMA_VERSION,
        transactions=self._transactions,
        writes=self._writes,
        failed_writes=self._failed_writes,
        largest_batch=self._largest_batch,
        last_seq=self._last_seq,
        commit_seconds=Buckets(COMMIT_SECONDS_BOUNDS, tuple(self._commit_counts), self._commit_sum),
        commit_batch_size=Buckets(
            COMMIT_BATCH_BOUNDS, tuple(self._batch_counts), float(self._batch_sum)
        ),
        trimmed_through=self._trimmed,
    )
