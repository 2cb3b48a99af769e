"""The read-only inspector: it reads a database that a runtime holds and writes, without
the runtime's claim, and writes nothing to it; it refuses what it cannot read safely."""

from __future__ import annotations

import fnmatch
import hashlib
import sqlite3
from contextlib import closing
from pathlib import Path

import anyio
import msgspec
import pytest
from _populate import WORKER, populate

from hive_orchestration import (
    SCHEMA_VERSION,
    InvalidInputError,
    NewerSchemaError,
    NotFoundError,
    PlanStatus,
    Runtime,
    RuntimeConfig,
    RuntimeStoppedError,
    StorageError,
    TaskStatus,
    WorkerStatus,
)
from hive_orchestration.inspector import Inspector
from hive_orchestration.messages.events import Event
from hive_orchestration.messages.storage import AppendEvent, Write
from hive_orchestration.storage.sqlite.schema import MIGRATIONS

pytestmark = pytest.mark.anyio


def _fingerprint(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), stat.st_mtime_ns, stat.st_size


def _user_version(path: str) -> int:
    with closing(sqlite3.connect(path)) as conn:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    assert isinstance(version, int)
    return version


def _old_database(path: str, version: int) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(path)) as conn, conn:
        for migration in MIGRATIONS[:version]:
            for statement in migration:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {version}")


# -- reading beside a live runtime ------------------------------------------------------


