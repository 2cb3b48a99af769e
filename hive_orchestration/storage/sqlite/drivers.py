"""Two ways to drive the one SQLite write connection, behind one small interface.

- :class:`AiosqliteDriver` (asyncio): a whole batch is one function run on aiosqlite's
  own thread, one await however large it is (see :func:`_in_connection_thread`).
- :class:`ThreadDriver` (trio, and asyncio on request): a whole batch is one function run
  in anyio's worker thread, so it costs one thread hop (about 110 us) however large it is.

Both open the connection in autocommit mode and issue ``BEGIN IMMEDIATE`` / ``COMMIT``
themselves, so a transaction is exactly what :meth:`Driver.transaction` says it is. Every
cursor is read to its end and closed in the thread that made it, before the call returns:
a statement left open (the row ``PRAGMA journal_mode=WAL`` answers, say, held by a worker
thread's variable until that thread's next job) makes the next ``COMMIT`` fail with "SQL
statements in progress", however briefly it lingers. The
storage actor calls them from a shielded scope: a transaction always ends in COMMIT or
ROLLBACK, never half-way (aiosqlite keeps running a statement whose caller was cancelled,
and would leave the shared connection inside an open transaction).

They implement the port's :class:`~hive_orchestration.storage.port.Driver`: every
``sqlite3`` error leaves them as a :class:`~hive_orchestration.storage.port.StoreError`
(:func:`.faults.store_error`, still a ``sqlite3.Error`` too), a missing row of an UPDATE
as a :class:`~hive_orchestration.storage.port.StoreIntegrityError`.
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from functools import partial, wraps
from itertools import chain
from operator import itemgetter
from typing import Any, Literal, ParamSpec, TypeVar, cast

import aiosqlite
import anyio
import anyio.lowlevel
import anyio.to_thread

from ...errors import ConfigError
from ..port import Driver, Params, ReadJob, Row, Statement, StoreError, coalesce
from ..port import check_updated as _check_updated
from .faults import IntegrityStoreError, store_error

__all__ = ["AiosqliteDriver", "Driver", "Params", "Statement", "ThreadDriver", "connect"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def check_updated(sql: str, rows: int, changed: int) -> None:
    """:func:`~hive_orchestration.storage.port.check_updated`, raising an error that is a
    ``sqlite3.IntegrityError`` too, as every other constraint failure here is."""
    _check_updated(sql, rows, changed, IntegrityStoreError)


def _as_store_errors(
    method: Callable[_P, Coroutine[Any, Any, _R]],
) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """A driver method whose ``sqlite3`` errors leave it as the port's StoreError."""

    @wraps(method)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await method(*args, **kwargs)
        except sqlite3.Error as exc:
            raise store_error(exc) from exc

    return wrapper


def bind_none_directly() -> None:
    """Give ``sqlite3`` an adapter for ``None`` that returns it, on Python 3.11 only.

    Python 3.11's ``sqlite3`` binds int, float, str and bytearray as they are and asks
    every other value for an adapter first, ``None`` included: a registry miss, then
    ``PrepareProtocol.__adapt__`` looked up on a type, whose miss 3.11 raises and formats
    as an AttributeError before dropping it (3.12 no longer makes the error). About 300
    ns a ``None``, and a task's rows bind about fifty (most of a task's columns are
    empty): a fifth of the connection thread's instructions on the batch calls
    (docs/performance.md, "The write path's own SQLite work"). A registered adapter is
    found in the registry, and this one returns its ``None``, which is bound as NULL as
    before: nothing read or written changes, for this package or anything else in the
    process using ``sqlite3``. An adapter for ``None`` already registered (by the
    application) is left as it is."""
    if sys.version_info >= (3, 12):
        return  # nothing to save: 3.12 looks the hook up without an error
    if (type(None), sqlite3.PrepareProtocol) not in sqlite3.adapters:
        sqlite3.register_adapter(type(None), _NONE.get)


#: ``_NONE.get(None)`` is None: an adapter that returns ``None`` as it is, without a
#: Python frame (a ``lambda`` costs one per value).
_NONE: dict[None, None] = {}


#: The rows one INSERT of a run may carry (the largest that fits first), and SQLite's
#: oldest bound on a statement's parameters (999 before 3.32). Few sizes and few sets of
#: empty columns (:data:`_EMPTY_SETS` an INSERT; past them a run binds all its columns)
#: keep the texts of an INSERT to a score, all kept prepared by the connection's
#: statement cache (128 statements): a 64-row task insert prepared afresh at each run
#: would cost twice what binding its rows does (13.4 against 6.8 us a row, measured).
_SIZES = (64, 16, 4, 1)
_MOST_PARAMS = 999
_EMPTY_SETS = 4
#: An INSERT of one row of ``?`` marks, cut around its VALUES row (None: any other SQL).
_INSERTS: dict[str, tuple[str, str, str] | None] = {}
#: Each INSERT's sets of empty columns taken so far, and its texts by (set, size).
_EMPTIES: dict[str, set[tuple[int, ...]]] = {}
_MULTI: dict[tuple[str, tuple[int, ...], int], str] = {}
_KEPT = 256


