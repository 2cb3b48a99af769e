"""Opening the database: the file, the pragmas, the schema version and the migrations."""

from __future__ import annotations

import os
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

__all__ = ["MEMORY", "DatabaseClaim", "Target", "open_database", "prepare_path"]

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


async def open_database(
    target: Target,
    *,
    driver: Literal["auto", "aiosqlite", "thread"],
    synchronous: Literal["FULL", "NORMAL"],
    busy_timeout: float,
) -> tuple[Driver, int]:
    """Open, check and migrate the database; returns the driver and the last event seq.

    A database with a newer schema is refused before anything is written to it.
    """
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


async def _user_version(db: Driver, path: str) -> int:
    rows = await db.fetchall("PRAGMA user_version")
    version = rows[0][0]
    if not isinstance(version, int):  # pragma: no cover - SQLite always answers an integer
        raise StorageError(f"database {path!r} reports a non-integer user_version")
    return version
