"""The storage port: what the storage actor asks of a store, and how a store says it failed.

The storage actor (group commit, isolation of a bad write, publishing, statistics) is the
same whatever holds the data; a *store* is what differs: SQLite (a file, one process) or
PostgreSQL (a server, several nodes). Each store brings its own driver (this module's
:class:`Driver`) and reports every failure of its database library as one of the
exceptions below, already classified, so that nothing above ``storage/`` (and nothing in
the actor) ever catches ``sqlite3.Error`` or ``psycopg.Error``.

Nothing here imports a database library: a store's own modules do, and only they.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Generator, Sequence
from typing import TYPE_CHECKING, Literal, Protocol, TypeAlias, TypeVar

import anyio

from ..errors import StorageError, StorageFault
from ..messages.events import Interest, Publish
from ..messages.plan_data import LoadDependencyResults
from ..messages.storage import (
    AppendEvent,
    CheckDependencies,
    CountQueued,
    CountSubtasks,
    CountTasks,
    DatabaseClock,
    FetchPlan,
    FetchPlanningRequest,
    FetchRun,
    FetchRuns,
    FetchTask,
    FetchTasks,
    FindIdempotencyKeys,
    FindPurgeable,
    LastTaskId,
    LoadActivePlans,
    LoadLeaseHashes,
    LoadPlanningRequests,
    LoadPlanTasks,
    LoadQueueHeads,
    LoadRuns,
    LoadStarts,
    LoadSubtasks,
    LoadTasks,
    LoadTimers,
    LoadWorkers,
    LockedHeads,
    LockReady,
    NextPlannedTask,
    PlanEventTrim,
    QueryPlanningRequests,
    QueryPlans,
    QueryTasks,
    QueryUnroutable,
    ReadEvents,
    RetentionDue,
    StorageMessage,
    StoreFences,
    TakePlan,
)
from .nodes import DeadNodes, LeaderDuties, Leadership, LogFeed

if TYPE_CHECKING:
    from ..config import RuntimeConfig

__all__ = [
    "PLAN_READS",
    "POSTGRES_SCHEMES",
    "QUEUE_READS",
    "RETENTION_READS",
    "STARTING",
    "SHARED_READS",
    "STOPPING",
    "TASK_READS",
    "CommitUnknownError",
    "DeadNodes",
    "Driver",
    "LeaderDuties",
    "Leadership",
    "LogFeed",
    "Params",
    "Publisher",
    "QueueKey",
    "ReadJob",
    "ReadyNotified",
    "Row",
    "Statement",
    "Store",
    "StoreClaim",
    "StoreError",
    "StoreFactory",
    "StoreIntegrityError",
    "StoreKind",
    "StoreSql",
    "check_updated",
    "coalesce",
    "store_kind",
]

Params: TypeAlias = tuple[object, ...]
#: A ready queue as stored: task type, requirement list, concurrency key.
QueueKey: TypeAlias = tuple[str, tuple[str, ...], str | None]
#: What a node's log feed calls when other nodes' commits made tasks of some ready queues
#: claimable (``None``: which is not known, read them all); quick, never blocking.
ReadyNotified: TypeAlias = Callable[[tuple[QueueKey, ...] | None], None]
Statement: TypeAlias = tuple[str, Params]
Row: TypeAlias = tuple[object, ...]
_T = TypeVar("_T")
#: A read of several statements, each chosen from the rows of those before it: a generator
#: that yields each statement, is sent its rows, and returns its answer. Plain code with no
#: await in it, so a driver may run it whole on its connection's thread (decoding included)
#: as one hop, in one read transaction (:meth:`Driver.snapshot`).
ReadJob: TypeAlias = Generator[Statement, list[Row], _T]

StoreKind: TypeAlias = Literal["sqlite", "postgres"]

#: A database named by one of these URL schemes is a PostgreSQL server; anything else is a
#: SQLite file (or ``:memory:``), as it always was.
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def store_kind(target: str) -> StoreKind:
    """Which store a ``db_path`` / ``--db`` value names."""
    return "postgres" if target.lower().startswith(POSTGRES_SCHEMES) else "sqlite"


#: What an owner record says in place of an address while its runtime is opening (it will
#: serve, and records where once it does) and once it has stopped serving (it is
#: closing): a client waits and tries again. ``None`` (nothing recorded): it serves no
#: socket. The same words for every store (:meth:`Store.read_owner`).
STARTING = "starting"
STOPPING = "stopping"


class StoreError(Exception):
    """The store's database library refused an operation; ``fault`` says why, when known.

    The storage actor turns it into the user's :class:`~hive_orchestration.StorageError`
    (naming the database and what to do); ``__cause__`` keeps the library's own error.
    """

    def __init__(self, message: str, *, fault: StorageFault | None = None) -> None:
        super().__init__(message)
        self.fault = fault


class StoreIntegrityError(StoreError):
    """A constraint refused a write, or an UPDATE found fewer rows than it was sent for
    (the writer's view and the database disagree). The transaction was rolled back; a
    batch holding it is isolated to find the write at fault."""


class CommitUnknownError(StoreError):
    """The connection was lost while COMMIT was on its way: the transaction may or may not
    have landed. Never report it as "nothing was applied"; whoever wrote must read back."""


def check_updated(
    sql: str, rows: int, changed: int, error: type[StoreError] = StoreIntegrityError
) -> None:
    """An UPDATE here writes a row its writer knows exists: one that is missing means the
    writer's memory and the database disagree, so the transaction fails (and the storage
    actor refuses the write that holds it) rather than lose the change in silence.

    Every driver calls it with each UPDATE run's row count (``changed``) against the rows
    it was given (``rows``); ``error`` lets a store raise its own subclass of
    :class:`StoreIntegrityError`.
    """
    if changed != rows and sql.startswith("UPDATE"):
        table = sql.split(None, 2)[1]
        missing = rows - changed
        raise error(f"{missing} of {rows} {table} row(s) to update are missing")


def coalesce(statements: Sequence[Statement]) -> list[tuple[str, list[Params]]]:
    """Merge consecutive statements with the same SQL, keeping their order exactly (one
    ``executemany`` run each)."""
    runs: list[tuple[str, list[Params]]] = []
    for sql, params in statements:
        if runs and runs[-1][0] == sql:
            runs[-1][1].append(params)
        else:
            runs.append((sql, [params]))
    return runs


class Driver:
    """The write connection (or one reader's connection). Only the storage actor and its
    readers hold one; each call is one trip to the database's thread or server."""

    name: str = "driver"

    async def execute(self, sql: str, params: Params = ()) -> None:
        raise NotImplementedError

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        raise NotImplementedError

    async def snapshot(self, job: ReadJob[_T]) -> _T:
        """Run ``job`` in one read transaction: every statement of it sees the database as
        of one commit, whatever commits meanwhile. This default drives it one statement per
        trip, on the event loop; the SQLite drivers run it whole on their thread."""
        await self.execute("BEGIN")
        try:
            rows: list[Row] | None = None
            while True:
                statement = next(job) if rows is None else job.send(rows)
                rows = await self.fetchall(*statement)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        finally:
            # A read: nothing to keep; ending it lets go of the snapshot.
            with anyio.CancelScope(shield=True):
                await self.execute("ROLLBACK")

    async def transaction(self, statements: Sequence[Statement]) -> None:
        """Apply ``statements`` in order in one transaction: all of them, or none.

        Consecutive statements with the same SQL may be sent as one batch. An UPDATE that
        changes fewer rows than it was given raises :class:`StoreIntegrityError`.
        """
        raise NotImplementedError

    async def append(self, statements: Sequence[Statement], numbered: Statement) -> Row:
        """Apply ``statements`` then ``numbered`` in one transaction, as :meth:`transaction`
        does, and answer the row ``numbered`` returned.

        ``numbered`` is a store's :meth:`StoreSql.numbered_events`: the statement that
        numbers a batch's events inside the transaction. Only the drivers of a store whose
        :class:`StoreSql` numbers events implement it.
        """
        raise NotImplementedError

    async def begin(self, statements: Sequence[Statement]) -> list[list[Row]]:
        """Open a transaction, run ``statements`` in it and answer each one's rows,
        leaving it open: the next :meth:`transaction` or :meth:`append` continues it
        (and commits it), :meth:`rollback` ends it. Only the drivers of a store whose
        :meth:`StoreSql.lock_ready` locks rows implement it. A connection lost meanwhile
        fails the call that would continue it, ``fault="unavailable"``: nothing applied.
        """
        raise NotImplementedError

    async def rollback(self) -> None:
        """End the transaction :meth:`begin` opened, applying nothing of it."""
        raise NotImplementedError

    async def probe(self, units: Sequence[Sequence[Statement]]) -> list[StoreError | None]:
        """Try each unit in its own savepoint, then roll everything back.

        Tells which units of a failed batch are at fault, without writing anything.
        """
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


# -- the store: everything the runtime needs of one kind of database ----------------------

#: The reads of the storage actor's own family (tasks, runs, workers, keys, listings).
TASK_READS = (
    CountTasks,
    CountQueued,
    LoadTasks,
    LoadRuns,
    LoadLeaseHashes,
    FindIdempotencyKeys,
    QueryTasks,
    FetchTask,
    FetchRun,
    FetchRuns,
    LoadWorkers,
)
#: The TaskManager's ready-queue reads (``storage/sqlite/queues.py`` on SQLite).
QUEUE_READS = (
    FetchTasks,
    LoadQueueHeads,
    QueryUnroutable,
    LoadTimers,
    LoadStarts,
    LastTaskId,
    StoreFences,
    DatabaseClock,
)
#: The plan, subtask and planning-queue reads.
PLAN_READS = (
    FetchPlan,
    QueryPlans,
    LoadActivePlans,
    TakePlan,
    LoadSubtasks,
    LoadPlanTasks,
    FetchPlanningRequest,
    QueryPlanningRequests,
    LoadPlanningRequests,
    CheckDependencies,
    NextPlannedTask,
    CountSubtasks,
)
#: The retention reads (what a purge may take, how far a trim goes, when one is due).
RETENTION_READS = (FindPurgeable, PlanEventTrim, RetentionDue)
#: Answered by shared code on any store, with portable SQL in ``?`` marks (which a driver
#: of another paramstyle translates): LoadDependencyResults (plan_data.py), the control
#: reads (control.py), LoadSchedules (schedules.py); so is every write statement (rows.py,
#: plans.py, control.py, schedules.py, retention.py) but the event's (StoreSql).
SHARED_READS = (LoadDependencyResults,)


class StoreClaim(Protocol):
    """A runtime's hold on its database for its whole life, across storage restarts: no
    second runtime opens it meanwhile (SQLite: a ``flock`` on ``<file>.lock``), and it
    records where the runtime serves its socket for clients (:meth:`Store.read_owner`)."""

    def acquire(self) -> None:
        """Take the claim; blocking (``Runtime.open`` calls it in a worker thread).

        Raises :class:`~hive_orchestration.StorageError` with ``fault="in_use"`` and
        ``path`` set if another runtime holds it (naming it: clients then look for its
        socket with :meth:`Store.read_owner`), or another ``StorageError`` if it cannot
        be taken. Records the owner (``STARTING`` as the address when serving)."""

    def release(self) -> None:
        """Let it go (clearing the records first); idempotent. Called on the event loop
        as the runtime closes (also after a failed open): it must not wait on anything
        that can hang (SQLite: closes a descriptor)."""

    def clear_records(self) -> None:
        """Forget the recorded owner and address while still holding the claim."""

    def record_address(self, address: str) -> None:
        """Record where the runtime serves (``""``: nowhere; :data:`STARTING` /
        :data:`STOPPING`). Called in a worker thread, and on the event loop for ``""``
        and ``STOPPING`` as serving ends: quick, never hanging."""


class StoreSql(Protocol):
    """The reads and statements whose SQL differs from one store to another, by family.

    Every read runs on the connection it is given (the write connection, or a reader's)
    and answers what its message's ``Request[...]`` type says, decoded (the shared
    decoders of ``rows.py`` and ``plans.py`` turn rows into messages). It raises
    :class:`StoreError` for a database failure, ``InvalidInputError`` for a bad cursor
    (``after``), ``msgspec`` errors for a row that does not decode.
    """

    # -- events: the log's own statements -----------------------------------------------

    def event_statement(self, seq: int, op: AppendEvent) -> Statement:
        """The statement that appends ``op.event`` to the log as number ``seq``
        (``op.data_json`` is its data, as text)."""
        ...

    def numbered_events(self, ops: Sequence[AppendEvent], origin: str) -> Statement | None:
        """The one statement that appends ``ops``' events as the log's next numbers,
        numbered by the database as the transaction commits, and returns the last number
        it gave as its row's first column (:meth:`Driver.append` runs it last); ``origin``
        names the writer in the wake-up it sends to the other nodes' log feeds.

        None: this store numbers events in memory instead (one writer per database: the
        actor gives each the next number, :meth:`event_statement`). A store that several
        runtimes write at once must number them here, in commit order: a number given
        before the commit (a serial) can become visible after a greater one, and a reader
        that has passed it never sees it (pg-design 4.4).
        """
        ...

    async def last_seq(self, db: Driver) -> int:
        """The greatest seq the log has given (0: none yet)."""
        ...

    async def read_events(self, db: Driver, read: ReadEvents) -> list[Row]:
        """The rows of ``read``, in seq order, each in ``rows.EVENT_COLUMNS`` order."""
        ...

    # -- claims: the ready rows a write takes before it is decided -------------------------

    def ready_notice(self, queues: Collection[QueueKey], origin: str) -> Statement | None:
        """The statement that tells the other nodes, as the transaction commits, that it
        made tasks of ``queues`` ready (their claims wait on no sweep); ``origin`` names
        the writer, whose own node skips it. None: no other node to tell."""
        ...

    async def lock_ready(self, db: Driver, lock: LockReady) -> LockedHeads | None:
        """Open the write's transaction on ``db`` (:meth:`Driver.begin`) and take the best
        ready rows of ``lock.heads`` in it, passing over rows another transaction holds
        (``FOR UPDATE SKIP LOCKED``): each queue's keys in claim order, and in full (with
        their runs) the tasks not in ``lock.known`` at their version. None: this store has
        one writer, whose memory is the truth; nothing is locked, and no transaction is
        open.
        """
        ...

    # -- the families of reads: one message of its tuple in, its answer out ---------------

    async def query_tasks(self, db: Driver, message: StorageMessage) -> object:
        """A message of :data:`TASK_READS`."""
        ...

    async def query_queues(self, db: Driver, message: StorageMessage) -> object:
        """A message of :data:`QUEUE_READS`."""
        ...

    async def query_plans(self, db: Driver, message: StorageMessage) -> object:
        """A message of :data:`PLAN_READS`."""
        ...

    async def query_retention(self, db: Driver, message: StorageMessage) -> object:
        """A message of :data:`RETENTION_READS`."""
        ...


#: Hands one commit's events to the broadcast actor (waiting if its mailbox is full).
Publisher: TypeAlias = Callable[[Publish], Awaitable[None]]


class Store(Protocol):
    """Everything the runtime needs of one kind of database, chosen at open by
    :func:`store_kind` (``storage.store.open_store(target, config)`` makes one).

    A store is cheap to make (no I/O); one is made per open runtime, inspector or CLI
    command, and handed to the storage actor, its reader pool and the socket server.
    Nothing outside ``storage/`` knows which kind it holds. The interface, for a new store
    (``storage/pg/`` implements it for PostgreSQL):

    - ``storage/<kind>/__init__.py`` exports ``open_store(target: str, config:
      RuntimeConfig) -> Store`` (:data:`StoreFactory`); ``storage.store.open_store``
      imports that package lazily for a target of that kind.
    - Attributes: ``kind`` (:data:`StoreKind`); ``display`` (what the user named, shown in
      errors, logs and ``StorageStats.path``; never a password); ``memory`` (the data
      lives inside this process: no socket is served for it); ``readers`` (whether
      :meth:`open_reader` may be used: the reader pool is made only then);
      ``head_reader`` (whether the TaskManager's refills of its heads may be read on a
      reader of their own, :data:`~.readers.on_head_reader`); ``sql``
      (:class:`StoreSql`, the store's SQL families).
    - :meth:`claim` -> :class:`StoreClaim`: ownership (one runtime at a time; records the
      socket address). Called once, before :meth:`open`, by ``Runtime.open``.
    - :meth:`open` -> ``(Driver, last_seq)``: the write connection, checked and migrated
      (one transaction; a newer schema than the code knows raises
      ``NewerSchemaError``; ``read_only``: nothing written, an older schema refused),
      and the log's greatest seq. Failures raise ``StorageError`` already explained.
    - :meth:`open_reader` -> ``Driver``: one read-only connection for the reader pool
      (raises ``StorageError``, explained).
    - :meth:`explain` ``(exc, action) -> StorageError``: the user's error for a
      :class:`StoreError` that a driver or a :class:`StoreSql` read raised during
      ``action`` (the store's own wording: path or server, fault, what to do).
    - :meth:`read_owner`, :meth:`read_schema_version`: blocking reads without a claim,
      for clients and the CLI.
    - Drivers (:class:`Driver`) raise only :class:`StoreError` (and subclasses) for the
      database's failures: :class:`StoreIntegrityError` for a constraint or
      :func:`check_updated`, :class:`CommitUnknownError` when COMMIT's outcome is unknown
      (the storage actor then crashes on purpose: its writers hear the outcome is
      unknown, and the restarted actor re-reads ``last_seq``); ``probe`` answers
      ``list[StoreError | None]``, one verdict per unit.
    - Shared SQL reaches the store's drivers too, in ``?`` marks (a driver of another
      paramstyle translates them): the write statements of ``rows.py``, ``plans.py``,
      ``control.py``, ``schedules.py`` and ``retention.py`` (upserts spelled ``INSERT ...
      ON CONFLICT (...) DO UPDATE SET x = excluded.x``; an UPDATE a writer expects to find
      its row begins with ``UPDATE``: :func:`check_updated`), and the reads of
      ``control.py`` (CONTROL_QUERIES), ``schedules.py`` (LoadSchedules),
      ``plan_data.py`` (:data:`SHARED_READS`: it spells a text's length in bytes
      SQLite's way, ``length(CAST(x AS BLOB))``) and ``retention.trimmed_through`` (the
      ``event_log`` row). Values are bound as the
      SQLite store keeps them: timestamps as ISO-8601 UTC text, JSON as text, lease
      hashes as bytes; ``rows.parse_time`` also takes a ``datetime``.
    - The actor groups a batch's writes into one :meth:`Driver.transaction`: row
      statements first, then each event's :meth:`StoreSql.event_statement` with the seq
      it assigned (``last_seq + 1`` onwards, in memory: one writer per database); or,
      where the store numbers events (:meth:`StoreSql.numbered_events`, several writers),
      one statement for all of the batch's events, last, by :meth:`Driver.append`.
    - :meth:`log_feed` -> :class:`LogFeed` or None: where several runtimes write one log,
      what publishes every node's events to this runtime's subscribers; None: the storage
      actor publishes its own commits itself (it is the only writer).
    - :meth:`leadership` -> :class:`Leadership` or None: where several runtimes share the
      database, the election of one leader, which does the duties dead nodes leave.
    """

    @property
    def kind(self) -> StoreKind:
        """Which store this is."""
        ...

    @property
    def display(self) -> str:
        """The database as the user named it (no password), for errors and logs."""
        ...

    @property
    def memory(self) -> bool:
        """Whether the data lives inside this process (no socket is served for it)."""
        ...

    @property
    def readers(self) -> bool:
        """Whether :meth:`open_reader` may be used (a reader pool is made only then)."""
        ...

    @property
    def head_reader(self) -> bool:
        """Whether a refill of the TaskManager's heads (a :class:`LoadQueueHeads` naming
        its queues) may run on a read-only connection of its own, in one read transaction,
        rather than between the commits of the write connection: true only where this
        runtime is the database's one writer, so that a commit the read does not show is
        one the TaskManager made after asking, which it knows of (storage/readers.py)."""
        ...

    @property
    def sql(self) -> StoreSql:
        """The store's SQL families."""
        ...

    def claim(self, *, serving: bool) -> StoreClaim:
        """The runtime's claim on the database (not yet taken: call ``acquire``)."""
        ...

    async def open(self, *, read_only: bool = False) -> tuple[Driver, int]:
        """The write connection (migrated) and the log's last seq."""
        ...

    async def open_reader(self) -> Driver:
        """One read-only connection beside the writer."""
        ...

    def log_feed(
        self,
        publish: Publisher,
        ready: ReadyNotified | None = None,
        interest: Callable[[], Interest] | None = None,
    ) -> LogFeed | None:
        """The log feed of a runtime on this database (None: the storage actor publishes);
        it calls ``ready`` as other nodes make tasks ready (:meth:`StoreSql.ready_notice`),
        and publishes of the other nodes' events only those ``interest`` says the runtime's
        subscribers could match (None: all of them)."""
        ...

    def leadership(self, duties: LeaderDuties) -> Leadership | None:
        """This node's part in electing the leader of the database's nodes (after
        :meth:`claim`), handing the duties it finds to ``duties``; None: the store has
        one owner, its own leader, whose recovery on open does them."""
        ...

    def explain(self, exc: StoreError, action: str) -> StorageError:
        """The user's error for ``exc``, raised while doing ``action``."""
        ...

    def read_owner(self) -> tuple[str | None, str | None]:
        """The pid (or node) holding the database and the address it serves on, each
        ``None`` when not recorded; blocking, takes no claim, may be stale."""
        ...

    def read_schema_version(self) -> int:
        """The database's schema version, read without writing; blocking."""
        ...


#: ``open_store(target, config)`` of a store's package.
StoreFactory: TypeAlias = Callable[[str, "RuntimeConfig"], Store]
