"""Control by hand (docs/CONTROL.md): wait_for_task, retry_task, idempotency keys held
while live, revoking and restoring a task type, flushing a queue, and get_task_counts.

Real SQLite files, both backends; reopening a file checks what must be durable (the
SIGKILL and socket tests are in tests/test_control_remote.py).
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from test_idempotency_keys import one_batch

from hive_orchestration import (
    Event,
    IllegalTransitionError,
    InvalidInputError,
    NotFoundError,
    RequestTimeoutError,
    Runtime,
    RuntimeConfig,
    StorageError,
    SyncOrchestrationClient,
    Task,
    TaskRetriedEvent,
    TaskStatus,
)
from hive_orchestration.messages.tasks import (
    CancelTask,
    CreateTask,
    GetTask,
    RetryTask,
    RevokeTaskType,
)
from hive_orchestration.storage.sqlite import drivers

pytestmark = pytest.mark.anyio

#: Only turns a hang into a failure.
DEADLINE = 30.0


async def events_of(runtime: Runtime, pattern: str) -> list[Event]:
    return await runtime.read_events(0, pattern=pattern)


async def failed_task(runtime: Runtime, task_type: str = "build", **options: Any) -> str:
    """A task that failed for good (no retries left)."""
    task_id = await runtime.create_task(task_type, max_retries=0, **options)
    claim = await runtime.claim_task("w1", [task_type], start=True)
    assert claim is not None
    assert claim.task.id == task_id
    failed = await runtime.fail_task(claim.lease, "boom")
    assert failed.status is TaskStatus.FAILED
    return task_id


# -- wait_for_task ----------------------------------------------------------------------


async def test_wait_for_task_returns_a_task_as_soon_as_it_ends(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        task_id = await runtime.create_task("build")
        got: list[Any] = []

        async def wait() -> None:
            got.append(await runtime.wait_for_task(task_id, timeout=DEADLINE))

        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as group:
                group.start_soon(wait)
                await anyio.wait_all_tasks_blocked()
                assert got == []  # still queued: it waits
                claim = await runtime.claim_task("w1", ["build"], start=True)
                assert claim is not None
                await anyio.wait_all_tasks_blocked()
                assert got == []  # running: still waiting
                await runtime.complete_task(claim.lease, {"answer": 42})
        (task,) = got
        assert (task.status, task.result) == (TaskStatus.COMPLETED, {"answer": 42})
        # An ended task is returned at once, a failed one with its error.
        assert (await runtime.wait_for_task(task_id)).status is TaskStatus.COMPLETED
        failed = await runtime.wait_for_task(await failed_task(runtime), timeout=1)
        assert (failed.status, failed.error) == (TaskStatus.FAILED, "boom")


async def test_wait_for_task_returns_a_task_deleted_as_it_completed(db_path: str) -> None:
    """A type deleted on success (RuntimeConfig.delete_on_success): the waiter gets the
    completion and its result, from the log, not NotFoundError."""
    config = RuntimeConfig(delete_on_success=("mail",))
    async with Runtime.open(db_path, config=config) as runtime:
        task_id = await runtime.create_task("mail")
        got: list[Any] = []

        async def wait() -> None:
            got.append(await runtime.wait_for_task(task_id, timeout=DEADLINE))

        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as group:
                group.start_soon(wait)
                await anyio.wait_all_tasks_blocked()
                claim = await runtime.claim_task("w1", ["mail"], start=True)
                assert claim is not None
                await runtime.complete_task(claim.lease, {"sent": True})
        assert await runtime.get_task(task_id) is None
        (task,) = got
        assert (task.id, task.status, task.result) == (
            task_id,
            TaskStatus.COMPLETED,
            {"sent": True},
        )


async def test_wait_for_task_times_out_with_the_package_error(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        task_id = await runtime.create_task("build")
        with pytest.raises(RequestTimeoutError) as late:
            await runtime.wait_for_task(task_id, timeout=0.05)
        assert isinstance(late.value, TimeoutError)
        assert task_id in str(late.value)
        with pytest.raises(NotFoundError):
            await runtime.wait_for_task("no-such-task", timeout=1)
        with pytest.raises(InvalidInputError) as bad:
            await runtime.wait_for_task(task_id, timeout=-1)
        assert bad.value.field == "timeout"
        with pytest.raises(InvalidInputError) as bad:
            await runtime.wait_for_task("", timeout=1)
        assert bad.value.field == "task_id"
        # A task deleted while waited for: not found, at once.
        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as group:

                async def deleted() -> None:
                    with pytest.raises(NotFoundError):
                        await runtime.wait_for_task(task_id)

                group.start_soon(deleted)
                await anyio.wait_all_tasks_blocked()
                await runtime.delete_task(task_id)


async def test_an_end_committed_while_the_wait_begins_is_not_missed(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The task ends after the waiter decided to wait but before its subscription is in
    place: a wait that read first and subscribed second would sleep until its timeout."""
    async with Runtime.open(db_path) as runtime:
        task_id = await runtime.create_task("build")
        claim = await runtime.claim_task("w1", ["build"], start=True)
        assert claim is not None
        subscribe = runtime.subscribe

        @asynccontextmanager
        async def ending_first(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            # Ends the task (committed and published) just before subscribing.
            await runtime.complete_task(claim.lease, {"ok": True})
            async with subscribe(*args, **kwargs) as subscription:
                yield subscription

        monkeypatch.setattr(runtime, "subscribe", ending_first)
        with anyio.fail_after(DEADLINE):
            task = await runtime.wait_for_task(task_id, timeout=DEADLINE / 2)
        assert task.status is TaskStatus.COMPLETED


# -- retry_task -------------------------------------------------------------------------


async def test_retry_task_requeues_with_a_fresh_attempt_budget(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        client = runtime.client(source_agent="ops-anna")
        task_id = await runtime.create_task("build", max_retries=1)
        for _ in range(2):  # both attempts fail: the task fails for good
            with anyio.fail_after(DEADLINE):
                claim = await runtime.claim_task("w1", ["build"], start=True, wait=DEADLINE)
            assert claim is not None
            await runtime.fail_task(claim.lease, "boom", retry_after=0)
        task = await runtime.get_task(task_id)
        assert task is not None
        assert (task.status, task.attempts) == (TaskStatus.FAILED, 2)
        retried = await client.retry_task(task_id, reason="the disk is fixed")
        assert (retried.status, retried.attempts, retried.assigned_worker) == (
            TaskStatus.QUEUED,
            0,
            None,
        )
        assert retried.error == "boom"  # what it last ended with, until it completes
        (event,) = await events_of(runtime, "task.retried")
        assert event.task_id == task_id
        assert event.source == "ops-anna"
        assert event.data["by"] == "ops-anna"
        assert event.data["previous"] == "failed"
        assert event.data["note"] == "the disk is fixed"
        assert event.data["attempts"] == 2
        # Handed out again at once, with max_retries + 1 attempts to go (a fresh budget).
        claim = await runtime.claim_task("w2", ["build"], start=True)
        assert claim is not None
        assert claim.task.id == task_id
        assert claim.lease.attempt == 3  # run numbers go on
        requeued = await runtime.fail_task(claim.lease, "again", retry_after=0)
        assert (requeued.status, requeued.attempts) == (TaskStatus.QUEUED, 1)
        with anyio.fail_after(DEADLINE):
            claim = await runtime.claim_task("w2", ["build"], start=True, wait=DEADLINE)
        assert claim is not None
        done = await runtime.complete_task(claim.lease, {"ok": True})
        assert (done.status, done.error) == (TaskStatus.COMPLETED, None)
    # Durable: the reopened file has the whole story.
    async with Runtime.open(db_path) as runtime:
        task = await runtime.get_task(task_id)
        assert task is not None
        assert task.status is TaskStatus.COMPLETED
        assert len(await runtime.get_runs(task_id)) == 4


async def test_retry_task_takes_cancelled_and_timed_out_tasks(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        cancelled = await runtime.create_task("build")
        await runtime.cancel_task(cancelled, reason="not now")
        timed_out = await runtime.create_task("build")
        claim = await runtime.claim_task("w1", ["build"], start=True)
        assert claim is not None
        assert claim.task.id == timed_out
        await runtime.update_task_status(timed_out, "timed_out")
        for task_id in (cancelled, timed_out):
            task = await runtime.retry_task(task_id)
            assert task.status is TaskStatus.QUEUED
        events = await events_of(runtime, "task.retried")
        assert [(e.task_id, e.data["previous"], e.source) for e in events] == [
            (cancelled, "cancelled", "operator"),
            (timed_out, "timed_out", "operator"),
        ]
        claims = await runtime.claim_tasks("w1", ["build"], limit=5)
        assert {c.task.id for c in claims} == {cancelled, timed_out}


async def test_retry_task_refuses_a_live_or_completed_task(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        task_id = await runtime.create_task("build")
        with pytest.raises(IllegalTransitionError) as live:
            await runtime.retry_task(task_id)
        assert (live.value.current, live.value.id) == ("queued", task_id)
        claim = await runtime.claim_task("w1", ["build"], start=True)
        assert claim is not None
        await runtime.complete_task(claim.lease)
        with pytest.raises(IllegalTransitionError) as done:
            await runtime.retry_task(task_id)
        assert done.value.current == "completed"
        with pytest.raises(NotFoundError):
            await runtime.retry_task("no-such-task")
        with pytest.raises(InvalidInputError) as bad:
            await runtime.retry_task(task_id, reason=3)  # type: ignore[arg-type]
        assert bad.value.field == "reason"
        assert await events_of(runtime, "task.retried") == []


async def test_retry_task_leaves_a_plans_subtask_to_its_plan(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        plan = await runtime.create_execution_plan(
            {
                "subtasks": [
                    {"id": "a", "title": "a", "task_type": "step"},
                    {"id": "b", "title": "b", "task_type": "step", "dependencies": ["a"]},
                ]
            },
            approved=True,
        )
        await runtime.mark_plan_execution_started(plan)
        claim = await runtime.claim_task("w1", ["step"], start=True)
        assert claim is not None
        await runtime.fail_task(claim.lease, "boom", retryable=False)
        ended = await runtime.wait_for_plan(plan, timeout=DEADLINE)
        assert ended.status.value == "failed"
        with pytest.raises(IllegalTransitionError) as refused:
            await runtime.retry_task(claim.task.id)
        assert f"plan {plan!r}" in str(refused.value)
        task = await runtime.get_task(claim.task.id)
        assert task is not None
        assert task.status is TaskStatus.FAILED


async def test_a_retried_task_event_published_by_hand_retries_it(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        client = runtime.client(source_agent="ops")
        task_id = await failed_task(runtime)
        await client.publish_event(TaskRetriedEvent(task_id=task_id, reason="try again"))
        task = await runtime.get_task(task_id)
        assert task is not None
        assert task.status is TaskStatus.QUEUED
        (event,) = await events_of(runtime, "task.retried")
        assert (event.data["by"], event.data["note"]) == ("ops", "try again")


# -- idempotency keys held while live ---------------------------------------------------


async def test_an_active_key_is_free_once_its_task_ends(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        first = await runtime.create_task("build", idempotency_key="k", idempotency_scope="active")
        assert await runtime.create_task("build", idempotency_key="k") == first
        stored = await runtime.get_task(first)
        assert stored is not None
        assert stored.idempotency_scope == "active"
        claim = await runtime.claim_task("w1", ["build"], start=True)
        assert claim is not None
        await runtime.complete_task(claim.lease)
        second = await runtime.create_task("build", idempotency_key="k", idempotency_scope="active")
        assert second != first
        assert await runtime.create_task("build", idempotency_key="k") == second
        # The default holds a key forever, as before.
        forever = await runtime.create_task("build", idempotency_key="f")
        assert (await runtime.get_task(forever)).idempotency_scope == "forever"  # type: ignore[union-attr]
        await runtime.cancel_task(forever)
        assert await runtime.create_task("build", idempotency_key="f") == forever
        with pytest.raises(InvalidInputError) as bad:
            await runtime.create_task("build", idempotency_key="x", idempotency_scope="until")
        assert bad.value.field == "idempotency_scope"


async def test_an_active_key_across_a_reopen_and_out_of_memory(db_path: str) -> None:
    config = RuntimeConfig(ready_queue_head=1)
    async with Runtime.open(db_path, config=config) as runtime:
        held = await runtime.create_task("build", idempotency_key="k", idempotency_scope="active")
        ended = await runtime.create_task("build", idempotency_key="e", idempotency_scope="active")
        await runtime.cancel_task(ended)
    async with Runtime.open(db_path, config=config) as runtime:
        # Live after the reopen (and not in memory: a backlog behind a head of one).
        await runtime.create_task("build", priority=9)
        assert await runtime.create_task("build", idempotency_key="k") == held
        fresh = await runtime.create_task("build", idempotency_key="e")
        assert fresh != ended
        # Ended and created in one batch: the key goes from one to the other.
        results: dict[str, str] = {}

        async def cancel() -> None:
            await runtime.cancel_task(held)

        async def create() -> None:
            results["new"] = await runtime.create_task("build", idempotency_key="k")

        async with anyio.create_task_group() as group:
            group.start_soon(cancel)
            group.start_soon(create)
        # Whichever came first in the batch: either the key was still held, or freed.
        if results["new"] != held:
            assert (await runtime.get_task(results["new"])).idempotency_key == "k"  # type: ignore[union-attr]
        assert await runtime.create_task("build", idempotency_key="k") != held


async def test_a_retried_task_takes_its_active_key_back_unless_taken(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        first = await runtime.create_task("build", idempotency_key="k", idempotency_scope="active")
        await runtime.cancel_task(first)
        await runtime.retry_task(first)
        assert await runtime.create_task("build", idempotency_key="k") == first
        await runtime.cancel_task(first)
        second = await runtime.create_task("build", idempotency_key="k", idempotency_scope="active")
        assert second != first
        with pytest.raises(IllegalTransitionError) as taken:
            await runtime.retry_task(first)
        assert second in str(taken.value)
        await runtime.cancel_task(second)
        await runtime.retry_task(first)  # free again
        assert await runtime.create_task("build", idempotency_key="k") == first
    async with Runtime.open(db_path) as runtime:
        assert await runtime.create_task("build", idempotency_key="k") == first


# -- revoking and restoring a task type -------------------------------------------------


async def test_a_revoked_type_is_not_handed_out_until_restored(db_path: str) -> None:
    config = RuntimeConfig(ready_queue_head=2)
    async with Runtime.open(db_path, config=config) as runtime:
        client = runtime.client(source_agent="ops")
        before = [await runtime.create_task("mail", priority=p) for p in (1, 2, 3, 4)]
        gpu = await runtime.create_task("mail", requires=("gpu",))
        other = await runtime.create_task("build")
        assert await client.revoke_task_type("mail", reason="smtp down") is True
        assert await client.revoke_task_type("mail") is False  # already
        during = await runtime.create_task("mail", priority=9)
        assert await runtime.claim_task("w1", ["mail", "gpu"]) is None
        assert await runtime.claim_task("w1", None) is not None  # the build task
        assert (await runtime.get_task(other)).status is TaskStatus.ASSIGNED  # type: ignore[union-attr]
        assert await runtime.claim_task("w1", None) is None
        for task_id in [*before, gpu, during]:
            assert (await runtime.get_task(task_id)).status is TaskStatus.QUEUED  # type: ignore[union-attr]
        (revoked,) = await runtime.get_revoked_task_types()
        assert (revoked.task_type, revoked.source_agent, revoked.reason) == (
            "mail",
            "ops",
            "smtp down",
        )
    # Durable: still revoked after a reopen.
    async with Runtime.open(db_path, config=config) as runtime:
        client = runtime.client(source_agent="ops")
        assert [r.task_type for r in await runtime.get_revoked_task_types()] == ["mail"]
        assert await runtime.claim_task("w1", ["mail", "gpu"]) is None
        got: list[Any] = []

        async def waiting_claim() -> None:
            got.append(await runtime.claim_task("w2", ["mail"], wait=DEADLINE))

        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as group:
                group.start_soon(waiting_claim)
                await anyio.wait_all_tasks_blocked()
                assert got == []
                assert await client.restore_task_type("mail") is True
        # The waiting claim got the best of them at once; the rest follow in order.
        assert got[0].task.id == during
        claims = await runtime.claim_tasks("w1", ["mail", "gpu"], limit=10)
        assert [c.task.id for c in claims] == [*reversed(before), gpu]
        assert await client.restore_task_type("mail") is False
        assert await runtime.get_revoked_task_types() == []
        events = await events_of(runtime, "task.type_*")
        assert [(e.type, e.data["task_type"], e.data["by"]) for e in events] == [
            ("task.type_revoked", "mail", "ops"),
            ("task.type_restored", "mail", "ops"),
        ]
    async with Runtime.open(db_path, config=config) as runtime:
        assert await runtime.get_revoked_task_types() == []


# -- flushing a queue and counting ------------------------------------------------------


async def test_flush_queue_deletes_the_queued_tasks_of_a_type(db_path: str) -> None:
    config = RuntimeConfig(ready_queue_head=2)
    async with Runtime.open(db_path, config=config) as runtime:
        client = runtime.client(source_agent="ops")
        mail = [await runtime.create_task("mail", priority=p % 3) for p in range(7)]
        held = await runtime.claim_task("w1", ["mail"], start=True)
        assert held is not None
        builds = [await runtime.create_task("build") for _ in range(2)]
        assert await client.flush_queue("mail") == 6
        assert await runtime.get_queued_tasks(100, "mail") == []
        gone = [task_id for task_id in mail if task_id != held.task.id]
        for task_id in gone:
            assert await runtime.get_task(task_id) is None
        assert (await runtime.get_task(held.task.id)).status is TaskStatus.RUNNING  # type: ignore[union-attr]
        deleted = await events_of(runtime, "task.deleted")
        assert {e.task_id for e in deleted} == set(gone)
        assert {(e.data["reason"], e.data["by"], e.source) for e in deleted} == {
            ("flushed", "ops", "ops")
        }
        (flushed,) = await events_of(runtime, "task.queue_flushed")
        assert (flushed.data["task_type"], flushed.data["deleted"]) == ("mail", 6)
        assert await client.flush_queue("mail") == 0
        assert await client.flush_queue() == 2  # every type
        for task_id in builds:
            assert await runtime.get_task(task_id) is None
    async with Runtime.open(db_path, config=config) as runtime:
        # Only the claimed one is left (recovery on open queues it again).
        assert await runtime.get_task_counts() == {"queued": {"mail": 1}}


async def test_get_task_counts_by_status_and_type(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        assert await runtime.get_task_counts() == {}
        for task_type in ("a", "a", "b"):
            await runtime.create_task(task_type)
        claim = await runtime.claim_task("w1", ["b"], start=True)
        assert claim is not None
        await runtime.complete_task(claim.lease)
        await failed_task(runtime, "c")
        assert await runtime.get_task_counts() == {
            "queued": {"a": 2},
            "completed": {"b": 1},
            "failed": {"c": 1},
        }


async def test_a_key_freed_and_taken_in_one_batch(db_path: str) -> None:
    """One commit ends a task that held its key while live and creates the next with it:
    the ended task's row must let go of the key before the new row takes it (the unique
    index would refuse the whole batch otherwise), whether memory held the task or not."""
    config = RuntimeConfig(ready_queue_head=1)
    async with Runtime.open(db_path, config=config) as runtime:
        await runtime.create_task("job", priority=9)  # the head: the others stay in storage
        in_storage = await runtime.create_task(
            "job", idempotency_key="s", idempotency_scope="active"
        )
        claimed = await runtime.create_task(
            "other", idempotency_key="m", idempotency_scope="active"
        )
        claim = await runtime.claim_task("w1", ["other"], start=True)
        assert claim is not None
        assert claim.task.id == claimed
        for task_id, key in ((in_storage, "s"), (claimed, "m")):
            new = CreateTask(
                title="next",
                task_type="job",
                payload={},
                idempotency_key=key,
                idempotency_scope="active",
            )
            out = await one_batch(runtime, CancelTask(task_id=task_id), new, GetTask(task_id))
            assert isinstance(out[0], Task), out
            assert isinstance(out[1], str)
            assert out[1] != task_id
            assert out[2].status is TaskStatus.CANCELLED  # type: ignore[union-attr]
            assert await runtime.create_task("job", idempotency_key=key) == out[1]
    async with Runtime.open(db_path, config=config) as runtime:
        for key in ("s", "m"):
            holder = await runtime.create_task("job", idempotency_key=key)
            assert holder not in (in_storage, claimed)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_control_from_sync_code(db_path: str, backend: str) -> None:
    with SyncOrchestrationClient(db_path=db_path, source_agent="cron", backend=backend) as client:
        task_id = client.create_task("report", max_retries=0)
        assert client.revoke_task_type("report") is True
        assert client.claim_task("w1", ["report"]) is None
        assert client.restore_task_type("report") is True
        claim = client.claim_task("w1", ["report"], start=True)
        assert claim is not None
        client.fail_task(claim.lease, "boom")
        assert client.wait_for_task(task_id, timeout=DEADLINE).status is TaskStatus.FAILED
        assert client.retry_task(task_id).status is TaskStatus.QUEUED
        assert client.get_task_counts() == {"queued": {"report": 1}}
        assert client.get_revoked_task_types() == []
        assert client.flush_queue() == 1


@pytest.mark.sqlite_only("injects a SQLite I/O error into the SQLite drivers")
async def test_a_failed_commit_leaves_revocations_retries_and_keys_as_they_were(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures = {"left": 0}
    originals = {cls: cls.transaction for cls in (drivers.ThreadDriver, drivers.AiosqliteDriver)}

    def failing(cls: type[drivers.Driver]) -> Callable[..., Awaitable[None]]:
        async def transaction(self: drivers.Driver, statements: list[drivers.Statement]) -> None:
            if failures["left"]:
                failures["left"] -= 1
                raise sqlite3.OperationalError("disk I/O error (injected)")
            await originals[cls](self, statements)  # type: ignore[arg-type]

        return transaction

    for cls in originals:
        monkeypatch.setattr(cls, "transaction", failing(cls))
    async with Runtime.open(db_path) as runtime:
        queued = await runtime.create_task("mail")
        failed = await failed_task(runtime, idempotency_key="k", idempotency_scope="active")
        seq = (await runtime.statistics()).storage.last_seq
        failures["left"] = 1
        out = await one_batch(
            runtime,
            RevokeTaskType(task_type="mail"),
            RetryTask(task_id=failed),
            CreateTask(title="t", task_type="build", payload={}, idempotency_key="k"),
        )
        assert all(isinstance(o, StorageError) for o in out), out
        assert (await runtime.statistics()).storage.last_seq == seq  # nothing published
        # Memory is as before the batch: mail is handed out, the task still failed, the
        # key free (a create takes it).
        assert await runtime.get_revoked_task_types() == []
        claim = await runtime.claim_task("w1", ["mail"])
        assert claim is not None
        assert claim.task.id == queued
        assert (await runtime.get_task(failed)).status is TaskStatus.FAILED  # type: ignore[union-attr]
        assert await runtime.create_task("build", idempotency_key="k") != failed
    async with Runtime.open(db_path) as runtime:
        assert await runtime.get_revoked_task_types() == []


async def test_a_flushed_subtask_is_withdrawn_from_its_plan(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        plan = await runtime.create_execution_plan(
            {
                "subtasks": [
                    {"id": "a", "title": "a", "task_type": "step"},
                    {"id": "b", "title": "b", "task_type": "other"},
                ]
            },
            approved=True,
            failure_policy="continue",
        )
        await runtime.mark_plan_execution_started(plan)
        assert await runtime.flush_queue("step") == 1
        # Answered once the plan has taken it in: the subtask is withdrawn at once.
        states = {s.subtask_id: s for s in await runtime.get_plan_subtasks(plan)}
        assert states["a"].status.value == "cancelled"
        assert states["a"].error == "its task was deleted"
        claim = await runtime.claim_task("w1", ["other"], start=True)
        assert claim is not None
        await runtime.complete_task(claim.lease)
        ended = await runtime.wait_for_plan(plan, timeout=DEADLINE)
        assert ended.status.value == "failed"