def _insert_parts(sql: str) -> tuple[str, str, str] | None:
    if not sql.startswith("INSERT INTO "):
        return None
    if sql in _INSERTS:
        return _INSERTS[sql]
    found = None
    start = sql.find(" VALUES (")
    end = sql.find(")", start)
    if start > 0 and end > 0:
        row = sql[start + 8 : end + 1]
        if not row.strip("(?, )") and row.count("?") <= _MOST_PARAMS // 2:
            found = (sql[: start + 8], row, sql[end + 1 :])
    if len(_INSERTS) >= _KEPT:  # texts built at run time must not grow it for good
        _INSERTS.clear()
        _EMPTIES.clear()
        _MULTI.clear()
    _INSERTS[sql] = found
    return found


def _runs(runs: list[tuple[str, list[Params]]]) -> Iterator[tuple[str, Sequence[Params]]]:
    """Each run of an INSERT of ``?`` marks as multi-row INSERTs of up to 64 rows: the
    rows in the same order, so with the same outcome (an upsert's second row of an id
    finds the first, a failing row fails the transaction either way), but one statement
    run, one statement journal and one halt for many rows, where ``executemany`` pays
    them a row (a batch's events 3.1 -> 1.9 us a row). A column that is None in every
    row of the run is written as NULL in the statement, not bound: most of a task's
    columns are empty, and each None bound costs a look-up of its adapter (1 000 or so
    instructions even with :func:`bind_none_directly`). docs/performance.md, "The write
    path's own SQLite work". Any other run is left as it is."""
    for sql, rows in runs:
        parts = _insert_parts(sql) if len(rows) > 1 else None
        if parts is None:
            yield sql, rows
            continue
        head, row, tail = parts
        width = row.count("?")
        nones = (None,) * len(rows)
        keep = tuple(at for at, column in enumerate(zip(*rows, strict=True)) if column != nones)
        taken = _EMPTIES.setdefault(sql, set())
        if not keep or (keep not in taken and len(taken) >= _EMPTY_SETS):
            keep = tuple(range(width))  # every column bound, as the run came
        taken.add(keep)
        if len(keep) < width:
            if len(keep) == 1:
                rows = [(values[keep[0]],) for values in rows]
            else:
                pick = itemgetter(*keep)
                rows = [pick(values) for values in rows]
        done = 0
        for size in _SIZES:
            if size * len(keep) > _MOST_PARAMS or size > len(rows) - done:
                continue
            multi = _MULTI.get((sql, keep, size))
            if multi is None:
                marks = set(keep)
                one = "(" + ", ".join("?" if at in marks else "NULL" for at in range(width)) + ")"
                multi = _MULTI[sql, keep, size] = head + ", ".join([one] * size) + tail
            whole = (len(rows) - done) // size * size
            if size == 1:
                yield multi, rows[done:]
            else:
                yield (
                    multi,
                    [
                        tuple(chain.from_iterable(rows[at : at + size]))
                        for at in range(done, done + whole, size)
                    ],
                )
            done += whole


# -- the thread driver: one hop per call -------------------------------------------------


def _execute_sync(conn: sqlite3.Connection, sql: str, params: Params = ()) -> int:
    """Run one statement to its end and close its cursor; returns its rowcount."""
    cursor = conn.execute(sql, params)
    try:
        cursor.fetchall()  # a statement that answers rows (a PRAGMA) is done only at its end
        return cursor.rowcount
    finally:
        cursor.close()


def _executemany_sync(conn: sqlite3.Connection, sql: str, rows: Sequence[Params]) -> int:
    cursor = conn.executemany(sql, rows)
    try:
        return cursor.rowcount
    finally:
        cursor.close()


def _transaction_sync(conn: sqlite3.Connection, statements: Sequence[Statement]) -> None:
    _execute_sync(conn, "BEGIN IMMEDIATE")
    try:
        for sql, rows in _runs(coalesce(statements)):
            check_updated(sql, len(rows), _executemany_sync(conn, sql, rows))
        _execute_sync(conn, "COMMIT")
    except BaseException:
        if conn.in_transaction:
            _execute_sync(conn, "ROLLBACK")
        raise


