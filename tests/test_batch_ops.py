"""Batch operations: ``create_tasks`` (many tasks, one commit, all or nothing) and
``claim_tasks`` (up to ``limit`` tasks for one worker, one commit), and ``start=True``
on claims. Real SQLite files, both backends, through the public API."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest
from _raw import raw_rows, refusing_writes

from hive_orchestration import (
    Claim,
    InvalidInputError,
    LeaseLostError,
    OrchestrationClient,
    RunStatus,
    Runtime,
    RuntimeConfig,
    StorageError,
    SyncOrchestrationClient,
    TaskStatus,
)
from hive_orchestration.actors.task_manager import TaskManager
from hive_orchestration.api.wire import call_json
from hive_orchestration.messages.tasks import ClaimTasks

pytestmark = pytest.mark.anyio

SOON = 10.0


@asynccontextmanager
async def runtime(db_path: str) -> AsyncIterator[Runtime]:
    async with Runtime.open(db_path, config=RuntimeConfig(retry_backoff=0.01)) as rt:
        yield rt


async def event_types(rt: Runtime, task_id: str) -> list[str]:
    return [e.type for e in await rt.read_events(0, limit=10_000) if e.task_id == task_id]


def rows(db_path: str, sql: str) -> list[tuple[Any, ...]]:
    """What is on disk, read by a separate connection."""
    return raw_rows(db_path, sql)


# -- create_tasks ---------------------------------------------------------------------------------


async def test_create_tasks_returns_ids_in_order_and_publishes_one_event_each(
    db_path: str,
) -> None:
    async with runtime(db_path) as rt:
        ids = await rt.create_tasks(
            [
                {"task_type": "build", "payload": {"n": 0}},
                {"task_type": "test", "payload": {"n": 1}, "priority": 7, "tags": ["ci"]},
                {"task_type": "deploy", "title": "ship it", "max_retries": 0},
            ]
        )
        assert len(set(ids)) == 3
        tasks = [await rt.get_task(task_id) for task_id in ids]
        assert [t.task_type for t in tasks if t] == ["build", "test", "deploy"]
        assert [t.payload for t in tasks if t] == [{"n": 0}, {"n": 1}, {}]
        assert [t.status for t in tasks if t] == [TaskStatus.QUEUED] * 3
        second, third = tasks[1], tasks[2]
        assert second is not None
        assert second.priority == 7
        assert second.tags == ("ci",)
        assert third is not None
        assert third.title == "ship it"
        assert third.max_retries == 0
        created = [e for e in await rt.read_events(0) if e.type == "task.created"]
        assert [e.task_id for e in created] == ids  # in the order given
    # Durable: the rows are on disk once the call returned.
    on_disk = rows(db_path, "SELECT id FROM tasks")
    assert {row[0] for row in on_disk} == set(ids)


async def test_create_tasks_with_nothing_creates_nothing(db_path: str) -> None:
    async with runtime(db_path) as rt:
        assert await rt.create_tasks([]) == []
        assert await rt.create_tasks(iter(())) == []
        assert await rt.read_events(0) == []


async def test_create_tasks_takes_any_iterable_of_mappings(db_path: str) -> None:
    async with runtime(db_path) as rt:
        ids = await rt.create_tasks({"task_type": f"t{n}"} for n in range(3))
        assert [(await rt.get_task(i)).task_type for i in ids] == ["t0", "t1", "t2"]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("tasks", "field", "reason"),
    [
        ({"task_type": "a"}, "tasks", "must be a list of mappings"),
        ("build", "tasks", "must be a list of mappings"),
        (5, "tasks", "must be a list of mappings"),
        ([{"task_type": "a"}, "b"], "tasks[1]", "must be a mapping"),
        ([{"task_type": "a"}, {"payload": {}}], "tasks[1].task_type", "is missing"),
        ([{"task_type": "a", "colour": "red"}], "tasks[0].colour", "not an argument"),
        (
            [{"task_type": "a"}, {"task_type": "b", "priority": -1}],
            "tasks[1].priority",
            "between 0",
        ),
        ([{"task_type": ""}], "tasks[0].task_type", "must not be empty"),
        ([{"task_type": "a", "payload": {"x": float("nan")}}], "tasks[0].payload.x", "finite"),
        ([{"task_type": "a", "due_date": "tomorrow"}], "tasks[0].due_date", "RFC 3339"),
        ([{"task_type": "a", "due_date": "2030-01-01T00:00:00"}], "tasks[0].due_date", "aware"),
        ([{"task_type": "a", "concurrency_limit": 2}], "tasks[0].concurrency_limit", "needs a"),
        ([{"task_type": "a"}] * 1001, "tasks", "more than 1000"),
    ],
)
async def test_a_bad_item_refuses_the_whole_batch(
    db_path: str, tasks: Any, field: str, reason: str
) -> None:
    async with runtime(db_path) as rt:
        with pytest.raises(InvalidInputError, match=reason) as refused:
            await rt.create_tasks(tasks)
        assert refused.value.field == field
        assert await rt.get_tasks_by_status("queued") == []
        assert await rt.read_events(0) == []


async def test_a_batch_the_database_refuses_leaves_nothing_behind(db_path: str) -> None:
    """All or nothing at commit too: the database refuses the third row, so none is kept,
    in memory or on disk, and no event is published."""
    async with runtime(db_path) as rt:
        await rt.create_task("warmup")
        async with refusing_writes(db_path, "tasks", "no bad tasks", when="NEW.title = 'bad'"):
            with pytest.raises(StorageError, match="no bad tasks"):
                await rt.create_tasks(
                    [{"task_type": "a"}, {"task_type": "b"}, {"task_type": "c", "title": "bad"}]
                )
            assert [t.task_type for t in await rt.get_tasks_by_status("queued")] == ["warmup"]
            assert [e.type for e in await rt.read_events(0)] == ["task.created"]
            assert await rt.claim_task("w1", ["a", "b", "c"]) is None
        # The runtime goes on: a good batch right after is taken.
        assert len(await rt.create_tasks([{"task_type": "a"}, {"task_type": "b"}])) == 2
    assert rows(db_path, "SELECT count(*) FROM tasks") == [(3,)]


async def test_idempotency_keys_hold_across_and_within_a_batch(db_path: str) -> None:
    async with runtime(db_path) as rt:
        first = await rt.create_task("job", idempotency_key="order-1")
        ids = await rt.create_tasks(
            [
                {"task_type": "job", "idempotency_key": "order-1"},  # known: the first task
                {"task_type": "job", "idempotency_key": "order-2"},
                {"task_type": "job", "idempotency_key": "order-2"},  # repeats the item above
                {"task_type": "job"},
            ]
        )
        assert ids[0] == first
        assert ids[1] == ids[2] != first
        assert len(set(ids)) == 3
        assert len(await rt.get_tasks_by_status("queued")) == 3
        created = [e for e in await rt.read_events(0) if e.type == "task.created"]
        assert len(created) == 3


async def test_a_due_date_may_be_rfc3339_text_in_a_batch(db_path: str) -> None:
    due = datetime(2030, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    async with runtime(db_path) as rt:
        (task_id, other) = await rt.create_tasks(
            [
                {"task_type": "a", "due_date": "2030-05-01T12:00:00+02:00"},
                {"task_type": "a", "due_date": due},
            ]
        )
        task, again = await rt.get_task(task_id), await rt.get_task(other)
        assert task is not None
        assert again is not None
        assert task.due_date == again.due_date == due.astimezone(UTC)


# -- claim_tasks ----------------------------------------------------------------------------------


async def test_claim_tasks_hands_out_the_best_tasks_up_to_the_limit(db_path: str) -> None:
    async with runtime(db_path) as rt:
        assert await rt.claim_tasks("w1", limit=5) == []
        low = await rt.create_task("job", priority=1)
        high = await rt.create_tasks([{"task_type": "job", "priority": 9} for _ in range(3)])
        other = await rt.create_task("other", priority=99)
        got = await rt.claim_tasks("w1", "job", limit=3, lease=30)
        assert [c.task.id for c in got] == high  # priority, then age
        assert len({c.lease.run_id for c in got}) == 3
        for c in got:
            assert c.task.status is TaskStatus.ASSIGNED
            assert c.task.assigned_worker == "w1"
            (run,) = await rt.get_runs(c.task.id)
            assert run.id == c.lease.run_id
            assert run.status is RunStatus.ASSIGNED
            assert run.lease_seconds == 30
        rest = await rt.claim_tasks("w1", "job", limit=3)
        assert [c.task.id for c in rest] == [low]  # fewer than the limit: what there is
        assert await rt.claim_tasks("w1", "job", limit=3) == []
        assert [c.task.id for c in await rt.claim_tasks("w2", limit=1)] == [other]


async def test_claim_tasks_keeps_concurrency_limits(db_path: str) -> None:
    async with runtime(db_path) as rt:
        limited = await rt.create_tasks(
            [{"task_type": "job", "concurrency_key": "tenant", "concurrency_limit": 2}] * 4
        )
        free = await rt.create_task("job", priority=0)
        got = await rt.claim_tasks("w1", limit=10)
        assert [c.task.id for c in got] == [*limited[:2], free]
        await rt.complete_task(got[0].lease)
        (next_one,) = await rt.claim_tasks("w1", limit=10)
        assert next_one.task.id == limited[2]


async def test_a_waiting_batch_claim_returns_when_tasks_arrive(db_path: str) -> None:
    async with runtime(db_path) as rt:
        got: list[list[Claim]] = []

        async def claimer() -> None:
            got.append(await rt.claim_tasks("w1", "job", limit=10, wait=SOON))

        with anyio.fail_after(SOON):
            async with anyio.create_task_group() as tg:
                tg.start_soon(claimer)
                await anyio.sleep(0.05)
                ids = await rt.create_tasks([{"task_type": "job"}] * 3)
        # It returns with what arrived together, not after waiting to fill its limit.
        assert [c.task.id for c in got[0]] == ids
        with anyio.fail_after(SOON):
            assert await rt.claim_tasks("w1", "job", limit=2, wait=0.05) == []


async def test_claim_with_start_runs_the_task_in_the_same_commit(db_path: str) -> None:
    async with runtime(db_path) as rt:
        single = await rt.create_task("job", priority=9)
        batch = await rt.create_tasks([{"task_type": "job"}] * 2)
        c = await rt.claim_task("w1", "job", start=True)
        assert c is not None
        assert c.task.id == single
        got = await rt.claim_tasks("w1", "job", limit=2, start=True)
        for claim in [c, *got]:
            assert claim.task.status is TaskStatus.RUNNING
            (run,) = await rt.get_runs(claim.task.id)
            assert run.status is RunStatus.RUNNING
            assert await event_types(rt, claim.task.id) == [
                "task.created",
                "task.assigned",
                "task.started",
            ]
            done = await rt.complete_task(claim.lease, {"ok": True})
            assert done.status is TaskStatus.COMPLETED
        assert [claim.task.id for claim in got] == batch


async def test_many_batch_claimers_never_share_a_task_and_lose_none(db_path: str) -> None:
    count, workers = 400, 6
    async with runtime(db_path) as rt:
        created: list[str] = []
        claimed: Counter[str] = Counter()

        async def producer() -> None:
            for n in range(0, count, 40):
                created.extend(
                    await rt.create_tasks(
                        [{"task_type": "job", "priority": k % 3} for k in range(n, n + 40)]
                    )
                )

        async def worker(name: str) -> None:
            while True:
                got = await rt.claim_tasks(name, "job", limit=7, wait=0.5, start=True)
                if not got:
                    return
                for c in got:
                    claimed[c.task.id] += 1
                async with anyio.create_task_group() as tg:
                    for c in got:
                        tg.start_soon(rt.complete_task, c.lease)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for w in range(workers):
                    tg.start_soon(worker, f"w{w}")
                tg.start_soon(producer)
        assert set(claimed) == set(created)
        assert len(created) == count
        assert max(claimed.values()) == 1
        done = await rt.get_tasks_by_status("completed", limit=count + 1)
        assert {t.id for t in done} == set(created)


async def test_a_batch_claim_whose_asker_left_is_handed_back_whole(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claimer leaves after its tasks were assigned (and started) but before the
    answer: every one of them goes back to the queue, without counting an attempt."""
    original = TaskManager._commit
    closed: list[bool] = []

    async def commit_and_lose_the_asker(self: TaskManager, work: Any, forwards: Any) -> Any:
        # After the commit, before the answers: on a store several nodes share, the
        # claims are decided inside the commit (from the rows it locks).
        error = await original(self, work, forwards)
        for envelope, outcome in work.answers:
            if isinstance(envelope.message, ClaimTasks) and outcome and not closed:
                envelope.reply.fail(RuntimeError("asker left"))
                closed.append(True)
        return error

    monkeypatch.setattr(TaskManager, "_commit", commit_and_lose_the_asker)
    async with runtime(db_path) as rt:
        ids = await rt.create_tasks([{"task_type": "job"}] * 3)
        with pytest.raises(RuntimeError, match="asker left"):
            await rt.claim_tasks("w1", "job", limit=3, start=True)
        again = await rt.claim_tasks("w2", "job", limit=5)
        assert [c.task.id for c in again] == ids
        assert all(c.lease.attempt == 2 and c.task.attempts == 0 for c in again)
        for task_id in ids:
            first, _ = await rt.get_runs(task_id)
            assert first.status is RunStatus.RELEASED
            assert "task.retrying" in await event_types(rt, task_id)


