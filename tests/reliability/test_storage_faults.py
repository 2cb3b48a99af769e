"""Storage faults: a read-only, damaged, full or locked database, on real SQLite files.

The behaviour chosen for each (docs/delivery.md); every refusal is a
:class:`StorageError` whose message names the file, the cause and what to do, with
``fault`` saying which, and nothing half-written is ever visible:

- **Read-only** (the file, its folder or its filesystem): ``Runtime.open`` refuses it
  (``fault == "read_only"``) before SQLite touches it, since a runtime that cannot write
  cannot run; the inspector still reads it, on a read-only mount too.
- **Damaged** (garbage, truncated, damaged pages): refused at open (``"corrupt"``) when
  the damage is in what the open reads (the schema, the live tasks and runs, the end of
  the log), and the file is left exactly as it was. Damage elsewhere fails the reads and
  writes that reach it, with the same error, while the rest keeps working.
- **Full** (a small tmpfs filled up; a file size limit in a child process): each write
  fails whole (``"disk_full"`` or ``"io_error"``) within its own time, reads go on, the
  runtime stays up, and writes succeed again once there is room; every acknowledged
  write is there after reopening and no refused one is.
- **Locked by another process** (a plain sqlite3 connection in a child process): a write
  waits up to ``busy_timeout`` for the lock, succeeds if it is released by then and fails
  whole (``"locked"``) if not; reads go on meanwhile. ``Runtime.open`` against a file
  held exclusively fails the same way after ``busy_timeout``.

Mounting the tmpfs and the immutable flag need root; without it those tests use
``chmod`` or are skipped, saying so.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from hive_orchestration import Runtime, RuntimeConfig, StorageError, Task, TaskStatus
from hive_orchestration.inspector import Inspector

from ._audit import audit_tasks, read_log
from ._children import child

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.sqlite_only(
        "faults of a SQLite file: read-only media, damaged pages, a full disk, file locks"
    ),
]

ROOT = os.geteuid() == 0


# -- helpers ------------------------------------------------------------------------------


async def populate(path: str | Path, count: int, blob: int = 0) -> set[str]:
    """Create ``count`` tasks at once (a few group commits); returns their ids."""
    created: set[str] = set()
    async with Runtime.open(path) as runtime:
        client = runtime.client(source_agent="populate")

        async def create(n: int) -> None:
            created.add(await client.create_task("job", {"n": n, "blob": "x" * blob}))

        async with anyio.create_task_group() as tg:
            for n in range(count):
                tg.start_soon(create, n)
    return created


async def audited(path: str | Path) -> dict[str, Task]:
    """Reopen the database and check its tasks against its log; returns the tasks."""
    async with Runtime.open(path) as runtime:
        client = runtime.client()
        _, tasks, _, problems = await audit_tasks(client, await read_log(client))
    assert not problems, "\n".join(problems)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    return tasks


def exists(path: str | Path) -> bool:
    return Path(path).exists()


def digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_error(error: StorageError, path: str | Path, fault: str, *words: str) -> None:
    """The error names the file, says the fault and says what to do."""
    message = str(error)
    assert error.fault == fault, message
    assert error.path == str(path), message
    assert repr(str(path)) in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@contextlib.contextmanager
def write_protected(target: Path) -> Iterator[None]:
    """Make ``target`` (a file or a folder) unwritable, even for root: the immutable flag
    as root (root ignores permissions), the permission bits otherwise."""
    if not ROOT:
        mode = target.stat().st_mode
        target.chmod(0o555 if target.is_dir() else 0o444)
        try:
            yield
        finally:
            target.chmod(mode)
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root, where only `chattr +i` makes a file read-only: no chattr")
    done = subprocess.run(["chattr", "+i", str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"running as root and `chattr +i` is refused here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(target)], check=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for the test (root only), unmounted afterwards."""
    if not ROOT:
        pytest.skip("mounting a small tmpfs needs root (the file size limit test runs anyway)")
    point = tmp_path / "disk"
    point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(point)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=True)


def remount(point: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(point)], check=True)


