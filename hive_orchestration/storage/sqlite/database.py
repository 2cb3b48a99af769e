"""Opening the database: the pragmas, the schema version and the migrations, and the
read-only connections of readers.

The claim on the file (its lock) is in :mod:`.claim`, the checks of the file and its
folder in :mod:`.files`.
"""

from __future__ import annotations

import contextlib
import shlex
import sqlite3
from typing import Literal

import anyio.to_thread

from ...errors import NewerSchemaError, StorageError
from ..port import STARTING, STOPPING, Driver, StoreError
from . import checkpoints
from .claim import DatabaseClaim, Target, read_owner
from .drivers import connect
from .faults import storage_error
from .files import MEMORY, check_file, check_writable, prepare_path, read_only_medium, read_only_uri
from .schema import MIGRATIONS, SCHEMA_VERSION

__all__ = [
    "MEMORY",
    "STARTING",
    "STOPPING",
    "DatabaseClaim",
    "Target",
    "open_database",
    "open_reader",
    "prepare_path",
    "read_only_uri",
    "read_owner",
    "read_schema_version",
]


def read_schema_version(path: str) -> int:
    """The schema version (``user_version``) of the database file at ``path``, read
    without writing anything (blocking: call it from a worker thread)."""
    check_file(path)
    try:
        row = _read_user_version(read_only_uri(path))
    except sqlite3.Error as exc:
        if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_CANTOPEN or not read_only_medium(path):
            raise storage_error(path, exc, action="cannot open") from exc
        try:
            row = _read_user_version(read_only_uri(path, immutable=True))
        except sqlite3.Error as exc:
            raise storage_error(path, exc, action="cannot open") from exc
    version = row[0]
    if not isinstance(version, int):  # pragma: no cover - SQLite always answers an integer
        raise StorageError(f"database {path!r} reports a non-integer user_version")
    return version


def _read_user_version(uri: str) -> tuple[object, ...]:
    conn = sqlite3.connect(uri, uri=True)
    try:
        row: tuple[object, ...] = conn.execute("PRAGMA user_version").fetchone()
    finally:
        conn.close()
    return row


async def open_database(
    target: Target,
    *,
    driver: Literal["auto", "aiosqlite", "thread"],
    synchronous: Literal["FULL", "NORMAL"],
    busy_timeout: float,
    read_only: bool = False,
) -> tuple[Driver, int]:
    """Open, check and migrate the database; returns the driver and the last event seq.

    A database with a newer schema is refused before anything is written to it.
    ``read_only`` opens an existing file with ``mode=ro`` and writes nothing to it: no
    pragma that changes the file, no migration, so a database at an older schema version
    is refused (``hive-orchestration db upgrade`` migrates it) rather than upgraded.
    """
    if read_only:
        return await _open_read_only(target, driver=driver, busy_timeout=busy_timeout)
    path = target.display
    if not target.memory:
        await anyio.to_thread.run_sync(_prepare_for_writing, path)
    try:
        db = await connect(target.connect, uri=target.uri, driver=driver, busy_timeout=busy_timeout)
    except StoreError as exc:
        raise _open_error(path, exc, busy_timeout) from exc
    try:
        version = await _user_version(db, path)
        if version > SCHEMA_VERSION:
            raise NewerSchemaError(path, version, SCHEMA_VERSION)
        if not target.memory:
            await db.execute("PRAGMA journal_mode=WAL")
            if checkpoints.off_the_commit_path(synchronous):
                # A thread copies the WAL into the file (checkpoints.py); the writer's
                # own checkpoint is the backstop that bounds the WAL.
                await db.execute(f"PRAGMA wal_autocheckpoint={checkpoints.BACKSTOP_PAGES}")
        await db.execute(f"PRAGMA synchronous={synchronous}")
        await db.execute("PRAGMA foreign_keys=ON")
        if version < SCHEMA_VERSION:
            statements = [(sql, ()) for migration in MIGRATIONS[version:] for sql in migration]
            statements.append((f"PRAGMA user_version={SCHEMA_VERSION}", ()))
            await db.transaction(statements)
        rows = await db.fetchall("SELECT coalesce(max(seq), 0) FROM events")
        last_seq = rows[0][0]
        assert isinstance(last_seq, int)
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await db.close()
        if isinstance(exc, StoreError):
            raise _open_error(path, exc, busy_timeout) from exc
        raise
    return db, last_seq