def _probe_sync(
    conn: sqlite3.Connection, units: Sequence[Sequence[Statement]]
) -> list[StoreError | None]:
    results: list[StoreError | None] = []
    _execute_sync(conn, "BEGIN IMMEDIATE")
    try:
        for unit in units:
            _execute_sync(conn, "SAVEPOINT unit")
            try:
                for sql, params in unit:
                    check_updated(sql, 1, _execute_sync(conn, sql, params))
            except sqlite3.Error as exc:
                _execute_sync(conn, "ROLLBACK TO unit")
                results.append(store_error(exc))
            else:
                results.append(None)
            _execute_sync(conn, "RELEASE unit")
    finally:
        if conn.in_transaction:
            _execute_sync(conn, "ROLLBACK")
    return results


def _fetchall_sync(conn: sqlite3.Connection, sql: str, params: Params) -> list[Row]:
    cursor = conn.execute(sql, params)
    try:
        return cursor.fetchall()
    finally:
        cursor.close()


def _snapshot_sync(conn: sqlite3.Connection, job: ReadJob[_R]) -> _R:
    """Run a read job whole, in one read transaction (``BEGIN``: deferred, so its first
    SELECT takes the WAL snapshot every later statement of it sees), decoding included:
    the event loop waits for one hop and gets the answer."""
    _execute_sync(conn, "BEGIN")
    try:
        rows: list[Row] | None = None
        while True:
            statement = next(job) if rows is None else job.send(rows)
            rows = _fetchall_sync(conn, *statement)
    except StopIteration as done:
        return cast(_R, done.value)
    finally:
        # A read: nothing to keep; ending it lets go of the snapshot (and of the WAL
        # frames it pinned, which a checkpoint may then copy).
        if conn.in_transaction:
            _execute_sync(conn, "ROLLBACK")


class ThreadDriver(Driver):
    name = "thread"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        # One thread at a time on the connection; calls are already serial, this makes sure.
        self._limiter = anyio.CapacityLimiter(1)

    @classmethod
    @_as_store_errors
    async def open(cls, path: str, busy_timeout: float, *, uri: bool = False) -> ThreadDriver:
        bind_none_directly()
        connect = partial(
            sqlite3.connect,
            path,
            isolation_level=None,
            check_same_thread=False,
            timeout=busy_timeout,
            uri=uri,
        )
        return cls(await anyio.to_thread.run_sync(connect))

    @_as_store_errors
    async def execute(self, sql: str, params: Params = ()) -> None:
        await anyio.to_thread.run_sync(
            _execute_sync, self._conn, sql, params, limiter=self._limiter
        )

    @_as_store_errors
    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        return await anyio.to_thread.run_sync(
            _fetchall_sync, self._conn, sql, params, limiter=self._limiter
        )

    @_as_store_errors
    async def snapshot(self, job: ReadJob[_R]) -> _R:
        return await anyio.to_thread.run_sync(
            _snapshot_sync, self._conn, job, limiter=self._limiter
        )

    @_as_store_errors
    async def transaction(self, statements: Sequence[Statement]) -> None:
        await anyio.to_thread.run_sync(
            _transaction_sync, self._conn, statements, limiter=self._limiter
        )

    @_as_store_errors
    async def probe(self, units: Sequence[Sequence[Statement]]) -> list[StoreError | None]:
        return await anyio.to_thread.run_sync(_probe_sync, self._conn, units, limiter=self._limiter)

    @_as_store_errors
    async def close(self) -> None:
        await anyio.to_thread.run_sync(self._conn.close, limiter=self._limiter)


# -- the aiosqlite driver: one await per batch ---------------------------------------------

_Job = Callable[..., Any]


def _in_connection_thread(conn: aiosqlite.Connection) -> Callable[..., Awaitable[Any]] | None:
    """How to run ``job(sqlite3_connection, *args)`` on aiosqlite's own thread, in one await.

    aiosqlite has no public call for it: each statement is one await (80-100 us here),
    so a transaction of BEGIN, a few ``executemany`` runs and COMMIT costs five to ten.
    Its connection queues callables on its thread with ``_execute`` and keeps the sqlite3
    connection as ``_conn`` (both since aiosqlite 0.17 at least). Where a release lacks
    them, this returns ``None`` and the driver goes back to one await per statement run:
    slower, equally correct.
    """
    execute = getattr(conn, "_execute", None)
    if not callable(execute) or not isinstance(getattr(type(conn), "_conn", None), property):
        return None

    def run(job: _Job, *args: object) -> Awaitable[Any]:
        return cast("Awaitable[Any]", execute(job, conn._conn, *args))

    return run


