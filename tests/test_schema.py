"""Opening a database: schema, migrations, pragmas, file permissions and refusals."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest
from _raw import is_postgres, raw_execute, raw_rows

from hive_orchestration import (
    DEFAULT_DB_PATH,
    SCHEMA_VERSION,
    InvalidInputError,
    NewerSchemaError,
    Runtime,
    RuntimeConfig,
    StorageError,
)
from hive_orchestration.messages.events import Event
from hive_orchestration.messages.storage import AppendEvent, ReadEvents
from hive_orchestration.messages.tasks import Run, RunStatus, Task, TaskStatus
from hive_orchestration.storage.rows import (
    run_state_statement,
    run_statement,
    task_state_statement,
    task_statement,
)
from hive_orchestration.storage.sqlite.event_reads import events_sql as _events_sql
from hive_orchestration.storage.sqlite.schema import MIGRATIONS
from hive_orchestration.storage.sqlite.sql import SqliteSql

pytestmark = pytest.mark.anyio

TABLES = {
    "tasks",
    "runs",
    "workers",
    "planning_queue",
    "execution_plans",
    "plan_execution",
    "events",
}
INDEXES = {
    "idx_tasks_status",
    "idx_tasks_priority",
    "idx_runs_task_id",
    "idx_runs_worker_id",
    "idx_workers_status",
    "idx_workers_role",
    "idx_planning_queue_status",
    "idx_execution_plans_status",
    "idx_plan_execution_plan_id",
}
#: The event log's partial indexes, by the field a read filters on (version 1 and 6).
EVENT_INDEXES = {
    "task_id": "idx_events_task_id",
    "correlation_id": "idx_events_correlation_id",
    "plan_id": "idx_events_plan_id",
}


def _names(path: str, kind: str) -> set[str]:
    with closing(sqlite3.connect(path)) as conn:
        rows = conn.execute(
            "SELECT name FROM sqlite_master WHERE type = ? AND name NOT LIKE 'sqlite_%'",
            (kind,),
        ).fetchall()
    return {name for (name,) in rows}


def _pragma(path: str, name: str) -> object:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]


def _mode(path: Path) -> int:
    return os.stat(path).st_mode


def _read(path: Path) -> bytes:
    return path.read_bytes()


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _fingerprint(path: Path) -> tuple[str, int, int]:
    stat = os.stat(path)
    return hashlib.sha256(_read(path)).hexdigest(), stat.st_mtime_ns, stat.st_size


def _sidecars(path: Path) -> list[Path]:
    return [p for p in (Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()]


# -- a fresh database -------------------------------------------------------------------


@pytest.mark.sqlite_only("SQLite's catalogue, PRAGMA user_version and journal_mode")
async def test_fresh_database_has_every_table_and_index(new_db_path: str) -> None:
    assert not Path(new_db_path).parent.exists()
    async with Runtime.open(new_db_path) as runtime:
        stats = await runtime.statistics()
        assert stats.storage.schema_version == SCHEMA_VERSION
        assert stats.storage.last_seq == 0
    assert _names(new_db_path, "table") >= TABLES
    assert _names(new_db_path, "index") >= INDEXES | set(EVENT_INDEXES.values())
    assert _pragma(new_db_path, "user_version") == SCHEMA_VERSION
    assert _pragma(new_db_path, "journal_mode") == "wal"
    with closing(sqlite3.connect(new_db_path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []


@pytest.mark.sqlite_only("SQLite's catalogue (PRAGMA index_info)")
async def test_indexes_cover_the_named_columns(db_path: str) -> None:
    async with Runtime.open(db_path):
        pass
    expected = {
        "idx_tasks_status": ("tasks", ["status"]),
        "idx_tasks_priority": ("tasks", ["priority", "created_at"]),
        "idx_runs_task_id": ("runs", ["task_id"]),
        "idx_runs_worker_id": ("runs", ["worker_id"]),
        "idx_workers_status": ("workers", ["status"]),
        "idx_workers_role": ("workers", ["role"]),
        "idx_planning_queue_status": ("planning_queue", ["status"]),
        "idx_execution_plans_status": ("execution_plans", ["status"]),
        "idx_plan_execution_plan_id": ("plan_execution", ["plan_id"]),
    }
    with closing(sqlite3.connect(db_path)) as conn:
        for index, (table, columns) in expected.items():
            (owner,) = conn.execute(
                "SELECT tbl_name FROM sqlite_master WHERE type = 'index' AND name = ?", (index,)
            ).fetchone()
            assert owner == table, index
            info = conn.execute(f"PRAGMA index_info({index})").fetchall()
            assert [row[2] for row in info] == columns, index


@pytest.mark.sqlite_only("reads SQLite's EXPLAIN QUERY PLAN of the SQLite store's own SQL")
async def test_filtered_event_reads_use_the_event_indexes(db_path: str) -> None:
    # A read by task, plan or correlation is a range scan of the index from ``after``,
    # never a scan of the whole log (``hive-orchestration events --plan ID --follow``).
    async with Runtime.open(db_path):
        pass
    with closing(sqlite3.connect(db_path)) as conn:
        for field, index in EVENT_INDEXES.items():
            for newest in (False, True):
                sql, params = _events_sql(ReadEvents(after=5, **{field: "x"}, newest=newest))
                plan = " ".join(
                    str(row[3]) for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)
                )
                assert f"INDEX {index} ({field}=? AND rowid>?)" in plan, (field, plan)


@pytest.mark.sqlite_only("builds a version-5 database from SQLite's migrations")
async def test_version_5_database_gains_the_plan_event_index(new_db_path: str) -> None:
    # A database left at version 5 by the previous release: its events stay, the
    # migration adds the index, and reads by plan find them.
    Path(new_db_path).parent.mkdir(parents=True)
    with closing(sqlite3.connect(new_db_path)) as conn, conn:
        for migration in MIGRATIONS[:5]:
            for statement in migration:
                conn.execute(statement)
        conn.execute(
            "INSERT INTO events (seq, type, timestamp, source, plan_id, data)"
            " VALUES (1, 'plan.created', 1.0, 'old', 'p-1', '{}'),"
            " (2, 'other', 2.0, 'old', NULL, '{}')"
        )
        conn.execute("PRAGMA user_version = 5")
    assert "idx_events_plan_id" not in _names(new_db_path, "index")
    async with Runtime.open(new_db_path) as runtime:
        stats = await runtime.statistics()
        assert stats.storage.last_seq == 2
        assert [event.seq for event in await runtime.read_events()] == [1, 2]
    assert _pragma(new_db_path, "user_version") == SCHEMA_VERSION
    assert "idx_events_plan_id" in _names(new_db_path, "index")
    with closing(sqlite3.connect(new_db_path)) as conn:
        assert conn.execute("SELECT seq FROM events WHERE plan_id = 'p-1'").fetchall() == [(1,)]


def _temporary_tables(conn: sqlite3.Connection) -> dict[str, int]:
    """The temporary tables (OpenEphemeral) each statement of the task path's writes
    codes: a task's insert, its state update, its run's insert and update, an event."""
    now = datetime.now(UTC)
    task = Task(
        id="t",
        title="t",
        task_type="job",
        status=TaskStatus.QUEUED,
        created_at=now,
        updated_at=now,
    )
    run = Run(id="r", task_id="t", status=RunStatus.RUNNING)
    event = AppendEvent(Event(type="x", timestamp=1.0, source="y"), b"{}")
    counts: dict[str, int] = {}
    for sql, params in (
        task_statement(task),
        task_state_statement(task),
        run_statement(run, b"hash"),
        run_state_statement(run),
        SqliteSql().event_statement(1, event),
    ):
        ops = conn.execute(f"EXPLAIN {sql}", params).fetchall()
        counts[sql.split(" (")[0]] = sum(1 for op in ops if op[1] == "OpenEphemeral")
    return counts


@pytest.mark.sqlite_only("builds a version-18 database from SQLite's migrations, reads EXPLAIN")
async def test_version_18_database_writes_its_tasks_without_temporary_tables(
    new_db_path: str,
) -> None:
    # Version 19 rewrote the two partial indexes whose condition listed statuses with IN,
    # which SQLite coded as a temporary table built at every row written (five a task).
    # An older database upgrades: its key stays held, its finished task is still found
    # by a purge (through idx_tasks_finished, INDEXED BY), and no write builds one.
    Path(new_db_path).parent.mkdir(parents=True)
    old = "2020-01-01T00:00:00+00:00"
    with closing(sqlite3.connect(new_db_path)) as conn, conn:
        for migration in MIGRATIONS[:18]:
            for statement in migration:
                conn.execute(statement)
        conn.execute(
            "INSERT INTO tasks (id, title, task_type, status, created_at, updated_at,"
            " idempotency_key, idempotency_scope) VALUES"
            " ('t-live', 'x', 'job', 'queued', ?, ?, 'k', 'active'),"
            " ('t-done', 'x', 'job', 'completed', ?, ?, NULL, NULL)",
            (old, old, old, old),
        )
        conn.execute("PRAGMA user_version = 18")
        assert sum(_temporary_tables(conn).values()) > 0
    async with Runtime.open(new_db_path) as runtime:
        assert await runtime.create_task("job", idempotency_key="k") == "t-live"
        assert await runtime.purge_tasks(60) == 1
        assert await runtime.get_task("t-done") is None
        assert (await runtime.get_task("t-live")) is not None
    assert _pragma(new_db_path, "user_version") == SCHEMA_VERSION
    with closing(sqlite3.connect(new_db_path)) as conn:
        assert set(_temporary_tables(conn).values()) == {0}
        with pytest.raises(sqlite3.IntegrityError):  # the live task still holds its key
            conn.execute(
                "INSERT INTO tasks (id, title, task_type, idempotency_key, idempotency_scope)"
                " VALUES ('t-2', 'x', 'job', 'k', 'active')"
            )


@pytest.mark.sqlite_only("the database file's and WAL files' permissions")
async def test_file_is_private_and_its_folder_is_created(new_db_path: str) -> None:
    path = Path(new_db_path)
    assert not path.parent.exists()
    async with Runtime.open(new_db_path) as runtime:
        assert path.parent.is_dir()
        await runtime.publish("file.checked", {"n": 1})
        assert os.stat(path).st_mode & 0o777 == 0o600
        # SQLite gives the WAL files the database's permissions.
        sidecars = _sidecars(path)
        assert sidecars, "no WAL file while the runtime is open"
        for sidecar in sidecars:
            assert sidecar.stat().st_mode & 0o777 == 0o600, sidecar
    assert os.stat(path).st_mode & 0o777 == 0o600


@pytest.mark.sqlite_only("the SQLite fixture's template file (tests/_raw.py)")
async def test_db_path_is_what_a_first_open_of_an_empty_path_leaves(
    db_path: str, tmp_path: Path
) -> None:
    """The fixture's copy of its template is the schema the runtime's own first open makes
    of an empty path (every table, index and trigger as written, the version, WAL), its
    file and folder private as the runtime makes them, and nothing in it: a test given it
    starts where one given an empty path would be after its first open."""
    from _raw import never_opened

    new_db_path = str(tmp_path / "empty" / "hive.db")
    async with Runtime.open(new_db_path):
        pass

    def schema(path: str) -> list[tuple[object, ...]]:
        with closing(sqlite3.connect(path)) as conn:
            return conn.execute(
                "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
            ).fetchall()

    assert schema(db_path) == schema(new_db_path)
    for name in ("user_version", "journal_mode", "page_size", "auto_vacuum", "encoding"):
        assert _pragma(db_path, name) == _pragma(new_db_path, name), name
    assert _pragma(db_path, "user_version") == SCHEMA_VERSION
    assert _mode(Path(db_path)) & 0o777 == 0o600
    assert _mode(Path(db_path).parent) & 0o777 == 0o700
    for table in sorted(_names(db_path, "table")):
        assert raw_rows(db_path, f"SELECT count(*) FROM {table}") == [(0,)], table
    assert never_opened(db_path)
    async with Runtime.open(db_path) as runtime:
        assert (await runtime.statistics()).storage.schema_version == SCHEMA_VERSION
    assert not never_opened(db_path)


async def test_path_like_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "deeper" / "hive.db"
    async with Runtime.open(path) as runtime:
        assert runtime.path == str(path)
        await runtime.publish("path.like", {})
    assert _pragma(str(path), "user_version") == SCHEMA_VERSION


# -- reopening --------------------------------------------------------------------------


async def test_reopen_keeps_data_and_does_not_migrate_again(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        first = await runtime.publish("reopen.first", {"n": 1}, task_id="t-1")
    # Data written behind the runtime's back, in a migrated table, must survive a reopen:
    # re-running migration 1 would fail on CREATE TABLE or lose it.
    raw_execute(db_path, "INSERT INTO tasks (id, title, task_type) VALUES ('t-1', 'kept', 'demo')")
    async with Runtime.open(db_path) as runtime:
        stats = await runtime.statistics()
        assert stats.storage.last_seq == first.seq == 1
        assert stats.storage.schema_version == SCHEMA_VERSION
        assert await runtime.read_events() == [first]
        second = await runtime.publish("reopen.second", {"n": 2})
        assert second.seq == 2
    if not is_postgres(db_path):
        assert _pragma(db_path, "user_version") == SCHEMA_VERSION
    assert raw_rows(db_path, "SELECT id, title FROM tasks") == [("t-1", "kept")]
    assert raw_rows(db_path, "SELECT seq, type FROM events ORDER BY seq") == [
        (1, "reopen.first"),
        (2, "reopen.second"),
    ]


@pytest.mark.sqlite_only("SQLite's catalogue and PRAGMA user_version")
async def test_failed_migration_leaves_the_database_as_it_was(new_db_path: str) -> None:
    # A version-0 database that already has a table named like one of ours: migration 1
    # fails part-way (tasks..plan_execution are created before events), and must roll back.
    Path(new_db_path).parent.mkdir(parents=True)
    with closing(sqlite3.connect(new_db_path)) as conn, conn:
        conn.execute("CREATE TABLE events (mine TEXT)")
        conn.execute("INSERT INTO events VALUES ('precious')")
    with pytest.raises(StorageError, match="already exists"):
        async with Runtime.open(new_db_path):
            pytest.fail("opened a database whose migration failed")
    assert _pragma(new_db_path, "user_version") == 0
    assert _names(new_db_path, "table") == {"events"}
    assert _names(new_db_path, "index") == set()
    with closing(sqlite3.connect(new_db_path)) as conn:
        assert conn.execute("SELECT mine FROM events").fetchall() == [("precious",)]


# -- refusals ---------------------------------------------------------------------------


@pytest.mark.sqlite_only("the file's bytes, WAL files and PRAGMA user_version")
async def test_newer_schema_is_refused_and_left_untouched(new_db_path: str) -> None:
    path = Path(new_db_path)
    path.parent.mkdir(parents=True)
    newer = SCHEMA_VERSION + 1
    with closing(sqlite3.connect(new_db_path)) as conn, conn:
        conn.execute("CREATE TABLE future_things (id INTEGER PRIMARY KEY, what TEXT)")
        conn.execute("INSERT INTO future_things (what) VALUES ('from the future')")
        conn.execute(f"PRAGMA user_version = {newer}")
    before = _fingerprint(path)
    mode_before = _mode(path)

    with pytest.raises(NewerSchemaError) as caught:
        async with Runtime.open(new_db_path):
            pytest.fail("opened a database with a newer schema")

    error = caught.value
    assert isinstance(error, StorageError)
    assert (error.found, error.supported) == (newer, SCHEMA_VERSION)
    assert error.path == new_db_path
    assert str(newer) in str(error)
    assert str(SCHEMA_VERSION) in str(error)
    assert _fingerprint(path) == before
    assert _mode(path) == mode_before
    assert _sidecars(path) == []
    assert _pragma(new_db_path, "user_version") == newer
    assert _pragma(new_db_path, "journal_mode") == "delete"
    assert _names(new_db_path, "table") == {"future_things"}
    with closing(sqlite3.connect(new_db_path)) as conn:
        assert conn.execute("SELECT what FROM future_things").fetchall() == [("from the future",)]


@pytest.mark.sqlite_only("SQLite's PRAGMA user_version")
async def test_current_version_without_the_tables_gives_storage_error(new_db_path: str) -> None:
    # user_version says "migrated" but the tables are not there: refuse, do not crash.
    Path(new_db_path).parent.mkdir(parents=True)
    with closing(sqlite3.connect(new_db_path)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    with pytest.raises(StorageError, match="events"):
        async with Runtime.open(new_db_path):
            pytest.fail("opened a database without an event log")


@pytest.mark.sqlite_only("SQLite's PRAGMA user_version")
async def test_newer_schema_is_refused_every_time(new_db_path: str) -> None:
    # The refusal leaves no trace that would let a second attempt through.
    Path(new_db_path).parent.mkdir(parents=True)
    with closing(sqlite3.connect(new_db_path)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    for _ in range(2):
        with pytest.raises(NewerSchemaError) as caught:
            async with Runtime.open(new_db_path):
                pass
        assert caught.value.found == SCHEMA_VERSION + 5


@pytest.mark.sqlite_only("a file that is not a SQLite database")
async def test_file_that_is_not_a_database_gives_storage_error(new_db_path: str) -> None:
    path = Path(new_db_path)
    path.parent.mkdir(parents=True)
    garbage = bytes(range(256)) * 64
    _write(path, garbage)
    # The deadline only turns a hang into a failure; it is not a timing assertion.
    with anyio.fail_after(30), pytest.raises(StorageError, match="not a database"):
        async with Runtime.open(new_db_path):
            pytest.fail("opened a file that is not a database")
    assert _read(path) == garbage


@pytest.mark.sqlite_only("a file that is not a SQLite database")
async def test_text_file_is_not_a_database_either(new_db_path: str) -> None:
    path = Path(new_db_path)
    path.parent.mkdir(parents=True)
    _write(path, b"this is my shopping list, not a database\n" * 200)
    with pytest.raises(StorageError):
        async with Runtime.open(new_db_path):
            pytest.fail("opened a text file as a database")


async def test_folder_that_cannot_be_created_gives_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(StorageError, match="cannot create"):
        async with Runtime.open(blocker / "hive.db"):
            pytest.fail("opened a database under a file")


async def test_directory_as_path_gives_storage_error(tmp_path: Path) -> None:
    folder = tmp_path / "a-folder"
    folder.mkdir()
    # The thread driver on both backends; aiosqlite is covered by the test below.
    with pytest.raises(StorageError, match="cannot open"):
        async with Runtime.open(folder, config=RuntimeConfig(storage_driver="thread")):
            pytest.fail("opened a directory as a database")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_failed_connect_leaves_no_aiosqlite_thread_behind(
    anyio_backend: str, tmp_path: Path
) -> None:
    """No thread outlives a failed ``Runtime.open``.

    When aiosqlite fails to connect it queues a stop for its worker thread but nobody waits
    for it; the thread later posts the result to the event loop, which by then may be
    closed ("RuntimeError: Event loop is closed" in a thread, after the program ended).
    Whether the thread is still running when ``open`` raises is a race that it loses most
    of the time, so the open is repeated to make a miss vanishingly unlikely.
    """
    folder = tmp_path / "a-folder"
    folder.mkdir()
    config = RuntimeConfig(storage_driver="aiosqlite")
    leftovers: list[str] = []
    for _ in range(10):
        before = set(threading.enumerate())
        with pytest.raises(StorageError, match="cannot open"):
            async with Runtime.open(folder, config=config):
                pytest.fail("opened a directory as a database")
        alive = [
            thread
            for thread in threading.enumerate()
            if thread not in before
            and thread.is_alive()
            and not thread.name.startswith("AnyIO worker thread")
        ]
        leftovers.extend(thread.name for thread in alive)
        # Let them finish while the loop still runs, so nothing leaks into other tests.
        for thread in alive:
            await anyio.to_thread.run_sync(thread.join, 10.0)
    assert leftovers == []


@pytest.mark.parametrize("bad", ["", "   ", 42, 4.2, b"hive.db", ["hive.db"]])
async def test_bad_path_argument_is_refused(bad: object) -> None:
    with pytest.raises(InvalidInputError) as caught:
        async with Runtime.open(bad):  # type: ignore[arg-type]
            pytest.fail(f"opened {bad!r}")
    assert caught.value.field == "path"


# -- special paths ----------------------------------------------------------------------


async def test_memory_database_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    async with Runtime.open(":memory:") as runtime:
        assert runtime.path == ":memory:"
        first = await runtime.publish("memory.one", {"n": 1}, correlation_id="c-1")
        second = await runtime.publish("memory.two", {"n": 2})
        assert [first.seq, second.seq] == [1, 2]
        assert await runtime.read_events() == [first, second]
        assert await runtime.read_events(after=1) == [second]
        stats = await runtime.statistics()
        assert stats.storage.path == ":memory:"
        assert stats.storage.last_seq == 2
        assert stats.storage.schema_version == SCHEMA_VERSION
    # Nothing was written to disk, and a second in-memory runtime starts empty.
    assert os.listdir(tmp_path) == []
    async with Runtime.open(":memory:") as runtime:
        assert await runtime.read_events() == []


async def test_default_path_is_relative_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HIVE_ORCHESTRATION_DB_PATH", raising=False)
    assert not (tmp_path / "hive").exists()
    async with Runtime.open() as runtime:
        assert runtime.path == str(Path.cwd() / DEFAULT_DB_PATH)  # resolved once, at open
        event = await runtime.publish("default.path", {})
    assert Path("hive") / "db" / "hive-internal.db" == DEFAULT_DB_PATH
    assert (tmp_path / "hive" / "db").is_dir()
    created = tmp_path / DEFAULT_DB_PATH
    assert created.is_file()
    assert created.stat().st_mode & 0o777 == 0o600
    assert _pragma(str(created), "user_version") == SCHEMA_VERSION
    with closing(sqlite3.connect(created)) as conn:
        assert conn.execute("SELECT seq, type FROM events").fetchall() == [
            (event.seq, "default.path")
        ]
