"""The PostgreSQL driver: psycopg 3's synchronous connection, driven on anyio worker threads.

psycopg's own async mode (like asyncpg) runs on asyncio only; the runtime runs on trio
too. So, exactly as SQLite's thread driver does, each connection is used by one worker
thread at a time (a ``CapacityLimiter(1)`` per connection), and a whole transaction is one
function run in that thread: one thread hop however many statements it holds (pg-design
section 2: the hop costs 0.1-0.3 ms, a durable commit 3-6 ms).

- **Transactions.** The connection is in autocommit mode, and the driver sends ``BEGIN`` /
  ``COMMIT`` itself, so a transaction is exactly what :meth:`Driver.transaction` says it is.
  ``BEGIN``, the statements and ``COMMIT`` go in one pipeline (one network round trip
  for the lot; consecutive statements with the same SQL are one ``executemany``, or,
  for the write path's hot rows (tasks, runs, fenced task states), one set-based
  statement with the rows as one JSON parameter: :mod:`.sets`). Each
  UPDATE must change its one row: it is sent as one that fails in the server when it
  changes none (``_checked``), which aborts the transaction, so the ``COMMIT`` after it
  does nothing and the transaction is rolled back: a count that is short never commits.
  (The row counts were checked by the driver before a ``COMMIT`` of its own round trip;
  in that round trip a commit appending events held the event counter's row lock, which
  every other node's commit of events waits for.)
- **Placeholders.** The SQL shared with SQLite uses ``?`` (and ``?NNN``); each statement
  text is translated once (cached) to psycopg's ``%s``, with its ``%`` doubled.
- **Errors.** Every psycopg error leaves as a port exception (:mod:`.faults`). A connection
  lost before ``COMMIT`` was sent is :class:`StoreError` with fault ``unavailable``: nothing
  was applied. One lost once ``COMMIT`` was sent (with the statements, in the pipeline:
  any loss while the pipeline is read) is :class:`CommitUnknownError`: the
  transaction may have landed, and the writer must read back. Either way the connection is
  dropped, and the next call opens a new one.
- **Cancellation.** A transaction and a probe run shielded: the thread finishes them
  whatever the caller does, so the connection is never left inside a transaction.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any, LiteralString, TypeVar

import anyio
import anyio.to_thread
import psycopg
from psycopg.pq import TransactionStatus

from ..port import (
    CommitUnknownError,
    Driver,
    Params,
    Row,
    Statement,
    StoreError,
    StoreIntegrityError,
    check_updated,
    coalesce,
)
from .faults import connect_error, connection_lost, store_error
from .sets import JOINS_BY_INDEX, set_statement

__all__ = ["PostgresDriver", "PostgresReader", "translate"]

Connection = psycopg.Connection[tuple[Any, ...]]
T = TypeVar("T")

#: Seconds to wait for the server to accept a connection before the call fails.
CONNECT_TIMEOUT = 10.0


# -- statements ------------------------------------------------------------------------


# Outside quotes and comments: a mark (``?`` or ``?NNN``) or a ``%``; a quoted literal,
# a quoted name or a comment is copied whole (only its ``%`` doubled).
_TOKENS = re.compile(
    r"""
      (?P<literal>'(?:[^']|'')*')
    | (?P<name>"(?:[^"]|"")*")
    | (?P<line>--[^\n]*)
    | (?P<block>/\*.*?\*/)
    | \?(?P<number>[0-9]+)?
    | %
    """,
    re.VERBOSE | re.DOTALL,
)


# SQLite's spelling of "the UTF-8 bytes of a text" (``length(CAST(x AS BLOB))`` is its byte
# length), which the SQL shared by both stores uses: PostgreSQL's CAST(text AS bytea)
# would parse backslashes as escapes, so it becomes convert_to(x, 'UTF8').
_AS_BLOB = re.compile(r"CAST\(\s*([A-Za-z_][\w.]*)\s+AS\s+BLOB\s*\)", re.IGNORECASE)


@functools.lru_cache(maxsize=2048)
def translate(sql: str) -> tuple[LiteralString, tuple[int, ...] | None]:
    """``sql`` with SQLite's marks as psycopg's, and how to order its parameters.

    ``?`` becomes ``%s``; ``?NNN`` (SQLite's numbered mark, which may repeat) becomes ``%s``
    too, and the second item lists, for each ``%s`` in order, the 0-based index of the
    parameter it takes (None when that is simply 0, 1, 2...). A plain ``?`` after numbered
    ones takes the number after the largest so far, as in SQLite. Every ``%`` is doubled,
    so that a ``LIKE 'a%'`` stays what it was. ``CAST(column AS BLOB)`` (SQLite's UTF-8
    bytes of a text) becomes ``convert_to(column, 'UTF8')``. Cached: the storage actor
    sends the same few hundred texts over and over.
    """
    order: list[int] = []
    highest = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal highest
        text = match.group(0)
        if text == "%":
            return "%%"
        if text[0] != "?":
            return text.replace("%", "%%")
        number = match.group("number")
        index = int(number) if number is not None else highest + 1
        highest = max(highest, index)
        order.append(index - 1)
        return "%s"

    text = _TOKENS.sub(replace, _AS_BLOB.sub(r"convert_to(\1, 'UTF8')", sql))
    plain = order == list(range(len(order)))
    # The text is the program's own SQL, only rewritten: as literal as what it came from
    # (mypy reads LiteralString as str; psycopg's annotations ask for it).
    return text, None if plain else tuple(order)


def _bind(order: tuple[int, ...] | None, params: Params) -> Params:
    return params if order is None else tuple(params[i] for i in order)


def _execute(conn: Connection, sql: str, params: Params = ()) -> int:
    text, order = translate(sql)
    with conn.cursor() as cursor:
        cursor.execute(text, _bind(order, params))
        return cursor.rowcount


def _fetchall(conn: Connection, sql: str, params: Params) -> list[Row]:
    text, order = translate(sql)
    with conn.cursor() as cursor:
        cursor.execute(text, _bind(order, params))
        return cursor.fetchall()


def _rollback(conn: Connection) -> None:
    """End a failed transaction (if the connection still lives to be told)."""
    if not connection_lost(conn) and conn.info.transaction_status != TransactionStatus.IDLE:
        conn.execute("ROLLBACK")


def _begin(conn: Connection, statements: Sequence[Statement]) -> list[list[Row]]:
    """BEGIN and ``statements``, in one round trip; the transaction stays open."""
    cursors: list[psycopg.Cursor[tuple[Any, ...]]] = []
    try:
        with conn.pipeline():
            conn.execute("BEGIN")
            for sql, params in statements:
                text, order = translate(sql)
                cursor = conn.cursor()
                cursor.execute(text, _bind(order, params))
                cursors.append(cursor)
        return [cursor.fetchall() for cursor in cursors]
    except BaseException:
        _rollback(conn)
        raise
    finally:
        for cursor in cursors:
            cursor.close()


#: What a checked UPDATE (:func:`_checked`) raises when its row is missing: the cast of
#: this text (and the row count, so that the planner cannot fold it) to an integer fails.
_MISSING = "hive:missing-row:"


@functools.lru_cache(maxsize=1024)
def _checked(sql: str) -> str:
    """``sql`` as the transaction runs it: an UPDATE (each here changes one row by its id:
    check_updated) becomes one that fails in the server, aborting the transaction, when
    it changes no row, so that COMMIT can go in the same round trip as the statements
    (the count checked before COMMIT, by the server instead of the client)."""
    if not sql.startswith("UPDATE"):
        return sql
    table = sql.split(None, 2)[1]
    return (
        f"WITH u AS ({sql} RETURNING 1) SELECT ('{_MISSING}{table}:' || count(*))::int"
        " FROM u HAVING count(*) <> 1"
    )


def _missing_row(exc: psycopg.Error) -> StoreIntegrityError | None:
    """The port's error for a checked UPDATE that found no row, else None."""
    text = str(exc)
    at = text.find(_MISSING)
    if not isinstance(exc, psycopg.errors.InvalidTextRepresentation) or at < 0:
        return None
    table = text[at + len(_MISSING) :].split(":", 1)[0]
    return StoreIntegrityError(f"a {table} row to update is missing")


def _forget_prepared(conn: Connection) -> None:
    """After a pipeline a statement of which failed in the server: psycopg's cache of
    prepared statements may name some the server never made (a statement that reached
    psycopg's threshold after the failure was skipped with its PREPARE), and the next
    use of one would fail. Both sides forget them all, as psycopg does itself when its
    own transaction block rolls back (its ``_prepared``, guarded: without it, the
    connection is dropped, and the next call opens a new one)."""
    if connection_lost(conn):
        return
    prepared = getattr(conn, "_prepared", None)
    if prepared is None or not hasattr(prepared, "clear") or not hasattr(prepared, "maintain_gen"):
        conn.close()
        return
    prepared.clear()
    conn.wait(prepared.maintain_gen(conn))


def _transaction(
    conn: Connection,
    statements: Sequence[Statement],
    last: Statement | None = None,
    begun: bool = False,
) -> Row | None:
    """Apply ``statements`` (then ``last``, answering its first row) and commit, all in
    one round trip; ``begun``: in the transaction :func:`_begin` opened, which must still
    be open. An UPDATE that finds no row fails in the server (:func:`_checked`), which
    aborts the transaction: the COMMIT sent after it does nothing, and the transaction is
    rolled back. A connection lost once COMMIT was sent leaves the outcome unknown
    (:class:`CommitUnknownError`); lost before, nothing was applied."""
    if begun and conn.info.transaction_status != TransactionStatus.INTRANS:
        # The connection was lost (and opened again) since: what was begun is gone.
        _rollback(conn)
        raise StoreError(
            "the connection was lost inside a transaction; nothing of it was applied",
            fault="unavailable",
        )
    runs = coalesce(statements)
    cursors: list[psycopg.Cursor[tuple[Any, ...]]] = []
    found: Row | None = None
    committing = False
    try:
        # One round trip: BEGIN, every run, the last statement and COMMIT, sent together,
        # read back at the sync.
        with conn.pipeline():
            if not begun:
                conn.execute("BEGIN")
            joins = False
            for sql, rows in runs:
                cursor = conn.cursor()
                cursors.append(cursor)
                whole = set_statement(sql, rows)
                if whole is not None:
                    # The run as one statement, its rows one parameter (sets.py).
                    if not joins:
                        conn.execute(JOINS_BY_INDEX)
                        joins = True
                    text, _ = translate(whole[0])
                    cursor.execute(text, whole[1])
                    continue
                text, order = translate(_checked(sql))
                cursor.executemany(text, [_bind(order, row) for row in rows])
            if last is not None:
                # Last before COMMIT: the event counter's row lock (numbered events) is
                # held from here to the end of COMMIT, and no longer.
                text, order = translate(last[0])
                cursor = conn.cursor()
                cursors.append(cursor)
                cursor.execute(text, _bind(order, last[1]))
            committing = True
            conn.execute("COMMIT")
        if last is not None:
            found = cursors[-1].fetchone()
    except psycopg.Error as exc:
        if committing and connection_lost(conn):
            # COMMIT was sent (or being sent) when the connection went: the server may
            # have committed before it went, or not. Only a read tells which.
            raise CommitUnknownError(
                f"the connection was lost during COMMIT ({str(exc).strip()})",
                fault="unavailable",
            ) from exc
        _rollback(conn)
        _forget_prepared(conn)
        missing = _missing_row(exc)
        if missing is not None:
            raise missing from exc
        raise
    except BaseException:
        if not committing:
            _rollback(conn)
        raise
    finally:
        for cursor in cursors:
            cursor.close()
    if last is not None and found is None:
        raise StoreError("the event counter row is missing (hive_event_seq)")
    return found


def _probe(conn: Connection, units: Sequence[Sequence[Statement]]) -> list[StoreError | None]:
    results: list[StoreError | None] = []
    conn.execute("BEGIN")
    try:
        for unit in units:
            # PostgreSQL aborts the whole transaction on an error; a savepoint per unit
            # keeps the next unit's test clean (SQLite needs it only to undo the unit).
            conn.execute("SAVEPOINT unit")
            try:
                for sql, params in unit:
                    check_updated(sql, 1, _execute(conn, sql, params))
            except (psycopg.Error, StoreIntegrityError) as exc:
                if isinstance(exc, psycopg.Error) and connection_lost(conn):
                    raise
                conn.execute("ROLLBACK TO SAVEPOINT unit")
                results.append(exc if isinstance(exc, StoreError) else store_error(exc))
            else:
                results.append(None)
            conn.execute("RELEASE SAVEPOINT unit")
    finally:
        _rollback(conn)
    return results


# -- the driver ------------------------------------------------------------------------


class PostgresDriver(Driver):
    """One PostgreSQL connection (the write connection), opened again after a loss.

    ``url`` is a ``postgresql://`` URL (libpq's forms and parameters); ``application_name``
    shows in ``pg_stat_activity``, so that an operator can tell a runtime's connections.
    """

    name = "postgres"
    #: Set on every connection this driver opens (``SET SESSION CHARACTERISTICS``...).
    _read_only = False

    def __init__(
        self,
        url: str,
        *,
        application_name: str = "hive-orchestration",
        connect_timeout: float = CONNECT_TIMEOUT,
        on_connect: Callable[[Connection], None] | None = None,
        guard: Callable[[], None] | None = None,
    ) -> None:
        self.url = url
        self._application_name = application_name
        self._connect_timeout = connect_timeout
        self._on_connect = on_connect
        self._guard = guard
        self._conn: Connection | None = None
        # One thread at a time on the connection; calls are already serial, this makes sure.
        self._limiter = anyio.CapacityLimiter(1)
        #: Connections opened so far (the first, then one per reconnection).
        self.connects = 0
        # A transaction begin() opened, which the next transaction() or append() commits.
        self._begun = False

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        application_name: str = "hive-orchestration",
        connect_timeout: float = CONNECT_TIMEOUT,
        on_connect: Callable[[Connection], None] | None = None,
        guard: Callable[[], None] | None = None,
    ) -> PostgresDriver:
        """Connect now, so that a server out of reach fails the open, not the first write.

        ``on_connect(connection)`` runs in the connection's thread on each connection
        opened, before anything else uses it (the owner's claim: :mod:`.claim`); what it
        raises fails the call, and the connection is closed. ``guard()`` runs before
        each call (a node that lost its lock writes nothing: ``DatabaseClaim.check``);
        the port's error it raises fails the call, the connection untouched (not inside a
        transaction :meth:`begin` opened, which the next call ends; a connection opened
        anew is checked by ``on_connect``).
        """
        driver = cls(
            url,
            application_name=application_name,
            connect_timeout=connect_timeout,
            on_connect=on_connect,
            guard=guard,
        )
        await driver.run(lambda conn: None)
        return driver

    # The connection, in the thread. --------------------------------------------------

    def _connect(self) -> Connection:
        try:
            conn = psycopg.connect(
                self.url,
                autocommit=True,
                application_name=self._application_name,
                connect_timeout=max(1, round(self._connect_timeout)),
                # A server (or a network) that vanished without a word is noticed in about
                # 11 s, not TCP's two hours, so that a call fails and the next reconnects.
                keepalives=1,
                keepalives_idle=5,
                keepalives_interval=2,
                keepalives_count=3,
            )
        except psycopg.Error as exc:
            raise connect_error(exc) from exc
        try:
            # Timestamps come back in UTC (their text is what the SQLite store stores).
            conn.execute("SET TIME ZONE 'UTC'")
            if self._read_only:
                conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            if self._on_connect is not None:
                self._on_connect(conn)
        except psycopg.Error as exc:
            conn.close()
            raise store_error(exc, lost=connection_lost(conn)) from exc
        except BaseException:
            conn.close()
            raise
        self.connects += 1
        return conn

    def _call(self, job: Callable[..., T], args: tuple[Any, ...]) -> T:
        conn = self._conn
        if conn is None or connection_lost(conn):
            if conn is not None:
                conn.close()
            self._conn = None
            conn = self._conn = self._connect()
        elif self._guard is not None and conn.info.transaction_status == TransactionStatus.IDLE:
            # Not inside a transaction begin() opened: the call that ends it must run.
            self._guard()
        try:
            return job(conn, *args)
        except psycopg.Error as exc:
            lost = connection_lost(conn)
            if lost:
                self._drop(conn)
            raise store_error(exc, lost=lost) from exc
        except CommitUnknownError:
            self._drop(conn)
            raise

    def _drop(self, conn: Connection) -> None:
        conn.close()
        if self._conn is conn:
            self._conn = None

    async def run(self, job: Callable[..., T], *args: Any) -> T:
        """Run ``job(connection, *args)`` in the connection's thread, the connection opened
        (again) first if it is not; psycopg errors leave as port exceptions. For this
        store's own modules (migrations, ownership), which need more than statements."""
        return await anyio.to_thread.run_sync(self._call, job, args, limiter=self._limiter)

    # The port. ---------------------------------------------------------------------

    async def execute(self, sql: str, params: Params = ()) -> None:
        await self.run(_execute, sql, params)

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        return await self.run(_fetchall, sql, params)

    async def begin(self, statements: Sequence[Statement]) -> list[list[Row]]:
        with anyio.CancelScope(shield=True):
            rows = await self.run(_begin, statements)
        self._begun = True
        return rows

    async def rollback(self) -> None:
        self._begun = False
        with anyio.CancelScope(shield=True):
            await self.run(_rollback)

    async def transaction(self, statements: Sequence[Statement]) -> None:
        begun, self._begun = self._begun, False
        with anyio.CancelScope(shield=True):
            await self.run(_transaction, statements, None, begun)

    async def append(self, statements: Sequence[Statement], numbered: Statement) -> Row:
        begun, self._begun = self._begun, False
        with anyio.CancelScope(shield=True):
            row = await self.run(_transaction, statements, numbered, begun)
        assert row is not None  # _transaction raises rather than commit without it
        return row

    async def probe(self, units: Sequence[Sequence[Statement]]) -> list[StoreError | None]:
        with anyio.CancelScope(shield=True):
            results = await self.run(_probe, units)
        return results

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._close, limiter=self._limiter)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class PostgresReader(PostgresDriver):
    """A read-only connection, for the storage readers (:mod:`..readers`): every
    transaction on it is ``READ ONLY``, so a write that got here by mistake is refused by
    the server (``fault="read_only"``), and it never waits for the writer (MVCC)."""

    name = "postgres-reader"
    _read_only = True

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        application_name: str = "hive-orchestration:reader",
        connect_timeout: float = CONNECT_TIMEOUT,
        on_connect: Callable[[Connection], None] | None = None,
        guard: Callable[[], None] | None = None,
    ) -> PostgresDriver:
        return await super().open(
            url,
            application_name=application_name,
            connect_timeout=connect_timeout,
            on_connect=on_connect,
            guard=guard,
        )
