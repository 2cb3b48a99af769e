"""What a PostgreSQL error means: the port's exception, its fault, and the user's message.

psycopg raises one class per SQLSTATE; the storage actor must never see those. The
driver turns each into a :class:`~hive_orchestration.storage.port.StoreError` (by SQLSTATE
class, :func:`store_error`), and :func:`storage_error` turns that into the user's
:class:`~hive_orchestration.StorageError`, naming the database by its URL without its
password, what happened and what to do, as :mod:`..faults` does for a SQLite file.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import psycopg

from ...errors import StorageError, StorageFault
from ..port import CommitUnknownError, StoreError, StoreIntegrityError
from .url import display_url

__all__ = [
    "LockNotHeld",
    "classify",
    "connect_error",
    "connection_lost",
    "storage_error",
    "store_error",
]


class LockNotHeld(StoreError):
    """A write refused because this node does not hold its node lock
    (``DatabaseClaim.check``): the server answers, so its own words say what is wrong,
    not the advice for a server out of reach that its fault (``unavailable``) gets."""


#: By full SQLSTATE, before the class (https://www.postgresql.org/docs/15/errcodes-appendix.html).
_BY_STATE: dict[str, StorageFault] = {
    "57P01": "unavailable",  # admin_shutdown: the server is stopping, or pg_terminate_backend
    "57P02": "unavailable",  # crash_shutdown: another backend crashed, all are reset
    "57P03": "unavailable",  # cannot_connect_now: the server is starting or recovering
    "53300": "unavailable",  # too_many_connections: max_connections reached, for now
    "53100": "disk_full",  # disk_full
    "25006": "read_only",  # read_only_sql_transaction: a hot standby, or a read-only default
    "58030": "io_error",  # io_error
    "XX001": "corrupt",  # data_corrupted
    "XX002": "corrupt",  # index_corrupted
    "55P03": "locked",  # lock_not_available (lock_timeout)
    "40001": "locked",  # serialization_failure: retrying the whole write is safe
    "40P01": "locked",  # deadlock_detected: this transaction was the one rolled back
}

#: By SQLSTATE class (its first two characters).
_BY_CLASS: dict[str, StorageFault] = {
    "08": "unavailable",  # connection_exception
    "28": "cannot_open",  # invalid_authorization_specification (role, password)
    "3D": "cannot_open",  # invalid_catalog_name (no such database)
    "53": "disk_full",  # insufficient_resources (disk, memory)
    "58": "io_error",  # system_error
    "XX": "corrupt",  # internal_error
}


def classify(exc: psycopg.Error) -> StorageFault | None:
    """The fault behind a psycopg error, or None (a constraint, a bug in a statement...).

    An error without SQLSTATE is psycopg's own: a connection that failed or was lost
    (``OperationalError``) is ``unavailable``; anything else is not a database fault.
    """
    state = exc.sqlstate
    if state is None:
        return "unavailable" if isinstance(exc, psycopg.OperationalError) else None
    return _BY_STATE.get(state) or _BY_CLASS.get(state[:2])


#: What a server that is there but not taking connections yet (or any more) says at
#: connection time, when libpq gives no SQLSTATE: anything else it refuses with is the
#: URL's fault (no such database or role, a wrong password, pg_hba.conf).
_NOT_NOW = (
    "starting up",  # 57P03
    "shutting down",  # 57P03
    "in recovery mode",  # 57P03
    "too many clients",  # 53300
    "connection slots are reserved",  # 53300
)


def connect_error(exc: psycopg.Error) -> StoreError:
    """The port's exception for a connection that could not be opened.

    libpq reports no SQLSTATE for a refused connection, only the server's words: a
    ``FATAL`` from a server that answered is ``cannot_open`` (it will refuse again until
    the URL or the server's configuration changes), unless it is the server saying "not
    now"; no answer at all (refused, timed out, no route) is ``unavailable``.
    """
    said = str(exc)
    answered = "FATAL:" in said and not any(words in said for words in _NOT_NOW)
    error = StoreError(said.strip(), fault="cannot_open" if answered else "unavailable")
    error.__cause__ = exc
    return error


def connection_lost(conn: psycopg.Connection[tuple[object, ...]] | None) -> bool:
    """Whether ``conn`` can no longer be used (the server went away, or it was killed)."""
    return conn is None or conn.closed or conn.broken


def store_error(exc: psycopg.Error, *, lost: bool = False) -> StoreError:
    """The port's exception for ``exc``; ``lost``: the connection was lost with it, so the
    fault is ``unavailable`` whatever the error says (the server ended the session).

    Class 23 (integrity constraint violation) is a :class:`StoreIntegrityError`: the write
    at fault is isolated by the storage actor's probe, like SQLite's constraint errors.
    """
    fault = "unavailable" if lost else classify(exc)
    state = exc.sqlstate or ""
    error: StoreError
    if state.startswith("23") and not lost:
        error = StoreIntegrityError(str(exc).strip(), fault=None)
    else:
        error = StoreError(str(exc).strip() or type(exc).__name__, fault=fault)
    error.__cause__ = exc
    return error


def _server(url: str) -> str:
    """``host:port`` of ``url`` for a command line (``pg_isready``), or '' if it has none."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return ""
    if not host:
        return ""
    return f"-h {host}" + ("" if port is None else f" -p {port}")


def storage_error(url: str, exc: BaseException, *, action: str) -> StorageError:
    """The user's :class:`StorageError` for ``exc`` (a :class:`StoreError` or a psycopg
    error), raised while doing ``action`` on the database at ``url``.

    ``action`` opens the message ("cannot open database", "write rolled back, nothing of
    it was applied"...); the rest names the database (its URL, without the password), what
    happened and what to do. ``__cause__`` is the library's own error when there is one.
    """
    shown = display_url(url)
    cause: BaseException = exc
    if isinstance(exc, StoreError):
        fault = exc.fault
        if exc.__cause__ is not None:
            cause = exc.__cause__
    elif isinstance(exc, psycopg.Error):
        fault = classify(exc)
    else:
        fault = None
    said = str(cause).strip() or type(cause).__name__
    if fault == "in_use" or isinstance(exc, LockNotHeld):
        # The claim's own words, which name the database and the node.
        error = StorageError(f"{action}: {said}", path=shown, fault=fault)
        error.__cause__ = cause
        return error
    server = _server(url)
    check = f" (`pg_isready {server}`)" if server else ""
    match fault:
        case _ if isinstance(exc, CommitUnknownError):
            detail = (
                f"lost its connection while the commit was on its way ({said}): the write may"
                " or may not have been applied. Read back what it wrote before doing it again;"
                " the runtime reconnects on its next call"
            )
        case "unavailable":
            detail = (
                f"cannot be reached ({said}): the server is down, restarting, or refusing"
                f" connections; check that PostgreSQL is running and accepts connections{check},"
                " then retry: the runtime reconnects on its next call"
            )
        case "cannot_open":
            detail = (
                f"refused the connection ({said}): check the user, the password (in the URL,"
                " ~/.pgpass or PGPASSWORD), the database name (it must exist: `createdb`) and"
                " the server's pg_hba.conf"
            )
        case "read_only":
            detail = (
                f"cannot be written ({said}): the server is a read-only standby, or"
                " default_transaction_read_only is on for this user or database; point the"
                " URL at the primary, or turn that setting off"
            )
        case "disk_full":
            detail = (
                f"is out of resources on the server ({said}): its data disk is full or it ran"
                " out of memory; free space on the server and retry"
            )
        case "io_error":
            detail = f"got an I/O error on the server ({said}); check the server's disk and log"
        case "corrupt":
            detail = (
                f"reported damaged data ({said}); nothing was changed. Check the server's log"
                " and restore from a backup if its data is damaged"
            )
        case "locked":
            detail = (
                f"could not take a lock in time, or chose this write as a deadlock's victim"
                f" ({said}); nothing of it was applied: retry"
            )
        case _:
            detail = f"refused it: {said}"
    error = StorageError(f"{action}: database {shown!r} {detail}", path=shown, fault=fault)
    error.__cause__ = cause
    return error
