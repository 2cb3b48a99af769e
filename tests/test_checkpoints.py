"""WAL checkpoints off the commit path (storage/sqlite/checkpoints.py): the write
connection leaves the copying to the checkpoint thread and checkpoints itself only at the
backstop, the WAL stays bounded while commits keep coming, a reader holding a snapshot
delays the WAL's restart only until it ends, and a clean close still leaves no WAL.

All at ``synchronous=NORMAL``, where the thread runs; at ``FULL`` (the default) SQLite
checkpoints in the commit, as ever (the last test). Sizes are read from the WAL file:
SQLite reuses it from the start once a checkpoint has copied it all, so its size is the
most frames it ever held at once (its high-water mark).
Each commit here writes one row of about a page and a half (two leaf pages and their
parent: a few frames), so "frames" below are counted, not timed.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import anyio
import pytest

from hive_orchestration import RuntimeConfig
from hive_orchestration.storage.port import Driver
from hive_orchestration.storage.sqlite import checkpoints
from hive_orchestration.storage.sqlite.store import SqliteStore

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.sqlite_only("the WAL and its checkpoints are SQLite's, on a file"),
]

#: A failure detector, not a measurement.
DEADLINE = 20.0
PAGE = 4096
ROW = "x" * 6000  # more than a page: each commit writes several frames


@pytest.fixture
def path(db_path: str) -> str:
    Path(db_path).parent.mkdir(parents=True, exist_ok=True)
    return db_path


def wal_frames(path: str) -> int:
    """The most frames the WAL ever held at once (its file's size)."""
    try:
        size = os.path.getsize(f"{path}-wal")
    except FileNotFoundError:
        return 0
    return max(0, (size - 32) // (PAGE + 24))


def wal_left(path: str) -> bool:
    return os.path.exists(f"{path}-wal")


def wal_round(path: str) -> bytes:
    """The WAL header's checkpoint sequence and salts: SQLite writes new ones each time
    the WAL starts over from its first frame, and only then."""
    with open(f"{path}-wal", "rb") as wal:
        return wal.read(24)[12:24]


async def open_db(path: str) -> tuple[SqliteStore, Driver]:
    # The thread runs at NORMAL only (checkpoints.off_the_commit_path).
    store = SqliteStore(path, RuntimeConfig(storage_driver="thread", synchronous="NORMAL"))
    db, _ = await store.open()
    await db.transaction([("CREATE TABLE IF NOT EXISTS blob (id INTEGER PRIMARY KEY, v)", ())])
    return store, db


async def commit_rows(db: Driver, count: int) -> None:
    for _ in range(count):
        await db.transaction([("INSERT INTO blob (v) VALUES (?)", (ROW,))])


def checkpointer(db: Driver) -> checkpoints.Checkpointer:
    found = getattr(db, "checkpointer", None)
    assert isinstance(found, checkpoints.Checkpointer)
    return found


async def test_the_write_connection_checkpoints_only_at_the_backstop(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The thread does nothing here: what the WAL reaches is the write connection's doing.
    monkeypatch.setattr(checkpoints.Checkpointer, "start", lambda self: None)
    monkeypatch.setattr(checkpoints, "BACKSTOP_PAGES", 2000)
    _, db = await open_db(path)
    try:
        assert await db.fetchall("PRAGMA wal_autocheckpoint") == [(2000,)]
        await commit_rows(db, 1200)  # about 3 600 frames
        high = wal_frames(path)
    finally:
        await db.close()
    # SQLite's own default would have started the WAL over at 1 000 frames; the
    # backstop let it reach 2 000 (and a commit's frames past it), and no further.
    assert 1500 < high <= 2000 + 10


async def test_the_thread_copies_the_wal_while_commits_go_on(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoints, "PAGES", 50)
    monkeypatch.setattr(checkpoints, "MIN_GAP", 0.0)
    _, db = await open_db(path)
    try:
        await commit_rows(db, 300)  # about 900 frames
        thread = checkpointer(db)
        with anyio.fail_after(DEADLINE):
            while thread.statistics().pages_copied < 800:
                await commit_rows(db, 1)
                await anyio.sleep(0.01)
        assert thread.statistics().failures == 0
        rows = await db.fetchall("SELECT count(*) FROM blob")
    finally:
        await db.close()
    assert rows[0][0] >= 300
    assert not wal_left(path)  # the writer's close was the last: it removed the WAL


async def test_the_wal_stays_bounded_while_commits_keep_coming(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A passive checkpoint seldom finds the WAL all copied while commits land during it:
    # the backstop starts it over.
    monkeypatch.setattr(checkpoints, "PAGES", 20)
    monkeypatch.setattr(checkpoints, "MIN_GAP", 0.0)
    monkeypatch.setattr(checkpoints, "BACKSTOP_PAGES", 200)
    _, db = await open_db(path)
    try:
        await commit_rows(db, 3000)  # about 9 000 frames, back to back
        high = wal_frames(path)
        copied = checkpointer(db).statistics().pages_copied
    finally:
        await db.close()
    # The backstop is skipped while the thread's checkpoint holds SQLite's checkpoint
    # lock, so the WAL may pass it by what commits write meanwhile (a slow fsync on a
    # loaded machine): bounded, not exact.
    assert high <= 4 * 200
    assert copied > 0


async def test_a_reader_holding_a_snapshot_delays_the_restart_until_it_ends(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoints, "PAGES", 20)
    monkeypatch.setattr(checkpoints, "MIN_GAP", 0.0)
    monkeypatch.setattr(checkpoints, "BACKSTOP_PAGES", 200)
    _, db = await open_db(path)
    reader = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        await commit_rows(db, 10)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM blob").fetchall()  # holds its snapshot
        await commit_rows(db, 300)
        held = wal_frames(path)
        round_held = wal_round(path)
        # No checkpoint may copy past the reader's snapshot: the WAL cannot start over.
        assert held > 200 + 10
        assert reader.execute("SELECT count(*) FROM blob").fetchall() == [(10,)]
        reader.execute("COMMIT")
        # Once a checkpoint has copied what the reader held back, the next commit starts
        # the WAL over. Which checkpoint is a race: the writer's backstop in the next
        # commit, or the thread's, and commits go on while the thread copies those ~1 000
        # pages (3-10 ms: 6-12 commits seen, load ~4), so how many land first is not
        # counted here, only that it starts over before 300 commits could double it.
        for _ in range(300):
            await commit_rows(db, 1)
            if wal_round(path) != round_held:
                break
        restarted = wal_frames(path)
        assert wal_round(path) != round_held, "the WAL never started over"
        # Started over, it is reused from its first frame: 300 more commits (about
        # 900 frames, fewer than it holds) do not make it grow.
        await commit_rows(db, 300)
        after = wal_frames(path)
    finally:
        reader.close()
        await db.close()
    assert after == restarted


async def test_at_full_sqlite_checkpoints_in_the_commit_as_before(path: str) -> None:
    store = SqliteStore(path, RuntimeConfig(storage_driver="thread", synchronous="FULL"))
    db, _ = await store.open()
    try:
        assert getattr(db, "checkpointer", None) is None
        assert await db.fetchall("PRAGMA wal_autocheckpoint") == [(1000,)]
    finally:
        await db.close()
