"""The storage actor's group commit: a batch's writes in one transaction, then their events.

A batch runs in a shielded scope: a writer that is cancelled, or a runtime that is shutting
down, can never stop it between BEGIN and COMMIT. If the transaction fails on a constraint,
the batch is probed write by write (in savepoints, rolled back) and re-committed without
the faulty writes, so one bad write never fails its neighbours. Any other store error
(disk full, read-only file, I/O error) fails the whole batch; nothing of it is written.

Committed events are then published to the broadcast actor in sequence order. The seqs
are given in memory (``last_seq + 1`` onwards) where this actor is the database's only
writer (SQLite); where several runtimes write one database (PostgreSQL), the database
numbers a batch's events as it commits (:meth:`~.port.StoreSql.numbered_events`, a
counter row that orders the commits), and a log feed beside this actor
(:class:`~.port.LogFeed`) publishes every node's events, this one's handed to it here.
"""

from __future__ import annotations

import functools
import logging
import time
from bisect import bisect_left
from collections.abc import Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, cast

import anyio
import msgspec

from ..errors import RuntimeStoppedError, StorageError
from ..messages.events import BroadcastMessage, Publish
from ..messages.storage import (
    COMMIT_BATCH_BOUNDS,
    COMMIT_SECONDS_BOUNDS,
    AppendEvent,
    Committed,
    PutTask,
    SetTaskState,
    StorageMessage,
    TrimEventLog,
    Write,
)
from ..messages.tasks import TERMINAL, TaskStatus
from ..runtime import ActorRef, Envelope
from .grouping import _row_statements
from .port import (
    CommitUnknownError,
    Publisher,
    QueueKey,
    Statement,
    StoreError,
    StoreIntegrityError,
)

if TYPE_CHECKING:
    from .actor import StorageActor

log = logging.getLogger("hive_orchestration.storage")

_Pending = tuple[Envelope[StorageMessage], Write]


async def _decide_locked(self: StorageActor, writes: list[_Pending]) -> list[_Pending] | None:
    """The writes whose ops are decided once their ready rows are locked (a node's
    claims: :class:`~..messages.storage.LockReady`): the rows are taken in the batch's
    transaction, left open (:meth:`~.port.StoreSql.lock_ready`), answered to the
    writer, which decides in its own task and answers the ops, and the batch goes on
    with them. A writer that answers no ops (it stopped, or its decision failed) is
    failed and left out; the others go on. None: the rows could not be read, and the
    batch failed whole, nothing applied."""
    db = self._require_db()
    decided: list[_Pending] = []
    begun = False
    try:
        for envelope, write in writes:
            lock = write.lock
            if lock is None:
                decided.append((envelope, write))
                continue
            if begun:  # one transaction locks once: a second writer decides on memory
                loaded = None
            else:
                loaded = await self._sql.lock_ready(db, lock)
                begun = loaded is not None
            lock.locked.resolve(loaded)
            try:
                # The writer is waiting for the rows and answers at once; it answers
                # on every way out (actors/task_manager/answers.py), so this wait ends.
                ops = await lock.decided.wait()
            except Exception as exc:
                envelope.fail(
                    StorageError(
                        f"the claims' write was not decided ({exc}); nothing of it applied"
                    )
                )
                continue
            decided.append((envelope, Write(ops)))
    except StoreError as exc:
        if begun:
            with suppress(StoreError):
                await db.rollback()
        self._fail(writes, exc)
        return None
    except BaseException:
        if begun:
            with suppress(StoreError):
                await db.rollback()
        raise
    return decided