async def test_a_batch_claim_cancelled_while_waiting_takes_nothing(db_path: str) -> None:
    async with runtime(db_path) as rt:
        with anyio.move_on_after(0.1):
            await rt.claim_tasks("gone", "job", limit=4, wait=SOON)
        ids = await rt.create_tasks([{"task_type": "job"}] * 2)
        got = await rt.claim_tasks("here", "job", limit=4)
        assert [c.task.id for c in got] == ids
        assert all(c.lease.attempt == 1 for c in got)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"limit": "3"}, "limit"),
        ({"limit": True}, "limit"),
        ({"limit": 2.0}, "limit"),
        ({"limit": 2, "start": "yes"}, "start"),
        ({"limit": 2, "wait": -1}, "wait"),
        ({"limit": 2, "lease": 0}, "lease"),
        ({"limit": 2, "task_types": []}, "task_types"),
        ({"limit": 2, "worker_id": ""}, "worker_id"),
    ],
)
async def test_bad_batch_claim_arguments_are_refused(
    db_path: str, kwargs: dict[str, Any], field: str
) -> None:
    async with runtime(db_path) as rt:
        task_id = await rt.create_task("job")
        args: dict[str, Any] = {"worker_id": "w1", **kwargs}
        with pytest.raises(InvalidInputError) as refused:
            await rt.claim_tasks(**args)
        assert refused.value.field == field
        task = await rt.get_task(task_id)
        assert task is not None
        assert task.status is TaskStatus.QUEUED
        with pytest.raises(InvalidInputError) as refused:
            await rt.claim_task("w1", start=1)  # type: ignore[arg-type]
        assert refused.value.field == "start"


