"""What lies at the database's path, and beside it: the lock file, the folders the runtime
creates, links, files that are not regular files, and a write a killed program left.

Another local user may plant a file where the runtime will write (a link at ``<db>.lock``
to a file of the runtime's user, a link at the database to someone else's file); the
runtime never writes through such a file: it refuses it with a :class:`StorageError`
saying what it found and what to do, and leaves the file as it was. The folders it
creates are its owner's alone (0700, whatever the umask), so that nobody can plant files
there in the first place.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from hive_orchestration import SCHEMA_VERSION, Runtime, StorageError
from hive_orchestration.cli import main
from hive_orchestration.inspector import Inspector

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.sqlite_only("the database file, its lock file, its folders and links"),
]

ROOT = os.geteuid() == 0
#: A user that is not this one (``nobody`` on most systems); files are given to it with
#: ``os.chown``, which needs root.
OTHER_UID = 65534
needs_root = pytest.mark.skipif(not ROOT, reason="giving a file to another user needs root")

VICTIM = b"a file of this user's that nobody should write\n" * 20


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def refused(path: Path | str, *words: str) -> StorageError:
    """Open a runtime on ``path``: it must be refused at once with a StorageError naming
    the path and saying each of ``words``."""
    with anyio.fail_after(10), pytest.raises(StorageError) as caught:  # a refusal, not a hang
        async with Runtime.open(path):
            pytest.fail(f"a runtime opened {path}")
    message = str(caught.value)
    assert caught.value.path == str(path), message
    assert repr(str(path)) in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return caught.value


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def lock_of(db: Path) -> Path:
    return db.with_name(f"{db.name}.lock")


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# -- the lock file -----------------------------------------------------------------------


async def test_a_lock_symlink_to_a_victim_file_is_refused_and_the_file_left_intact(
    tmp_path: Path,
) -> None:
    """Before: the lock was opened through the link, and the pid written and then
    truncated away, leaving the victim empty."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM)
    db = tmp_path / "hive.db"
    lock_of(db).symlink_to(victim)
    error = await refused(db, "lock file", "is a symbolic link", "remove")
    assert error.fault == "cannot_open"
    assert victim.read_bytes() == VICTIM
    assert lock_of(db).is_symlink()  # left for its owner to look at
    # A dangling link (to where a file would be created) is refused the same way.
    lock_of(db).unlink()
    lock_of(db).symlink_to(tmp_path / "would-be-created")
    await refused(db, "is a symbolic link")
    assert not (tmp_path / "would-be-created").exists()


async def test_a_lock_hard_link_to_a_victim_file_is_refused_and_the_file_left_intact(
    tmp_path: Path,
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM)
    db = tmp_path / "hive.db"
    os.link(victim, f"{db}.lock")
    await refused(db, "has 2 names (hard links)")
    assert victim.read_bytes() == VICTIM


async def test_a_lock_that_is_not_a_regular_file_is_refused_without_hanging(
    tmp_path: Path,
) -> None:
    db = tmp_path / "hive.db"
    os.mkfifo(f"{db}.lock")
    await refused(db, "is a FIFO (named pipe), not a regular file")


@needs_root
async def test_a_lock_file_of_another_user_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "hive.db"
    lock = lock_of(db)
    lock.write_bytes(b"")
    os.chown(lock, OTHER_UID, OTHER_UID)
    await refused(db, f"belongs to another user (uid {OTHER_UID})")
    assert lock.read_bytes() == b""


async def test_the_lock_file_is_overwritten_in_place_never_truncated(tmp_path: Path) -> None:
    """The pid is a fixed-width record written over what was there; the next opener
    reads the owner's pid, and an empty record once it closed."""
    db = tmp_path / "hive.db"
    lock = lock_of(db)
    async with Runtime.open(db):
        # The pid, then where the runtime serves its socket (read by other processes).
        pid, address = lock.read_text().split()
        assert pid == str(os.getpid())
        assert address.startswith("unix:")
        inode = lock.stat().st_ino
        with pytest.raises(StorageError, match=f"pid {os.getpid()}, this process"):
            async with Runtime.open(db):
                pytest.fail("two runtimes own one database")
    assert lock.read_text().strip() == ""
    assert lock.stat().st_ino == inode
    assert mode(lock) == 0o600


