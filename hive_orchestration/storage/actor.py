"""The storage actor: the only owner of the store's write connection.

Every write in the runtime is a :class:`Write` message to this actor. It takes whatever is
waiting in its mailbox (up to ``max_batch``), applies all the writes in one transaction
(group commit), and only then answers each writer: a reply means the write is durable.
At ``synchronous=FULL`` the fsync is what a commit costs, so sharing it across a batch is
what makes many concurrent writers fast.

What differs between stores (SQLite, PostgreSQL) is behind the store it is given
(``storage/port.py``): the connections, the SQL of its reads and of the event rows, and
the wording of a failure. The actor catches the port's errors only, and has the store
explain them (:meth:`~.port.Store.explain`).

Opened ``read_only`` (the inspector, beside a runtime that may own the database in another
process), the actor takes no claim and writes nothing, not even a pragma or a migration:
every :class:`Write` is refused with a :class:`StorageError`, and queries work as usual.

The rest of it, by responsibility:

- :mod:`.commit`: the group commit: a batch's writes in one transaction, a faulty write
  isolated, the events numbered and published
- :mod:`.grouping`: a write's ops as the statements that apply them
- :mod:`.queries`: the reads it answers, on its connection or a reader's
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anyio

from ..config import RuntimeConfig
from ..errors import StorageError
from ..messages.events import BroadcastMessage
from ..messages.storage import COMMIT_BATCH_BOUNDS, COMMIT_SECONDS_BOUNDS, StorageMessage, Write
from ..runtime import Actor, ActorRef, Envelope
from . import commit, queries
from .commit import _Pending, publish_to, publisher
from .grouping import _in_order as _in_order
from .grouping import _row_statements as _row_statements
from .port import Driver, LogFeed, Store, StoreError
from .readers import POOLED, ReaderPool, on_head_reader
from .retention import trimmed_through
from .store import open_store

__all__ = ["StorageActor", "publish_to", "publisher"]
# _in_order and _row_statements (grouping.py) stay importable from here, as before the split.

log = logging.getLogger("hive_orchestration.storage")

#: Seconds a stopping actor waits for its log feed to publish what it committed.
_DRAIN_SECONDS = 2.0


class StorageActor(Actor[StorageMessage]):
    # A writer may run the batch of its write while this actor is idle
    # (ActorRef.request_now, the TaskManager's commits): the batch holds nothing bound
    # to this actor's task (its transaction is shielded, its connection serves any
    # task), and saves waking this actor and then the writer.
    lends_batches = True

    def __init__(
        self,
        store: Store | str,
        config: RuntimeConfig,
        events: ActorRef[BroadcastMessage] | None = None,
        *,
        read_only: bool = False,
        readers: ReaderPool | None = None,
        feed: LogFeed | None = None,
        heads: ReaderPool | None = None,
    ) -> None:
        """``feed``: the store's log feed (:meth:`~.port.Store.log_feed`), which then
        publishes the committed events instead of this actor (``events`` is not used).
        ``heads``: the reader of the TaskManager's refills (readers.py); None: they run
        on the write connection."""
        self.max_batch = config.max_batch
        self._feed = feed
        self._origin = "" if feed is None else feed.origin
        #: Where the large reads go (see readers.py); None: all on the write connection.
        self._readers = readers
        self._heads = heads
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
        for pool in (self._readers, self._heads):
            if pool is not None:
                # A reader's read crashed: crash as that read would have on the write
                # connection, before anything of this batch starts (it all goes on to the
                # replacement), so that the supervisor restarts and reports it as ever.
                pool.raise_crash()
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
            elif self._heads is not None and on_head_reader(message):
                await self._heads.submit((self._reader_job(envelope), envelope.fail))
            else:
                await self._answer(envelope)

    def _error(self, exc: StoreError, action: str) -> StorageError:
        return self._store.explain(exc, action)

    def _require_db(self) -> Driver:
        if self._db is None:  # pragma: no cover - messages only arrive after started()
            raise StorageError("storage is not open")
        return self._db

    # The rest of the actor lives in the modules of its responsibilities, as functions
    # that take it as their first argument; named here, they are its methods (tests patch
    # StorageActor._commit, _query and _read_events, which the other functions call).
    # commit.py
    _commit = commit._commit
    _decide_locked = commit._decide_locked
    _isolate = commit._isolate
    _fail = commit._fail
    _publish = commit._publish
    # queries.py
    _reader_job = queries._reader_job
    _connection = queries._connection
    _answer = queries._answer
    _query = queries._query
    _read_events = queries._read_events
    _check_trimmed = queries._check_trimmed
    _statistics = queries._statistics