# -- other ways in --------------------------------------------------------------------------------


async def test_batches_through_json(db_path: str) -> None:
    def request(op: str, **args: object) -> bytes:
        return msgspec.json.encode({"op": op, "args": args})

    async with OrchestrationClient(db_path) as client:
        ids = msgspec.json.decode(
            await call_json(
                client,
                request(
                    "create_tasks",
                    tasks=[
                        {"task_type": "build", "due_date": "2030-01-01T00:00:00Z"},
                        {"task_type": "build", "priority": 3},
                    ],
                ),
            )
        )
        claims = msgspec.json.decode(
            await call_json(client, request("claim_tasks", worker_id="w1", limit=5, start=True))
        )
        assert [c["task"]["id"] for c in claims] == [ids[1], ids[0]]
        assert {c["task"]["status"] for c in claims} == {"running"}
        done = msgspec.json.decode(
            await call_json(client, request("complete_task", lease=claims[0]["lease"]))
        )
        assert done["status"] == "completed"
        with pytest.raises(InvalidInputError) as refused:
            await call_json(client, request("create_tasks", tasks=[{"task_type": 5}]))
        assert refused.value.field == "tasks[0].task_type"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_batches_from_sync_code(tmp_path: Path, backend: str) -> None:
    with SyncOrchestrationClient(db_path=str(tmp_path / "hive.db"), backend=backend) as client:
        ids = client.create_tasks([{"task_type": "job", "payload": {"n": n}} for n in range(4)])
        got = client.claim_tasks("w1", "job", limit=3, start=True)
        assert [c.task.id for c in got] == ids[:3]
        for c in got:
            client.complete_task(c.lease)
        assert [t.id for t in client.get_tasks_by_status("queued")] == ids[3:]