class AiosqliteDriver(Driver):
    name = "aiosqlite"

    def __init__(self, conn: aiosqlite.Connection, *, whole_batches: bool = True) -> None:
        self._conn = conn
        self._run = _in_connection_thread(conn) if whole_batches else None

    @classmethod
    @_as_store_errors
    async def open(cls, path: str, busy_timeout: float, *, uri: bool = False) -> AiosqliteDriver:
        bind_none_directly()
        pending = aiosqlite.connect(path, isolation_level=None, timeout=busy_timeout, uri=uri)
        try:
            return cls(await pending)
        except BaseException:
            await _join_worker(pending)
            raise

    @_as_store_errors
    async def execute(self, sql: str, params: Params = ()) -> None:
        if self._run is not None:
            await self._run(_execute_sync, sql, params)
        else:
            await self._statement(sql, params)

    @_as_store_errors
    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        if self._run is not None:
            return cast("list[Row]", await self._run(_fetchall_sync, sql, params))
        async with self._conn.execute(sql, params) as cursor:  # closed on aiosqlite's thread
            return [tuple(row) for row in await cursor.fetchall()]

    @_as_store_errors
    async def snapshot(self, job: ReadJob[_R]) -> _R:
        if self._run is not None:
            # Shielded as a transaction is: the thread runs the job to its end anyway.
            with anyio.CancelScope(shield=True):
                return cast(_R, await self._run(_snapshot_sync, job))
        return await super().snapshot(job)

    async def _statement(self, sql: str, params: Params = ()) -> int:
        """One statement run to its end, its cursor closed; its rowcount."""
        async with self._conn.execute(sql, params) as cursor:
            await cursor.fetchall()
            return cursor.rowcount

    async def _statements(self, sql: str, rows: Sequence[Params]) -> int:
        async with self._conn.executemany(sql, rows) as cursor:
            return cursor.rowcount

    @_as_store_errors
    async def transaction(self, statements: Sequence[Statement]) -> None:
        if self._run is not None:
            # The whole transaction is one job on aiosqlite's thread, from BEGIN to COMMIT
            # or ROLLBACK: a caller cancelled meanwhile stops waiting, the job ends all
            # the same, so no shield is needed (the storage actor's commit, which must
            # hear the outcome, shields itself: a second scope cost about 2% of the
            # event loop's time on the task path).
            await self._run(_transaction_sync, statements)
            return
        # Shielded: aiosqlite runs a statement whose awaiting caller was cancelled anyway,
        # so a cancellation here would leave the connection inside an open transaction.
        with anyio.CancelScope(shield=True):
            await self._statement("BEGIN IMMEDIATE")
            try:
                for sql, rows in _runs(coalesce(statements)):
                    check_updated(sql, len(rows), await self._statements(sql, rows))
                await self._statement("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    await self._statement("ROLLBACK")
                raise

    @_as_store_errors
    async def probe(self, units: Sequence[Sequence[Statement]]) -> list[StoreError | None]:
        with anyio.CancelScope(shield=True):
            if self._run is not None:
                return cast("list[StoreError | None]", await self._run(_probe_sync, units))
            results = await self._probe(units)
        return results

    async def _probe(self, units: Sequence[Sequence[Statement]]) -> list[StoreError | None]:
        results: list[StoreError | None] = []
        await self._statement("BEGIN IMMEDIATE")
        try:
            for unit in units:
                await self._statement("SAVEPOINT unit")
                try:
                    for sql, params in unit:
                        check_updated(sql, 1, await self._statement(sql, params))
                except sqlite3.Error as exc:
                    await self._statement("ROLLBACK TO unit")
                    results.append(store_error(exc))
                else:
                    results.append(None)
                await self._statement("RELEASE unit")
        finally:
            if self._conn.in_transaction:
                await self._statement("ROLLBACK")
        return results

    @_as_store_errors
    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self._conn.close()
            finally:
                await _join_worker(self._conn)


async def _join_worker(conn: aiosqlite.Connection) -> None:
    """Wait for aiosqlite's worker thread to end, so that no thread outlives the runtime.

    aiosqlite asks the thread to stop on close (or on a failed connect) without waiting
    for it; a thread still running when the event loop closes raises "Event loop is closed".
    """
    thread = getattr(conn, "_thread", None)
    if thread is not None and thread.is_alive():
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(thread.join, 5.0)


def running_on_trio() -> bool:
    backend = anyio.lowlevel.current_token().backend_class
    return backend.__module__.rpartition(".")[2] == "_trio"


async def connect(
    path: str,
    *,
    uri: bool = False,
    driver: Literal["auto", "aiosqlite", "thread"],
    busy_timeout: float,
) -> Driver:
    """Open the write connection with the driver the config and the event loop call for."""
    on_trio = running_on_trio()
    if driver == "aiosqlite" and on_trio:
        raise ConfigError(
            "storage_driver", "aiosqlite runs only on asyncio; use 'thread' or 'auto' under trio"
        )
    if driver == "thread" or (driver == "auto" and on_trio):
        return await ThreadDriver.open(path, busy_timeout, uri=uri)
    return await AiosqliteDriver.open(path, busy_timeout, uri=uri)
