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
import logging
from collections.abc import Callable
from typing import Any

import anyio
import psycopg

from ...config import RuntimeConfig
from ...errors import StorageError
from ...messages.events import Interest
from ..port import (
    Driver,
    LeaderDuties,
    Leadership,
    LogFeed,
    Publisher,
    ReadyNotified,
    StoreClaim,
    StoreError,
    StoreKind,
)
from .claim import DatabaseClaim, read_owner
from .driver import PostgresDriver, PostgresReader
from .faults import connect_error, storage_error
from .schema import check_version, migrate
from .sql import PostgresSql
from .url import display_url

__all__ = ["PostgresStore", "open_store"]

_SQL = PostgresSql()

log = logging.getLogger("hive_orchestration.storage")

#: Seconds a reopening storage actor waits for an unreachable server to come back.
REOPEN_SECONDS = 60.0


class PostgresStore:
    """A PostgreSQL database named by ``url`` (``postgresql://`` or ``postgres://``)."""

    kind: StoreKind = "postgres"
    memory = False
    readers = True
    #: Several nodes write the tasks; a refill stays on the write connection, where the
    #: store's own reads of the heads were built and proved (not measured on a reader).
    head_reader = False

    def __init__(self, url: str, config: RuntimeConfig) -> None:
        self.url = url
        self.display = display_url(url)
        self.sql = _SQL
        self._config = config
        self._claim: DatabaseClaim | None = None
        self._opened = False

    def claim(self, *, serving: bool) -> StoreClaim:
        self._claim = DatabaseClaim(self.url, serving=serving)
        return self._claim

    def _timeout(self) -> float:
        return max(1.0, float(self._config.busy_timeout))

    async def open(self, *, read_only: bool = False) -> tuple[Driver, int]:
        """The write connection, migrated (``read_only``: a read-only session, nothing
        written, an older schema refused), and the log's last seq. A runtime's write
        connection holds to its claim: each connection it opens checks it first.

        The first open fails at once if the server cannot be reached (``Runtime.open``
        reports it). A later one (the storage actor restarted, most often because the
        server went away mid-COMMIT) waits up to :data:`REOPEN_SECONDS` for the server to
        come back: a restart takes seconds, and the writers queued meanwhile carry on
        once it answers, rather than the runtime giving up on a crash loop."""
        deadline = None if not self._opened else anyio.current_time() + REOPEN_SECONDS
        delay = 0.05
        while True:
            try:
                opened = await self._open(read_only)
            except StorageError as exc:
                if deadline is None or exc.fault != "unavailable":
                    raise
                if anyio.current_time() >= deadline:
                    raise
                log.warning("storage: %s unreachable; opening again in %.2fs", self.display, delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            self._opened = True
            return opened

    async def _open(self, read_only: bool) -> tuple[Driver, int]:
        hold = None if read_only or self._claim is None else self._claim.hold
        guard = None if read_only or self._claim is None else self._claim.check
        kind = PostgresReader if read_only else PostgresDriver
        try:
            db = await kind.open(
                self.url,
                application_name="hive-orchestration:" + ("inspector" if read_only else "writer"),
                connect_timeout=self._timeout(),
                on_connect=hold,
                guard=guard,
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

    def log_feed(
        self,
        publish: Publisher,
        ready: ReadyNotified | None = None,
        interest: Callable[[], Interest] | None = None,
    ) -> LogFeed | None:
        """Several runtimes may write this database: a log tailer publishes every node's
        events (:mod:`.tailer`; of the others', those ``interest`` asks for), and its
        listener hands ``ready`` the other nodes' ready notices."""
        from . import tailer

        return tailer.LogTailer(
            self.url,
            publish,
            connect_timeout=self._timeout(),
            poll=tailer.POLL_SECONDS,
            ready=ready,
            interest=interest,
        )

    def leadership(self, duties: LeaderDuties) -> Leadership | None:
        """Several runtimes may share this database: one at a time leads, doing what
        dead nodes leave behind (:mod:`.leader`). None without a claim (a reader)."""
        if self._claim is None:
            return None
        from .leader import Leader

        return Leader(
            self.url,
            self._claim.node_id,
            duties,
            connect_timeout=self._timeout(),
            worker_timeout=float(self._config.worker_timeout),
            touch=self._claim.touch,
            held=self._claim.held,
        )

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
