"""The runtime's hold on its database for its whole life (:class:`DatabaseClaim`): the
exclusive lock on ``<file>.lock``, or the keeper connection of a memory database, and the
records in the lock file (the owner's pid and the address it serves on) that clients of
other processes read (:func:`read_owner`).

Separate from opening the database (:mod:`.database`): the claim is taken once and held
across restarts of the storage actor, which opens and closes connections under it.
"""

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

from ...errors import StorageError
from ..port import STARTING
from .files import MEMORY, check_lock_file, prepare_path, unsafe_lock, unwritable

__all__ = ["DatabaseClaim", "Target", "read_owner"]

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
                raise unsafe_lock(self._path, lock_path, "is a symbolic link") from None
            raise unwritable(self._path, f"its lock file {lock_path!r}", exc) from exc
        try:
            check_lock_file(self._path, lock_path, os.fstat(fd))
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