def _prepare_for_writing(path: str) -> None:
    prepare_path(path)
    check_writable(path)


def _open_error(path: str, exc: StoreError, busy_timeout: float) -> StorageError:
    return storage_error(path, exc, action="cannot open", busy_timeout=busy_timeout)


async def _open_read_only(
    target: Target, *, driver: Literal["auto", "aiosqlite", "thread"], busy_timeout: float
) -> tuple[Driver, int]:
    path = target.display
    if target.memory or target.uri:
        raise StorageError(
            f"cannot open {path!r} read-only: a read-only database must be a file on disk"
        )
    await anyio.to_thread.run_sync(check_file, path)
    try:
        return await _connect_read_only(path, driver=driver, busy_timeout=busy_timeout)
    except StorageError as refused:
        if refused.fault != "cannot_open" or not await anyio.to_thread.run_sync(
            read_only_medium, path
        ):
            raise
    # A WAL database on a read-only medium: nobody can be writing it, read it as immutable.
    return await _connect_read_only(path, driver=driver, busy_timeout=busy_timeout, immutable=True)


async def _connect_read_only(
    path: str,
    *,
    driver: Literal["auto", "aiosqlite", "thread"],
    busy_timeout: float,
    immutable: bool = False,
) -> tuple[Driver, int]:
    try:
        db = await connect(
            read_only_uri(path, immutable=immutable),
            uri=True,
            driver=driver,
            busy_timeout=busy_timeout,
        )
    except StoreError as exc:
        raise _open_error(path, exc, busy_timeout) from exc
    try:
        version = await _user_version(db, path)
        if version > SCHEMA_VERSION:
            raise NewerSchemaError(path, version, SCHEMA_VERSION)
        if version < SCHEMA_VERSION:
            raise StorageError(
                f"database {path!r} has schema version {version}, older than this version of"
                f" hive-orchestration ({SCHEMA_VERSION}); it cannot be read until it is"
                f" migrated: run `hive-orchestration db upgrade --db {shlex.quote(path)}`",
                path=path,
            )
        # Per connection, not in the file: a second guard, should a write ever get here.
        await db.execute("PRAGMA query_only=ON")
        rows = await db.fetchall("SELECT coalesce(max(seq), 0) FROM events")
        last_seq = rows[0][0]
        assert isinstance(last_seq, int)
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await db.close()
        if isinstance(exc, StoreError):
            raise _open_error(path, exc, busy_timeout) from exc
        raise
    return db, last_seq


async def _user_version(db: Driver, path: str) -> int:
    rows = await db.fetchall("PRAGMA user_version")
    version = rows[0][0]
    if not isinstance(version, int):  # pragma: no cover - SQLite always answers an integer
        raise StorageError(f"database {path!r} reports a non-integer user_version")
    return version


async def open_reader(
    target: Target, *, driver: Literal["auto", "aiosqlite", "thread"], busy_timeout: float
) -> Driver:
    """One read-only connection (``mode=ro``, ``query_only``) to the file ``target`` names,
    for the reader pool (readers.py); raises :class:`StorageError`."""
    path = target.display
    try:
        db = await connect(
            read_only_uri(target.connect), uri=True, driver=driver, busy_timeout=busy_timeout
        )
    except StoreError as exc:
        raise storage_error(path, exc, action="cannot open a reader") from exc
    try:
        # Per connection: a second guard, should a write ever get here.
        await db.execute("PRAGMA query_only=ON")
    except BaseException as exc:
        # Closing a read-only connection that failed its first statement: nothing to lose.
        with anyio.CancelScope(shield=True), contextlib.suppress(StoreError):
            await db.close()
        if isinstance(exc, StoreError):
            raise storage_error(path, exc, action="cannot open a reader") from exc
        raise
    return db