# -- the folders -------------------------------------------------------------------------


async def test_created_folders_are_private_even_under_umask_000(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "a" / "b" / "hive.db"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HIVE_ORCHESTRATION_DB_PATH", raising=False)
    with umask(0o000):
        async with Runtime.open(db) as runtime:
            await runtime.publish("made.here")
        async with Runtime.open() as runtime:  # the default: hive/db/hive-internal.db
            await runtime.publish("made.here")
    for folder in ("a", "a/b", "hive", "hive/db"):
        assert mode(tmp_path / folder) == 0o700, folder
    for file in (db, tmp_path / "hive" / "db" / "hive-internal.db"):
        assert mode(file) == 0o600
        assert mode(Path(f"{file}.lock")) == 0o600


async def test_created_folders_are_usable_even_under_umask_077_or_700(tmp_path: Path) -> None:
    for mask in (0o077, 0o700):
        db = tmp_path / f"umask-{mask:o}" / "hive.db"
        with umask(mask):
            async with Runtime.open(db) as runtime:
                await runtime.publish("made.here")
        assert mode(db.parent) == 0o700


async def test_an_existing_folder_keeps_its_mode(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o750)
    async with Runtime.open(shared / "hive.db") as runtime:
        await runtime.publish("made.here")
    assert mode(shared) == 0o750


# -- the database path -------------------------------------------------------------------


@needs_root
async def test_a_database_symlink_to_another_users_file_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs.db"
    async with Runtime.open(theirs) as runtime:  # a real database, then given away
        await runtime.publish("theirs")
    for file in (theirs, Path(f"{theirs}-wal"), Path(f"{theirs}-shm")):
        if file.exists():
            os.chown(file, OTHER_UID, OTHER_UID)
    lock_of(theirs).unlink()
    before = digest(theirs)
    db = tmp_path / "hive.db"
    db.symlink_to(theirs)
    error = await refused(db, "symbolic link to a file owned by another user", str(OTHER_UID))
    assert error.fault == "cannot_open"
    assert digest(theirs) == before
    assert not lock_of(theirs).exists()  # refused before anything was made there
    # A link another user made, even to a file of this user's, is refused as well.
    mine = tmp_path / "mine.db"
    async with Runtime.open(mine):
        pass
    planted = tmp_path / "planted.db"
    planted.symlink_to(mine)
    os.chown(planted, OTHER_UID, OTHER_UID, follow_symlinks=False)
    await refused(planted, f"symbolic link made by another user (uid {OTHER_UID})")


async def test_a_database_symlink_to_a_file_of_this_user_opens_it(tmp_path: Path) -> None:
    real = tmp_path / "real" / "hive.db"
    async with Runtime.open(real) as runtime:
        await runtime.publish("first")
    link = tmp_path / "link.db"
    link.symlink_to(real)
    async with Runtime.open(link) as runtime:
        assert [e.type for e in await runtime.read_events()] == ["first"]


async def test_a_dangling_database_symlink_is_refused_and_its_target_not_created(
    tmp_path: Path,
) -> None:
    target = tmp_path / "elsewhere.db"
    db = tmp_path / "hive.db"
    db.symlink_to(target)
    await refused(db, "symbolic link", "cannot be reached")
    assert not target.exists()


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "/dev/null", "directory"])
async def test_what_is_not_a_regular_file_is_refused_as_such(tmp_path: Path, kind: str) -> None:
    """Before: "disk I/O error ... check the disk" for a FIFO or a device, and a lock
    file made beside it (``/dev/zero.lock``)."""
    if kind == "fifo":
        path, what = tmp_path / "fifo.db", "a FIFO (named pipe)"
        os.mkfifo(path)
    elif kind == "directory":
        path, what = tmp_path / "folder.db", "a directory"
        path.mkdir()
    else:
        path, what = Path(kind), "a character device"
    lock = lock_of(path)
    lock_was_there = lock.exists()
    try:
        error = await refused(path, f"it is {what}, not a regular file", "name a file")
        assert error.fault == "cannot_open"
        assert "I/O error" not in str(error)
        assert lock.exists() == lock_was_there, "a lock file was made beside it"
        # The read-only side says the same.
        with pytest.raises(StorageError, match=re.escape(f"it is {what}, not a regular file")):
            async with Inspector.open(path):
                pytest.fail(f"inspected {path}")
    finally:
        if lock.exists() and not lock_was_there:
            lock.unlink()


