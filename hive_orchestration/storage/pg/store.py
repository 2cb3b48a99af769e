"""The PostgreSQL store: a database on a PostgreSQL server, owned by one runtime at a time.

It puts together what ``storage/port.py`` asks of a store from the modules beside it: the
claim (a session advisory lock and the ``hive_nodes`` record, :mod:`.claim`), the write
connection checked against the claim each time it connects and the migrations
(:mod:`.driver`, :mod:`.schema`), read-only reader connections, the wording of
PostgreSQL's faults (:mod:`.faults`) and the SQL families (:class:`.sql.PostgresSql`).

``config.storage_driver`` and ``config.synchronous`` are SQLite's knobs: ignored here
(one driver; a commit is as durable as the server's ``synchronous_commit`` makes it).
"""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import psycopg

from ...config import RuntimeConfig
from ...errors import StorageError
from ..port import Driver, LogFeed, Publisher, StoreClaim, StoreError, StoreKind
from .claim import DatabaseClaim, read_owner
from .driver import PostgresDriver, PostgresReader
from .faults import connect_error, storage_error
from .schema import check_version, migrate
from .sql import PostgresSql
from .url import display_url

__all__ = ["PostgresStore", "open_store"]

_SQL = PostgresSql()


class PostgresStore:
    """A PostgreSQL database named by ``url`` (``postgresql://`` or ``postgres://``)."""

    kind: StoreKind = "postgres"
    memory = False
    readers = True

    def __init__(self, url: str, config: RuntimeConfig) -> None:
        self.url = url
        self.display = display_url(url)
        self.sql = _SQL
        self._config = config
        self._claim: DatabaseClaim | None = None

    def claim(self, *, serving: bool) -> StoreClaim:
        self._claim = DatabaseClaim(self.url, serving=serving)
        return self._claim

    def _timeout(self) -> float:
        return max(1.0, float(self._config.busy_timeout))

    async def open(self, *, read_only: bool = False) -> tuple[Driver, int]:
        """The write connection, migrated (``read_only``: a read-only session, nothing
        written, an older schema refused), and the log's last seq. A runtime's write
        connection holds to its claim: each connection it opens checks it first."""
        hold = None if read_only or self._claim is None else self._claim.hold
        kind = PostgresReader if read_only else PostgresDriver
        try:
            db = await kind.open(
                self.url,
                application_name="hive-orchestration:" + ("inspector" if read_only else "writer"),
                connect_timeout=self._timeout(),
                on_connect=hold,
            )
        except StoreError as exc:
            raise self.explain(exc, "cannot open") from exc
        try:
            if read_only:
                await check_version(db)
            else:
                await migrate(db)
            last_seq = await _SQL.last_seq(db)
        except StoreError as exc:
            await _close(db)
            raise self.explain(exc, "cannot open") from exc
        except BaseException:
            await _close(db)
            raise
        return db, last_seq

    async def open_reader(self) -> Driver:
        try:
            return await PostgresReader.open(
                self.url,
                application_name="hive-orchestration:reader",
                connect_timeout=self._timeout(),
            )
        except StoreError as exc:
            raise self.explain(exc, "cannot open a reader") from exc

    def log_feed(self, publish: Publisher) -> LogFeed | None:
        """Several runtimes may write this database: a log tailer publishes every node's
        events (:mod:`.tailer`)."""
        from .tailer import LogTailer

        return LogTailer(self.url, publish, connect_timeout=self._timeout())

    def explain(self, exc: StoreError, action: str) -> StorageError:
        return storage_error(self.url, exc, action=action)

    def read_owner(self) -> tuple[str | None, str | None]:
        return read_owner(self.url)

    def read_schema_version(self) -> int:
        """The schema version, read without writing (0: no runtime has opened it)."""
        try:
            conn: psycopg.Connection[tuple[Any, ...]] = psycopg.connect(
                self.url, connect_timeout=round(self._timeout())
            )
        except psycopg.Error as exc:
            raise self.explain(connect_error(exc), "cannot open") from exc
        try:
            row = conn.execute("SELECT to_regclass('hive_schema') IS NOT NULL").fetchone()
            if row is None or not row[0]:
                return 0
            found = conn.execute("SELECT version FROM hive_schema WHERE id = 1").fetchone()
            return 0 if found is None else int(found[0])
        except psycopg.Error as exc:
            raise storage_error(self.url, exc, action="cannot read the schema version") from exc
        finally:
            conn.close()


async def _close(db: Driver) -> None:
    with anyio.CancelScope(shield=True), contextlib.suppress(StoreError):
        await db.close()


def open_store(target: str, config: RuntimeConfig) -> PostgresStore:
    return PostgresStore(target, config)
