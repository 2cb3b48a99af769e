"""Reads on their own read-only connections (storage/readers.py): a long read never holds
up a commit, and a read still sees every write committed before it was asked."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import anyio
import msgspec
import pytest
from _raw import is_postgres

from hive_orchestration import Runtime, RuntimeConfig, Task, TaskStatus
from hive_orchestration.errors import RuntimeStoppedError
from hive_orchestration.messages.events import Event
from hive_orchestration.messages.storage import (
    PutTask,
    QueryTasks,
    ReadEvents,
    SetTaskState,
    StorageMessage,
    Write,
)
from hive_orchestration.runtime import ActorRef, ChildSpec, Supervisor
from hive_orchestration.storage import StorageActor, open_store
from hive_orchestration.storage.readers import ReaderPool

pytestmark = pytest.mark.anyio

Driver = Literal["aiosqlite", "thread"]
#: A failure detector, not a measurement: what waits here takes milliseconds.
DEADLINE = 20.0


@pytest.fixture(params=["aiosqlite", "thread"])
def driver(request: pytest.FixtureRequest, anyio_backend: str) -> Driver:
    if request.param == "aiosqlite" and anyio_backend == "trio":
        pytest.skip("aiosqlite runs only on asyncio")
    return request.param  # type: ignore[no-any-return]


@asynccontextmanager
async def storage_with_readers(
    db_path: str, driver: Driver, size: int = 2
) -> AsyncIterator[tuple[ActorRef[StorageMessage], ReaderPool]]:
    if not is_postgres(db_path):
        Path(db_path).parent.mkdir(parents=True, exist_ok=True)
    config = RuntimeConfig(storage_driver=driver)
    ref: ActorRef[StorageMessage] = ActorRef("storage", mailbox_size=4096, ask_timeout=30.0)
    pool = ReaderPool(open_store(db_path, config), size=size, queue=64)
    supervisor = Supervisor(
        [ChildSpec(ref, lambda: StorageActor(db_path, config, readers=pool), (pool.run,))],
        max_restarts=0,
        restart_window=10.0,
        shutdown_timeout=5.0,
    )
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(supervisor.run)
            try:
                yield ref, pool
            finally:
                await supervisor.stop()
    finally:
        pool.close()


def _task(n: int, task_type: str) -> Task:
    now = datetime.now(UTC)
    return Task(
        id=f"task-{task_type}-{n}",
        title="t",
        task_type=task_type,
        status=TaskStatus.QUEUED,
        created_at=now,
        updated_at=now,
    )


async def test_a_read_queued_behind_a_write_sees_it(db_path: str, driver: Driver) -> None:
    """Writers send a write and, without waiting for its reply, a read of what it wrote:
    the read runs on a reader (not the write connection) and sees the write, every time,
    while other writers commit all along."""
    async with storage_with_readers(db_path, driver) as (ref, pool):
        counter = itertools.count()

        async def writer(name: str) -> None:
            for _ in range(40):
                n = next(counter)
                task = _task(n, name)
                put = await ref.request(Write((PutTask(task),)))
                # Queued behind the write, not after its reply.
                found = await ref.ask(QueryTasks(status="queued", task_type=name))
                assert task.id in {t.id for t in found}
                await put.wait()
                ended = msgspec.structs.replace(task, status=TaskStatus.COMPLETED)
                state = await ref.request(Write((SetTaskState(ended),)))
                completed = await ref.ask(QueryTasks(status="completed", task_type=name))
                assert task.id in {t.id for t in completed}
                queued = await ref.ask(QueryTasks(status="queued", task_type=name))
                assert task.id not in {t.id for t in queued}
                await state.wait()

        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:
                for w in range(6):
                    tg.start_soon(writer, f"type{w}")
        assert pool.reads >= 6 * 40 * 3  # every one of those reads ran on a reader


async def test_a_reply_to_a_write_means_a_later_read_sees_it(
    db_path: str, anyio_backend: str
) -> None:
    """Through the runtime, with concurrent writers: once a call that writes has answered,
    every read sees it, the TaskManager's forwarded listings and the event log alike."""
    async with Runtime.open(db_path) as rt:

        async def worker(name: str) -> None:
            await rt.register_worker(name, "w", [name])
            for _ in range(15):
                task_id = await rt.create_task(name, {"n": 1})
                claim = await rt.claim_task(name, name)
                assert claim is not None
                await rt.complete_task(claim.lease, {"ok": True})
                completed = await rt.get_tasks_by_status("completed", task_type=name)
                assert task_id in {t.id for t in completed}
                events = await rt.read_events(task_id=task_id)
                assert [e.type for e in events][-1] == "task.completed"
                assert await rt.read_events(pattern="task.completed", task_id=task_id)

        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:
                for w in range(4):
                    tg.start_soon(worker, f"kind{w}")


async def test_a_long_read_does_not_hold_up_commits(
    db_path: str, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read held in the middle (as a read of a million rows would be) while writers
    create, claim and complete tasks: every write is answered, durable, before the read
    is let go. With one connection for reads and writes, the writes waited for it."""
    entered, release = anyio.Event(), anyio.Event()
    original = StorageActor._read_events

    async def long_read(self: StorageActor, read: ReadEvents) -> tuple[Event, ...]:
        if read.pattern == "held.*":
            entered.set()
            await release.wait()
        return await original(self, read)

    monkeypatch.setattr(StorageActor, "_read_events", long_read)
    async with Runtime.open(db_path) as rt:
        await rt.publish("held.one")
        async with anyio.create_task_group() as tg:
            found: list[tuple[Event, ...]] = []

            async def reader() -> None:
                found.append(await rt.read_events(pattern="held.*"))

            tg.start_soon(reader)
            with anyio.fail_after(DEADLINE):
                await entered.wait()
                await rt.register_worker("w", "w", ["build"])
                for n in range(20):
                    task_id = await rt.create_task("build", {"n": n})
                    claim = await rt.claim_task("w", "build")
                    assert claim is not None
                    assert claim.task.id == task_id
                    await rt.complete_task(claim.lease)
                # Other reads go on meanwhile too, on the other reader.
                assert len(await rt.get_tasks_by_status("completed")) == 20
            assert not found  # the long read was still held all that time
            release.set()
        assert [e.type for e in found[0]] == ["held.one"]


async def test_a_read_still_running_at_shutdown_is_answered(
    db_path: str, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runtime stops while a reader is in a read that never ends: the asker is told
    the runtime stopped, nobody hangs."""
    entered = anyio.Event()
    original = StorageActor._read_events

    async def endless(self: StorageActor, read: ReadEvents) -> tuple[Event, ...]:
        if read.pattern == "endless.*":
            entered.set()
            await anyio.sleep_forever()
        return await original(self, read)

    monkeypatch.setattr(StorageActor, "_read_events", endless)
    outcome: list[BaseException] = []
    config = RuntimeConfig(shutdown_timeout=0.5)

    async def reader(rt: Runtime) -> None:
        try:
            await rt.read_events(pattern="endless.*")
        except RuntimeStoppedError as exc:
            outcome.append(exc)

    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as tg, Runtime.open(db_path, config=config) as rt:
            tg.start_soon(reader, rt)
            await entered.wait()
    assert len(outcome) == 1
