"""The storage actor: the only owner of the store's write connection.

Every write in the runtime is a :class:`Write` message to this actor. It takes whatever is
waiting in its mailbox (up to ``max_batch``), applies all the writes in one transaction
(group commit), and only then answers each writer: a reply means the write is durable.
At ``synchronous=FULL`` the fsync is what a commit costs, so sharing it across a batch is
what makes many concurrent writers fast.

A batch runs in a shielded scope: a writer that is cancelled, or a runtime that is shutting
down, can never stop it between BEGIN and COMMIT. If the transaction fails on a constraint,
the batch is probed write by write (in savepoints, rolled back) and re-committed without
the faulty writes, so one bad write never fails its neighbours. Any other store error
(disk full, read-only file, I/O error) fails the whole batch; nothing of it is written.

What differs between stores (SQLite, PostgreSQL) is behind the store it is given
(``storage/port.py``): the connections, the SQL of its reads and of the event rows, and
the wording of a failure. The actor catches the port's errors only, and has the store
explain them (:meth:`~.port.Store.explain`).

Committed events are then published to the broadcast actor in sequence order. The seqs
are given in memory (``last_seq + 1`` onwards) where this actor is the database's only
writer (SQLite); where several runtimes write one database (PostgreSQL), the database
numbers a batch's events as it commits (:meth:`~.port.StoreSql.numbered_events`, a
counter row that orders the commits), and a log feed beside this actor
(:class:`~.port.LogFeed`) publishes every node's events, this one's handed to it here.

The reads of a batch start after its writes committed. The large ones (listings, counts,
the event log) are handed to a pool of read-only connections (:mod:`.readers`), so that
the actor goes on committing while they run; the others run here, in order.

Opened ``read_only`` (the inspector, beside a runtime that may own the database in another
process), the actor takes no claim and writes nothing, not even a pragma or a migration:
every :class:`Write` is refused with a :class:`StorageError`, and queries work as usual.
"""

from __future__ import annotations

import functools
import logging
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import cast

import anyio
import msgspec

from ..config import RuntimeConfig
from ..errors import EventsTrimmedError, HiveError, RuntimeStoppedError, StorageError
from ..messages.events import BroadcastMessage, Event, Publish
from ..messages.plan_data import LoadDependencyResults
from ..messages.plans import PlanningRequest, SubtaskState
from ..messages.storage import (
    COMMIT_BATCH_BOUNDS,
    COMMIT_SECONDS_BOUNDS,
    AppendEvent,
    Buckets,
    CheckReaders,
    Committed,
    DeleteRevokedType,
    DeleteScheduleRow,
    DeleteTaskEvents,
    DeleteTaskRow,
    DeleteWorkerRow,
    FenceLeader,
    FenceTask,
    FenceWorker,
    GetStorageStats,
    LoadSchedules,
    PutPlan,
    PutPlanningRequest,
    PutRevokedType,
    PutRun,
    PutSchedule,
    PutSubtask,
    PutTask,
    PutWorker,
    ReadEvents,
    SetPlanStatus,
    SetRunState,
    SetScheduleSlot,
    SetTaskState,
    StorageMessage,
    StorageStats,
    TrimEventLog,
    Write,
    WriteOp,
)
from ..messages.tasks import Run, Task
from ..messages.workers import Worker
from ..runtime import Actor, ActorRef, Envelope
from . import plans
from .control import CONTROL_QUERIES, frees_key, query_control, revoked_statement
from .plan_data import load_dependency_results
from .port import (
    PLAN_READS,
    QUEUE_READS,
    RETENTION_READS,
    TASK_READS,
    CommitUnknownError,
    Driver,
    LogFeed,
    Publisher,
    Statement,
    Store,
    StoreError,
    StoreIntegrityError,
)
from .readers import POOLED, ReaderPool
from .retention import delete_events_statements, trim_statements, trimmed_through
from .rows import (
    DELETE_TASK,
    DELETE_WORKER,
    FENCE_CLAIM,
    FENCE_TASK,
    KEY_LOCK,
    decoded,
    event_from_row,
    run_state_statement,
    run_statement,
    task_state_statement,
    task_statement,
    worker_statement,
)
from .schedules import load_schedules, schedule_statement
from .sqlite.schema import SCHEMA_VERSION
from .store import open_store

