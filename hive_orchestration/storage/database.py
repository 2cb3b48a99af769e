"""Opening the database: the file, the pragmas, the schema version and the migrations."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Literal

import anyio.to_thread

from ..errors import NewerSchemaError, StorageError
from .drivers import Driver, connect
from .schema import MIGRATIONS, SCHEMA_VERSION

__all__ = ["MEMORY", "open_database", "prepare_path"]

MEMORY = ":memory:"


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
    path: str,
    *,
    driver: Literal["auto", "aiosqlite", "thread"],
    synchronous: Literal["FULL", "NORMAL"],
    busy_timeout: float,
) -> tuple[Driver, int]:
    """Open, check and migrate the database; returns the driver and the last event seq.

    A database with a newer schema is refused before anything is written to it.
    """
    try:
        await anyio.to_thread.run_sync(prepare_path, path)
    except OSError as exc:
        raise StorageError(f"cannot create database {path!r}: {exc}") from exc
    try:
        db = await connect(path, driver=driver, busy_timeout=busy_timeout)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open database {path!r}: {exc}") from exc
    try:
        version = await _user_version(db, path)
        if version > SCHEMA_VERSION:
            raise NewerSchemaError(path, version, SCHEMA_VERSION)
        if path != MEMORY:
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