# -- complete_tasks and fail_tasks ----------------------------------------------------------------


async def running(rt: Runtime, count: int, lease: float = 600.0) -> list[Claim]:
    """``count`` tasks created, claimed and started by one worker."""
    await rt.create_tasks([{"task_type": "job", "payload": {"n": n}} for n in range(count)])
    claims = await rt.claim_tasks("w1", "job", limit=count, lease=lease, start=True)
    assert len(claims) == count
    return claims


async def statuses(rt: Runtime, claims: list[Claim]) -> list[TaskStatus]:
    tasks = [await rt.get_task(c.task.id) for c in claims]
    return [t.status for t in tasks if t is not None]


async def test_complete_tasks_completes_each_in_one_commit_with_an_event_each(
    db_path: str,
) -> None:
    async with runtime(db_path) as rt:
        claims = await running(rt, 5)
        after = await rt.last_seq()
        before = (await rt.statistics()).storage.transactions
        outcomes = await rt.complete_tasks(
            [{"lease": c.lease, "result": {"n": n}} for n, c in enumerate(claims[:4])]
            + [{"lease": claims[4].lease}]
        )
        assert (await rt.statistics()).storage.transactions == before + 1
        assert all(o.refused is None for o in outcomes)
        done = [o.result() for o in outcomes]
        assert [t.id for t in done] == [c.task.id for c in claims]
        assert {t.status for t in done} == {TaskStatus.COMPLETED}
        assert [t.result for t in done] == [{"n": 0}, {"n": 1}, {"n": 2}, {"n": 3}, None]
        events = await rt.read_events(after)
        assert [(e.type, e.task_id) for e in events] == [
            ("task.completed", c.task.id) for c in claims
        ]
        assert [e.data["run_id"] for e in events] == [c.lease.run_id for c in claims]
        runs = [(await rt.get_runs(c.task.id))[-1] for c in claims]
        assert {r.status for r in runs} == {RunStatus.COMPLETED}
        assert await rt.complete_tasks([]) == []
    # Durable once the call returned.
    assert rows(db_path, "SELECT DISTINCT status FROM tasks") == [("completed",)]


