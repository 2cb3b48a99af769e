"""What a SQLite error means to the user: the fault, the file, and what to do about it.

SQLite's own messages ("database is locked", "attempt to write a readonly database",
"database or disk is full") say neither which file nor what to do. Every SQLite error
the storage layer hands to a caller goes through :func:`storage_error`, which keeps
SQLite's words (in parentheses, and as ``__cause__``) and adds the path, the fault
(:attr:`StorageError.fault`) and the remedy.

Below the store, every SQLite error leaves the drivers as the port's
:class:`~hive_orchestration.storage.port.StoreError` (:func:`store_error`), classified
here, so that the storage actor catches no ``sqlite3`` exception.
"""

from __future__ import annotations

import shlex
import sqlite3

from ...errors import StorageError, StorageFault
from ..port import StoreError, StoreIntegrityError

__all__ = ["classify", "storage_error", "store_error"]

# By SQLite's primary result code (https://sqlite.org/rescode.html).
_BY_CODE: dict[int, StorageFault] = {
    sqlite3.SQLITE_BUSY: "locked",
    sqlite3.SQLITE_LOCKED: "locked",
    sqlite3.SQLITE_READONLY: "read_only",
    sqlite3.SQLITE_IOERR: "io_error",
    sqlite3.SQLITE_CORRUPT: "corrupt",
    sqlite3.SQLITE_NOTADB: "corrupt",
    sqlite3.SQLITE_FULL: "disk_full",
    sqlite3.SQLITE_CANTOPEN: "cannot_open",
}


#: By extended result code, before the primary code: a hot journal (or a WAL index to
#: rebuild) that a read-only connection may not touch is no read-only file or filesystem.
_BY_EXTENDED_CODE: dict[int, StorageFault] = {
    sqlite3.SQLITE_READONLY_ROLLBACK: "needs_recovery",
    sqlite3.SQLITE_READONLY_RECOVERY: "needs_recovery",
}


_STORE_CLASSES: dict[type[sqlite3.Error], type[StoreError]] = {}


def _store_class(kind: type[sqlite3.Error]) -> type[StoreError]:
    """The port's error class for a ``sqlite3`` error class: a subclass of both, so that
    the storage actor sees a :class:`StoreError` (an integrity error a
    :class:`StoreIntegrityError`) and code that knows it talks to SQLite (the SQLite
    store's own modules, its tests) still sees the ``sqlite3`` class it always did."""
    found = _STORE_CLASSES.get(kind)
    if found is None:
        base = StoreIntegrityError if issubclass(kind, sqlite3.IntegrityError) else StoreError
        found = type(f"Store{kind.__name__}", (base, kind), {"__module__": __name__})
        _STORE_CLASSES[kind] = found
    return found


#: What :func:`~hive_orchestration.storage.port.check_updated` raises on SQLite.
IntegrityStoreError = _store_class(sqlite3.IntegrityError)


def store_error(exc: sqlite3.Error) -> StoreError:
    """``exc`` as the port's :class:`StoreError`, classified (raise it ``from exc``): the
    same message, SQLite's result codes kept."""
    if isinstance(exc, StoreError):
        return exc
    error = _store_class(type(exc))(str(exc), fault=classify(exc))
    for attribute in ("sqlite_errorcode", "sqlite_errorname"):
        if hasattr(exc, attribute):
            setattr(error, attribute, getattr(exc, attribute))
    return error


def classify(exc: sqlite3.Error | StoreError) -> StorageFault | None:
    """The fault behind a SQLite error, or None for any other error (a constraint...)."""
    if isinstance(exc, StoreError):
        return exc.fault
    if _statement_in_progress(exc):
        return None
    code = getattr(exc, "sqlite_errorcode", 0)
    if code in _BY_EXTENDED_CODE:
        return _BY_EXTENDED_CODE[code]
    # The extended code's low byte is the primary code; 0 for an error SQLite did not give
    # (an error of the sqlite3 module itself).
    return _BY_CODE.get(code & 0xFF)


def _statement_in_progress(exc: Exception) -> bool:
    """SQLITE_BUSY from this connection's own unfinished statement ("cannot commit
    transaction - SQL statements in progress"), not from another connection's lock: no
    wait helps, and nobody else is involved."""
    return "statements in progress" in str(exc)


def storage_error(
    path: str, exc: sqlite3.Error | StoreError, *, action: str, busy_timeout: float | None = None
) -> StorageError:
    """The :class:`StorageError` for ``exc`` (SQLite's, or the port's error made of one by
    :func:`store_error`: the same words), raised while doing ``action``.

    ``action`` opens the message ("cannot open database", "write rolled back, nothing of it
    was applied"...); the rest names ``path``, says what happened and what to do.
    """
    fault = classify(exc)
    quoted = shlex.quote(path)
    match fault:
        case "locked":
            waited = "" if busy_timeout is None else f" ({busy_timeout:g}s)"
            detail = (
                f"is locked by another connection, which held its lock past busy_timeout"
                f"{waited} ({exc}); retry later, and if it stays locked stop the other"
                f" program using the file (`fuser {quoted}` lists them)"
            )
        case "read_only":
            detail = (
                f"cannot be written ({exc}): the file, its -wal or -shm file, its folder or"
                " its filesystem is read-only for this process; make them writable"
                " (permissions, `chattr -i`, a read-write mount), or only read it with the"
                f" inspector (`hive-orchestration tasks --db {quoted}`)"
            )
        case "needs_recovery":
            detail = (
                f"was left in the middle of a write by a program that was killed or crashed"
                f" ({exc}): its -journal or -wal file holds what must be undone, and this"
                " read-only connection may not write it. Open it once for writing to recover"
                f" it: start the app, or run `hive-orchestration db upgrade --db {quoted}`;"
                " do not delete its -journal or -wal file, that would damage it"
            )
        case "disk_full":
            detail = (
                f"has no room to grow ({exc}): its disk is full or a file size limit was"
                " reached; free space on that filesystem (or raise the limit) and retry"
            )
        case "io_error":
            detail = (
                f"got an I/O error from the operating system ({exc}); check the disk, the"
                " filesystem and the file size limit (`ulimit -f`), then retry"
            )
        case "corrupt":
            detail = (
                f"is damaged or is not a SQLite database ({exc}); it was not repaired or"
                " changed. Restore it from a backup, or salvage what is readable into a new"
                f" file with `sqlite3 {quoted} .recover | sqlite3 NEW.db`"
            )
        case "cannot_open":
            detail = (
                f"cannot be opened ({exc}): SQLite could not open the file or create its"
                " -wal and -shm files beside it; check that the file and its folder exist"
                " and that this user may read and write them"
            )
        case _ if _statement_in_progress(exc):
            detail = (
                f"refused it ({exc}): a statement of the runtime's own connection was still"
                " open, so SQLite kept the transaction from ending; no other program holds a"
                " lock and nothing of it was applied. This is a bug in hive-orchestration:"
                " please report it with this message; retrying (reopening) is safe"
            )
        case _:
            detail = f"refused it: {exc}"
    error = StorageError(f"{action}: database {path!r} {detail}", path=path, fault=fault)
    error.__cause__ = exc
    return error
