"""Opening the database: the file, the pragmas, the schema version and the migrations."""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import sqlite3
import stat
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio.to_thread

from ...errors import NewerSchemaError, StorageError, StorageFault
from ..port import STARTING, STOPPING, Driver, StoreError
from .drivers import connect
from .faults import storage_error
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

MEMORY = ":memory:"
# STARTING and STOPPING (port.py): what a lock file says in place of an address while its
# runtime is opening or closing; an empty record: it serves no socket.

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

    - A file: an exclusive ``flock`` on ``<file>.lock`` beside the real file (symlinks
      resolved, so that two names of one file share one lock), so that a second runtime
      (in this process or another) is refused with a clear error instead of corrupting the
      first one's view; the OS drops the lock when the process dies, even by SIGKILL. The
      lock file holds the owner's pid while it is open, and is left in place (removing it
      would race with the next opener). It is opened without following a symlink and
      used only if it is a regular file of this user with no other name (a lock planted
      as a link to another file would otherwise have that file written), and it is
      never truncated.
    - ``:memory:``: a named shared-cache memory database kept alive by an idle connection,
      so that a restarted storage actor finds the same data instead of an empty database.
    """

    def __init__(self, path: str, *, serving: bool = False) -> None:
        self._path = path
        #: Whether the runtime will serve its socket: the lock file says STARTING until
        #: it records where (else nothing, so that a client is told at once).
        self._serving = serving
        self._keeper: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        if path == MEMORY:
            name = f"hive-memory-{uuid.uuid4().hex}"
            self.target = Target(MEMORY, f"file:{name}?mode=memory&cache=shared", uri=True)
        else:
            self.target = Target(path, path)

    def acquire(self) -> None:
        """Take the claim (blocking file I/O: call it from a worker thread).

        Raises :class:`StorageError` if the file cannot be created or is not one the
        runtime may use (see :func:`prepare_path`), if its lock file is unsafe, if another
        runtime holds it (``fault="in_use"``, naming its pid), or if it cannot be written.
        """
        if self.target.memory:
            self._keeper = sqlite3.connect(self.target.connect, uri=True, check_same_thread=False)
            return
        prepare_path(self._path)
        if sys.platform == "win32":  # pragma: no cover - no flock: one runtime is up to you
            return
        lock_path = f"{os.path.realpath(self._path)}.lock"
        # O_NONBLOCK: a FIFO planted there must not hang the open (it is refused below).
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(lock_path, flags, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _unsafe_lock(self._path, lock_path, "is a symbolic link") from None
            raise _unwritable(self._path, f"its lock file {lock_path!r}", exc) from exc
        try:
            _check_lock_file(self._path, lock_path, os.fstat(fd))
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, _PID_WIDTH, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            here = ", this process" if holder == str(os.getpid()) else ""
            raise StorageError(
                f"database {self._path!r} is already open in another runtime (pid {holder}"
                f"{here}); one runtime owns a database at a time: close it first, or use"
                " another file (the inspector, `hive-orchestration tasks --db"
                f" {shlex.quote(self._path)}`, reads it meanwhile)",
                path=self._path,
                fault="in_use",
            ) from None
        except StorageError:
            os.close(fd)
            raise
        except OSError as exc:
            os.close(fd)
            raise StorageError(
                f"cannot lock database {self._path!r}: flock on its lock file {lock_path!r}"
                f" failed ({exc.strerror or exc}); keep the database on a local filesystem"
                " that supports file locks",
                path=self._path,
                fault="cannot_open",
            ) from exc
        except BaseException:
            os.close(fd)
            raise
        # The pid is for the error above, the flock is the claim: on a full disk, go on
        # without it (the next opener then reports "pid unknown"). A fixed-width record
        # overwrites whatever a previous owner left, so the file is never truncated.
        # The address record too: a killed owner left its own there, which names no one
        # now that this runtime holds the file.
        starting = _address_record(STARTING if self._serving else "")
        with contextlib.suppress(OSError):
            os.pwrite(fd, _pid_record(str(os.getpid())) + starting, 0)
        self._lock_fd = fd

    def release(self) -> None:
        if self._keeper is not None:
            self._keeper.close()
            self._keeper = None
        if self._lock_fd is not None:
            self.clear_records()
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)  # closing the descriptor releases the flock

    def clear_records(self) -> None:
        """No stale pid or address for the next opener (or a client) to report: done as
        the claim goes, while it still holds the lock (a client that finds the lock held
        and the records empty waits for it to go)."""
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):  # the lock goes with the descriptor anyway
                os.pwrite(self._lock_fd, _pid_record("") + _address_record(""), 0)

    def record_address(self, address: str) -> None:
        """Write where the runtime serves its message API (``""``: nowhere) into the
        lock file, for the clients of other processes to find (:func:`read_owner`)."""
        if self._lock_fd is not None:
            os.pwrite(self._lock_fd, _address_record(address), _PID_WIDTH)


#: Bytes of the lock file's pid record: more than any pid has digits.
_PID_WIDTH = 32
#: Bytes of the lock file's address record, after the pid's (a socket path fits in 108).
_ADDRESS_WIDTH = 480


def _pid_record(pid: str) -> bytes:
    return pid.ljust(_PID_WIDTH - 1).encode() + b"\n"


def _address_record(address: str) -> bytes:
    raw = address.encode("utf-8", "surrogateescape")
    if len(raw) >= _ADDRESS_WIDTH or b"\n" in raw:
        raise ValueError(f"address too long to record: {address!r}")
    return raw.ljust(_ADDRESS_WIDTH - 1) + b"\n"


def read_owner(path: str) -> tuple[str | None, str | None]:
    """The pid of the runtime that holds ``path`` and the address it serves on, as its
    lock file says (each ``None`` when not recorded; the address :data:`STARTING` or
    :data:`STOPPING` while it is opening or closing). Reads without taking the lock: the
    answer may be stale by the time it is used (the caller connects and finds out)."""
    lock_path = f"{os.path.realpath(path)}.lock"
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None, None
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode) or found.st_uid != os.geteuid():
            return None, None  # not a lock file this user's runtime wrote
        raw = os.pread(fd, _PID_WIDTH + _ADDRESS_WIDTH, 0)
    except OSError:
        return None, None
    finally:
        os.close(fd)
    pid = raw[:_PID_WIDTH].decode(errors="replace").strip() or None
    address = raw[_PID_WIDTH:].decode("utf-8", "surrogateescape").strip() or None
    return pid, address


def _check_lock_file(path: str, lock_path: str, found: os.stat_result) -> None:
    """Refuse a lock file the runtime could be tricked into writing another file through:
    not a regular file, a second name (hard link) of some file, or another user's file."""
    if not stat.S_ISREG(found.st_mode):
        raise _unsafe_lock(path, lock_path, f"is {_kind(found)}, not a regular file")
    if found.st_nlink != 1:
        raise _unsafe_lock(
            path, lock_path, f"has {found.st_nlink} names (hard links), so it is another file too"
        )
    if found.st_uid != os.geteuid():
        raise _unsafe_lock(path, lock_path, f"belongs to another user (uid {found.st_uid})")