__all__ = ["StorageActor", "publish_to", "publisher"]

log = logging.getLogger("hive_orchestration.storage")

_Pending = tuple[Envelope[StorageMessage], Write]
#: Seconds a stopping actor waits for its log feed to publish what it committed.
_DRAIN_SECONDS = 2.0
#: The read-only connection of the reader task running a read (readers.py); unset in the
#: actor's own task, whose reads run on the write connection.
_READER: ContextVar[Driver | None] = ContextVar("hive_storage_reader", default=None)


class StorageActor(Actor[StorageMessage]):
    def __init__(
        self,
        store: Store | str,
        config: RuntimeConfig,
        events: ActorRef[BroadcastMessage] | None = None,
        *,
        read_only: bool = False,
        readers: ReaderPool | None = None,
        feed: LogFeed | None = None,
    ) -> None:
        """``feed``: the store's log feed (:meth:`~.port.Store.log_feed`), which then
        publishes the committed events instead of this actor (``events`` is not used)."""
        self.max_batch = config.max_batch
        self._feed = feed
        self._origin = "" if feed is None else feed.origin
        #: Where the large reads go (see readers.py); None: all on the write connection.
        self._readers = readers
        self._read_only = read_only
        self._store = open_store(store, config) if isinstance(store, str) else store
        self._sql = self._store.sql
        self._config = config
        self._events = events
        self._db: Driver | None = None
        self._last_seq = 0
        # How far retention trimmed the log: raised before a trim commits (and put back if
        # it fails), so that a read that overlapped the trim is refused, never short.
        self._trimmed = 0
        self._transactions = 0
        self._writes = 0
        self._failed_writes = 0
        self._largest_batch = 0
        # Fixed buckets counted in place: a commit costs two increments and two adds
        # here, no allocation and no lock (only this actor's task touches them).
        self._commit_counts = [0] * (len(COMMIT_SECONDS_BOUNDS) + 1)
        self._commit_sum = 0.0
        self._batch_counts = [0] * (len(COMMIT_BATCH_BOUNDS) + 1)
        self._batch_sum = 0

    async def started(self) -> None:
        self._db, self._last_seq = await self._store.open(read_only=self._read_only)
        try:
            self._trimmed = await trimmed_through(self._db)
        except StoreError as exc:
            raise self._store.explain(exc, "cannot open") from exc
        # A log trimmed to nothing goes on after the last number it ever gave.
        self._last_seq = max(self._last_seq, self._trimmed)
        if self._feed is not None:
            self._feed.begin(self._last_seq)
        mode = "read-only, " if self._read_only else ""
        log.info("storage open: %s (%sdriver %s)", self._store.display, mode, self._db.name)

    async def stopped(self, error: BaseException | None) -> None:
        if self._feed is not None and error is None:
            # What this actor committed reaches the subscribers before the broadcast actor
            # (stopped after this one) finishes their feeds; bounded: the feed may be
            # waiting for the database.
            with anyio.move_on_after(_DRAIN_SECONDS):
                await self._feed.drain()
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    async def receive_batch(self, batch: Sequence[Envelope[StorageMessage]]) -> None:
        # All the writes of a batch are one unit: if the actor crashes in it, every writer
        # hears so. Reads are started one by one, so a crash hands the unstarted ones on.
        if self._readers is not None:
            # A reader's read crashed: crash as that read would have on the write
            # connection, before anything of this batch starts (it all goes on to the
            # replacement), so that the supervisor restarts and reports it as ever.
            self._readers.raise_crash()
        writes: list[_Pending] = []
        for envelope in batch:
            if isinstance(envelope.message, Write):
                envelope.started = True
                writes.append((envelope, envelope.message))
        if writes and self._read_only:
            refused = StorageError(
                f"database {self._store.display!r} was opened read-only: nothing is written;"
                " writes go through the runtime that owns it",
                path=self._store.display,
            )
            self._failed_writes += len(writes)
            for envelope, _ in writes:
                envelope.fail(refused)
        elif writes:
            await self._commit(writes, isolate=True)
        for envelope in batch:
            if envelope.started:
                continue
            envelope.started = True
            message = envelope.message
            if self._readers is not None and isinstance(message, POOLED):
                # After this batch's writes committed: the read sees them (readers.py).
                await self._readers.submit((self._reader_job(envelope), envelope.fail))
            else:
                await self._answer(envelope)

    def _reader_job(
        self, envelope: Envelope[StorageMessage]
    ) -> Callable[[Driver], Awaitable[None]]:
        async def job(db: Driver) -> None:
            # Only this reader's task sees the variable: the actor's reads stay on its own.
            _READER.set(db)
            await self._answer(envelope)

        return job

    def _connection(self) -> Driver:
        """The connection a read runs on: a reader's, in a reader's task, else the writer's."""
        reader = _READER.get()
        return self._require_db() if reader is None else reader

    async def _answer(self, envelope: Envelope[StorageMessage]) -> None:
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

    async def _query(self, message: StorageMessage) -> object:
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

    async def _commit(self, writes: list[_Pending], *, isolate: bool) -> None:
        db = self._require_db()
        with anyio.CancelScope(shield=True):
            rows: list[list[Statement]] = []  # each write's row statements
            appended: list[list[AppendEvent]] = []  # each write's events
            for _, write in writes:
                rows.append(_row_statements(write.ops))
                appended.append([op for op in write.ops if isinstance(op, AppendEvent)])
            ops = [op for unit in appended for op in unit]
            numbered = self._sql.numbered_events(ops, self._origin) if ops else None
            statements = [statement for unit in rows for statement in unit]
            if numbered is None:
                # Numbered here, in memory: this actor is the database's only writer.
                seq = self._last_seq
                for event_op in ops:
                    seq += 1
                    statements.append(self._sql.event_statement(seq, event_op))
            trimmed = self._trimmed
            for _, write in writes:
                for op in write.ops:
                    if isinstance(op, TrimEventLog):
                        self._trimmed = max(self._trimmed, op.through)
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

    async def _isolate(
        self,
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

    def _fail(self, writes: Sequence[_Pending], exc: StoreError) -> None:
        self._failed_writes += len(writes)
        log.warning("%d write(s) failed and were rolled back: %s", len(writes), exc)
        for envelope, _ in writes:
            envelope.fail(self._error(exc, "write rolled back, nothing of it was applied"))

    def _error(self, exc: StoreError, action: str) -> StorageError:
        return self._store.explain(exc, action)

    async def _publish(self, message: Publish) -> None:
        assert self._events is not None
        await publish_to(self._events, message)

    async def _read_events(self, read: ReadEvents) -> tuple[Event, ...]:
        # ``after=0`` reads from wherever the log starts; a later ``after`` that the log
        # no longer reaches back to would miss events: refused, before and after the read
        # (a trim that committed while it ran may have taken what it was about to read).
        await self._check_trimmed(read)
        rows = await self._sql.read_events(self._connection(), read)
        await self._check_trimmed(read)
        return tuple(await decoded(rows, event_from_row))

    async def _check_trimmed(self, read: ReadEvents) -> None:
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

    def _statistics(self) -> StorageStats:
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
            commit_seconds=Buckets(
                COMMIT_SECONDS_BOUNDS, tuple(self._commit_counts), self._commit_sum
            ),
            commit_batch_size=Buckets(
                COMMIT_BATCH_BOUNDS, tuple(self._batch_counts), float(self._batch_sum)
            ),
            trimmed_through=self._trimmed,
        )

    def _require_db(self) -> Driver:
        if self._db is None:  # pragma: no cover - messages only arrive after started()
            raise StorageError("storage is not open")
        return self._db


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