def fill(folder: Path) -> Path:
    """Fill the filesystem of ``folder`` to the last byte; returns the filler file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
        with pytest.raises(OSError, match="No space left") as caught:  # full indeed
            os.write(fd, b"\0")
        assert caught.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


async def refused(path: str | Path, config: RuntimeConfig | None = None) -> StorageError:
    """Open ``path``: it must be refused with a StorageError, without hanging."""
    with anyio.fail_after(20), pytest.raises(StorageError) as caught:
        async with Runtime.open(path, config=config):
            pytest.fail(f"opened {path}")
    return caught.value


# -- read-only ----------------------------------------------------------------------------


async def test_a_read_only_file_is_refused_at_open_and_can_still_be_read(
    db_path: str, anyio_backend: str
) -> None:
    created = await populate(db_path, 10)
    before = digest(db_path)
    with write_protected(Path(db_path)):
        error = await refused(db_path)
        check_error(error, db_path, "read_only", "the file cannot be written", "inspector")
        # Refused before SQLite opened it: nothing was written, not even a -wal beside it.
        assert digest(db_path) == before
        assert not exists(f"{db_path}-wal")
        async with Inspector.open(db_path) as inspector:
            assert await inspector.task_counts() == {"queued": 10}
    assert set(await audited(db_path)) == created  # writable again: opens as usual


async def test_a_read_only_folder_is_refused_at_open_and_can_still_be_read(
    db_path: str, anyio_backend: str
) -> None:
    """The file is writable, but SQLite could not create its -wal beside it."""
    created = await populate(db_path, 5)
    folder = Path(db_path).parent
    with write_protected(folder):
        error = await refused(db_path)
        check_error(error, db_path, "read_only", "its folder", "-wal")
        async with Inspector.open(db_path) as inspector:
            assert await inspector.task_counts() == {"queued": 5}
    assert set(await audited(db_path)) == created


async def test_a_read_only_filesystem_is_refused_and_can_still_be_inspected(
    small_disk: Path, anyio_backend: str
) -> None:
    path = small_disk / "hive.db"
    created = await populate(path, 5)
    before = digest(path)
    remount(small_disk, "ro")
    try:
        check_error(await refused(path), path, "read_only", "lock file", "Read-only file system")
        new = small_disk / "new.db"
        check_error(await refused(new), new, "read_only", "cannot create")
        # No -shm can be made on a read-only mount: the inspector reads the file immutable.
        async with Inspector.open(path) as inspector:
            assert {task.id for task in await inspector.tasks(limit=100)} == created
        assert digest(path) == before
        assert sorted(os.listdir(small_disk)) == ["hive.db", "hive.db.lock"]
    finally:
        remount(small_disk, "rw")
    assert set(await audited(path)) == created


# -- damaged files ------------------------------------------------------------------------


def page_of(path: str, name: str) -> tuple[int, int]:
    """The byte offset and size of the root page of the table or index ``name``."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (name,))
        (size,) = conn.execute("PRAGMA page_size").fetchone()
    return (root[0] - 1) * size, size


