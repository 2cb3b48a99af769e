"""Where a runtime serves its message API on this machine, and how a client finds it.

The socket lives in a folder of the owner's alone (mode 0700), beside the database:
``<database>.hive/socket`` (mode 0600), the database's path resolved through symlinks, so
that every name of one file finds one socket. A path too long for a Unix socket address
(``sun_path``, 107 bytes) falls back to ``$XDG_RUNTIME_DIR/hive-<hash>.socket`` (that
folder is the user's own by its specification), then to an abstract socket
``hive-<uid>-<hash>`` (Linux; no file at all, so only the peer check guards it).

Whatever was chosen is recorded in the database's lock file (beside the owner's pid), so a
client never has to guess: it reads the record, connects, and the server checks that the
peer runs as the owner's user (``SO_PEERCRED``) before it reads a byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import stat
import struct
import sys

from ..errors import StorageError
from ..storage.port import store_kind

__all__ = [
    "ABSTRACT",
    "UNIX",
    "choose_address",
    "connect_path",
    "peer_pid",
    "peer_uid",
    "remove_address",
]

UNIX = "unix:"
ABSTRACT = "abstract:"
#: Longest path a Unix socket address holds (``sun_path`` is 108 bytes with its NUL).
_SUN_PATH = 107


def choose_address(db_path: str) -> str:
    """A fresh address to listen on for the database at ``db_path`` (its folder made if
    needed), as recorded in the lock file: ``unix:<path>`` or ``abstract:<name>``."""
    if store_kind(db_path) == "postgres":
        # A server's database has no folder to put the socket beside (a URL taken as a
        # path would make folders named "postgresql:" in the working directory): the
        # runtime folder or an abstract name, recorded in the database for its clients.
        # Several runtimes (nodes) may serve one database from one machine, even from
        # one process: each gets a name of its own (clients read it, never guess it).
        real = f"{db_path}#{os.urandom(8).hex()}"
    else:
        real = os.path.realpath(db_path)
        beside = f"{real}.hive"
        path = os.path.join(beside, "socket")
        if len(os.fsencode(path)) <= _SUN_PATH and _private_folder(beside):
            return UNIX + path
    digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:32]
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir:
        path = os.path.join(runtime_dir, f"hive-{digest}.socket")
        if len(os.fsencode(path)) <= _SUN_PATH and _owned_private(runtime_dir):
            return UNIX + path
    if sys.platform.startswith("linux"):
        return ABSTRACT + f"hive-{os.geteuid()}-{digest}"
    raise _no_place(db_path, real)


def _no_place(db_path: str, real: str) -> StorageError:
    if store_kind(db_path) == "postgres":
        where = "a PostgreSQL database has no folder to hold it"
    else:
        where = f"{os.path.join(real + '.hive', 'socket')!r} is too long for a Unix socket"
    return StorageError(
        f"no place for the socket of database {db_path!r}: {where} and $XDG_RUNTIME_DIR is"
        " not set; use a shorter path, set XDG_RUNTIME_DIR, or turn the socket off"
        " (RuntimeConfig.serve_socket=False)",
        path=db_path,
    )


def connect_path(address: str) -> str:
    """What to pass to ``connect_unix`` for a recorded address."""
    if address.startswith(UNIX):
        return address[len(UNIX) :]
    if address.startswith(ABSTRACT):
        return "\0" + address[len(ABSTRACT) :]
    raise ValueError(f"not an address this runtime records: {address!r}")


def remove_address(address: str) -> None:
    """Remove a listening socket's file (an abstract socket has none), and its folder
    beside the database if nothing else is in it."""
    if address.startswith(UNIX):
        path = address[len(UNIX) :]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        folder = os.path.dirname(path)
        if folder.endswith(".hive"):
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def peer_uid(sock: socket.socket) -> int | None:
    """The user id of the process at the other end of a Unix socket (Linux), or None
    where the system does not say."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:  # pragma: no cover - not Linux
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


def peer_pid(sock: socket.socket) -> int | None:
    """The process at the other end of a Unix socket (Linux), or None where the system
    does not say (another platform, a socket of another family)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:  # pragma: no cover - not Linux
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    except OSError:
        return None
    pid, _uid, _gid = struct.unpack("3i", raw)
    return int(pid) or None


def _private_folder(folder: str) -> bool:
    """Make ``folder`` (0700) if missing; True if it is a folder of this user's alone."""
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    return _owned_private(folder, fix=True)


def _owned_private(folder: str, *, fix: bool = False) -> bool:
    try:
        found = os.lstat(folder)
    except OSError:
        return False
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.geteuid():
        return False
    if found.st_mode & 0o077:
        if not fix:
            return False
        try:
            os.chmod(folder, 0o700)  # ours, made by an earlier runtime under a loose umask
        except OSError:
            return False
    return True
