"""The SQLite store: a database file (or ``:memory:``) owned by one runtime process.

It puts together what ``storage/port.py`` asks of a store from the SQLite modules beside
it: the claim (``flock`` on ``<file>.lock``, :class:`.database.DatabaseClaim`), the open
with its pragmas and migrations (:func:`.database.open_database`), read-only reader
connections, the wording of SQLite's faults (:mod:`.faults`) and the SQL families
(:class:`.sql.SqliteSql`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import TypeVar

import anyio
import anyio.to_thread

from ...config import RuntimeConfig
from ...errors import StorageError
from ...messages.events import Interest
from ..port import (
    Driver,
    LeaderDuties,
    Leadership,
    LogFeed,
    Params,
    Publisher,
    ReadJob,
    ReadyNotified,
    Row,
    Statement,
    StoreClaim,
    StoreError,
    StoreKind,
)
from .checkpoints import Checkpointer, off_the_commit_path
from .database import (
    MEMORY,
    DatabaseClaim,
    Target,
    open_database,
    open_reader,
    read_owner,
    read_schema_version,
)
from .faults import storage_error, store_error
from .sql import SqliteSql

__all__ = ["SqliteStore", "open_store"]

_SQL = SqliteSql()
_T = TypeVar("_T")


class SqliteStore:
    """A SQLite database: ``target`` is a file path or ``:memory:``."""

    kind: StoreKind = "sqlite"

    def __init__(self, target: str, config: RuntimeConfig) -> None:
        self.display = target
        self.memory = target == MEMORY
        self.sql = _SQL
        self._config = config
        self._target = Target(target, target)

    @property
    def readers(self) -> bool:
        """A file only: a shared-cache memory database has no WAL, so a reader there
        would wait for the writer's lock (and a private one is this connection's alone)."""
        return not self._target.memory and not self._target.uri

    @property
    def head_reader(self) -> bool:
        """One runtime writes the file: a refill may run on a reader (a WAL snapshot)."""
        return self.readers

    @property
    def target(self) -> Target:
        """What the connections open (the claim's shared-cache name for ``:memory:``)."""
        return self._target

    def claim(self, *, serving: bool) -> StoreClaim:
        claim = DatabaseClaim(self.display, serving=serving)
        # ``:memory:`` is a named shared-cache database the claim keeps alive: the
        # storage actor (and a restarted one) must open that one.
        self._target = claim.target
        return claim

    async def open(self, *, read_only: bool = False) -> tuple[Driver, int]:
        config = self._config
        db, last_seq = await open_database(
            self._target,
            driver=config.storage_driver,
            synchronous=config.synchronous,
            busy_timeout=config.busy_timeout,
            read_only=read_only,
        )
        checkpointer = None
        if not read_only and self.readers and off_the_commit_path(config.synchronous):
            checkpointer = Checkpointer(
                self._target.connect,
                uri=self._target.uri,
                synchronous=config.synchronous,
                busy_timeout=config.busy_timeout,
            )
            checkpointer.start()
        return _Checked(db, checkpointer), last_seq

    async def open_reader(self) -> Driver:
        config = self._config
        db = await open_reader(
            self._target, driver=config.storage_driver, busy_timeout=config.busy_timeout
        )
        return _Checked(db)

    def log_feed(
        self,
        publish: Publisher,
        ready: ReadyNotified | None = None,
        interest: Callable[[], Interest] | None = None,
    ) -> LogFeed | None:
        # One runtime writes the file: its storage actor publishes its own commits.
        return None

    def leadership(self, duties: LeaderDuties) -> Leadership | None:
        # One runtime owns the file: it is its own leader, and the duties a dead owner
        # leaves (its claims, its workers) are done by the next one's recovery on open.
        return None

    def explain(self, exc: StoreError, action: str) -> StorageError:
        return storage_error(
            self.display, exc, action=action, busy_timeout=self._config.busy_timeout
        )

    def read_owner(self) -> tuple[str | None, str | None]:
        return read_owner(self.display)

    def read_schema_version(self) -> int:
        return read_schema_version(self.display)


def open_store(target: str, config: RuntimeConfig) -> SqliteStore:
    return SqliteStore(target, config)


class _Checked(Driver):
    """A driver whose every call answers the port's errors only, whatever runs below it.

    The drivers already raise :class:`StoreError`; this also holds for a method replaced
    at run time (the tests inject faults by patching a driver class's ``transaction``
    with one that raises ``sqlite3`` errors, as a failing disk would), so that the storage
    actor, which catches port errors only, still fails the write instead of crashing.
    """

    def __init__(self, inner: Driver, checkpointer: Checkpointer | None = None) -> None:
        self._inner = inner
        self.name = inner.name
        #: The write connection's checkpoint thread (checkpoints.py), poked after commits.
        self.checkpointer = checkpointer

    async def execute(self, sql: str, params: Params = ()) -> None:
        try:
            await self._inner.execute(sql, params)
        except sqlite3.Error as exc:
            raise store_error(exc) from exc

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        try:
            return await self._inner.fetchall(sql, params)
        except sqlite3.Error as exc:
            raise store_error(exc) from exc

    async def snapshot(self, job: ReadJob[_T]) -> _T:
        try:
            return await self._inner.snapshot(job)
        except sqlite3.Error as exc:
            raise store_error(exc) from exc

    async def transaction(self, statements: Sequence[Statement]) -> None:
        try:
            await self._inner.transaction(statements)
        except sqlite3.Error as exc:
            raise store_error(exc) from exc
        if self.checkpointer is not None:
            self.checkpointer.committed()

    async def probe(self, units: Sequence[Sequence[Statement]]) -> list[StoreError | None]:
        try:
            verdicts: Sequence[BaseException | None] = await self._inner.probe(units)
        except sqlite3.Error as exc:
            raise store_error(exc) from exc
        return [
            verdict if verdict is None or isinstance(verdict, StoreError) else _wrap(verdict)
            for verdict in verdicts
        ]

    async def close(self) -> None:
        checkpointer, self.checkpointer = self.checkpointer, None
        if checkpointer is not None:
            # First: the write connection's close is then the last, which checkpoints
            # the whole WAL and removes it, as without the thread.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(checkpointer.close)
        try:
            await self._inner.close()
        except sqlite3.Error as exc:
            raise store_error(exc) from exc


def _wrap(verdict: BaseException) -> StoreError:
    if isinstance(verdict, sqlite3.Error):
        return store_error(verdict)
    raise verdict
