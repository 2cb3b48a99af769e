"""One runtime owns a PostgreSQL database at a time, as one owns a SQLite file.

The SQLite store's claim is a ``flock`` on the file's lock file, which records the owner's
pid and the address its socket serves on (:mod:`..database`). Here:

- **The claim** is a session advisory lock (``pg_try_advisory_lock``) held by a
  connection of its own for the runtime's whole life (across restarts of the storage
  actor, as a flock is). PostgreSQL drops it the moment that session ends: the process
  killed (even by SIGKILL), the server restarted. A second runtime on the same database
  is refused with :class:`StorageError` ``fault="in_use"``, naming the owner's pid and
  host. The write connection's driver checks the claim each time it connects
  (:meth:`DatabaseClaim.hold`), and takes it again if it was lost with the server, or is
  refused if another runtime took the database meanwhile: a runtime never writes to a
  database it no longer owns after a reconnection.
- **The records** (pid, host, the socket address clients connect to) are a row of
  ``hive_nodes``. A client given the URL reads it (:func:`read_owner`) and believes it only
  while the lock is held (``pg_locks``): a killed owner's row names no one.

Advisory locks belong to one database, so runtimes on other databases of the same server
never meet. Single node: next, several nodes each hold a lock on their own id and share
the work; ``hive_nodes`` is already one row per node so that they can.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from typing import Any

import psycopg

from ...errors import StorageError
from ..port import STARTING, StoreError
from .driver import CONNECT_TIMEOUT
from .faults import connect_error, connection_lost, storage_error
from .schema import MIGRATE_LOCK
from .url import display_url

__all__ = ["OWNER_LOCK", "DatabaseClaim", "read_owner"]

#: The advisory lock the owning runtime's write connection holds. "hiveownr" in ASCII.
OWNER_LOCK = 0x68697665_6F776E72
# How pg_locks shows a bigint advisory key: its high and low halves.
_LOCK_HIGH, _LOCK_LOW = OWNER_LOCK >> 32, OWNER_LOCK & 0xFFFFFFFF


Connection = psycopg.Connection[tuple[Any, ...]]

log = logging.getLogger("hive_orchestration.storage")

_NODES = (
    "CREATE TABLE IF NOT EXISTS hive_nodes ("
    ' id text COLLATE "C" PRIMARY KEY,'
    " pid bigint NOT NULL,"
    " host text NOT NULL,"
    " address text,"
    " started_at timestamptz NOT NULL DEFAULT now())"
)

_HELD = (
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND classid = %s AND objid = %s AND objsubid = 1"
)


def _connect(url: str, application_name: str) -> Connection:
    try:
        return psycopg.connect(
            url,
            autocommit=True,
            application_name=application_name,
            connect_timeout=round(CONNECT_TIMEOUT),
            # A server or network gone silent ends the session in seconds, not hours: the
            # claim is held for the runtime's whole life, mostly idle.
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
            tcp_user_timeout=10_000,
        )
    except psycopg.Error as exc:
        raise storage_error(url, connect_error(exc), action="cannot open") from exc


def _holder(conn: Connection) -> tuple[str | None, str | None]:
    """(pid, address) of the owner as its row says, if the lock is held (else Nones)."""
    held = conn.execute(_HELD + ")", (_LOCK_HIGH, _LOCK_LOW)).fetchone()
    if held is None or not held[0]:
        return None, None
    table = conn.execute("SELECT to_regclass('hive_nodes') IS NOT NULL").fetchone()
    if table is None or not table[0]:
        return None, None
    row = conn.execute(
        "SELECT pid, host, address FROM hive_nodes ORDER BY started_at DESC LIMIT 1"
    ).fetchone()
    if row is None:
        return None, None
    pid, host, address = row
    where = "" if host == socket.gethostname() else f" on {host}"
    return f"{pid}{where}", address or None


def read_owner(url: str) -> tuple[str | None, str | None]:
    """The pid (with its host, if not this one) of the runtime that owns the database at
    ``url`` and the address it serves on (each None when not recorded; the address
    :data:`STARTING` or :data:`STOPPING` while it opens or closes). Blocking: call it from
    a worker thread. The answer may be stale by the time it is used (the caller connects
    and finds out), as for a SQLite file."""
    try:
        conn = _connect(url, "hive-orchestration:client")
    except StorageError:
        return None, None
    try:
        return _holder(conn)
    except psycopg.Error:
        return None, None
    finally:
        conn.close()


#: Seconds the runtime waits for the server as it lets the claim go or records its address
#: on the event loop (both are called there, and must not hang on a server gone silent).
_QUICK = 2.0


def _quickly(job: Callable[[], None], what: str) -> None:
    """Run ``job`` in a thread of its own and wait for it at most :data:`_QUICK` seconds;
    after that it is left to end by itself (its connection's keepalives bound it), and
    the caller goes on: the server ends the session, and with it the lock, anyway."""
    done = threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            job()
        except BaseException as exc:  # handed to the caller below
            failed.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name="hive-pg-claim", daemon=True).start()
    if not done.wait(_QUICK):
        log.warning("PostgreSQL did not answer within %gs to %s; going on", _QUICK, what)
        return
    if failed:
        raise failed[0]


class DatabaseClaim:
    """The runtime's hold on a PostgreSQL database for its whole life, across restarts of
    the storage actor (see the module).

    :meth:`acquire` opens the claim's own connection and takes the lock there; it is held
    until :meth:`release` (or the process's end). Give :meth:`hold` to the write
    connection's driver (``on_connect``): each write connection opened checks that the
    claim is still held, and takes it again if its connection was lost (a server
    restart), or refuses (``in_use``) if another runtime took the database meanwhile.
    Its methods are called from worker threads and the driver's thread: a lock keeps
    them one at a time.
    """

    def __init__(self, url: str, *, serving: bool = False) -> None:
        self.url = url
        self.display = display_url(url)
        #: Whether the runtime will serve its socket: the record says STARTING until it
        #: records where (else nothing, so that a client is told at once).
        self.node_id = uuid.uuid4().hex
        self._address: str = STARTING if serving else ""
        self._conn: Connection | None = None
        self._backend_pid = 0
        self._released = False
        self._lock = threading.Lock()

    def acquire(self) -> None:
        """Take the claim (blocking: call it from a worker thread). Raises
        :class:`StorageError`: ``fault="in_use"`` naming the owner if another runtime holds
        it, or the server's fault if it cannot be reached or refuses the URL."""
        with self._lock:
            self._released = False
            self._take()

    def hold(self, conn: Connection) -> None:
        """The write connection's ``on_connect``: the claim must be held before it writes."""
        with self._lock:
            if self._released:
                raise StoreError(
                    f"database {self.display!r} is no longer claimed by this runtime (it is"
                    " closing); nothing more is written",
                    fault="in_use",
                )
            # Asked of the server, on the new connection: the claim's own connection may be
            # gone without its client knowing yet (it has not used it since).
            if connection_lost(self._conn) or not self._held_by(conn, self._backend_pid):
                try:
                    self._take()
                except StorageError as exc:
                    # The driver's caller (the storage actor) hears the port's error.
                    raise StoreError(str(exc), fault=exc.fault) from exc

    def _take(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        conn = _connect(self.url, "hive-orchestration:owner")
        try:
            got = conn.execute("SELECT pg_try_advisory_lock(%s)", (OWNER_LOCK,)).fetchone()
            if got is None or not got[0]:
                pid, _ = _holder(conn)
                raise self._in_use(pid)
            with conn.transaction():
                # Made here, not by a migration: the claim comes before the schema is read.
                # Under the migration lock, so that two runtimes never create it at once.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
                conn.execute(_NODES)
                # This runtime holds the lock, so every other row is a dead owner's.
                conn.execute("DELETE FROM hive_nodes WHERE id <> %s", (self.node_id,))
                conn.execute(
                    "INSERT INTO hive_nodes (id, pid, host, address) VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT (id) DO UPDATE SET address = excluded.address",
                    (self.node_id, os.getpid(), socket.gethostname(), self._address),
                )
        except psycopg.Error as exc:
            conn.close()
            raise storage_error(self.url, exc, action="cannot open") from exc
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._backend_pid = conn.info.backend_pid

    @staticmethod
    def _held_by(conn: Connection, backend: int) -> bool:
        """Whether the server session ``backend`` holds the claim (asked on ``conn``)."""
        row = conn.execute(_HELD + " AND pid = %s)", (_LOCK_HIGH, _LOCK_LOW, backend)).fetchone()
        return row is not None and bool(row[0])

    def _in_use(self, holder: str | None) -> StorageError:
        here = ", this process" if holder == str(os.getpid()) else ""
        return StorageError(
            f"database {self.display!r} is already open in another runtime (pid"
            f" {holder or 'unknown'}{here}); one runtime owns a database at a time: close it"
            " first, or use another database",
            path=self.display,
            fault="in_use",
        )

    def _write(self, sql: str, params: tuple[object, ...]) -> None:
        conn = self._conn
        if connection_lost(conn):
            return  # the next write connection takes the claim again, with its records
        assert conn is not None
        try:
            conn.execute(sql, params)
        except psycopg.Error as exc:
            raise storage_error(self.url, exc, action="cannot record the owner") from exc

    def _record(self) -> None:
        self._write(
            "INSERT INTO hive_nodes (id, pid, host, address) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (id) DO UPDATE SET address = excluded.address",
            (self.node_id, os.getpid(), socket.gethostname(), self._address),
        )

    def record_address(self, address: str) -> None:
        """Record where the runtime serves its message API (``""``: nowhere), for the
        clients of other processes to find (:func:`read_owner`). Quick: waits for the
        server :data:`_QUICK` seconds at most (it is called on the event loop too)."""

        def job() -> None:
            with self._lock:
                self._address = address
                self._record()

        _quickly(job, "the owner's address")

    def clear_records(self) -> None:
        """No owner for a client to find any more (neither pid nor address, as a SQLite
        lock file's records are cleared), while the claim is still held: a client that
        finds the lock held and no record waits for it to go. Best effort: a server out
        of reach has no client to mislead either."""

        def job() -> None:
            with self._lock:
                self._address = ""
                self._write("DELETE FROM hive_nodes WHERE id = %s", (self.node_id,))

        with contextlib.suppress(StorageError):
            _quickly(job, "clearing the owner's record")

    def release(self) -> None:
        """Let the claim go (idempotent): the row goes, and the lock with its connection.
        Quick, as :meth:`record_address`; if the server does not answer, the lock goes
        when the server ends the session."""

        def job() -> None:
            with self._lock:
                self._released = True
                conn, self._conn = self._conn, None
                if conn is None:
                    return
                with contextlib.suppress(psycopg.Error):
                    conn.execute("DELETE FROM hive_nodes WHERE id = %s", (self.node_id,))
                    # Unlocked here, not by closing: the server ends a closed session a
                    # moment after the close returns, and a runtime opened right after
                    # would be refused by a lock still held for nobody.
                    conn.execute("SELECT pg_advisory_unlock(%s)", (OWNER_LOCK,))
                conn.close()

        self._released = True  # no write connection takes the claim again meanwhile
        _quickly(job, "letting the claim go")