#: A duty of the leader of several nodes (PostgreSQL only): the epoch it was given is still
#: the leader's; the row lock it takes makes a new leader's bump wait for this commit.
FENCE_LEADER = "UPDATE hive_leader SET epoch = epoch WHERE id = 1 AND epoch = ?"
#: A dead node's worker is still that node's (it did not come back on a live node).
FENCE_WORKER = "UPDATE workers SET node_id = node_id WHERE id = ? AND node_id = ?"


def _row_statements(ops: Sequence[WriteOp]) -> list[Statement]:
    """The row statements of one write, grouped by kind (its events follow).

    Applying them grouped, each row once, leaves the same rows as applying the ops in
    order: a put replaces every column of its row and a state write every column that
    changes after creation, so only the last op of a row counts (written whole if the row
    was put in this write, as it may be new; else its state columns only); tasks go
    before runs, so a run's task exists; deletes go first, so a key a deleted task held is
    free for a task created in the same write (a task is put once, at its creation, and
    its keys never change, so only a delete frees one); events reference no row. The one
    case where order matters, a row both written and deleted in one write, is applied in
    order.
    Grouping turns a write into a few long ``executemany`` runs.
    """
    tasks: dict[str, Task] = {}
    runs: dict[str, Run] = {}
    put_tasks: set[str] = set()  # rows that may be new in this write: written whole
    put_runs: set[str] = set()
    lease_hashes: dict[str, bytes] = {}  # a put run's, kept when a state write follows it
    workers: dict[str, Worker] = {}
    deleted: list[str] = []
    fences: dict[str, FenceTask] = {}  # task id -> the version the writer read
    duty: list[Statement] = []  # a leader's fences (epoch, workers): first of all
    gone: list[str] = []  # deleted workers
    requests: dict[str, PlanningRequest] = {}
    new_plans: list[Statement] = []
    plan_updates: list[Statement] = []  # in order: each sets whole status and times
    subtasks: dict[tuple[str, str], SubtaskState] = {}
    control: list[Statement] = []  # revoked task types, in order
    retention: list[Statement] = []  # a purge's events, a trim: before the rows go
    schedules: list[Statement] = []  # in order: they reference no other row
    for op in ops:
        match op:
            case SetTaskState(task=task):
                tasks[task.id] = task
            case SetRunState(run=run):
                runs[run.id] = run
            case AppendEvent():
                pass
            case PutTask(task=task):
                tasks[task.id] = task
                put_tasks.add(task.id)
            case PutRun(run=run, lease_hash=lease_hash):
                runs[run.id] = run
                put_runs.add(run.id)
                if lease_hash is not None:
                    lease_hashes[run.id] = lease_hash
            case PutPlanningRequest(request=request):
                requests[request.id] = request
            case PutPlan():
                new_plans.append(plans.plan_statement(op))
            case SetPlanStatus():
                plan_updates.append(plans.plan_status_statement(op))
            case PutSubtask(state=state):
                subtasks[state.plan_id, state.subtask_id] = state
            case DeleteTaskRow(task_id=task_id):
                deleted.append(task_id)
            case FenceTask(task_id=task_id):
                fences.setdefault(task_id, op)
            case FenceLeader() | FenceWorker():
                duty.append(_in_order(op))
            case PutWorker(worker=worker):
                workers[worker.id] = worker
            case DeleteWorkerRow(worker_id=worker_id):
                gone.append(worker_id)
            case PutRevokedType() | DeleteRevokedType():
                control.append(revoked_statement(op))
            case DeleteTaskEvents(task_ids=task_ids):
                retention += delete_events_statements(task_ids)
            case TrimEventLog(through=through):
                retention += trim_statements(through)
            case PutSchedule() | SetScheduleSlot() | DeleteScheduleRow():
                schedules.append(schedule_statement(op))
    if (
        deleted
        and (
            not tasks.keys().isdisjoint(deleted)
            or any(run.task_id in deleted for run in runs.values())
        )
    ) or (gone and not workers.keys().isdisjoint(gone)):
        rest = [op for op in ops if not isinstance(op, AppendEvent | FenceLeader | FenceWorker)]
        return duty + [s for op in rest for s in _in_order_all(op)]
    # The fences first, in one order on every node: they lock the rows the write changes,
    # so two nodes' writes of the same tasks wait for each other, never deadlock.
    keys = sorted({fence.key for fence in fences.values() if fence.key is not None})
    statements: list[Statement] = duty + [(KEY_LOCK, (key,)) for key in keys]
    statements += [_fence(fences[task_id]) for task_id in sorted(fences)]
    statements += retention
    statements += [(DELETE_TASK, (task_id,)) for task_id in deleted]
    statements += [(DELETE_WORKER, (worker_id,)) for worker_id in gone]
    # Referenced rows before the rows that reference them: request <- plan <- subtask,
    # task <- run, task <- subtask. New rows before state writes, so that a statement
    # follows the one before it (same SQL) more often and executemany takes longer runs.
    statements += [plans.request_statement(request) for request in requests.values()]
    statements += new_plans
    statements += plan_updates
    states: list[Statement] = []
    for task_id, task in tasks.items():
        if task_id in put_tasks:
            statements.append(task_statement(task))
        elif frees_key(task):
            # Before the puts: a task created in this write may take the key it frees.
            statements.insert(0, task_state_statement(task))
        else:
            states.append(task_state_statement(task))
    for run_id, run in runs.items():
        if run_id in put_runs:
            statements.append(run_statement(run, lease_hashes.get(run_id)))
        else:
            states.append(run_state_statement(run))
    statements += [worker_statement(worker) for worker in workers.values()]
    statements += [plans.subtask_statement(state) for state in subtasks.values()]
    return statements + states + control + schedules