def damage(path: str, how: str) -> None:
    data = bytearray(Path(path).read_bytes())
    if how == "garbage":
        data = bytearray(os.urandom(len(data)))
    elif how == "truncated":
        data = data[: len(data) // 2]
    else:  # a valid header, the page the open reads tasks from overwritten
        offset, size = page_of(path, "tasks")
        data[offset : offset + size] = os.urandom(size)
    Path(path).write_bytes(data)


def overwrite(path: str, offset: int, size: int) -> None:
    with Path(path).open("r+b") as file:
        file.seek(offset)
        file.write(os.urandom(size))


@pytest.mark.parametrize("how", ["garbage", "truncated", "tasks page"])
async def test_a_damaged_file_is_refused_at_open_and_left_as_it_is(
    db_path: str, how: str, anyio_backend: str
) -> None:
    await populate(db_path, 60, blob=1000)
    damage(db_path, how)
    before = digest(db_path)
    started = time.monotonic()
    error = await refused(db_path)
    assert time.monotonic() - started < 5, "refused at once, not after restarts or waits"
    check_error(error, db_path, "corrupt", "is damaged", "backup", ".recover")
    assert digest(db_path) == before
    if how != "tasks page":  # (the inspector counts tasks by an index, which is whole)
        with pytest.raises(StorageError) as caught:
            async with Inspector.open(db_path):
                pytest.fail("inspected a damaged file")
        check_error(caught.value, db_path, "corrupt", "is damaged")
    assert digest(db_path) == before


async def test_damage_only_writes_reach_fails_those_writes_and_reads_go_on(
    db_path: str, anyio_backend: str
) -> None:
    """The index of task ids is damaged: the open and the reads do not use it, so the
    runtime opens; every create needs it, so each fails whole, and nothing is written."""
    created = await populate(db_path, 60, blob=1000)
    overwrite(db_path, *page_of(db_path, "sqlite_autoindex_tasks_1"))
    before = digest(db_path)
    async with Runtime.open(db_path) as runtime:
        client = runtime.client()
        for _ in range(2):
            with anyio.fail_after(10), pytest.raises(StorageError) as caught:
                await client.create_task("job", {"n": -1})
            check_error(caught.value, db_path, "corrupt", "write rolled back", "backup")
            queued = await client.get_tasks_by_status(TaskStatus.QUEUED)
            assert {task.id for task in queued} == created
            assert len(await client.read_events(0, limit=1000)) == len(created)
    assert digest(db_path) == before


# -- full disk ----------------------------------------------------------------------------


async def test_a_full_disk_fails_each_write_whole_and_loses_nothing(
    small_disk: Path, anyio_backend: str
) -> None:
    path = small_disk / "hive.db"
    acked: list[str] = []
    async with Runtime.open(path) as runtime:
        client = runtime.client()
        acked += [await client.create_task("job", {"n": n}) for n in range(20)]
        filler = fill(small_disk)
        # Large writes: each commit spans many pages, so the disk fills in the middle.
        for n in range(5):
            with anyio.fail_after(10), pytest.raises(StorageError) as caught:
                await client.create_task("job", {"n": 100 + n, "blob": "x" * 50_000})
            check_error(caught.value, path, "disk_full", "write rolled back", "free space")
        with pytest.raises(StorageError) as caught:
            await runtime.publish("note", {"blob": "y" * 50_000})
        check_error(caught.value, path, "disk_full")
        # Reads go on, and see no trace of the refused writes.
        queued = await client.get_tasks_by_status(TaskStatus.QUEUED)
        assert [task.id for task in queued] == acked
        assert len(await client.read_events(0, limit=1000)) == len(acked)
        # Room again: writes succeed again, the runtime never stopped.
        filler.unlink()
        acked.append(await client.create_task("job", {"n": 200, "blob": "z" * 50_000}))
        # Full again as it closes (its checkpoint cannot grow the file): it closes anyway.
        fill(small_disk)
    fill(small_disk)  # and the page its lock file's pid held, freed as it closed
    with anyio.fail_after(20), pytest.raises(StorageError) as caught:
        async with Runtime.open(small_disk / "new.db"):
            pytest.fail("created a database on a full disk")
    check_error(caught.value, small_disk / "new.db", "disk_full", "free space")
    # Reopened while the disk is still full (its last commits only in the -wal, no room
    # even for the pid in the lock file): it opens, reads everything, refuses to write.
    async with Runtime.open(path) as runtime:
        client = runtime.client()
        queued = await client.get_tasks_by_status(TaskStatus.QUEUED)
        assert [task.id for task in queued] == acked
        with anyio.fail_after(10), pytest.raises(StorageError) as caught:
            await client.create_task("job", {"n": 300, "blob": "x" * 50_000})
        check_error(caught.value, path, "disk_full")
    (small_disk / "filler").unlink()
    assert list((await audited(path)).keys()) == acked  # no more, no less


async def test_a_file_size_limit_fails_each_write_whole_and_loses_nothing(
    new_db_path: str, tmp_path: Path, anyio_backend: str
) -> None:
    """The unprivileged full disk: RLIMIT_FSIZE in a child process caps every file."""
    Path(new_db_path).parent.mkdir(parents=True)
    acked: list[str] = []
    refusals: list[dict[str, str]] = []
    async with child(
        "fsize", anyio_backend, new_db_path, str(1 << 19), stderr_path=tmp_path / "err"
    ) as limited:
        while (line := await limited.line()) is not None:
            if "ack" in line:
                acked.append(line["ack"])
            elif "refused" in line:
                refusals.append(line)
            elif "read" in line:
                # Reads still work in the limited process, and see every acked task.
                assert line["read"] == len(acked), line
            else:
                assert line == {"closed": True}, line
        assert await limited.finish() == 0, limited.stderr()
    assert len(refusals) == 3, refusals
    assert len(acked) >= 5, acked
    for refusal in refusals:
        assert refusal["refused"] in {"disk_full", "io_error"}, refusal
        assert refusal["path"] == new_db_path, refusal
        assert "rolled back" in refusal["message"], refusal
    assert list((await audited(new_db_path)).keys()) == acked


# -- locked by another process ------------------------------------------------------------


async def test_a_write_lock_held_by_another_process(
    db_path: str, tmp_path: Path, anyio_backend: str
) -> None:
    """Writes wait for it up to busy_timeout, then fail whole; reads go on meanwhile."""
    acked = await populate(db_path, 5)
    quick = RuntimeConfig(busy_timeout=0.3)
    late: list[str] = []
    async with child("lock", db_path, "write", stderr_path=tmp_path / "err") as locker:
        await locker.expect("locked")
        async with Runtime.open(db_path, config=quick) as runtime:
            client = runtime.client()
            for _ in range(2):
                started = time.monotonic()
                with anyio.fail_after(10), pytest.raises(StorageError) as caught:
                    await client.create_task("job", {"n": -1})
                assert time.monotonic() - started >= 0.25, "failed before busy_timeout"
                check_error(caught.value, db_path, "locked", "busy_timeout (0.3s)", "fuser")
                queued = await client.get_tasks_by_status(TaskStatus.QUEUED)
                assert {task.id for task in queued} == acked
                assert len(await client.read_events(0, limit=100)) == len(acked)
        assert await locker.finish() == 0

    patient = RuntimeConfig(busy_timeout=10.0)
    async with child("lock", db_path, "write", stderr_path=tmp_path / "err2") as locker:
        await locker.expect("locked")
        async with Runtime.open(db_path, config=patient) as runtime:
            client = runtime.client()
            async with anyio.create_task_group() as tg:

                async def create() -> None:
                    late.append(await client.create_task("job", {"n": 5}))

                tg.start_soon(create)
                await anyio.sleep(0.2)
                assert not late, "wrote while another process held the lock"
                assert await locker.finish() == 0  # releases it: the waiting write goes on
    assert len(late) == 1
    assert set(await audited(db_path)) == acked | set(late)


async def test_opening_a_file_another_process_holds_exclusively(
    db_path: str, tmp_path: Path, anyio_backend: str
) -> None:
    created = await populate(db_path, 3)
    async with child("lock", db_path, "exclusive", stderr_path=tmp_path / "err") as locker:
        await locker.expect("locked")
        started = time.monotonic()
        error = await refused(db_path, RuntimeConfig(busy_timeout=0.3))
        assert time.monotonic() - started >= 0.25
        check_error(error, db_path, "locked", "busy_timeout (0.3s)")
        assert await locker.finish() == 0
    assert set(await audited(db_path)) == created


# -- the messages -------------------------------------------------------------------------


def error_of(tmp_path: Path, fault: str) -> sqlite3.Error:
    """A real error of SQLite's for ``fault`` (but "io_error", which needs a failing disk)."""
    path = tmp_path / f"{fault}.db"
    if fault == "io_error":
        error = sqlite3.OperationalError("disk I/O error")
        error.sqlite_errorcode = 778  # SQLITE_IOERR_WRITE
        return error
    if fault == "cannot_open":
        with pytest.raises(sqlite3.Error) as caught:
            sqlite3.connect(tmp_path / "no-such-folder" / "x.db")
        return caught.value
    if fault == "corrupt":
        path.write_bytes(b"not a database at all" * 500)
    else:
        with contextlib.closing(sqlite3.connect(path)) as setup:
            setup.execute("CREATE TABLE t (x)")
    with contextlib.ExitStack() as stack:
        conn = stack.enter_context(contextlib.closing(sqlite3.connect(path, timeout=0)))
        sql = "INSERT INTO t VALUES (zeroblob(100000))"
        if fault == "locked":
            holder = stack.enter_context(contextlib.closing(sqlite3.connect(path)))
            holder.execute("BEGIN IMMEDIATE")
        elif fault == "read_only":
            conn.close()
            conn = stack.enter_context(
                contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True))
            )
        elif fault == "disk_full":
            conn.execute("PRAGMA max_page_count = 2")  # the file may not grow
        elif fault == "corrupt":
            sql = "SELECT * FROM sqlite_master"
        with pytest.raises(sqlite3.Error) as caught:
            conn.execute(sql)
        return caught.value
    raise AssertionError("unreachable")


