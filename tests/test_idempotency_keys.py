"""Idempotency keys live in SQLite behind the unique index; the TaskManager's memory holds
only the keys of the tasks it holds (live ones, and the recently finished it keeps).

Every promise of a key is checked where memory no longer knows it: after the first task
finished and left memory (a small ``recent`` forces that), after a reopen, across and
within batches, after a delete (which frees the key) and after a failed commit. And what
it costs: a reopen loads no key, and a batch of keyed creates asks storage once.
Real SQLite files, both backends.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from _raw import raw_rows

from hive_orchestration import Runtime, StorageError
from hive_orchestration.actors.task_manager import TaskManager
from hive_orchestration.api import embedded as embedded_module
from hive_orchestration.messages.storage import FindIdempotencyKeys, StorageMessage
from hive_orchestration.messages.tasks import CreateTask, CreateTasks, DeleteTask, GetTask
from hive_orchestration.runtime import Envelope, Reply
from hive_orchestration.storage import StorageActor
from hive_orchestration.storage.sqlite import drivers
from hive_orchestration.storage.sqlite.sql import FIND_KEYS_SQL

pytestmark = pytest.mark.anyio


def track_task_managers(monkeypatch: pytest.MonkeyPatch, *, recent: int) -> list[TaskManager]:
    """Make the runtime build its TaskManagers with ``recent`` finished tasks kept in
    memory; returns the list every TaskManager built from now on is appended to."""
    made: list[TaskManager] = []

    def build(*args: Any, **kwargs: Any) -> TaskManager:
        manager = TaskManager(*args, recent=recent, **kwargs)
        made.append(manager)
        return manager

    monkeypatch.setattr(embedded_module, "TaskManager", build)
    return made


def record_lookups(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """The keys of every FindIdempotencyKeys the storage actor answers, in order."""
    asked: list[tuple[str, ...]] = []
    original = StorageActor._query

    async def query(self: StorageActor, message: StorageMessage) -> object:
        if isinstance(message, FindIdempotencyKeys):
            asked.append(message.keys)
        return await original(self, message)

    monkeypatch.setattr(StorageActor, "_query", query)
    return asked


async def last_seq(rt: Runtime) -> int:
    return (await rt.statistics()).storage.last_seq


def stored_count(db_path: str, sql: str, *params: object) -> int:
    return int(raw_rows(db_path, sql, params)[0][0])


async def one_batch(rt: Runtime, *messages: object) -> list[object]:
    """Queue all messages at once, so that the TaskManager handles them as one batch."""
    replies: list[Reply[object]] = []
    for message in messages:
        reply: Reply[object] = Reply()
        assert rt._tasks.mailbox.put_nowait(Envelope(message, reply))  # type: ignore[arg-type]
        replies.append(reply)
    outcomes: list[object] = []
    with anyio.fail_after(5):
        for reply in replies:
            try:
                outcomes.append(await reply.wait())
            except Exception as exc:
                outcomes.append(exc)
    return outcomes


def keyed(key: str, title: str = "again") -> CreateTask:
    return CreateTask(title=title, task_type="job", payload={}, idempotency_key=key)


async def finished_keyed_tasks(rt: Runtime, count: int, prefix: str = "k") -> list[str]:
    """``count`` tasks with keys ``prefix0``.. that end cancelled, oldest first."""
    ids = []
    for i in range(count):
        task_id = await rt.create_task("job", {"i": i}, idempotency_key=f"{prefix}{i}")
        await rt.cancel_task(task_id)
        ids.append(task_id)
    return ids


async def test_keys_of_finished_tasks_that_left_memory_still_dedupe(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    managers = track_task_managers(monkeypatch, recent=2)
    async with Runtime.open(db_path) as rt:
        [manager] = managers
        first = await finished_keyed_tasks(rt, 6)
        live = await rt.create_task("job", idempotency_key="live")
        # Memory holds the keys of the tasks it holds: the live one and the 2 it kept.
        assert manager._keys == {"k4": first[4], "k5": first[5], "live": live}
        assert set(manager._tasks) == {first[4], first[5], live}
        seq = await last_seq(rt)
        for i, task_id in enumerate(first):
            assert await rt.create_task("other", idempotency_key=f"k{i}") == task_id
        # Across and within one batch: known keys, and a new key repeated.
        items = [{"task_type": "job", "idempotency_key": f"k{i}"} for i in range(6)]
        items += [{"task_type": "job", "idempotency_key": "new"}] * 2
        ids = await rt.create_tasks(items)
        assert ids[:6] == first
        assert ids[6] == ids[7] not in first
        created = [e for e in await rt.read_events() if e.seq > seq]
        assert [(e.type, e.task_id) for e in created] == [("task.created", ids[6])]
        # The lookups did not bring the finished tasks' keys back into memory.
        assert manager._keys == {"k4": first[4], "k5": first[5], "live": live, "new": ids[6]}
    assert stored_count(db_path, "SELECT count(*) FROM tasks") == 8


async def test_a_reopened_runtime_loads_no_keys_of_finished_tasks(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Runtime.open(db_path) as rt:
        finished = await rt.create_tasks(
            [{"task_type": "job", "idempotency_key": f"done-{i}"} for i in range(300)]
        )
        for task_id in finished:
            await rt.cancel_task(task_id)
        live = await rt.create_tasks(
            [{"task_type": "job", "idempotency_key": f"live-{i}"} for i in range(5)]
        )
    managers = track_task_managers(monkeypatch, recent=10_000)
    asked = record_lookups(monkeypatch)
    async with Runtime.open(db_path) as rt:
        [manager] = managers
        assert manager._keys == {f"live-{i}": task_id for i, task_id in enumerate(live)}
        assert asked == []  # opening asked storage for no key
        assert await rt.create_task("job", idempotency_key="done-123") == finished[123]
        assert await rt.create_task("job", idempotency_key="live-3") == live[3]
        assert asked == [("done-123",)]  # a live key is answered from memory
        assert len(manager._keys) == 5
    assert stored_count(db_path, "SELECT count(*) FROM tasks") == 305


async def test_the_keyed_creates_of_a_batch_ask_storage_once(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = record_lookups(monkeypatch)
    async with Runtime.open(db_path) as rt:
        await rt.create_tasks([{"task_type": "job", "idempotency_key": f"a{i}"} for i in range(50)])
        assert len(asked) == 1
        assert sorted(asked[0]) == sorted(f"a{i}" for i in range(50))
        # Several creates queued together: one lookup for the keys memory does not hold.
        outcomes = await one_batch(rt, keyed("a1"), keyed("b1"), keyed("b2"), keyed("b1"))
        assert len(asked) == 2
        assert sorted(asked[1]) == ["b1", "b2"]
        assert outcomes[3] == outcomes[1] != outcomes[2]
        # Keys memory holds, and creates without a key, ask nothing.
        await rt.create_task("job", idempotency_key="a7")
        await rt.create_task("job")
        assert len(asked) == 2


async def test_delete_frees_the_key_of_a_task_that_left_memory(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    track_task_managers(monkeypatch, recent=1)
    async with Runtime.open(db_path) as rt:
        old = await finished_keyed_tasks(rt, 4)  # k0..k2 left memory
        assert await rt.delete_task(old[0]) is True
        again = await rt.create_task("job", idempotency_key="k0")
        assert again != old[0]
        # In one batch: a delete then a create with its key makes a new task...
        out = await one_batch(rt, DeleteTask(old[1]), keyed("k1"), keyed("k1"))
        assert out[0] is True
        assert isinstance(out[1], str)
        assert out[1] == out[2] != old[1]
        # ...and a create then a delete returns the first task's id, then deletes it.
        out = await one_batch(rt, keyed("k2"), DeleteTask(old[2]), GetTask(old[2]))
        assert out == [old[2], True, None]
        assert await rt.create_task("job", idempotency_key="k2") != old[2]
    assert stored_count(db_path, "SELECT count(*) FROM tasks WHERE id IN (?, ?, ?)", *old[:3]) == 0


@pytest.mark.sqlite_only("injects a SQLite I/O error into the SQLite drivers")
async def test_a_failed_commit_keeps_the_key_of_a_task_that_left_memory(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures = {"left": 0}
    originals = {cls: cls.transaction for cls in (drivers.ThreadDriver, drivers.AiosqliteDriver)}

    def failing(cls: type[drivers.Driver]) -> Callable[..., Awaitable[None]]:
        async def transaction(self: drivers.Driver, statements: list[drivers.Statement]) -> None:
            if failures["left"] and any("tasks" in sql for sql, _ in statements):
                failures["left"] -= 1
                raise sqlite3.OperationalError("disk I/O error (injected)")
            await originals[cls](self, statements)  # type: ignore[arg-type]

        return transaction

    for cls in originals:
        monkeypatch.setattr(cls, "transaction", failing(cls))
    track_task_managers(monkeypatch, recent=1)
    async with Runtime.open(db_path) as rt:
        old = await finished_keyed_tasks(rt, 3)  # k0 and k1 left memory
        failures["left"] = 1
        out = await one_batch(rt, DeleteTask(old[0]), keyed("k0"), keyed("fresh"))
        assert all(isinstance(o, StorageError) for o in out), out
        assert await rt.create_task("job", idempotency_key="k0") == old[0]
        fresh = await rt.create_task("job", idempotency_key="fresh")
        assert fresh not in old
    assert stored_count(db_path, "SELECT count(*) FROM tasks") == 4


@pytest.mark.sqlite_only("injects a SQLite I/O error into the SQLite drivers")
async def test_a_key_lookup_that_fails_fails_only_its_creates(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Storage cannot answer the lookup: the creates that needed it fail with its error
    and create nothing (a batch create whole); the rest of the batch goes on."""
    failures = {"left": 0}
    originals = {cls: cls.fetchall for cls in (drivers.ThreadDriver, drivers.AiosqliteDriver)}

    def failing(cls: type[drivers.Driver]) -> Callable[..., Awaitable[list[Any]]]:
        async def fetchall(self: drivers.Driver, sql: str, params: Any = ()) -> list[Any]:
            if failures["left"] and "idempotency_key IN" in sql:
                failures["left"] -= 1
                raise sqlite3.OperationalError("disk I/O error (injected)")
            return await originals[cls](self, sql, params)  # type: ignore[arg-type]

        return fetchall

    for cls in originals:
        monkeypatch.setattr(cls, "fetchall", failing(cls))
    async with Runtime.open(db_path) as rt:
        known = await rt.create_task("job", idempotency_key="known")
        seq = await last_seq(rt)
        failures["left"] = 1
        out = await one_batch(
            rt,
            keyed("lost"),
            CreateTasks((keyed("known"), keyed("lost-too"))),
            keyed("known"),
            CreateTask(title="plain", task_type="job", payload={}),
        )
        assert isinstance(out[0], StorageError)
        assert isinstance(out[1], StorageError)  # no item of it was created
        assert out[2] == known
        assert isinstance(out[3], str)
        created = [e.task_id for e in await rt.read_events() if e.seq > seq]
        assert created == [out[3]]
        assert await rt.create_task("job", idempotency_key="lost") not in (known, out[3])
    assert stored_count(db_path, "SELECT count(*) FROM tasks") == 3


@pytest.mark.sqlite_only("reads SQLite's EXPLAIN QUERY PLAN and pragma_index_list")
async def test_a_key_lookup_is_a_search_of_the_unique_index(db_path: str) -> None:
    """The lookup that replaced loading every key at open reads the unique index (a
    search per key), never the whole table; and the index refuses a second owner."""
    async with Runtime.open(db_path) as rt:
        await rt.create_task("job", idempotency_key="taken")
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        sql = FIND_KEYS_SQL.format(marks="?, ?")
        plan = " ".join(
            str(row[3]) for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", ("a", "b"))
        )
        assert "SEARCH tasks USING INDEX idx_tasks_idempotency_key" in plan, plan
        [(unique, partial)] = conn.execute(
            "SELECT \"unique\", partial FROM pragma_index_list('tasks')"
            " WHERE name = 'idx_tasks_idempotency_key'"
        ).fetchall()
        assert (unique, partial) == (1, 1)
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute(
                "INSERT INTO tasks (id, title, task_type, idempotency_key)"
                " VALUES ('x', 'x', 'job', 'taken')"
            )