async def test_a_refused_item_changes_nothing_and_the_others_complete(db_path: str) -> None:
    """One commit, each item decided on its own: an item whose lease does not hold its
    task (another run's id, a wrong secret, already completed, the same lease twice, a
    task cancelled under it) says why and changes nothing; the others complete."""
    async with runtime(db_path) as rt:
        claims = await running(rt, 6)
        await rt.complete_task(claims[1].lease)  # already completed
        await rt.cancel_task(claims[4].task.id, reason="not needed")  # the lease is lost
        wrong_run = msgspec.structs.replace(claims[2].lease, run_id=claims[3].lease.run_id)
        wrong_secret = msgspec.structs.replace(claims[3].lease, secret="x" * 22)
        after = await rt.last_seq()
        outcomes = await rt.complete_tasks(
            [
                {"lease": claims[0].lease, "result": {"ok": 0}},
                {"lease": claims[1].lease},
                {"lease": wrong_run},
                {"lease": wrong_secret},
                {"lease": claims[4].lease},
                {"lease": claims[5].lease, "result": {"ok": 5}},
                {"lease": claims[0].lease, "result": {"again": True}},
            ]
        )
        refused = {i: o.refused for i, o in enumerate(outcomes) if o.refused is not None}
        assert sorted(refused) == [1, 2, 3, 4, 6]
        for index, refusal in refused.items():
            assert refusal.error == "LeaseLostError"
            assert refusal.field == f"items[{index}].lease"
            with pytest.raises(LeaseLostError) as lost:
                outcomes[index].result()
            assert lost.value.task_id == refusal.attributes["task_id"]
            assert str(lost.value) == refusal.message
        assert "run ended as completed" in str(refused[1].attributes["reason"])
        assert refused[4].attributes["status"] == "cancelled"
        assert refused[6].attributes["task_id"] == claims[0].task.id
        assert [outcomes[0].result().result, outcomes[5].result().result] == [{"ok": 0}, {"ok": 5}]
        # Only the two good items moved anything, and published.
        assert [(e.type, e.task_id) for e in await rt.read_events(after)] == [
            ("task.completed", claims[0].task.id),
            ("task.completed", claims[5].task.id),
        ]
        assert await statuses(rt, claims) == [
            TaskStatus.COMPLETED,
            TaskStatus.COMPLETED,
            TaskStatus.RUNNING,
            TaskStatus.RUNNING,
            TaskStatus.CANCELLED,
            TaskStatus.COMPLETED,
        ]
        # The refused claims still hold their tasks: their own leases complete them.
        again = await rt.complete_tasks([{"lease": claims[2].lease}, {"lease": claims[3].lease}])
        assert [o.result().status for o in again] == [TaskStatus.COMPLETED] * 2


