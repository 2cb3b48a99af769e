"""Read-only connections beside the write connection, so that a long read never holds up
a commit.

The storage actor handles its mailbox one batch at a time. With one connection, a read of
a million rows (12 s here) ran inside a batch, and every writer behind it waited as long.
In WAL mode a reader needs no lock a writer waits for, so the large reads (listings,
counts, the event log: see :data:`POOLED`) go to a small, bounded pool of read-only
connections instead, and the actor goes on committing.

Each reader is a task that runs for the runtime's whole life (a supervisor service, across
restarts of the storage actor) and owns one connection, opened on its first read by the
store (:meth:`~.port.Store.open_reader`; on SQLite with ``mode=ro`` and ``query_only``:
aiosqlite's own thread on asyncio, anyio's worker thread under trio, exactly as the write
connection, :mod:`.sqlite.drivers`). Jobs reach the readers
through a bounded stream; a full stream makes the storage actor wait (backpressure),
which only happens with that many reads already waiting.

Read-your-writes. The storage actor commits the writes of a batch before it hands that
batch's reads to the pool, and a reader starts the read's transaction only when it takes
the job, so a read sees every write committed before it was handed over: every write
whose reply its asker had, and every write queued before it (a read a TaskManager
forwards behind its batch's write sees that write). A read asked while a write commits
may see it or not, as before.

The TaskManager's refills of its heads (a :class:`LoadQueueHeads` naming its queues: the
next tasks of each after what memory holds, a range scan of the ready index, 5 to 16 ms
for 1 024 tasks, far more on a cold cache) have a reader of their own, where the store is
the database's one writer (:attr:`~.port.Store.head_reader`, SQLite): on the write
connection every commit waited for the read's SQL, and in the pool it would wait behind
the listings. Correct because the read runs whole in one read transaction
(:meth:`~.port.Driver.snapshot`: a WAL snapshot, the database as of one commit) taken
after the TaskManager asked, and the TaskManager is the only writer of tasks: it sends a
refill with no commit of its own in flight (after a batch's commit was answered), so the
snapshot holds every change memory was built on, and whatever it commits after sending,
whether the snapshot shows it or not, it records against the read (the tasks it changed,
those it left to storage, the queues it trimmed, a failed batch) and reconciles as it
takes the answer in (``actors/task_manager/heads.py``, ``take_refill``), as it already
did for a read served between its commits.

Point reads by key (a task, a run, a plan) and the actors' own loads stay on the write
connection: they take microseconds, and an actor that awaits one mid-batch must never
wait behind someone's listing. ``:memory:`` databases (and a ``read_only`` storage actor,
which reads only) keep their one connection: a shared-cache memory database has no WAL,
so a reader there would wait for the writer's lock.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeAlias

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..errors import ActorFailedError, RuntimeStoppedError, StorageError
from ..messages.plan_data import LoadDependencyResults
from ..messages.storage import (
    CountQueued,
    CountTasks,
    CountTasksByType,
    LoadQueueHeads,
    PlanEventTrim,
    QueryPlanningRequests,
    QueryPlans,
    QueryTasks,
    ReadEvents,
)
from .port import Driver, Store, StoreError

__all__ = ["POOLED", "Job", "ReaderPool", "on_head_reader"]

log = logging.getLogger("hive_orchestration.storage")

#: The reads that go to the pool: the ones whose size grows with the database.
POOLED = (
    QueryTasks,
    CountTasks,
    ReadEvents,
    QueryPlans,
    QueryPlanningRequests,
    CountTasksByType,
    CountQueued,
    LoadDependencyResults,  # up to max_bytes of results
    PlanEventTrim,
)


def on_head_reader(message: object) -> bool:
    """Whether ``message`` is a refill of the TaskManager's heads (not the load of every
    queue as it opens, which waits for nothing and stays on the write connection)."""
    return isinstance(message, LoadQueueHeads) and message.heads is not None


#: A read to run: given a connection, it answers its asker itself (and never raises but
#: for cancellation). ``stopped`` fails its asker, for a read that will never run.
Job: TypeAlias = tuple[Callable[[Driver], Awaitable[None]], Callable[[BaseException], object]]


class ReaderPool:
    """``size`` read-only connections to ``store``'s database, each driven by its own task."""

    def __init__(self, store: Store, *, size: int, queue: int, owner: str = "storage") -> None:
        if not store.readers:
            raise ValueError(f"a reader pool cannot read {store.display!r}: it needs a file")
        self.size = size
        self._owner = owner
        self._store = store
        send, receive = anyio.create_memory_object_stream[Job](queue)
        self._send: MemoryObjectSendStream[Job] = send
        self._receive: MemoryObjectReceiveStream[Job] = receive
        self._running = False
        #: Reads run so far (for the tests and statistics).
        self.reads = 0
        self._crashes: list[tuple[Callable[[BaseException], object], Exception]] = []
        #: Tells the storage actor to come and crash (set by the runtime).
        self.poke: Callable[[], object] = lambda: None

    @property
    def running(self) -> bool:
        """Whether the readers are up: reads sent now will be answered."""
        return self._running

    def raise_crash(self) -> None:
        """Raise what a read crashed on (anything but the store's and the domain's errors a
        read answers with itself), after failing its asker with :class:`ActorFailedError`: the
        storage actor calls it first thing in each batch (a crashed reader pokes it), so
        that it crashes, and is restarted and reported, as if the read had run in it."""
        if not self._crashes:
            return
        crashes, self._crashes = self._crashes, []
        for fail, exc in crashes:
            fail(ActorFailedError(self._owner, exc))
        raise crashes[0][1]

    async def submit(self, job: Job) -> None:
        """Queue a read; waits only while ``queue`` reads are already waiting."""
        try:
            try:
                self._send.send_nowait(job)
            except anyio.WouldBlock:
                await self._send.send(job)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            job[1](RuntimeStoppedError("the storage readers are stopped"))

    async def run(self) -> None:
        """Run the readers until cancelled (a supervisor service), then close their
        connections and fail whatever was still queued."""
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(self.size):
                    tg.start_soon(self._reader)
                self._running = True
        finally:
            self._running = False
            self.close()

    def close(self) -> None:
        """Refuse every read from now on and fail the ones still queued (idempotent)."""
        stopped = RuntimeStoppedError("the storage readers stopped before this read ran")
        while True:
            try:
                _, fail = self._receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            fail(stopped)
        self._receive.close()
        self._send.close()

    async def _reader(self) -> None:
        db: Driver | None = None
        try:
            while True:
                job, fail = await self._receive.receive()
                if db is None:
                    try:
                        db = await self._open()
                    except StorageError as exc:
                        fail(exc)  # the next read tries again
                        continue
                self.reads += 1
                try:
                    await job(db)
                except anyio.get_cancelled_exc_class():
                    fail(RuntimeStoppedError("the storage readers stopped during this read"))
                    raise
                except Exception as exc:
                    # Its asker hears from the storage actor as it crashes (raise_crash).
                    self._crashes.append((fail, exc))
                    self.poke()
                    log.warning("a storage reader failed (%r); its connection is reopened", exc)
                    await _close(db)
                    db = None
        finally:
            if db is not None:
                await _close(db)

    async def _open(self) -> Driver:
        return await self._store.open_reader()


async def _close(db: Driver) -> None:
    with anyio.CancelScope(shield=True):
        try:
            await db.close()
        except StoreError as exc:  # pragma: no cover - closing a read-only connection
            log.warning("closing a storage reader failed: %s", exc)