def _unsafe_lock(path: str, lock_path: str, why: str) -> StorageError:
    return StorageError(
        f"cannot open database {path!r}: its lock file {lock_path!r} {why}. The runtime"
        " writes its pid to its lock file, so it refuses one that could be another file."
        f" If no runtime is using the database, remove {lock_path!r} and open again; keep"
        " the database's folder writable only by its owner, so that nobody else can plant"
        " files there",
        path=path,
        fault="cannot_open",
    )


def _kind(found: os.stat_result) -> str:
    """What a file that is not a regular file is, for a message."""
    mode = found.st_mode
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "a special file"


def _not_a_file(path: str, found: os.stat_result) -> StorageError:
    return StorageError(
        f"cannot open database {path!r}: it is {_kind(found)}, not a regular file; a"
        " database is a regular file: name a file, or a path where one can be created",
        path=path,
        fault="cannot_open",
    )


def check_existing(path: str) -> None:
    """Refuse an existing ``path`` the runtime must not open as its database: anything but
    a regular file (SQLite would report a FIFO or a device as a "disk I/O error"), a
    dangling symbolic link (SQLite would create its target, wherever it points), and a
    symbolic link that another user made or that leads to another user's file (another
    local user may have planted it to have the runtime write that file)."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StorageError(
            f"cannot open database {path!r}: {exc}", path=path, fault=_os_fault(exc)
        ) from exc
    if stat.S_ISLNK(found.st_mode):
        link = found
        try:
            found = os.stat(path)
        except OSError as exc:
            raise StorageError(
                f"cannot open database {path!r}: it is a symbolic link to"
                f" {os.path.realpath(path)!r}, which cannot be reached"
                f" ({exc.strerror or exc}); the runtime does not create a database through"
                " a link: create the file there first, or name the real path",
                path=path,
                fault="cannot_open",
            ) from None
        me = os.geteuid()
        if link.st_uid != me:
            whose = f"made by another user (uid {link.st_uid})"
        elif found.st_uid != me:
            whose = f"to a file owned by another user (uid {found.st_uid})"
        else:
            whose = ""
        if whose:
            raise StorageError(
                f"cannot open database {path!r}: it is a symbolic link {whose}, leading to"
                f" {os.path.realpath(path)!r}; the runtime does not write a database"
                " through a link it cannot trust (another local user may have planted it)."
                " Remove the link if you did not make it, or open the file by its own path"
                " as its owner",
                path=path,
                fault="cannot_open",
            )
    if not stat.S_ISREG(found.st_mode):
        raise _not_a_file(path, found)


def _unwritable(path: str, what: str, exc: OSError | None) -> StorageError:
    """The error for a database whose file, lock file or folder cannot be written (``exc``
    says why; None: the folder is not writable)."""
    if exc is not None and exc.errno == errno.EISDIR:
        return StorageError(
            f"cannot open database {path!r}: it is a directory, not a file",
            path=path,
            fault="cannot_open",
        )
    why = "not writable" if exc is None else exc.strerror or str(exc)
    return StorageError(
        f"cannot open database {path!r} for writing: {what} cannot be written"
        f" ({why}); the runtime writes to its database, so the file and its"
        " folder must be writable by this user (permissions, `chattr -i`, a read-write"
        " mount). To only read it, use the inspector (`hive-orchestration tasks --db"
        f" {shlex.quote(path)}`)",
        path=path,
        fault="read_only" if exc is None else _os_fault(exc),
    )


def _os_fault(exc: OSError) -> StorageFault:
    """The fault behind an operating-system error on the database's file or folder."""
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "read_only"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk_full"
    return "cannot_open"