@pytest.mark.parametrize(
    ("call", "items", "field", "reason"),
    [
        ("complete_tasks", {"lease": None}, "items", "must be a list of mappings"),
        ("complete_tasks", "abc", "items", "must be a list of mappings"),
        ("complete_tasks", [0], "items[0]", "must be a mapping"),
        ("complete_tasks", [{}], "items[0].lease", "is missing"),
        ("complete_tasks", [{"lease": "token"}], "items[0].lease", "must be the Lease"),
        ("complete_tasks", [{"lease": {"task_id": 5}}], "items[0].lease", "is not a lease"),
        ("complete_tasks", [{"GOOD": 1, "colour": "red"}], "items[0].colour", "not an item's"),
        ("complete_tasks", [{"GOOD": 1, "result": [1]}], "items[0].result", "object"),
        ("complete_tasks", [{"GOOD": 1, "result": {"x": math.nan}}], "items[0].result.x", "finite"),
        ("complete_tasks", [{"GOOD": 1}] * 1001, "items", "more than 1000"),
        ("fail_tasks", [{"GOOD": 1}], "items[0].error", "is missing"),
        ("fail_tasks", [{"GOOD": 1, "error": ""}], "items[0].error", "empty"),
        (
            "fail_tasks",
            [{"GOOD": 1, "error": "e", "retryable": "no"}],
            "items[0].retryable",
            "a bool",
        ),
        (
            "fail_tasks",
            [{"GOOD": 1, "error": "e", "retry_after": -1}],
            "items[0].retry_after",
            "seconds",
        ),
        ("fail_tasks", [{"GOOD": 1, "error": "e", "result": {}}], "items[0].result", "not an"),
    ],
)
async def test_a_malformed_item_refuses_the_whole_call(
    db_path: str, call: str, items: Any, field: str, reason: str
) -> None:
    """Malformed input is the caller's bug, not a claim's fate: nothing is sent."""
    async with runtime(db_path) as rt:
        [claim] = await running(rt, 1)
        after = await rt.last_seq()
        if isinstance(items, list):  # "GOOD": a good lease in the item
            lease = {"lease": claim.lease}
            items = [
                {**{k: v for k, v in i.items() if k != "GOOD"}, **lease}
                if isinstance(i, dict) and "GOOD" in i
                else i
                for i in items
            ]
            if len(items) > 1:  # a good item first, so that something could be applied
                items = [{"lease": claim.lease}, *items[1:]]
        with pytest.raises(InvalidInputError, match=reason) as refused:
            await getattr(rt, call)(items)
        assert refused.value.field == field
        assert await rt.read_events(after) == []
        assert await statuses(rt, [claim]) == [TaskStatus.RUNNING]


