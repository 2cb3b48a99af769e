"""Runtimes on a PostgreSQL database: each is a *node*, registered for its whole life.

The SQLite store's claim is a ``flock`` on the file's lock file, which records the owner's
pid and the address its socket serves on (:mod:`..database`). Here:

- **A node** is one open runtime: a fresh id, a row of ``hive_nodes`` (pid, host, the
  socket address clients connect to) and a session advisory lock on a key drawn from its
  id (:func:`node_key`), held by a connection of its own for the runtime's whole life
  (across restarts of the storage actor, as a flock is). PostgreSQL drops the lock the
  moment that session ends (the process killed, even by SIGKILL; the server restarted),
  so **a node is alive exactly while its lock is held** (:func:`alive_sql`): a row whose
  lock is free is a dead node's, whatever the row says.
- **Claims of tasks** record their node (``tasks.node_id``, set by the database as a task
  enters ``assigned`` or ``running``, from the writer's ``hive.node`` session setting,
  which :meth:`DatabaseClaim.hold` gives each write connection: schema version 15).
  Recovery on open requeues the claims of dead nodes and unowned ones only, never those
  of another live node (``storage/pg/sql.py``, :func:`recoverable_sql`).
- **Several nodes.** Any number of runtimes open one database (a SQLite file keeps its
  one owner): the TaskManager of each fences every write of a task by its version, so
  that nodes share the work safely (``actors/task_manager/fencing.py``).
- The write connection's driver checks the node's lock each time it connects
  (:meth:`DatabaseClaim.hold`), and takes it again if it was lost with the server (the
  node registers again, with its id: meanwhile it looked dead, and another node may have
  requeued its claims, which its fenced writes then find out).
- **Taking the lock again is bounded** (:data:`RETAKE_SECONDS`): a session of the node's
  own that its client gave up for lost but the server has not ended (half-open TCP: the
  server's keepalive may take hours) still holds the lock, and waiting for it stalled the
  leader's poll (:meth:`DatabaseClaim.touch`) and the write connection's reconnects
  (:meth:`DatabaseClaim.hold`) for as long. The node ends such a session of its own
  first (``pg_terminate_backend``: its own user's session), then waits for the lock at
  most :data:`RETAKE_SECONDS`. **A node writes only while it holds its lock**: one that
  could not take it again (another session holds it, or no connection opens) refuses
  every write on its write connection (:meth:`DatabaseClaim.check`: ``StorageError``,
  ``unavailable``, nothing applied) until a later try takes it (each poll tries), so it
  never hands out or settles a claim while the other nodes may take it for dead.
- **Clients** given the URL read the live nodes' rows (:func:`read_owner`) and connect
  to any of them.

Advisory locks belong to one database, so runtimes on other databases of the same server
never meet.
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
import psycopg.errors

from ...errors import StorageError
from ..port import STARTING, STOPPING, StoreError
from .driver import CONNECT_TIMEOUT
from .faults import LockNotHeld, connect_error, connection_lost, storage_error
from .schema import MIGRATE_LOCK
from .url import display_url

__all__ = [
    "NODE_SETTING",
    "RETAKE_SECONDS",
    "DatabaseClaim",
    "alive_sql",
    "node_key",
    "node_lock_sql",
    "poll_lock_sql",
    "read_owner",
    "recoverable_sql",
]

#: The session setting naming the node a write connection writes for (read by the
#: ``tasks_claim_holder`` trigger, schema version 15, and by :func:`recoverable_sql`).
NODE_SETTING = "hive.node"


def node_key(node_id: str) -> int:
    """The advisory lock key of a node: the first 16 hex digits of its id (a uuid4's
    hex, random), as a signed bigint. :func:`alive_sql` computes the same in SQL."""
    key = int(node_id[:16], 16)
    return key - (1 << 64) if key >= 1 << 63 else key


def _half(column: str, start: int) -> str:
    # 8 hex digits of the id as the unsigned 32-bit number pg_locks shows.
    return f"('x' || lpad(substr({column}, {start}, 8), 16, '0'))::bit(64)::bigint"


def _lock_sql(column: str, alias: str, subid: int) -> str:
    # The granted advisory lock of the node's key (in ``column``) in this database, in
    # the bigint form (objsubid 1) or the two-int4 form (objsubid 2).
    return (
        f"{alias}.locktype = 'advisory' AND {alias}.granted AND {alias}.objsubid = {subid}"
        f" AND {alias}.database = (SELECT oid FROM pg_database"
        " WHERE datname = current_database())"
        f" AND {alias}.classid::bigint = {_half(column, 1)}"
        f" AND {alias}.objid::bigint = {_half(column, 9)}"
    )


def alive_sql(column: str) -> str:
    """SQL true while the node whose id is in ``column`` holds its lock (it lives)."""
    return f"EXISTS (SELECT 1 FROM pg_locks l WHERE {node_lock_sql(column, 'l')})"


def node_lock_sql(column: str, alias: str) -> str:
    """SQL true for the ``pg_locks`` row ``alias`` of the node lock of the node whose id
    is in ``column`` (``objsubid`` 1), held by the claim's own session
    (:class:`DatabaseClaim`) for the node's whole life."""
    return _lock_sql(column, alias, 1)