async def test_reads_a_database_a_runtime_holds_and_writes(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        made = await populate(runtime)
        # The runtime holds the claim on the file all along: a second runtime is refused
        # (a PostgreSQL database takes several runtimes as nodes: tests/test_pg_nodes.py).
        if not db_path.startswith("postgresql://"):
            with pytest.raises(StorageError, match="already open in another runtime"):
                async with Runtime.open(db_path):
                    pytest.fail("two runtimes on one database")
        async with Inspector.open(db_path) as inspector:
            assert inspector.path == db_path
            counts = await inspector.task_counts()
            assert counts == {"completed": 1, "running": 1, "queued": 2, "blocked": 3}

            tasks = await inspector.tasks()
            assert len(tasks) == 7
            assert tasks[0].created_at >= tasks[-1].created_at  # newest first
            queued = await inspector.tasks(TaskStatus.QUEUED)
            assert {task.task_type for task in queued} == {"deploy", "build"}
            assert [task.id for task in await inspector.tasks("queued", task_type="deploy")] == [
                made.queued
            ]
            assert [t.id for t in await inspector.tasks(task_type="compile", limit=1)] == [
                made.running
            ]

            task = await inspector.task(made.running)
            assert task is not None
            assert (task.status, task.assigned_worker) == (TaskStatus.RUNNING, WORKER)
            assert await inspector.task("no-such-task") is None
            runs = await inspector.runs(made.running)
            assert [(run.id, run.worker_id, run.status.value) for run in runs] == [
                (made.run_id, WORKER, "running")
            ]
            (done,) = await inspector.runs(made.completed)
            assert done.result == {"ok": True}

            (worker,) = await inspector.workers()
            assert (worker.id, worker.role, worker.capabilities) == (
                WORKER,
                "compiler",
                ("compile",),
            )
            assert worker.status is not WorkerStatus.OFFLINE
            assert await inspector.workers(WorkerStatus.OFFLINE) == []

            (plan,) = await inspector.plans()
            assert (plan.id, plan.status, plan.title) == (
                made.plan_id,
                PlanStatus.EXECUTING,
                "Ship it",
            )
            assert await inspector.plans("completed") == []
            assert (await inspector.plan(made.plan_id)) == plan
            subtasks = await inspector.plan_subtasks(made.plan_id)
            assert {s.subtask_id: s.status.value for s in subtasks} == {
                "build": "ready",
                "test": "pending",
                "review": "pending",
                "ship": "pending",
            }
            statuses = await inspector.plan_task_statuses(made.plan_id)
            assert statuses == {
                "build": TaskStatus.QUEUED,
                "test": TaskStatus.BLOCKED,
                "review": TaskStatus.BLOCKED,
                "ship": TaskStatus.BLOCKED,
            }
            progress = await inspector.plan_progress(made.plan_id)
            assert (progress.total, progress.done, progress.status) == (4, 0, PlanStatus.EXECUTING)
            assert progress.counts == {"queued": 1, "pending": 3}
            assert progress == await runtime.get_plan_progress(made.plan_id)

            everything = await inspector.events(limit=10_000)
            assert everything == await runtime.read_events(limit=10_000)
            assert await inspector.last_seq() == everything[-1].seq == made.note_seq

            # The runtime goes on writing; the inspector sees each commit as it lands.
            extra = await runtime.publish("app.later", {"n": 2})
            assert await inspector.events(after=made.note_seq) == [extra]
            assert await inspector.last_seq() == extra.seq
            await runtime.cancel_task(made.queued)
            assert (await inspector.task_counts())["cancelled"] == 1
            stats = await inspector.statistics()
            assert (stats.path, stats.schema_version) == (db_path, SCHEMA_VERSION)
            assert (stats.writes, stats.transactions) == (0, 0)


async def test_event_filters_are_anded(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        published = [
            await runtime.publish("build.note", {}, task_id="t-1", plan_id="p-1"),
            await runtime.publish("build.note", {}, task_id="t-2", correlation_id="c-1"),
            await runtime.publish("build.other", {}, task_id="t-1", correlation_id="c-1"),
            await runtime.publish("ship.note", {}, plan_id="p-1", correlation_id="c-1"),
            await runtime.publish("builds.note", {}, plan_id="p-2"),
        ]
        t1, t2, t1_other, p1, p2 = (event.seq for event in published)
        async with Inspector.open(db_path) as inspector:

            async def seqs(**filters: object) -> list[int]:
                return [event.seq for event in await inspector.events(**filters)]  # type: ignore[arg-type]

            assert await seqs() == [t1, t2, t1_other, p1, p2]
            assert await seqs(pattern="build.*") == [t1, t2, t1_other]
            assert await seqs(pattern="build?.note") == [p2]
            assert await seqs(pattern="*.note") == [t1, t2, p1, p2]
            assert await seqs(pattern="BUILD.*") == []  # case-sensitive, like fnmatchcase
            assert await seqs(pattern="ship.note") == [p1]
            assert await seqs(task_id="t-1") == [t1, t1_other]
            assert await seqs(plan_id="p-1") == [t1, p1]
            assert await seqs(correlation_id="c-1") == [t2, t1_other, p1]
            assert await seqs(task_id="t-1", correlation_id="c-1") == [t1_other]
            assert await seqs(pattern="build.*", plan_id="p-1") == [t1]
            assert await seqs(pattern="ship.*", task_id="t-1") == []
            assert await seqs(plan_id="nowhere") == []
            # after, limit and newest apply to the matching events.
            assert await seqs(correlation_id="c-1", after=t2) == [t1_other, p1]
            assert await seqs(correlation_id="c-1", limit=2) == [t2, t1_other]
            assert await seqs(correlation_id="c-1", limit=2, newest=True) == [t1_other, p1]
            assert await seqs(pattern="*.note", after=t1, limit=1, newest=True) == [p2]


async def test_pattern_matches_as_the_live_subscriptions_do(db_path: str) -> None:
    # SQLite GLOB in the log and fnmatchcase in the broadcast agree on '*' and '?'.
    types = ["app.created", "app.completed", "ship.started", "ship", "a.b.c", "x_y", "t.x"]
    patterns = ["*", "app.*", "*.c*", "?.x", "*.*.*", "ship", "????", "*ed", "x?y", "t*x"]
    async with Runtime.open(db_path) as runtime:
        for type_ in types:
            await runtime.publish(type_, {})
        async with Inspector.open(db_path) as inspector:
            for pattern in patterns:
                found = [event.type for event in await inspector.events(pattern=pattern)]
                expected = [type_ for type_ in types if fnmatch.fnmatchcase(type_, pattern)]
                assert found == expected, pattern


async def test_bad_arguments_name_their_field(db_path: str) -> None:
    async with Runtime.open(db_path):
        pass
    async with Inspector.open(db_path) as inspector:
        calls = [
            ("status", inspector.tasks("sleeping")),
            ("limit", inspector.tasks(limit=0)),
            ("task_type", inspector.tasks(task_type="")),
            ("status", inspector.plans("napping")),
            ("status", inspector.workers("lazy")),
            ("task_id", inspector.task("")),
            ("after", inspector.events(after=-1)),
            ("limit", inspector.events(limit=10_001)),
            ("pattern", inspector.events(pattern="")),
            ("plan_id", inspector.events(plan_id="bad\x00id")),
        ]
        for field, call in calls:
            with pytest.raises(InvalidInputError) as caught:
                await call
            assert caught.value.field == field
        with pytest.raises(NotFoundError, match="plan 'nope' not found"):
            await inspector.plan_progress("nope")
    with pytest.raises(RuntimeStoppedError, match="closed"):
        await inspector.task_counts()


# -- it writes nothing ------------------------------------------------------------------


async def test_writes_are_refused(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        await runtime.publish("before", {})
        async with Inspector.open(db_path) as inspector:
            event = Event(type="sneaky", timestamp=1.0, source="test")
            write = Write(ops=(AppendEvent(event, msgspec.json.encode({})),))
            with pytest.raises(StorageError, match="opened read-only"):
                await inspector._storage.ask(write)
            # The actor refused it and stays up.
            assert [e.type for e in await inspector.events()] == ["before"]
            assert (await inspector.statistics()).failed_writes == 1
        assert [e.type for e in await runtime.read_events()] == ["before"]


@pytest.mark.sqlite_only("the file's bytes, its lock file and WAL file")
async def test_inspecting_leaves_the_file_untouched(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        made = await populate(runtime)
    path = Path(db_path)
    lock = Path(f"{db_path}.lock")
    await anyio.Path(lock).unlink()
    before = _fingerprint(path)
    async with Inspector.open(db_path) as inspector:
        await inspector.task_counts()
        await inspector.tasks()
        await inspector.runs(made.running)
        await inspector.workers()
        await inspector.plan_progress(made.plan_id)
        await inspector.events(plan_id=made.plan_id, newest=True)
    assert _fingerprint(path) == before
    assert _user_version(db_path) == SCHEMA_VERSION
    assert not await anyio.Path(lock).exists(), "the inspector took the runtime's claim"
    # What it left is SQLite's shared-memory index and an empty WAL, not data.
    wal = anyio.Path(f"{db_path}-wal")
    assert not await wal.exists() or (await wal.stat()).st_size == 0
    with closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # The next runtime opens it as usual.
    async with Runtime.open(db_path) as runtime:
        assert (await runtime.get_task(made.queued)) is not None


# -- refusals ---------------------------------------------------------------------------


@pytest.mark.sqlite_only("a database file (and its folder) that does not exist")
async def test_missing_database_is_refused_and_not_created(new_db_path: str) -> None:
    with pytest.raises(StorageError, match="no database at") as caught:
        async with Inspector.open(new_db_path):
            pytest.fail("inspected a database that does not exist")
    assert new_db_path in str(caught.value)
    assert not Path(new_db_path).parent.exists()


@pytest.mark.sqlite_only("builds an older database from SQLite's migrations; the file's bytes")
async def test_older_schema_is_refused_untouched(new_db_path: str) -> None:
    _old_database(new_db_path, SCHEMA_VERSION - 1)
    before = _fingerprint(Path(new_db_path))
    with pytest.raises(StorageError, match="db upgrade") as caught:
        async with Inspector.open(new_db_path):
            pytest.fail("inspected a database at an older schema")
    assert f"schema version {SCHEMA_VERSION - 1}" in str(caught.value)
    assert _fingerprint(Path(new_db_path)) == before
    assert _user_version(new_db_path) == SCHEMA_VERSION - 1


@pytest.mark.sqlite_only("SQLite's PRAGMA user_version; the file's bytes")
async def test_newer_schema_is_refused_untouched(new_db_path: str) -> None:
    Path(new_db_path).parent.mkdir(parents=True)
    with closing(sqlite3.connect(new_db_path)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = _fingerprint(Path(new_db_path))
    with pytest.raises(NewerSchemaError) as caught:
        async with Inspector.open(new_db_path):
            pytest.fail("inspected a database at a newer schema")
    assert caught.value.found == SCHEMA_VERSION + 1
    assert _fingerprint(Path(new_db_path)) == before


async def test_what_is_not_a_database_is_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database, just text\n" * 200)
    with anyio.fail_after(30), pytest.raises(StorageError, match="not a database"):
        async with Inspector.open(garbage):
            pytest.fail("inspected a text file")
    with pytest.raises(StorageError, match="it is a directory, not a regular file"):
        async with Inspector.open(tmp_path):
            pytest.fail("inspected a folder")
    with pytest.raises(InvalidInputError) as caught:
        async with Inspector.open(":memory:"):
            pytest.fail("inspected another process's memory")
    assert caught.value.field == "path"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.sqlite_only("the SQLite thread driver")
async def test_the_thread_driver_reads_as_well(anyio_backend: str, db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        made = await populate(runtime)
    config = RuntimeConfig(storage_driver="thread")
    async with Inspector.open(db_path, config=config) as inspector:
        assert (await inspector.statistics()).driver == "thread"
        assert [e.seq for e in await inspector.events(task_id=made.queued)][-1] == made.note_seq