async def test_a_failed_commit_of_complete_tasks_changes_nothing(db_path: str) -> None:
    """The items are one commit: the database refuses one run's update, so no item is
    applied, in memory or on disk, and every claim still holds its task."""
    async with runtime(db_path) as rt:
        claims = await running(rt, 3)
        after = await rt.last_seq()
        bad = claims[2].lease.run_id
        async with refusing_writes(
            db_path, "runs", "no run ends today", event="UPDATE", when=f"NEW.id = '{bad}'"
        ):
            with pytest.raises(StorageError, match="no run ends today"):
                await rt.complete_tasks([{"lease": c.lease, "result": {"n": 1}} for c in claims])
            assert await statuses(rt, claims) == [TaskStatus.RUNNING] * 3
            assert await rt.read_events(after) == []
            runs = [(await rt.get_runs(c.task.id))[-1] for c in claims]
            assert {r.status for r in runs} == {RunStatus.RUNNING}
        outcomes = await rt.complete_tasks([{"lease": c.lease, "result": {"n": 2}} for c in claims])
        assert [o.result().result for o in outcomes] == [{"n": 2}] * 3
    assert rows(db_path, "SELECT count(*) FROM tasks WHERE status = 'completed'") == [(3,)]


async def test_a_cancelled_complete_tasks_is_applied_whole_or_not_at_all(db_path: str) -> None:
    """Cancelled at any point, the call leaves every item completed (its commit was
    under way) or none: never some."""
    async with runtime(db_path) as rt:
        for checkpoints in range(12):
            claims = await running(rt, 8)
            with anyio.CancelScope() as scope:

                async def cancel_soon(
                    scope: anyio.CancelScope = scope, n: int = checkpoints
                ) -> None:
                    for _ in range(n):
                        await anyio.lowlevel.checkpoint()
                    scope.cancel()

                async with anyio.create_task_group() as group:
                    group.start_soon(cancel_soon)
                    await rt.complete_tasks([{"lease": c.lease} for c in claims])
            # Whatever was sent is decided by the next batch: a read after it sees it.
            seen = set(await statuses(rt, claims))
            assert seen in ({TaskStatus.COMPLETED}, {TaskStatus.RUNNING}), (checkpoints, seen)
            if seen == {TaskStatus.RUNNING}:
                outcomes = await rt.complete_tasks([{"lease": c.lease} for c in claims])
                assert all(o.refused is None for o in outcomes)
        completed = [e for e in await rt.read_events(0) if e.type == "task.completed"]
        assert len(completed) == len({e.task_id for e in completed}) == 12 * 8