def poll_lock_sql(column: str, alias: str) -> str:
    """SQL true for the ``pg_locks`` row ``alias`` of the poll lock of the node whose id is
    in ``column``: the node's key in the two-int4 form (``objsubid`` 2), held by the
    session on which the node polls for the leader's role (``storage/pg/leader.py``)."""
    return _lock_sql(column, alias, 2)


def recoverable_sql(column: str = "node_id") -> str:
    """SQL true for a task whose claim this node may take over: its own (a restart of the
    task manager), no node's, or a dead node's; never another live node's."""
    return (
        f"({column} IS NULL OR {column} = current_setting('{NODE_SETTING}', true)"
        f" OR NOT {alive_sql(column)})"
    )


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
    """(pid, address) of a live node as its row says (else Nones): one that serves, if
    any does, else the newest (which may be starting or stopping)."""
    table = conn.execute("SELECT to_regclass('hive_nodes') IS NOT NULL").fetchone()
    if table is None or not table[0]:
        return None, None
    row = conn.execute(
        "SELECT pid, host, address FROM hive_nodes"
        f" WHERE {alive_sql('id')}"
        # One that serves, else one about to (a client waits for it), else one closing.
        " ORDER BY CASE coalesce(address, '') WHEN '' THEN 3 WHEN %s THEN 2 WHEN %s THEN 1"
        " ELSE 0 END, started_at DESC LIMIT 1",
        (STOPPING, STARTING),
    ).fetchone()
    if row is None:
        return None, None
    pid, host, address = row
    where = "" if host == socket.gethostname() else f" on {host}"
    return f"{pid}{where}", address or None


def read_owner(url: str) -> tuple[str | None, str | None]:
    """The pid (with its host, if not this one) of a live runtime (node) on the database
    at ``url`` and the address it serves on (each None when not recorded; the address
    :data:`STARTING` or :data:`STOPPING` while it opens or closes; a serving node is
    preferred). Blocking: call it from a worker thread. The answer may be stale by the
    time it is used (the caller connects and finds out), as for a SQLite file."""
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