@pytest.mark.parametrize(
    ("fault", "remedy"),
    [
        ("locked", "retry later"),
        ("read_only", "make them writable"),
        ("disk_full", "free space"),
        ("io_error", "check the disk"),
        ("corrupt", "Restore it from a backup"),
        ("cannot_open", "check that the file and its folder exist"),
    ],
)
def test_each_sqlite_fault_is_told_with_the_file_and_what_to_do(
    tmp_path: Path, fault: str, remedy: str
) -> None:
    from hive_orchestration.storage.sqlite.faults import storage_error

    cause = error_of(tmp_path, fault)
    error = storage_error("/data/hive.db", cause, action="cannot read", busy_timeout=2.5)
    check_error(error, "/data/hive.db", fault, "cannot read: database '/data/hive.db'", remedy)
    assert str(cause) in str(error)  # SQLite's own words are kept
    assert error.__cause__ is cause
    if fault == "locked":
        assert "busy_timeout (2.5s)" in str(error)


def test_any_other_sqlite_error_is_passed_on_with_the_file() -> None:
    from hive_orchestration.storage.sqlite.faults import storage_error

    cause = sqlite3.IntegrityError("UNIQUE constraint failed: tasks.id")
    error = storage_error("/data/hive.db", cause, action="write rolled back")
    assert error.fault is None
    assert str(error) == (
        "write rolled back: database '/data/hive.db' refused it: UNIQUE constraint failed: tasks.id"
    )