async def test_fail_tasks_retries_or_fails_each_as_fail_task_would(db_path: str) -> None:
    async with OrchestrationClient(db_path) as rt:
        await rt.create_tasks([{"task_type": "job", "max_retries": 1} for _ in range(3)])
        claims = await rt.claim_tasks("w1", "job", limit=3, lease=600, start=True)
        await rt.complete_task(claims[2].lease)
        after = await rt.last_seq()
        outcomes = await rt.fail_tasks(
            [
                {"lease": claims[0].lease, "error": "flaky", "retry_after": 0.01},
                {"lease": claims[1].lease, "error": "broken", "retryable": False},
                {"lease": claims[2].lease, "error": "too late"},
            ]
        )
        first, second = outcomes[0].result(), outcomes[1].result()
        assert (first.status, first.error, first.attempts) == (TaskStatus.QUEUED, "flaky", 1)
        assert (second.status, second.error) == (TaskStatus.FAILED, "broken")
        assert outcomes[2].refused is not None
        assert outcomes[2].refused.field == "items[2].lease"
        with pytest.raises(LeaseLostError):
            outcomes[2].result()
        events = [(e.type, e.task_id) for e in await rt.read_events(after)]
        assert events == [
            ("task.retrying", claims[0].task.id),
            ("task.failed", claims[1].task.id),
        ]
        retried = await rt.claim_task("w2", "job", wait=SOON)
        assert retried is not None
        assert retried.task.id == claims[0].task.id
        assert (await rt.get_runs(claims[1].task.id))[-1].error == "broken"


async def test_batch_completions_through_json_and_from_sync_code(db_path: str) -> None:
    def request(op: str, **args: object) -> bytes:
        return msgspec.json.encode({"op": op, "args": args})

    async with OrchestrationClient(db_path) as client:
        await client.create_tasks([{"task_type": "build"} for _ in range(3)])
        claims = msgspec.json.decode(
            await call_json(client, request("claim_tasks", worker_id="w1", limit=3, start=True))
        )
        leases = [c["lease"] for c in claims]
        answer = await call_json(
            client,
            request(
                "complete_tasks",
                items=[
                    {"lease": leases[0], "result": {"ok": True}},
                    {"lease": {**leases[1], "secret": "wrong"}},
                ],
            ),
        )
        done, lost = msgspec.json.decode(answer)
        assert done["task"]["status"] == "completed"
        assert done["task"]["result"] == {"ok": True}
        assert "refused" not in done
        assert "task" not in lost
        assert lost["refused"]["error"] == "LeaseLostError"
        assert lost["refused"]["field"] == "items[1].lease"
        assert lost["refused"]["attributes"]["task_id"] == leases[1]["task_id"]
        failed = msgspec.json.decode(
            await call_json(
                client,
                request(
                    "fail_tasks", items=[{"lease": leases[2], "error": "no", "retryable": False}]
                ),
            )
        )
        assert failed[0]["task"]["status"] == "failed"
        with pytest.raises(InvalidInputError) as refused:
            await call_json(client, request("complete_tasks", items=[{"lease": 5}]))
        assert refused.value.field == "items[0].lease"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_batch_completions_from_sync_code(tmp_path: Path, backend: str) -> None:
    with SyncOrchestrationClient(db_path=str(tmp_path / "hive.db"), backend=backend) as client:
        client.create_tasks([{"task_type": "job"} for _ in range(3)])
        got = client.claim_tasks("w1", "job", limit=3, start=True)
        outcomes = client.complete_tasks([{"lease": c.lease} for c in got[:2]])
        assert [o.result().status for o in outcomes] == [TaskStatus.COMPLETED] * 2
        [failed] = client.fail_tasks([{"lease": got[2].lease, "error": "x", "retryable": False}])
        assert failed.result().status is TaskStatus.FAILED
