"""A backlog stays in SQLite: the TaskManager holds only the head of each ready queue.

With ``ready_queue_head`` set to 2, every queue of a few tasks has a backlog in storage,
so these tests go through refills all the time: claims still come in claim order
(priority, then age) across refills, a task created while a head is drained or being read
is neither lost nor handed out twice, operations on tasks memory does not hold answer
as they did, a reopened runtime loads the heads and not the backlog, and concurrency keys
keep their limits and their priority order when a key has more tasks than a head.
Real SQLite files, both backends.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

from hive_orchestration import Claim, Runtime, RuntimeConfig
from hive_orchestration.actors.task_manager import TaskManager
from hive_orchestration.api import embedded as embedded_module
from hive_orchestration.messages.tasks import ClaimTask, CreateTask
from hive_orchestration.runtime import Envelope, Reply

pytestmark = pytest.mark.anyio

HEAD = 2


def track(monkeypatch: pytest.MonkeyPatch) -> list[TaskManager]:
    made: list[TaskManager] = []

    def build(*args: Any, **kwargs: Any) -> TaskManager:
        made.append(TaskManager(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(embedded_module, "TaskManager", build)
    return made


@asynccontextmanager
async def runtime(db_path: str, head: int = HEAD, readers: int = 2) -> AsyncIterator[Runtime]:
    config = RuntimeConfig(
        ready_queue_head=head,
        retry_backoff=0.01,
        retry_backoff_max=0.02,
        read_connections=readers,
    )
    async with Runtime.open(db_path, config=config) as rt:
        yield rt


def queued_in_memory(manager: TaskManager) -> int:
    """Queued tasks the TaskManager holds (every queue's head, at most twice its size)."""
    return sum(1 for task in manager._tasks.values() if task.status.value == "queued")


async def claim_all(rt: Runtime, *types: str, worker: str = "w") -> list[Claim]:
    claims = []
    while (claim := await rt.claim_task(worker, list(types) or None)) is not None:
        claims.append(claim)
    return claims


async def create_mixed(rt: Runtime, count: int, task_type: str = "job") -> list[str]:
    """``count`` tasks over 3 priorities, in several calls; returns them in claim order."""
    made: list[tuple[int, int, str]] = []
    for start in range(0, count, 4):
        items = [
            {"task_type": task_type, "payload": {"n": n}, "priority": n % 3}
            for n in range(start, min(start + 4, count))
        ]
        ids = await rt.create_tasks(items)
        for n, task_id in zip(range(start, start + len(items)), ids, strict=True):
            made.append((-(n % 3), n, task_id))
    return [task_id for *_, task_id in sorted(made)]


@pytest.mark.parametrize("readers", [2, 0], ids=["refills-on-a-reader", "no-readers"])
async def test_claims_come_in_priority_then_age_order_across_refills(
    db_path: str, monkeypatch: pytest.MonkeyPatch, readers: int
) -> None:
    """With reader connections (SQLite: the refills have one of their own) and without
    (the refills read on the write connection, in the same one read transaction)."""
    managers = track(monkeypatch)
    async with runtime(db_path, readers=readers) as rt:
        [manager] = managers
        expected = await create_mixed(rt, 20)
        assert queued_in_memory(manager) <= 2 * HEAD  # the other 16 or more stay in SQLite
        got = []
        while (claim := await rt.claim_task("w", "job")) is not None:
            got.append(claim.task.id)
            assert queued_in_memory(manager) <= 2 * HEAD
        assert got == expected
        # Listing reads storage: every queued task, whatever memory holds.
        assert await rt.get_tasks_by_status("queued") == []
        assert len(await rt.get_tasks_by_status("assigned")) == 20


async def test_a_claim_tasks_larger_than_the_head_gets_all_it_asks_for(db_path: str) -> None:
    async with runtime(db_path) as rt:
        expected = await create_mixed(rt, 12)
        claims = await rt.claim_tasks("w", "job", limit=7)
        assert [c.task.id for c in claims] == expected[:7]
        rest = await rt.claim_tasks("w", "job", limit=100)
        assert [c.task.id for c in rest] == expected[7:]


async def test_tasks_created_in_the_batch_that_drains_a_head_are_ordered_and_not_lost(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim drains the head; in the same batch, tasks are created before the bound
    (held), after it (left to storage) and at a priority of their own. Every task is then
    handed out once, in claim order."""
    managers = track(monkeypatch)
    async with runtime(db_path) as rt:
        [manager] = managers
        old = [await rt.create_task("job", {"n": n}, priority=1) for n in range(6)]
        first = await rt.claim_task("w", "job")
        assert first is not None
        assert first.task.id == old[0]

        def create(n: int, priority: int) -> CreateTask:
            return CreateTask(title=f"t{n}", task_type="job", payload={}, priority=priority)

        def take() -> ClaimTask:
            return ClaimTask(worker_id="w", task_types=("job",), lease=30.0)

        outcomes = await one_batch(
            rt, take(), create(1, 1), take(), create(2, 5), create(3, 0), take(), take()
        )
        low, high, lowest = (outcomes[i] for i in (1, 3, 4))
        claimed = [o.task.id for o in outcomes if isinstance(o, Claim)]
        # Claims are handed out at the end of the batch: the new high-priority task first.
        assert claimed == [high, old[1], old[2], old[3]]
        rest = [c.task.id for c in await claim_all(rt, "job")]
        assert rest == [old[4], old[5], low, lowest]
        assert queued_in_memory(manager) == 0


@asynccontextmanager
async def refills_held(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[anyio.Event, anyio.Event]]:
    """Once ``arm`` is set, the next read of heads is served by storage at once but its
    answer reaches the TaskManager only when ``release`` is set: batches go on meanwhile,
    with that read in flight."""
    arm, release, sent = anyio.Event(), anyio.Event(), anyio.Event()
    original = TaskManager._send_refill

    async with anyio.create_task_group() as tg:

        async def send(self: TaskManager, queues: Any) -> Any:
            refill = await original(self, queues)
            if refill is None or not arm.is_set() or sent.is_set():
                return refill
            sent.set()
            real, proxy = refill.reply, Reply[Any]()

            async def relay() -> None:
                value = await real.wait()
                await release.wait()
                proxy.resolve(value)

            tg.start_soon(relay)
            refill.reply = proxy
            return refill

        monkeypatch.setattr(TaskManager, "_send_refill", send)
        yield arm, release
        release.set()


async def test_tasks_created_and_changed_while_a_read_is_in_flight_are_not_lost(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The head is read after its bound (priority 8) while, before its answer comes, a
    task is created before the bound (9: held), one between the bound and where the read
    ends (5: left to storage, then taken in from memory's copy), one at the end (1), and a
    task of the read is cancelled. Every task is handed out once, in claim order."""
    async with refills_held(monkeypatch) as (arm, release), runtime(db_path) as rt:
        ids = {p: await rt.create_task("job", priority=p) for p in (9, 8, 6, 4, 2, 0)}
        got = [await rt.claim_task("w", "job")]
        arm.set()
        got.append(await rt.claim_task("w", "job"))  # the head is empty: read it (held)
        nine = await rt.create_task("job", priority=9)
        five = await rt.create_task("job", priority=5)
        one = await rt.create_task("job", priority=1)
        cancelled = await rt.cancel_task(ids[6])  # in the read's answer
        assert cancelled.status.value == "cancelled"
        release.set()
        got += await claim_all(rt, "job")
        assert [c.task.id for c in got if c is not None] == [
            ids[9],
            ids[8],
            nine,
            five,
            ids[4],
            ids[2],
            one,
            ids[0],
        ]


async def test_a_task_deleted_while_a_read_is_in_flight_is_not_handed_out(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with refills_held(monkeypatch) as (arm, release), runtime(db_path) as rt:
        ids = {p: await rt.create_task("job", priority=p) for p in (9, 8, 6, 4, 2, 0)}
        got = [await rt.claim_task("w", "job")]
        arm.set()
        got.append(await rt.claim_task("w", "job"))
        assert await rt.delete_task(ids[4])  # in the read's answer, gone from storage
        release.set()
        got += await claim_all(rt, "job")
        assert [c.task.id for c in got if c is not None] == [ids[9], ids[8], ids[6], ids[2], ids[0]]


@asynccontextmanager
async def snapshot_held(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[threading.Event, threading.Event, threading.Event]]:
    """Once ``arm`` is set, the next refill of a head stops inside its read transaction,
    on its reader's thread, right after its first statement (the snapshot is taken), and
    sets ``inside``; it reads on (in that snapshot) when ``release`` is set."""
    from hive_orchestration.storage.sqlite import queues

    arm, inside, release = threading.Event(), threading.Event(), threading.Event()
    load_heads = queues._load_heads

    def held(heads: Any, limit: int) -> Any:
        job = load_heads(heads, limit)
        if heads is None or not arm.is_set() or inside.is_set():
            return (yield from job)
        rows = yield next(job)
        inside.set()
        assert release.wait(10), "never released"
        try:
            while True:
                rows = yield job.send(rows)
        except StopIteration as done:
            return done.value

    monkeypatch.setattr(queues, "_load_heads", held)
    try:
        yield arm, inside, release
    finally:
        release.set()


@pytest.mark.sqlite_only("a refill reads on a reader of its own, in a WAL snapshot")
async def test_a_refill_reads_a_snapshot_while_commits_change_its_tasks(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refill runs on a read-only connection of its own, in one read transaction: held
    open inside it (its snapshot taken, before any of the changes below), commits go on
    (on the write connection the first would wait for the read), creating tasks before,
    inside and after the range it reads, cancelling one task of its answer and deleting
    another. Its answer, older than those commits, still hands every task out once, in
    claim order, and neither the cancelled task nor the deleted one."""
    async with snapshot_held(monkeypatch) as (arm, inside, release), runtime(db_path) as rt:
        ids = {p: await rt.create_task("job", priority=p) for p in (9, 8, 6, 4, 3, 2, 0)}
        got = [await rt.claim_task("w", "job")]
        arm.set()
        got.append(await rt.claim_task("w", "job"))  # the head runs low: a refill
        with anyio.fail_after(10):
            assert await anyio.to_thread.run_sync(inside.wait, 5), "no refill was held"
            nine = await rt.create_task("job", priority=9)
            five = await rt.create_task("job", priority=5)
            one = await rt.create_task("job", priority=1)
            cancelled = await rt.cancel_task(ids[6])  # in the snapshot's answer, queued
            assert cancelled.status.value == "cancelled"
            assert await rt.delete_task(ids[4])  # in the answer, gone from storage
        release.set()
        got += await claim_all(rt, "job")
        assert [c.task.id for c in got if c is not None] == [
            ids[9],
            ids[8],
            nine,
            five,
            ids[3],
            ids[2],
            one,
            ids[0],
        ]


async def test_concurrent_creators_and_claimers_hand_out_every_task_once(db_path: str) -> None:
    async with runtime(db_path) as rt:
        created: list[str] = []
        claimed: list[str] = []
        done = anyio.Event()

        async def creator(c: int) -> None:
            for n in range(30):
                created.append(await rt.create_task("job", {"c": c, "n": n}, priority=n % 4))

        async def claimer(w: int) -> None:
            while not (done.is_set() and len(claimed) == len(created)):
                claim = await rt.claim_task(f"w{w}", "job", wait=0.05)
                if claim is not None:
                    claimed.append(claim.task.id)
                    await rt.start_task(claim.lease)
                    await rt.complete_task(claim.lease)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for w in range(3):
                    tg.start_soon(claimer, w)
                async with anyio.create_task_group() as creators:
                    for c in range(3):
                        creators.start_soon(creator, c)
                done.set()
        assert sorted(claimed) == sorted(created)
        assert len(set(claimed)) == 90


async def test_operations_on_tasks_not_in_memory_answer_as_before(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    managers = track(monkeypatch)
    async with runtime(db_path) as rt:
        [manager] = managers
        ids = [await rt.create_task("job", {"n": n}) for n in range(10)]
        deep, deeper, deepest, gone = ids[6], ids[7], ids[8], ids[9]
        assert deep not in manager._tasks
        task = await rt.get_task(deep)
        assert task is not None
        assert task.status.value == "queued"
        async with rt.subscribe("task.*") as events:
            cancelled = await rt.cancel_task(deep, reason="not needed")
            assert cancelled.status.value == "cancelled"
            assert cancelled.error == "not needed"
            failed = await rt.update_task_status(deeper, "failed", error="by hand")
            assert failed
            assert await rt.delete_task(gone)
            with anyio.fail_after(5):
                seen = [await events.receive() for _ in range(3)]
        assert [(e.type, e.task_id) for e in seen] == [
            ("task.cancelled", deep),
            ("task.failed", deeper),
            ("task.deleted", gone),
        ]
        assert seen[0].data["previous"] == "queued"
        assert await rt.get_task(gone) is None
        got = [c.task.id for c in await claim_all(rt, "job")]
        assert got == [*ids[:6], deepest]
        unroutable = await rt.create_task("nobody-does-this")
        assert [t.id for t in await rt.get_unroutable_tasks()] == [unroutable]


async def test_a_requeued_task_left_to_storage_keeps_its_runs(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A released task goes back behind better tasks, out of the head: read back later,
    it comes with its runs (its next claim is attempt 2)."""
    managers = track(monkeypatch)
    async with runtime(db_path) as rt:
        [manager] = managers
        first = await rt.create_task("job", priority=0)
        claim = await rt.claim_task("w", "job")
        assert claim is not None
        better = [await rt.create_task("job", priority=5) for _ in range(2 * HEAD + 1)]
        await rt.release_task(claim.lease)
        assert first not in manager._tasks
        assert [r.run_number for r in await rt.get_runs(first)] == [1]
        got = await claim_all(rt, "job")
        assert [c.task.id for c in got] == [*better, first]
        assert got[-1].lease.attempt == 2
        assert [r.run_number for r in await rt.get_runs(first)] == [1, 2]


async def test_a_reopened_runtime_loads_the_heads_not_the_backlog(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with runtime(db_path) as rt:
        expected = await create_mixed(rt, 12)
        other = await create_mixed(rt, 5, task_type="other")
        held = await rt.claim_task("w", "job")  # the runtime stops while it is held
        assert held is not None
        assert held.task.id == expected[0]
    managers = track(monkeypatch)
    async with runtime(db_path) as rt:
        [manager] = managers
        # Two queues' heads and the recovered claim, not 17 tasks.
        assert queued_in_memory(manager) <= 2 * HEAD + 1
        got = await claim_all(rt, "job")
        # Recovered: back in the queue, still the best, its next claim attempt 2.
        assert [c.task.id for c in got] == expected
        assert got[0].lease.attempt == 2
        assert [c.task.id for c in await claim_all(rt, "other")] == other


async def test_a_key_with_more_tasks_than_the_head_keeps_its_limit_and_order(
    db_path: str,
) -> None:
    async with runtime(db_path) as rt:
        ids = [
            await rt.create_task("job", {"n": n}, concurrency_key="k", concurrency_limit=3)
            for n in range(8)
        ]
        claims = await rt.claim_tasks("w", "job", limit=10)
        assert [c.task.id for c in claims] == ids[:3]
        assert await rt.claim_task("w", "job") is None  # the key is full
        await rt.complete_task(claims[1].lease)
        again = await rt.claim_tasks("w", "job", limit=10)
        assert [c.task.id for c in again] == ids[3:4]


async def test_a_keys_better_tasks_in_storage_hold_back_a_worse_task_of_another_type(
    db_path: str,
) -> None:
    """Key "k" (limit 3): type ta has priorities 9, 8, 7, 6 and 1 (the head holds 9 and 8),
    type tb one task of priority 5. The key's 3 slots belong to 9, 8 and 7, so a tb claimer
    gets nothing, although among the tasks memory holds, 5 is third best."""
    async with runtime(db_path) as rt:
        ta = [
            await rt.create_task("ta", priority=p, concurrency_key="k", concurrency_limit=3)
            for p in (9, 8, 7, 6, 1)
        ]
        tb = await rt.create_task("tb", priority=5, concurrency_key="k", concurrency_limit=3)
        assert await rt.claim_task("wb", "tb") is None
        got = await rt.claim_tasks("wa", "ta", limit=10)
        assert [c.task.id for c in got] == ta[:3]
        await rt.complete_task(got[0].lease)
        assert await rt.claim_task("wb", "tb") is None  # 6 comes before 5
        six = await rt.claim_task("wa", "ta")
        assert six is not None
        assert six.task.id == ta[3]
        await rt.complete_task(got[1].lease)
        five = await rt.claim_task("wb", "tb")
        assert five is not None
        assert five.task.id == tb


async def one_batch(rt: Runtime, *messages: object) -> list[object]:
    """Queue all messages at once, so that the TaskManager handles them as one batch."""
    replies: list[Reply[object]] = []
    for message in messages:
        reply: Reply[object] = Reply()
        assert rt._tasks.mailbox.put_nowait(Envelope(message, reply))  # type: ignore[arg-type]
        replies.append(reply)
    with anyio.fail_after(5):
        return [await reply.wait() for reply in replies]


@pytest.mark.sqlite_only("counts the SQLite store's decoding")
async def test_a_heads_read_is_decoded_and_taken_in_a_slice_at_a_time(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading a head of 1 024 tasks and taking it in hold the event loop a slice of at
    most 256 tasks at a time (counted, not timed): the decoding in storage and the
    TaskManager's taking in each give the loop back between slices. The rows themselves
    are read on a reader's thread, in one hop, none on the loop's."""
    from hive_orchestration.actors.task_manager import heads
    from hive_orchestration.storage.sqlite import queues, store

    loop_thread = threading.get_ident()
    # "row" (a task decoded), "take" (taken in); the loop runs at a "yield" and at a
    # "read" (an await on the connection's thread), and between two tasks' steps.
    steps: list[str] = []
    task_from_row = queues.task_from_row
    take_in = TaskManager._take_in
    checkpoint = anyio.lowlevel.checkpoint
    shielded = anyio.lowlevel.cancel_shielded_checkpoint
    readers: set[int] = set()  # the threads the reads' statements ran on

    def row(*args: Any) -> Any:
        steps.append("row" if threading.get_ident() == loop_thread else "row-off")
        return task_from_row(*args)

    def take(*args: Any) -> None:
        steps.append("take")
        take_in(*args)

    snapshot = store._Checked.snapshot
    load_heads = queues._load_heads

    async def read(*args: Any) -> Any:
        steps.append("read")
        return await snapshot(*args)

    def job(*args: Any) -> Any:
        readers.add(threading.get_ident())
        return (yield from load_heads(*args))

    async def pause() -> None:
        steps.append("yield")
        await checkpoint()

    async def shielded_pause() -> None:
        steps.append("yield")
        await shielded()

    head = 1024
    async with runtime(db_path, head=head) as rt:
        for _ in range(6):
            await rt.create_tasks([{"task_type": "job", "payload": {"n": n}} for n in range(512)])
    monkeypatch.setattr(queues, "task_from_row", row)
    monkeypatch.setattr(queues, "_load_heads", job)
    monkeypatch.setattr(TaskManager, "_take_in", take)
    monkeypatch.setattr(store._Checked, "snapshot", read)
    monkeypatch.setattr(anyio.lowlevel, "checkpoint", pause)
    monkeypatch.setattr(anyio.lowlevel, "cancel_shielded_checkpoint", shielded_pause)
    async with runtime(db_path, head=head) as rt:  # opening reads the head: 1 024 rows
        for _ in range(head // 2 + 8):  # under half: the next 1 024 are read and taken in
            assert await rt.claim_task("w", "job") is not None
        while steps.count("take") < head:
            assert await rt.claim_task("w", "job") is not None

    def longest(kind: str) -> int:
        return max(len(list(run)) for step, run in itertools.groupby(steps) if step == kind)

    assert steps.count("row") >= 2 * head
    assert "row-off" not in steps
    assert steps.count("take") >= head
    assert longest("row") <= heads.TAKE_SLICE
    assert longest("take") <= heads.TAKE_SLICE
    assert readers
    assert loop_thread not in readers