# -- a write a killed program left -------------------------------------------------------

#: Dies by SIGKILL inside a write on a fresh file, before the switch to WAL: with a
#: one-page cache SQLite writes pages to the file mid-transaction, so the rollback
#: journal beside it holds the write to undo (a "hot" journal), as a runtime killed while
#: switching a fresh file to WAL leaves it.
KILLED_MID_WRITE = """
import os, signal, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA cache_size=1")
conn.execute("BEGIN IMMEDIATE")
conn.execute("CREATE TABLE t (x)")
conn.executemany("INSERT INTO t VALUES (?)", [("x" * 500,)] * 200)
os.kill(os.getpid(), signal.SIGKILL)
"""


def killed_mid_write(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # as the runtime does
    os.close(fd)
    child = subprocess.run(
        [sys.executable, "-c", KILLED_MID_WRITE, str(path)], timeout=60, check=False
    )
    assert child.returncode == -signal.SIGKILL
    assert Path(f"{path}-journal").stat().st_size > 0, "no journal left to undo"


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_write_a_killed_program_left_is_told_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: "cannot be written (attempt to write a readonly database): ... its
    filesystem is read-only ... `chattr -i`", from a read-only command on a writable file."""
    db = tmp_path / "hive.db"
    killed_mid_write(db)
    journal = Path(f"{db}-journal").read_bytes()
    for argv in (["db", "current"], ["status", "--json"], ["tasks", "--json"]):
        code, out, err = cli(capsys, *argv, "--db", str(db))
        assert (code, out) == (1, ""), err
        assert "in the middle of a write by a program that was killed" in err, err
        assert f"hive-orchestration db upgrade --db {db}" in err, err
        assert "do not delete" in err, err
        # SQLite's own words stay, in parentheses; the diagnosis is no longer theirs.
        for wrong in ("read-only for this process", "chattr", "make them writable"):
            assert wrong not in err, err
    assert Path(f"{db}-journal").read_bytes() == journal  # the readers left it alone

    code, out, err = cli(capsys, "db", "upgrade", "--db", str(db))
    assert code == 0, err
    assert "recovered from a write a killed program left unfinished" in out
    assert f"schema version {SCHEMA_VERSION}" in out
    code, out, _ = cli(capsys, "db", "current", "--db", str(db))
    assert code == 0
    assert "up to date" in out
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        # The killed write was undone, not half-kept.
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 't'").fetchall() == []


async def test_the_inspector_names_a_write_a_killed_program_left(tmp_path: Path) -> None:
    db = tmp_path / "hive.db"
    killed_mid_write(db)
    with pytest.raises(StorageError) as caught:
        async with Inspector.open(db):
            pytest.fail("read a file with a write to undo")
    assert caught.value.fault == "needs_recovery", caught.value
    # A runtime opens it for writing, which undoes the write.
    async with Runtime.open(db) as runtime:
        assert await runtime.read_events() == []
    async with Inspector.open(db) as inspector:
        assert await inspector.task_counts() == {}