def check_writable(path: str) -> None:
    """Refuse a database file this process cannot open for writing, or whose folder it
    cannot write while the file has no ``-wal`` and ``-shm`` beside it yet.

    SQLite would open such a file read-only without a word and fail every write later
    ("attempt to write a readonly database"), or fail with "unable to open database file"
    for want of its ``-wal``; a runtime that cannot write cannot run, so it is refused at
    open, saying why. Opening the file for writing is SQLite's own test, and writes nothing.
    """
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise _unwritable(path, "the file", exc) from exc
    os.close(fd)
    folder = Path(path).absolute().parent
    companions = (Path(f"{path}-wal"), Path(f"{path}-shm"))
    if not all(file.exists() for file in companions) and not _can_write(folder):
        raise _unwritable(
            path,
            f"its folder {str(folder)!r}, where SQLite keeps the -wal and -shm files,",
            None,
        )


def prepare_path(path: str) -> None:
    """Create the missing folders (mode 0700) and the file (mode 0600) if it does not
    exist; refuse what exists there if the runtime must not use it (:func:`check_existing`).

    SQLite gives the ``-wal`` and ``-shm`` files the database file's permissions, so the
    whole database stays readable by its owner only; a folder the runtime creates is its
    owner's alone, so that no other user can plant files beside the database. Raises
    :class:`StorageError` if the folder or the file cannot be created.
    """
    if path == MEMORY:
        return
    target = Path(path)
    try:
        _make_folders(target.parent)
        fd = os.open(
            target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except FileExistsError:
        check_existing(path)
        return
    except OSError as exc:
        raise StorageError(
            f"cannot create database {path!r}: {exc}", path=path, fault=_os_fault(exc)
        ) from exc
    os.close(fd)


def _make_folders(folder: Path) -> None:
    """Create ``folder`` and its missing parents with mode 0700, whatever the umask (only
    the folders created here: an existing folder's mode is its owner's choice)."""
    missing: list[Path] = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for created in reversed(missing):
        try:
            os.mkdir(created, 0o700)
        except FileExistsError:
            continue  # made meanwhile by someone else: theirs, left as it is
        # mkdir applies the umask; a umask that takes the owner's bits would leave a
        # folder the runtime cannot use. Through a descriptor that follows no link.
        fd = os.open(created, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)


def read_only_uri(path: str, *, immutable: bool = False) -> str:
    """The SQLite URI that opens the file at ``path`` read-only.

    Through pathlib, so that a ``?``, ``#`` or ``%`` in the path is quoted instead of being
    read as the URI's query. ``mode=ro`` still reads a live WAL database (it maps the
    ``-shm`` index, creating it if needed, like any reader) but never writes the file.
    ``immutable`` also tells SQLite that nobody writes the file, so that it needs no
    ``-shm``: only for a file on a medium nobody can write (see :func:`_read_only_medium`).
    """
    return f"{Path(path).absolute().as_uri()}?mode=ro{'&immutable=1' if immutable else ''}"


def _read_only_medium(path: str) -> bool:
    """True if nothing can be writing the database at ``path`` now or later: it has no
    ``-wal`` or ``-shm`` file (a WAL writer keeps both while it has the file open) and its
    folder cannot be written (a read-only mount, an immutable folder), so no writer can
    create them. Such a file can only be read as immutable: SQLite cannot create the
    ``-shm`` index a read-only connection to a WAL database otherwise needs."""
    folder = Path(path).absolute().parent
    return (
        not Path(f"{path}-wal").exists()
        and not Path(f"{path}-shm").exists()
        and not _can_write(folder)
    )


def _can_write(folder: Path) -> bool:
    """Whether this process may create files in ``folder`` (read-only mounts and immutable
    folders included, which refuse even root)."""
    effective = os.access in os.supports_effective_ids
    return os.access(folder, os.W_OK, effective_ids=effective)


def _check_file(path: str) -> None:
    """Refuse a path where a read-only open cannot find a database file."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        raise StorageError(f"no database at {path!r}: the file does not exist", path=path) from None
    except OSError as exc:
        raise StorageError(
            f"cannot open database {path!r}: {exc}", path=path, fault=_os_fault(exc)
        ) from exc
    if not stat.S_ISREG(found.st_mode):
        raise _not_a_file(path, found)


def read_schema_version(path: str) -> int:
    """The schema version (``user_version``) of the database file at ``path``, read
    without writing anything (blocking: call it from a worker thread)."""
    _check_file(path)
    try:
        row = _read_user_version(read_only_uri(path))
    except sqlite3.Error as exc:
        if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_CANTOPEN or not _read_only_medium(path):
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
    await anyio.to_thread.run_sync(_check_file, path)
    try:
        return await _connect_read_only(path, driver=driver, busy_timeout=busy_timeout)
    except StorageError as refused:
        if refused.fault != "cannot_open" or not await anyio.to_thread.run_sync(
            _read_only_medium, path
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