def _fence(fence: FenceTask) -> Statement:
    if fence.key is None:
        return (FENCE_TASK, (fence.task_id, fence.version))
    return (FENCE_CLAIM, (fence.task_id, fence.version, fence.key, fence.task_id, fence.room))


def _in_order_all(op: WriteOp) -> list[Statement]:
    """The statements of one op (a retention op has several, a row op one)."""
    match op:
        case DeleteTaskEvents(task_ids=task_ids):
            return delete_events_statements(task_ids)
        case TrimEventLog(through=through):
            return trim_statements(through)
    return [_in_order(op)]


def _in_order(op: WriteOp) -> Statement:
    match op:
        case PutTask(task=task):
            return task_statement(task)
        case SetTaskState(task=task):
            return task_state_statement(task)
        case PutRun(run=run, lease_hash=lease_hash):
            return run_statement(run, lease_hash)
        case SetRunState(run=run):
            return run_state_statement(run)
        case DeleteTaskRow(task_id=task_id):
            return (DELETE_TASK, (task_id,))
        case FenceTask():
            return _fence(op)
        case FenceLeader(epoch=epoch):
            return (FENCE_LEADER, (epoch,))
        case FenceWorker(worker_id=worker_id, node_id=node_id):
            return (FENCE_WORKER, (worker_id, node_id))
        case PutWorker(worker=worker):
            return worker_statement(worker)
        case DeleteWorkerRow(worker_id=worker_id):
            return (DELETE_WORKER, (worker_id,))
        case PutPlanningRequest(request=request):
            return plans.request_statement(request)
        case PutPlan():
            return plans.plan_statement(op)
        case SetPlanStatus():
            return plans.plan_status_statement(op)
        case PutSubtask(state=state):
            return plans.subtask_statement(state)
        case PutRevokedType() | DeleteRevokedType():
            return revoked_statement(op)
        case PutSchedule() | SetScheduleSlot() | DeleteScheduleRow():
            return schedule_statement(op)
    raise AssertionError(f"not a row write: {op!r}")
