"""Which files the runtime may open as its database, and creating them safely: refusing
what is not a regular file, a link it cannot trust, a lock file that could be another
file, or a file or folder it cannot write, with an error that says what to do; creating
missing folders (0700) and the file (0600); the read-only URI of a file.

Separate from opening (:mod:`.database`) and from the claim (:mod:`.claim`): these are the
file-system checks both rely on, done before SQLite sees the path.
"""

from __future__ import annotations

import errno
import os
import shlex
import stat
from pathlib import Path

from ...errors import StorageError, StorageFault

__all__ = [
    "MEMORY",
    "check_existing",
    "check_file",
    "check_lock_file",
    "check_writable",
    "prepare_path",
    "read_only_medium",
    "read_only_uri",
    "unsafe_lock",
    "unwritable",
]

MEMORY = ":memory:"


def check_lock_file(path: str, lock_path: str, found: os.stat_result) -> None:
    """Refuse a lock file the runtime could be tricked into writing another file through:
    not a regular file, a second name (hard link) of some file, or another user's file."""
    if not stat.S_ISREG(found.st_mode):
        raise unsafe_lock(path, lock_path, f"is {_kind(found)}, not a regular file")
    if found.st_nlink != 1:
        raise unsafe_lock(
            path, lock_path, f"has {found.st_nlink} names (hard links), so it is another file too"
        )
    if found.st_uid != os.geteuid():
        raise unsafe_lock(path, lock_path, f"belongs to another user (uid {found.st_uid})")


def unsafe_lock(path: str, lock_path: str, why: str) -> StorageError:
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


def unwritable(path: str, what: str, exc: OSError | None) -> StorageError:
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
        raise unwritable(path, "the file", exc) from exc
    os.close(fd)
    folder = Path(path).absolute().parent
    companions = (Path(f"{path}-wal"), Path(f"{path}-shm"))
    if not all(file.exists() for file in companions) and not _can_write(folder):
        raise unwritable(
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
    ``-shm``: only for a file on a medium nobody can write (see :func:`read_only_medium`).
    """
    return f"{Path(path).absolute().as_uri()}?mode=ro{'&immutable=1' if immutable else ''}"


def read_only_medium(path: str) -> bool:
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


def check_file(path: str) -> None:
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