async def _commit(self: StorageActor, writes: list[_Pending], *, isolate: bool) -> None:
    db = self._require_db()
    with anyio.CancelScope(shield=True):
        if any(write.lock is not None for _, write in writes):
            locked = await self._decide_locked(writes)
            if locked is None:
                return
            writes = locked
        rows: list[list[Statement]] = []  # each write's row statements
        appended: list[list[AppendEvent]] = []  # each write's events
        through = None  # the furthest trim of the event log the writes hold
        for _, write in writes:
            rows.append(_row_statements(write.ops))
            # One pass over the ops (a task's write holds about ten) for both kinds.
            events_of: list[AppendEvent] = []
            for op in write.ops:
                kind = type(op)
                if kind is AppendEvent:
                    events_of.append(op)  # type: ignore[arg-type]
                elif kind is TrimEventLog:
                    trim = op.through  # type: ignore[union-attr]
                    through = trim if through is None else max(through, trim)
            appended.append(events_of)
        ops = [op for unit in appended for op in unit]
        numbered = self._sql.numbered_events(ops, self._origin) if ops else None
        statements = [statement for unit in rows for statement in unit]
        if self._feed is not None:
            # Several nodes: one notice per commit that made tasks ready, so that the
            # others' claims waiting for those queues are handed them now.
            notice = self._sql.ready_notice(_ready_queues(writes), self._origin)
            if notice is not None:
                statements.append(notice)
        if numbered is None:
            # Numbered here, in memory: this actor is the database's only writer.
            seq = self._last_seq
            for event_op in ops:
                seq += 1
                statements.append(self._sql.event_statement(seq, event_op))
        trimmed = self._trimmed
        if through is not None:
            self._trimmed = max(self._trimmed, through)
        began = time.perf_counter()
        try:
            if numbered is None:
                await db.transaction(statements)
                last = self._last_seq + len(ops)
            else:
                last = int(cast(int, (await db.append(statements, numbered))[0]))
        except CommitUnknownError:
            # The connection went while COMMIT was on its way: the batch may be in
            # the database or not, so it must not be told "nothing was applied", and
            # the seqs it took may be taken. Crash: every writer of the batch hears
            # that the outcome is unknown (ActorFailedError, not StorageError), and
            # the restarted actor reads the log's last seq from the database.
            self._trimmed = trimmed
            raise
        except StoreIntegrityError as exc:
            self._trimmed = trimmed
            if not isolate or len(writes) == 1:
                self._fail(writes, exc)
                return
            await self._isolate(writes, rows, appended)
            return
        except StoreError as exc:
            self._trimmed = trimmed
            self._fail(writes, exc)
            return
        took = time.perf_counter() - began
        self._last_seq = max(self._last_seq, last)
        self._transactions += 1
        self._writes += len(writes)
        self._largest_batch = max(self._largest_batch, len(writes))
        self._commit_counts[bisect_left(COMMIT_SECONDS_BOUNDS, took)] += 1
        self._commit_sum += took
        self._batch_counts[bisect_left(COMMIT_BATCH_BOUNDS, len(writes))] += 1
        self._batch_sum += len(writes)
        # The batch's events took the numbers up to ``last``, in order.
        seq = last - len(ops)
        seqs: list[tuple[int, ...]] = []
        for unit in appended:
            seqs.append(tuple(range(seq + 1, seq + 1 + len(unit))))
            seq += len(unit)
        events = [
            msgspec.structs.replace(op.event, seq=number)
            for op, number in zip(ops, range(last - len(ops) + 1, last + 1), strict=True)
        ]
    # Publish before answering, so that an event caused by a write is already on its
    # way to subscribers when the writer learns the write is durable; answer in a
    # finally, so that a cancellation while publishing cannot report a committed write
    # as not done.
    try:
        if events:
            message = Publish(tuple(events), tuple(op.data_json for op in ops))
            if self._feed is not None:
                await self._feed.committed(message)
            elif self._events is not None:
                await self._publish(message)
    finally:
        for (envelope, _), committed_seqs in zip(writes, seqs, strict=True):
            envelope.resolve(Committed(committed_seqs))


def _ready_queues(writes: list[_Pending]) -> set[QueueKey]:
    """The ready queues the writes queue tasks in (created, or back in the queue), and
    those of a concurrency key a task of which ended: its slot is free, so a task of
    that key another node holds back may now be handed out."""
    queues: set[QueueKey] = set()
    for _, write in writes:
        for op in write.ops:
            if isinstance(op, PutTask | SetTaskState):
                task = op.task
                if (task.status is TaskStatus.QUEUED and task.run_at is None) or (
                    task.concurrency_key is not None and task.status in TERMINAL
                ):
                    queues.add((task.task_type, task.requires, task.concurrency_key))
    return queues


async def _isolate(
    self: StorageActor,
    writes: list[_Pending],
    rows: list[list[Statement]],
    appended: list[list[AppendEvent]],
) -> None:
    """Find the writes that broke the batch, fail them, and commit the others."""
    units: list[list[Statement]] = []
    seq = self._last_seq  # the numbers a probe gives are rolled back with it
    for unit_rows, unit_ops in zip(rows, appended, strict=True):
        numbered = self._sql.numbered_events(unit_ops, "") if unit_ops else None
        if numbered is not None:
            units.append([*unit_rows, numbered])
            continue
        unit = list(unit_rows)
        for op in unit_ops:
            seq += 1
            unit.append(self._sql.event_statement(seq, op))
        units.append(unit)
    verdicts = await self._require_db().probe(units)
    good: list[_Pending] = []
    for pending, verdict in zip(writes, verdicts, strict=True):
        if verdict is None:
            good.append(pending)
        else:
            self._fail([pending], verdict)
    if len(good) == len(writes):
        # Each write is fine alone but not together: fail them rather than loop.
        self._fail(writes, StoreIntegrityError("writes conflict with each other"))
    elif good:
        await self._commit(good, isolate=False)


def _fail(self: StorageActor, writes: Sequence[_Pending], exc: StoreError) -> None:
    self._failed_writes += len(writes)
    log.warning("%d write(s) failed and were rolled back: %s", len(writes), exc)
    for envelope, _ in writes:
        envelope.fail(self._error(exc, "write rolled back, nothing of it was applied"))


async def _publish(self: StorageActor, message: Publish) -> None:
    assert self._events is not None
    await publish_to(self._events, message)


async def publish_to(events: ActorRef[BroadcastMessage], message: Publish) -> None:
    """Hand one commit's events to the broadcast actor (waiting if its mailbox is full)."""
    try:
        if not events.try_tell(message):
            await events.tell(message)
    except RuntimeStoppedError:
        # Only during shutdown, after the broadcast actor stopped: the events are
        # durable and can be replayed from the log.
        log.debug("broadcast stopped; %d event(s) not fanned out", len(message.events))


def publisher(events: ActorRef[BroadcastMessage]) -> Publisher:
    """What a store's log feed publishes with (:meth:`~.port.Store.log_feed`)."""
    return functools.partial(publish_to, events)
