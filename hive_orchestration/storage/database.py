"""Opening the database: the file, the pragmas, the schema version and the migrations."""

from __future__ import annotations

import os
import shlex
import sqlite3
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio.to_thread

from ..errors import NewerSchemaError, StorageError
from .drivers import Driver, connect
from .schema import MIGRATIONS, SCHEMA_VERSION

__all__ = [
    "MEMORY",
    "DatabaseClaim",
    "Target",
    "open_database",
    "prepare_path",
    "read_only_uri",
    "read_schema_version",
]

MEMORY = ":memory:"

if sys.platform != "win32":
    import fcntl


@dataclass(frozen=True, slots=True)
class Target:
    """What the storage actor connects to: ``display`` is what the user named."""

    display: str
    connect: str
    uri: bool = False

    @property
    def memory(self) -> bool:
        return self.display == MEMORY


class DatabaseClaim:
    """The runtime's hold on its database for its whole life, across storage restarts.

    - A file: an exclusive ``flock`` on ``<path>.lock``, so that a second runtime (in this
      process or another) is refused with a clear error instead of corrupting the first
      one's view; the OS drops the lock when the process dies, even by SIGKILL. The lock
      file is left in place (removing it would race with the next opener).
    - ``:memory:``: a named shared-cache memory database kept alive by an idle connection,
      so that a restarted storage actor finds the same data instead of an empty database.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._keeper: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        if path == MEMORY:
            name = f"hive-memory-{uuid.uuid4().hex}"
            self.target = Target(MEMORY, f"file:{name}?mode=memory&cache=shared", uri=True)
        else:
            self.target = Target(path, path)

    def acquire(self) -> None:
        """Take the claim (blocking file I/O: call it from a worker thread)."""
        if self.target.memory:
            self._keeper = sqlite3.connect(self.target.connect, uri=True, check_same_thread=False)
            return
        prepare_path(self._path)
        if sys.platform == "win32":  # pragma: no cover - no flock: one runtime is up to you
            return
        lock_path = f"{self._path}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StorageError(
                f"database {self._path!r} is already open in another runtime (pid {holder}); "
                "one runtime owns a database at a time: close it first, or use another file"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        if self._keeper is not None:
            self._keeper.close()
            self._keeper = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None


def prepare_path(path: str) -> None:
    """Create the folder if needed, and the file with mode 0600 if it does not exist.

    SQLite gives the ``-wal`` and ``-shm`` files the database file's permissions, so the
    whole database stays readable by its owner only.
    """
    if path == MEMORY:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def read_only_uri(path: str) -> str:
    """The SQLite URI that opens the file at ``path`` read-only.

    Through pathlib, so that a ``?``, ``#`` or ``%`` in the path is quoted instead of being
    read as the URI's query. ``mode=ro`` still reads a live WAL database (it maps the
    ``-shm`` index, creating it if needed, like any reader) but never writes the file.
    """
    return f"{Path(path).absolute().as_uri()}?mode=ro"


def _check_file(path: str) -> None:
    """Refuse a path where a read-only open cannot find a database file."""
    target = Path(path)
    if not target.exists():
        raise StorageError(f"no database at {path!r}: the file does not exist")
    if not target.is_file():
        raise StorageError(f"cannot open database {path!r}: it is not a file")


def read_schema_version(path: str) -> int:
    """The schema version (``user_version``) of the database file at ``path``, read
    without writing anything (blocking: call it from a worker thread)."""
    _check_file(path)
    try:
        conn = sqlite3.connect(read_only_uri(path), uri=True)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open database {path!r}: {exc}") from exc
    try:
        row = conn.execute("PRAGMA user_version").fetchone()
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open database {path!r}: {exc}") from exc
    finally:
        conn.close()
    version = row[0]
    if not isinstance(version, int):  # pragma: no cover - SQLite always answers an integer
        raise StorageError(f"database {path!r} reports a non-integer user_version")
    return version


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
        try:
            await anyio.to_thread.run_sync(prepare_path, path)
        except OSError as exc:
            raise StorageError(f"cannot create database {path!r}: {exc}") from exc
    try:
        db = await connect(target.connect, uri=target.uri, driver=driver, busy_timeout=busy_timeout)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open database {path!r}: {exc}") from exc
    try:
        version = await _user_version(db, path)
        if version > SCHEMA_VERSION:
            raise NewerSchemaError(path, version, SCHEMA_VERSION)
        if not target.memory:
            await db.execute("PRAGMA journal_mode=WAL")
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
        if isinstance(exc, sqlite3.Error):
            raise StorageError(f"cannot open database {path!r}: {exc}") from exc
        raise
    return db, last_seq


async def _open_read_only(
    target: Target, *, driver: Literal["auto", "aiosqlite", "thread"], busy_timeout: float
) -> tuple[Driver, int]:
    path = target.display
    if target.memory or target.uri:
        raise StorageError(
            f"cannot open {path!r} read-only: a read-only database must be a file on disk"
        )
    await anyio.to_thread.run_sync(_check_file, path)
    try:
        db = await connect(
            read_only_uri(target.connect), uri=True, driver=driver, busy_timeout=busy_timeout
        )
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open database {path!r}: {exc}") from exc
    try:
        version = await _user_version(db, path)
        if version > SCHEMA_VERSION:
            raise NewerSchemaError(path, version, SCHEMA_VERSION)
        if version < SCHEMA_VERSION:
            raise StorageError(
                f"database {path!r} has schema version {version}, older than this version of"
                f" hive-orchestration ({SCHEMA_VERSION}); it cannot be read until it is"
                f" migrated: run `hive-orchestration db upgrade --db {shlex.quote(path)}`"
            )
        # Per connection, not in the file: a second guard, should a write ever get here.
        await db.execute("PRAGMA query_only=ON")
        rows = await db.fetchall("SELECT coalesce(max(seq), 0) FROM events")
        last_seq = rows[0][0]
        assert isinstance(last_seq, int)
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await db.close()
        if isinstance(exc, sqlite3.Error):
            raise StorageError(f"cannot open database {path!r}: {exc}") from exc
        raise
    return db, last_seq


async def _user_version(db: Driver, path: str) -> int:
    rows = await db.fetchall("PRAGMA user_version")
    version = rows[0][0]
    if not isinstance(version, int):  # pragma: no cover - SQLite always answers an integer
        raise StorageError(f"database {path!r} reports a non-integer user_version")
    return version