#: Seconds the node waits for its lock as it takes it again (its session was lost): the
#: leader's poll (every 0.5 s) runs it, and a poll session idle for 2 s looks stuck.
RETAKE_SECONDS = 0.5

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
    """The runtime's registration as a node of a PostgreSQL database for its whole life,
    across restarts of the storage actor (see the module).

    :meth:`acquire` opens the claim's own connection and takes the node's lock there; it
    is held until :meth:`release` (or the process's end). Give :meth:`hold` to the write
    connection's driver (``on_connect``): each write connection opened checks that the
    lock is still held, and takes it again if its connection was lost (a server restart);
    it also names the node on that connection (:data:`NODE_SETTING`).
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
        # Why the lock was not taken again (its session lost), while it is not: the node
        # writes nothing meanwhile (check).
        self._unheld: str | None = None
        self._lock = threading.Lock()

    def acquire(self) -> None:
        """Register the node (blocking: call it from a worker thread). Raises
        :class:`StorageError`, the server's fault, if it cannot be reached or refuses the
        URL; other runtimes on the database are nodes beside it, not a refusal."""
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
            # For the session (the connection is in autocommit): the claims this
            # connection writes are this node's.
            conn.execute("SELECT set_config(%s, %s, false)", (NODE_SETTING, self.node_id))

    def check(self) -> None:
        """The write connection's guard, before each call: a node that lost its lock and
        could not take it again writes nothing (the other nodes may take it for dead and
        recover its claims), until a try takes it again (each poll: :meth:`touch`)."""
        unheld = self._unheld
        if unheld is not None:
            raise LockNotHeld(
                f"this node ({self.node_id}) does not hold its lock on {self.display!r}:"
                f" {unheld}; nothing is written until it takes it again",
                fault="unavailable",
            )

    def held(self) -> bool:
        """Whether the node holds its lock, as far as it knows (False once it lost it and
        could not take it again: :meth:`check` refuses its writes meanwhile)."""
        return self._unheld is None

    def _take(self) -> None:
        try:
            self._retake()
        except StorageError as exc:
            self._unheld = str(exc)
            raise
        self._unheld = None

    def _retake(self) -> None:
        old, self._conn = self._conn, None
        if old is not None:
            old.close()
        conn = _connect(self.url, "hive-orchestration:owner")
        key = node_key(self.node_id)
        try:
            if self._backend_pid:
                # The session this claim gave up for lost may live on in the server
                # (half-open TCP, ended only by its keepalive, perhaps hours later), still
                # holding the lock: it is this node's, of no use to it any more; ended.
                half = key & 0xFFFFFFFF_FFFFFFFF
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'"
                    " AND granted AND database = (SELECT oid FROM pg_database"
                    " WHERE datname = current_database())"
                    " AND classid = %s AND objid = %s AND objsubid = 1 AND pid = %s",
                    (half >> 32, half & 0xFFFFFFFF, self._backend_pid),
                )
            # A fresh id's lock is free; taken before the row is written, so that a row
            # whose lock is free is always a dead node's. Waited for a bounded time: a
            # session the server has not ended (another one than the claim's last) may
            # hold it for hours.
            with conn.transaction():
                conn.execute(
                    "SELECT set_config('lock_timeout', %s, true)",
                    (f"{round(RETAKE_SECONDS * 1000)}ms",),
                )
                conn.execute("SELECT pg_advisory_lock(%s)", (key,))
            with conn.transaction():
                # Made here, not by a migration: the claim comes before the schema is read.
                # Under the migration lock, so that two runtimes never create it at once.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
                conn.execute(_NODES)
                # The rows of dead nodes go (their claims are found by tasks.node_id).
                conn.execute(
                    f"DELETE FROM hive_nodes WHERE id <> %s AND NOT {alive_sql('id')}",
                    (self.node_id,),
                )
                conn.execute(
                    "INSERT INTO hive_nodes (id, pid, host, address) VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT (id) DO UPDATE SET address = excluded.address",
                    (self.node_id, os.getpid(), socket.gethostname(), self._address),
                )
        except psycopg.errors.LockNotAvailable as exc:
            conn.close()
            raise StorageError(
                f"cannot take this node's lock again on {self.display!r}: another session"
                f" has held it for over {RETAKE_SECONDS:g}s",
                fault="locked",
                path=self.display,
            ) from exc
        except psycopg.Error as exc:
            conn.close()
            raise storage_error(self.url, exc, action="cannot open") from exc
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._backend_pid = conn.info.backend_pid

    def touch(self) -> bool:
        """Run a statement on the claim's own session (blocking: call it from a worker
        thread), so that its ``pg_stat_activity.state_change`` is now by the database's
        clock: the node's sign of life to the leader (``storage/pg/leader.py``), which
        runs it at each poll. A session found lost (the server ended it: a restart, or
        ``pg_terminate_backend``) is opened again and the node's lock taken again at
        once: else a node whose write connection lived on kept its lock free, and the
        leader took it for dead and recovered its claims while it ran them. Taking it
        again waits :data:`RETAKE_SECONDS` at most; until it is taken, the node writes
        nothing (:meth:`check`). False when the session was lost or the statement failed
        (then taken again if it can be)."""
        with self._lock:
            if self._released:
                return False
            conn = self._conn
            if not connection_lost(conn):
                assert conn is not None
                try:
                    conn.execute("SELECT 1")
                    return True
                except psycopg.Error:
                    if not connection_lost(conn):
                        return False
            before = self._unheld
            try:
                self._take()
            except StorageError as exc:
                # Once, not at every poll while it lasts.
                level = logging.WARNING if before is None else logging.DEBUG
                log.log(level, "node %s could not take its lock again: %s", self.node_id, exc)
            else:
                if before is not None:
                    log.warning("node %s took its lock again; it writes again", self.node_id)
            return False

    def _held_by(self, conn: Connection, backend: int) -> bool:
        """Whether the server session ``backend`` holds the node's lock (asked on ``conn``)."""
        key = node_key(self.node_id) & 0xFFFFFFFF_FFFFFFFF
        row = conn.execute(
            _HELD + " AND pid = %s)", (key >> 32, key & 0xFFFFFFFF, backend)
        ).fetchone()
        return row is not None and bool(row[0])

    def _write(self, sql: str, params: tuple[object, ...]) -> None:
        conn = self._conn
        if connection_lost(conn):
            return  # the next write connection takes the claim again, with its records
        assert conn is not None
        try:
            conn.execute(sql, params)
        except psycopg.Error as exc:
            if connection_lost(conn):
                # Found lost only now (a restart, its backends terminated): as above.
                return
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
                    conn.execute("SELECT pg_advisory_unlock_all()")
                conn.close()

        self._released = True  # no write connection takes the claim again meanwhile
        _quickly(job, "letting the claim go")
