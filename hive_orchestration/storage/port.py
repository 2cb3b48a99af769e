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

from collections.abc import Sequence
from typing import Literal, TypeAlias

from ..errors import StorageFault

__all__ = [
    "POSTGRES_SCHEMES",
    "CommitUnknownError",
    "Driver",
    "Params",
    "Row",
    "Statement",
    "StoreError",
    "StoreIntegrityError",
    "StoreKind",
    "store_kind",
]

Params: TypeAlias = tuple[object, ...]
Statement: TypeAlias = tuple[str, Params]
Row: TypeAlias = tuple[object, ...]

StoreKind: TypeAlias = Literal["sqlite", "postgres"]

#: A database named by one of these URL schemes is a PostgreSQL server; anything else is a
#: SQLite file (or ``:memory:``), as it always was.
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def store_kind(target: str) -> StoreKind:
    """Which store a ``db_path`` / ``--db`` value names."""
    return "postgres" if target.lower().startswith(POSTGRES_SCHEMES) else "sqlite"


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


class Driver:
    """The write connection (or one reader's connection). Only the storage actor and its
    readers hold one; each call is one trip to the database's thread or server."""

    name: str = "driver"

    async def execute(self, sql: str, params: Params = ()) -> None:
        raise NotImplementedError

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        raise NotImplementedError

    async def transaction(self, statements: Sequence[Statement]) -> None:
        """Apply ``statements`` in order in one transaction: all of them, or none.

        Consecutive statements with the same SQL may be sent as one batch. An UPDATE that
        changes fewer rows than it was given raises :class:`StoreIntegrityError`.
        """
        raise NotImplementedError

    async def probe(self, units: Sequence[Sequence[Statement]]) -> list[StoreError | None]:
        """Try each unit in its own savepoint, then roll everything back.

        Tells which units of a failed batch are at fault, without writing anything.
        """
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError
