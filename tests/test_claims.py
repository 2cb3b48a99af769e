"""Claims, leases, fencing, retries, timeouts and concurrency limits, through the public
Runtime API on real SQLite files, both backends.

Time-based behaviour (lease expiry, backoff, timeouts) uses short real durations. Most
tests check *that* something happens and in what order; the lease tests also check *when*
against what docs/delivery.md promises (never before the lease, at most :data:`LATE` after it).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import anyio
import msgspec
import pytest
from _held import hold_in_batch, stall_commits
from _raw import refusing_writes
from _timing import loop_time, loop_wall_clock

from hive_orchestration import (
    Claim,
    Event,
    IllegalTransitionError,
    InvalidInputError,
    Lease,
    LeaseLostError,
    NotFoundError,
    RunStatus,
    Runtime,
    RuntimeConfig,
    StorageError,
    TaskStatus,
)
from hive_orchestration.actors.task_manager import TaskManager
from hive_orchestration.messages.tasks import GetTask, Wake

pytestmark = pytest.mark.anyio

#: Bound on anything that should happen "soon": generous, so a loaded machine passes.
SOON = 10.0
#: How late after its deadline the runtime may act on an expired lease (the batch that
#: requeues the task and hands it to a waiting claim, read from the time it stamps): the
#: alarm's wake-up and at most one batch before it (measured: a few ms on an idle 2-core
#: machine). The margin is for a loaded one, and still fails a deadline 200 ms late.
LATE = 0.15
#: Then the commit and the answer, on a loaded machine.
DELIVERY = 1.0
#: "Never early" allowance: the test and the runtime read the monotonic clock apart.
EARLY = 0.01
#: A retry backoff no lease test waits for: a lost run must be claimable at once.
SLOW_BACKOFF = {"retry_backoff": 60.0, "retry_backoff_max": 60.0}


@asynccontextmanager
async def runtime(
    db_path: str, *, wall_clock: Callable[[], datetime] | None = None, **config: Any
) -> AsyncIterator[Runtime]:
    settings: dict[str, Any] = {"retry_backoff": 0.01, "retry_backoff_max": 0.05}
    settings.update(config)
    async with Runtime.open(db_path, config=RuntimeConfig(**settings), wall_clock=wall_clock) as rt:
        yield rt


async def claim(rt: Runtime, *types: str, worker: str = "w1", **kwargs: Any) -> Claim:
    got = await rt.claim_task(worker, types or None, **kwargs)
    assert got is not None, "expected a task to claim"
    return got


async def events_of(rt: Runtime, task_id: str) -> list[Event]:
    return [e for e in await rt.read_events(0, limit=10_000) if e.task_id == task_id]


async def parked() -> None:
    """Return once a waiting claim just started is parked in the TaskManager, however
    loaded the machine: when no other task can run, its claimer waits for the answer and
    the TaskManager for its next message, so the claim is parked. (This holds because the
    way from ``claim_task`` to a parked claim has no timer and reads nothing from disk,
    either of which would count as blocked; a fixed sleep is what a loaded machine can
    outlast.)"""
    with anyio.fail_after(SOON):
        await anyio.wait_all_tasks_blocked()


async def wait_for_status(rt: Runtime, task_id: str, status: TaskStatus) -> None:
    with anyio.fail_after(SOON):
        while True:
            task = await rt.get_task(task_id)
            assert task is not None
            if task.status is status:
                return
            await anyio.sleep(0.01)


# -- claiming ------------------------------------------------------------------------------


async def test_claim_hands_out_the_best_task_and_opens_a_leased_run(db_path: str) -> None:
    async with runtime(db_path) as rt:
        assert await rt.claim_task("w1") is None
        low = await rt.create_task("job", {"n": 1}, priority=1)
        high_old = await rt.create_task("job", {"n": 2}, priority=5)
        high_new = await rt.create_task("job", {"n": 3}, priority=5)
        order = [(await claim(rt, "job", lease=30)).task.id for _ in range(3)]
        assert order == [high_old, high_new, low]
        assert await rt.claim_task("w1", "job") is None

        task = await rt.get_task(low)
        assert task is not None
        assert task.status is TaskStatus.ASSIGNED
        assert task.assigned_worker == "w1"
        (run,) = await rt.get_runs(low)
        assert run.status is RunStatus.ASSIGNED
        assert run.worker_id == "w1"
        assert run.lease_seconds == 30
        assert run.lease_expires_at is not None
        assigned = [e for e in await events_of(rt, low) if e.type == "task.assigned"]
        assert len(assigned) == 1
        assert assigned[0].data["run_id"] == run.id
        assert assigned[0].worker_id == "w1"


async def test_claim_returns_a_token_naming_the_task_run_and_attempt(db_path: str) -> None:
    async with runtime(db_path) as rt:
        task_id = await rt.create_task("job")
        got = await claim(rt)
        (run,) = await rt.get_runs(task_id)
        assert (got.lease.task_id, got.lease.run_id, got.lease.attempt) == (task_id, run.id, 1)
        assert got.lease.secret  # the claimer's proof (tests/test_lease_secrets.py)
        assert got.task.status is TaskStatus.ASSIGNED
        assert got.expires_at == run.lease_expires_at


async def test_claim_only_hands_out_the_types_asked_for(db_path: str) -> None:
    async with runtime(db_path) as rt:
        build = await rt.create_task("build", priority=1)
        deploy = await rt.create_task("deploy", priority=9)
        test = await rt.create_task("test", priority=5)
        assert (await claim(rt, "build")).task.id == build
        assert await rt.claim_task("w1", ["build"]) is None
        assert (await claim(rt, "build", "test")).task.id == test
        assert (await claim(rt)).task.id == deploy  # any type


async def test_a_waiting_claim_gets_a_task_as_soon_as_it_is_created(db_path: str) -> None:
    async with runtime(db_path) as rt:
        got: list[Claim | None] = []

        async def worker() -> None:
            got.append(await rt.claim_task("w1", "job", wait=SOON * 3))

        async with anyio.create_task_group() as tg:
            tg.start_soon(worker)
            await parked()
            await rt.create_task("other")  # not for this worker
            start = anyio.current_time()
            task_id = await rt.create_task("job")
        assert got[0] is not None
        assert got[0].task.id == task_id
        # Woken by the create, not by the end of its wait.
        assert anyio.current_time() - start < SOON


async def test_a_waiting_claim_ends_empty_at_its_deadline(db_path: str) -> None:
    async with runtime(db_path) as rt:
        start = anyio.current_time()
        assert await rt.claim_task("w1", "job", wait=0.2) is None
        assert anyio.current_time() - start >= 0.19


async def test_waiting_claims_are_served_first_come_first_served(db_path: str) -> None:
    async with runtime(db_path) as rt:
        got: dict[str, str] = {}

        async def worker(name: str) -> None:
            c = await rt.claim_task(name, "job", wait=SOON * 3)
            assert c is not None
            got[name] = c.task.id

        async with anyio.create_task_group() as tg:
            for name in ("w1", "w2", "w3"):
                tg.start_soon(worker, name)
                await parked()  # in this order
            first = await rt.create_task("job")
            second = await rt.create_task("job")
            third = await rt.create_task("job")
        assert got == {"w1": first, "w2": second, "w3": third}


async def test_many_workers_never_get_the_same_task_and_none_is_lost(db_path: str) -> None:
    count, workers = 300, 8
    async with runtime(db_path) as rt:
        created = set()
        claimed: Counter[str] = Counter()

        async def producer() -> None:
            for n in range(count):
                created.add(await rt.create_task("job", {"n": n}, priority=n % 4))

        async def worker(name: str) -> None:
            while True:
                c = await rt.claim_task(name, "job", wait=0.5)
                if c is None:
                    return
                claimed[c.task.id] += 1
                await rt.start_task(c.lease)
                await rt.complete_task(c.lease, {"by": name})

        async with anyio.create_task_group() as tg:
            for w in range(workers):
                tg.start_soon(worker, f"w{w}")
            tg.start_soon(producer)
        assert set(claimed) == created
        assert max(claimed.values()) == 1
        done = await rt.get_tasks_by_status("completed")
        assert {t.id for t in done} == created


async def test_a_claimer_that_gave_up_is_not_handed_a_task(db_path: str) -> None:
    async with runtime(db_path) as rt:
        with anyio.move_on_after(0.1):
            await rt.claim_task("gone", "job", wait=SOON)
        task_id = await rt.create_task("job")
        got = await claim(rt, "job", worker="here")
        assert got.task.id == task_id
        assert [r.worker_id for r in await rt.get_runs(task_id)] == ["here"]


async def test_a_claim_whose_asker_left_during_the_commit_is_handed_back(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claimer leaves after the task was assigned to it but before the answer: the
    task is released (not counted as an attempt) and goes to the next claimer."""
    original = TaskManager._commit
    closed: list[bool] = []

    async def commit_and_lose_the_asker(self: TaskManager, work: Any, forwards: Any) -> Any:
        # After the commit, before the answers: on a store several nodes share, the
        # claims are decided inside the commit (from the rows it locks).
        error = await original(self, work, forwards)
        for envelope, outcome in work.answers:
            if isinstance(outcome, Claim) and outcome.lease.attempt == 1 and not closed:
                envelope.reply.fail(RuntimeError("asker left"))
                closed.append(True)
        return error

    monkeypatch.setattr(TaskManager, "_commit", commit_and_lose_the_asker)
    async with runtime(db_path) as rt:
        task_id = await rt.create_task("job")
        with pytest.raises(RuntimeError, match="asker left"):
            await rt.claim_task("w1", "job")
        got = await claim(rt, "job", worker="w2")
        assert got.task.id == task_id
        assert got.lease.attempt == 2
        assert got.task.attempts == 0
        first, _ = await rt.get_runs(task_id)
        assert first.status is RunStatus.RELEASED
        retrying = [e for e in await events_of(rt, task_id) if e.type == "task.retrying"]
        assert [e.data["reason"] for e in retrying] == ["unclaimed"]


def record_task_managers(monkeypatch: pytest.MonkeyPatch) -> list[TaskManager]:
    """The TaskManager instances the runtime starts, to look at their state."""
    managers: list[TaskManager] = []
    original = TaskManager.started

    async def started(self: TaskManager) -> None:
        managers.append(self)
        await original(self)

    monkeypatch.setattr(TaskManager, "started", started)
    return managers


async def test_the_deadlines_kept_are_one_per_live_claim_and_parked_claim(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Heartbeats that move deadlines (shortening them every other time) and claims that
    end long before their lease or their wait leave the TaskManager one deadline per live
    claim and per parked claim: not one per heartbeat, nor one per claim ever made."""
    managers = record_task_managers(monkeypatch)
    async with runtime(db_path) as rt:
        (manager,) = managers
        for n in range(100):
            await rt.create_task("job", {"n": n})
        claims = await rt.claim_tasks("w", "job", limit=100, lease=600)
        assert manager.deadline_entries == 100
        for round_ in range(10):
            for c in claims:
                await rt.heartbeat(c.lease, extend=300 if round_ % 2 else 600)
        assert manager.deadline_entries == 100
        for c in claims[:90]:
            await rt.complete_task(c.lease)
        assert manager.deadline_entries == 10  # the 90 finished claims' leases are gone
        got: list[Claim] = []

        async def wait_and_claim() -> None:
            found = await rt.claim_task("w", "later", lease=600, wait=600)
            assert found is not None
            got.append(found)

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(wait_and_claim)
            with anyio.fail_after(SOON):
                while True:
                    if manager.deadline_entries == 30:  # 10 leases, 20 parked waits
                        break
                    await anyio.sleep(0.005)
            for _ in range(20):
                await rt.create_task("later")
        # The waits ended with their claims, long before their 600 s; 30 leases now.
        assert manager.deadline_entries == 30
        for c in [*claims[90:], *got]:
            await rt.complete_task(c.lease)
        assert manager.deadline_entries == 0


# -- the worker's calls and fencing -----------------------------------------------------------


async def test_start_then_complete_stores_the_result_on_task_and_run(db_path: str) -> None:
    async with runtime(db_path) as rt:
        task_id = await rt.create_task("job", correlation_id="corr-1", source_agent="planner")
        c = await claim(rt)
        running = await rt.start_task(c.lease)
        assert running.status is TaskStatus.RUNNING
        with pytest.raises(IllegalTransitionError):
            await rt.start_task(c.lease)
        done = await rt.complete_task(c.lease, {"answer": 42})
        assert done.status is TaskStatus.COMPLETED
        assert done.result == {"answer": 42}
        (run,) = await rt.get_runs(task_id)
        assert (run.status, run.result) == (RunStatus.COMPLETED, {"answer": 42})
        assert run.completed_at is not None
        types = [e.type for e in await events_of(rt, task_id)]
        assert types == ["task.created", "task.assigned", "task.started", "task.completed"]
        for event in await events_of(rt, task_id):
            assert event.correlation_id == "corr-1"


async def test_complete_works_straight_from_assigned(db_path: str) -> None:
    async with runtime(db_path) as rt:
        await rt.create_task("job")
        c = await claim(rt)
        assert (await rt.complete_task(c.lease)).status is TaskStatus.COMPLETED


async def test_one_result_wins(db_path: str) -> None:
    async with runtime(db_path) as rt:
        task_id = await rt.create_task("job")
        c = await claim(rt)
        await rt.complete_task(c.lease, {"first": True})
        with pytest.raises(LeaseLostError) as caught:
            await rt.complete_task(c.lease, {"second": True})
        assert caught.value.status == "completed"
        with pytest.raises(LeaseLostError):
            await rt.fail_task(c.lease, "late")
        with pytest.raises(LeaseLostError):
            await rt.heartbeat(c.lease)
        task = await rt.get_task(task_id)
        assert task is not None
        assert task.result == {"first": True}


async def test_a_token_that_never_held_the_task_is_refused(db_path: str) -> None:
    async with runtime(db_path) as rt:
        task_id = await rt.create_task("job")
        c = await claim(rt)
        secret = c.lease.secret  # the claim's own: the ids alone must be refused
        for forged in (
            Lease(task_id, "not-a-run", 1, secret),
            Lease(task_id, c.lease.run_id, 7, secret),
            Lease("no-such-task", c.lease.run_id, 1, secret),
        ):
            with pytest.raises(LeaseLostError):
                await rt.complete_task(forged, {"x": 1})
        task = await rt.get_task(task_id)
        assert task is not None
        assert task.status is TaskStatus.ASSIGNED


async def test_cancel_reaches_the_claim(db_path: str) -> None:
    async with runtime(db_path) as rt:
        task_id = await rt.create_task("job")
        c = await claim(rt)
        await rt.start_task(c.lease)
        await rt.cancel_task(task_id, reason="not needed")
        with pytest.raises(LeaseLostError) as caught:
            await rt.heartbeat(c.lease)
        assert caught.value.status == "cancelled"
        assert "cancelled" in str(caught.value)
        (run,) = await rt.get_runs(task_id)
        assert run.status is RunStatus.CANCELLED


async def test_deleting_a_claimed_task_ends_the_claim(db_path: str) -> None:
    async with runtime(db_path) as rt:
        task_id = await rt.create_task("job")
        c = await claim(rt)
        await rt.delete_task(task_id)
        with pytest.raises(LeaseLostError):
            await rt.complete_task(c.lease)
        assert await rt.claim_task("w1") is None


async def test_moving_a_claimed_task_by_hand_closes_its_run(db_path: str) -> None:
    async with runtime(db_path) as rt:
        task_id = await rt.create_task("job")
        c = await claim(rt)
        with pytest.raises(IllegalTransitionError, match="held by a claim"):
            await rt.update_run_status(c.lease.run_id, "completed")
        assert await rt.update_task_status(task_id, "running")
        (run,) = await rt.get_runs(task_id)
        assert run.status is RunStatus.RUNNING
        assert await rt.update_task_status(task_id, "completed", result={"manual": True})
        (run,) = await rt.get_runs(task_id)
        assert run.status is RunStatus.COMPLETED
        with pytest.raises(LeaseLostError):
            await rt.complete_task(c.lease)


async def test_manual_requeue_releases_the_claim_and_it_can_be_claimed_again(
    db_path: str,
) -> None:
    async with runtime(db_path) as rt:
        task_id = await rt.create_task("job")
        c = await claim(rt)
        assert await rt.update_task_status(task_id, "queued")
        (run,) = await rt.get_runs(task_id)
        assert run.status is RunStatus.RELEASED
        again = await claim(rt, worker="w2")
        assert again.task.id == task_id
        assert again.lease.attempt == 2
        with pytest.raises(LeaseLostError, match=r"run .* holds the task now"):
            await rt.complete_task(c.lease)


# -- leases ----------------------------------------------------------------------------------


async def test_an_expired_lease_requeues_the_task_and_fences_the_old_worker(
    db_path: str,
) -> None:
    """The task goes back when the lease runs out, no earlier and at most LATE after it,
    with an attempt counted and no retry backoff (a 60 s one is configured): a worker
    waiting for it gets it in the same batch."""
    async with runtime(db_path, wall_clock=loop_wall_clock, **SLOW_BACKOFF) as rt:
        task_id = await rt.create_task("job")
        sent = anyio.current_time()
        stale = await claim(rt, lease=0.2, worker="slow", start=True)
        acked = anyio.current_time()
        # Another worker waits; it gets the task when the lease runs out.
        fresh = await claim(rt, "job", worker="fast", wait=SOON)
        got = anyio.current_time()
        acted = loop_time(fresh.task.updated_at)  # the batch that requeued and handed it
        assert acted - (sent + 0.2) >= -EARLY, acted - (sent + 0.2)
        assert acted - (acked + 0.2) <= LATE, acted - (acked + 0.2)
        assert got - acted <= DELIVERY, got - acted
        assert fresh.task.id == task_id
        assert fresh.lease.attempt == 2
        assert fresh.task.attempts == 1
        with pytest.raises(LeaseLostError) as caught:
            await rt.complete_task(stale.lease, {"from": "slow"})
        assert "lease expired" in str(caught.value)
        await rt.complete_task(fresh.lease, {"from": "fast"})
        task = await rt.get_task(task_id)
        assert task is not None
        assert task.result == {"from": "fast"}
        first, second = await rt.get_runs(task_id)
        assert first.status is RunStatus.LOST
        assert second.status is RunStatus.COMPLETED
        retrying = [e for e in await events_of(rt, task_id) if e.type == "task.retrying"]
        assert [e.data["reason"] for e in retrying] == ["lease_expired"]
        assert retrying[0].data["worker_id"] == "slow"
        assert (retrying[0].data["attempts"], retrying[0].data["retry_in"]) == (1, 0)


async def test_heartbeats_keep_the_lease(db_path: str) -> None:
    async with runtime(db_path) as rt:
        task_id = await rt.create_task("job")
        c = await claim(rt, lease=0.3)
        expires = c.expires_at
        for _ in range(8):  # 0.8 s in all, well past one lease
            await anyio.sleep(0.1)
            renewed = await rt.heartbeat(c.lease)
            assert renewed >= expires
            expires = renewed
        done = await rt.complete_task(c.lease)
        assert done.status is TaskStatus.COMPLETED
        assert done.attempts == 0
        assert len(await rt.get_runs(task_id)) == 1


async def test_progress_is_stored_published_and_renews_the_lease(db_path: str) -> None:
    async with runtime(db_path) as rt:
        task_id = await rt.create_task("job")
        c = await claim(rt, lease=30)
        expires = await rt.report_progress(c.lease, {"done": 3, "of": 10}, phase="download")
        assert isinstance(expires, datetime)
        assert expires >= c.expires_at
        (run,) = await rt.get_runs(task_id)
        assert run.progress == {"done": 3, "of": 10}
        assert run.phase == "download"
        progress = [e for e in await events_of(rt, task_id) if e.type == "task.progress"]
        assert len(progress) == 1
        assert progress[0].data["progress"] == {"done": 3, "of": 10}
        task = await rt.get_task(task_id)
        assert task is not None
        assert task.status is TaskStatus.ASSIGNED  # progress is not a transition


async def test_a_lease_can_be_shortened_and_then_expires(db_path: str) -> None:
    async with runtime(db_path, wall_clock=loop_wall_clock, **SLOW_BACKOFF) as rt:
        task_id = await rt.create_task("job")
        c = await claim(rt, lease=60)
        sent = anyio.current_time()
        await rt.heartbeat(c.lease, extend=0.1)
        acked = anyio.current_time()
        again = await claim(rt, worker="w2", wait=SOON)
        got = anyio.current_time()
        assert again.task.id == task_id
        acted = loop_time(again.task.updated_at)
        assert acted - (sent + 0.1) >= -EARLY, acted - (sent + 0.1)
        assert acted - (acked + 0.1) <= LATE, acted - (acked + 0.1)
        assert got - acted <= DELIVERY, got - acted


@pytest.mark.parametrize("place", ["queued", "behind a full batch"])
async def test_a_renewal_sent_before_the_lease_ends_keeps_it_however_late_it_is_taken(
    db_path: str, monkeypatch: pytest.MonkeyPatch, place: str
) -> None:
    """A heartbeat or a completion sent before its lease ends counts, even when the
    TaskManager, busy (its commit held up by a slow disk or a starved database backend),
    takes it only after the deadline, in the batch that finds the lease due, or behind
    more than a batch (``max_batch`` messages): the lease is not expired (the request is
    answered, the run not lost). A request with the claim's ids but not its secret spares
    nothing: the lease beside them, silent but for that, is expired by that same batch.
    Here the TaskManager is held in a batch (a read of ``hold``) from before the deadline
    to after it, while the requests wait in its mailbox."""
    lease = 1.0
    flood = TaskManager.max_batch + 100 if place == "behind a full batch" else 0
    held = hold_in_batch(monkeypatch, TaskManager, GetTask("hold"))
    gate, batches = held.gate, held.batches
    answers: dict[str, object] = {}
    answered = anyio.Event()

    async def send(name: str, call: Awaitable[object]) -> None:
        try:
            answers[name] = await call
        except LeaseLostError as exc:
            answers[name] = exc
        if len(answers) == 3:
            answered.set()

    async with (
        runtime(db_path, mailbox_size=flood + 100, **SLOW_BACKOFF) as rt,
        anyio.create_task_group() as tg,
    ):
        ids = [await rt.create_task("job") for _ in range(3)]
        renewed, completed, lost = [await claim(rt, lease=lease, worker=f"w{i}") for i in range(3)]
        claimed = anyio.current_time()  # the deadlines are at most a lease from here
        assert [c.task.id for c in (renewed, completed, lost)] == ids
        tg.start_soon(rt.get_task, "hold")
        await anyio.wait_all_tasks_blocked()  # the TaskManager holds
        for _ in range(flood):  # what a busy TaskManager has before it (each a no-op)
            assert rt._tasks.try_tell(Wake())
        tg.start_soon(send, "renewed", rt.heartbeat(renewed.lease))
        tg.start_soon(send, "completed", rt.complete_task(completed.lease, {"done": True}))
        forged = msgspec.structs.replace(lost.lease, secret="not the claim's secret")
        tg.start_soon(send, "forged", rt.heartbeat(forged))
        await anyio.wait_all_tasks_blocked()  # sent: queued behind the held batch
        assert anyio.current_time() < claimed + lease, "sent too late for the test"
        await anyio.sleep(claimed + lease + 0.3 - anyio.current_time())
        gate.set()  # the deadlines have passed: the next batch settles them
        with anyio.fail_after(SOON):
            await answered.wait()
        assert not isinstance(answers["renewed"], LeaseLostError), answers["renewed"]
        assert not isinstance(answers["completed"], LeaseLostError), answers["completed"]
        assert isinstance(answers["forged"], LeaseLostError)
        if flood:
            assert batches[0] == TaskManager.max_batch  # the requests waited behind it
        (run,) = await rt.get_runs(renewed.task.id)
        assert run.status is RunStatus.ASSIGNED
        await rt.complete_task(renewed.lease)  # LeaseLostError had it been expired
        for task_id in ids[:2]:
            (run,) = await rt.get_runs(task_id)
            assert run.status is RunStatus.COMPLETED
            assert not [e for e in await events_of(rt, task_id) if e.type == "task.retrying"]
        (run,) = await rt.get_runs(lost.task.id)
        assert run.status is RunStatus.LOST
        retrying = [e for e in await events_of(rt, lost.task.id) if e.type == "task.retrying"]
        assert [e.data["reason"] for e in retrying] == ["lease_expired"]


async def test_a_lease_runs_from_the_answer_to_its_renewal_not_from_its_batch(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renewed lease runs from the answer to the renewal, not from the start of the
    batch that handled it: the worker renews a while after that answer (the agent runner:
    a third of the lease), and a commit held up (a slow fsync, a database backend waiting
    for a CPU) is the runtime's delay, not the worker's. Here the renewal's commit (it
    reports progress, so it is written) is held 0.9 of the lease, and the next renewal is
    sent a third of the lease after its answer: it holds (counted from the batch's
    start, the lease ended before that renewal was sent)."""
    lease = 1.0
    stall = 0.9
    stalled = stall_commits(monkeypatch, stall)
    async with runtime(db_path, **SLOW_BACKOFF) as rt:
        task_id = await rt.create_task("job")
        c = await claim(rt, lease=lease)
        stalled.on = True
        sent = anyio.current_time()
        await rt.report_progress(c.lease, {"done": 1})
        answered = anyio.current_time()
        stalled.on = False
        assert answered - sent >= stall - EARLY
        await anyio.sleep(lease / 3)  # as the runner does, from the answer
        assert anyio.current_time() < answered + lease, "sent too late for the test"
        await rt.heartbeat(c.lease)  # LeaseLostError had the lease run from the batch
        done = await rt.complete_task(c.lease)
        assert done.attempts == 0
        (run,) = await rt.get_runs(task_id)
        assert run.status is RunStatus.COMPLETED


@pytest.mark.parametrize("deadline", ["lease", "timeout"])
async def test_a_claims_lease_and_timeout_run_from_its_answer_not_from_its_batch(
    db_path: str, monkeypatch: pytest.MonkeyPatch, deadline: str
) -> None:
    """A claim's lease and its task's ``timeout`` run from the claim's answer, as a
    renewal's lease does: the worker gets the task only then, and renews (the agent
    runner: a third of the lease after the answer) or works from there. Here the claim's
    commit is held 0.9 of the span, and the worker renews (``lease``) or completes
    (``timeout``, having renewed at once, which leaves the timeout as it was) a third of
    the span after the answer: it holds (counted from the batch's start, the span ended
    before that call was sent)."""
    span = 1.0
    stall = 0.9
    stalled = stall_commits(monkeypatch, stall)
    async with runtime(db_path, **SLOW_BACKOFF) as rt:
        timed = deadline == "timeout"
        task_id = await rt.create_task("job", timeout=span if timed else None)
        stalled.on = True
        sent = anyio.current_time()
        c = await claim(rt, lease=60.0 if timed else span)
        answered = anyio.current_time()
        stalled.on = False
        assert answered - sent >= stall - EARLY
        if timed:  # a renewal leaves the timeout as it was: from the answer
            await rt.heartbeat(c.lease)
        await anyio.sleep(span / 3)  # as the runner does, from the answer
        assert anyio.current_time() < answered + span, "sent too late for the test"
        if not timed:
            await rt.heartbeat(c.lease)  # LeaseLostError had the lease run from the batch
        done = await rt.complete_task(c.lease)  # LeaseLostError had it timed out
        assert done.attempts == 0
        (run,) = await rt.get_runs(task_id)
        assert run.status is RunStatus.COMPLETED


async def test_release_worker_tasks_requeues_what_the_worker_held(db_path: str) -> None:
    async with runtime(db_path, **SLOW_BACKOFF) as rt:
        ids = [await rt.create_task("job") for _ in range(3)]
        a = await claim(rt, worker="dead")
        b = await claim(rt, worker="dead")
        other = await claim(rt, worker="alive")
        assert await rt.release_worker_tasks("dead", reason="missed heartbeats") == 2
        assert await rt.release_worker_tasks("dead") == 0
        for c in (a, b):
            task = await rt.get_task(c.task.id)
            assert task is not None
            assert (task.status, task.attempts) == (TaskStatus.QUEUED, 1)
            (run,) = await rt.get_runs(c.task.id)
            assert run.status is RunStatus.LOST
            assert run.error is not None
            assert "missed heartbeats" in run.error
            with pytest.raises(LeaseLostError):
                await rt.heartbeat(c.lease)
        await rt.heartbeat(other.lease)
        assert sorted(ids) == sorted([a.task.id, b.task.id, other.task.id])
        # A lost run counts an attempt but is no reason to wait: claimable at once.
        taken = {(await claim(rt, worker="new")).task.id for _ in range(2)}
        assert taken == {a.task.id, b.task.id}
        for c in (a, b):
            (retrying,) = [e for e in await events_of(rt, c.task.id) if e.type == "task.retrying"]
            assert (retrying.data["reason"], retrying.data["retry_in"]) == ("worker_lost", 0)


# -- failures, retries and timeouts ----------------------------------------------------------


async def test_failures_are_retried_with_backoff_then_fail_for_good(db_path: str) -> None:
    async with runtime(db_path) as rt:
        task_id = await rt.create_task("job", max_retries=2)
        for attempt in (1, 2):
            c = await claim(rt, wait=SOON)
            assert c.lease.attempt == attempt
            task = await rt.fail_task(c.lease, f"boom {attempt}")
            assert task.status is TaskStatus.QUEUED
            assert task.attempts == attempt
            assert task.available_at is not None
        c = await claim(rt, wait=SOON)
        task = await rt.fail_task(c.lease, "boom 3")
        assert task.status is TaskStatus.FAILED
        assert (task.attempts, task.error) == (3, "boom 3")
        assert await rt.claim_task("w1", wait=0.1) is None
        runs = await rt.get_runs(task_id)
        assert [r.status for r in runs] == [RunStatus.FAILED] * 3
        assert [r.error for r in runs] == ["boom 1", "boom 2", "boom 3"]
        events = [e for e in await events_of(rt, task_id) if e.type.startswith("task.")]
        assert [e.type for e in events] == [
            "task.created",
            "task.assigned",
            "task.retrying",
            "task.assigned",
            "task.retrying",
            "task.assigned",
            "task.failed",
        ]
        assert events[2].data["reason"] == "failed"
        assert events[2].data["error"] == "boom 1"
        assert events[-1].data["error"] == "boom 3"


async def test_a_completion_after_a_failed_attempt_carries_no_error(db_path: str) -> None:
    async with runtime(db_path) as rt:
        task_id = await rt.create_task("job", max_retries=1)
        first = await claim(rt, wait=SOON)
        await rt.fail_task(first.lease, "boom", retry_after=0)
        second = await claim(rt, wait=SOON)
        task = await rt.complete_task(second.lease, {"ok": True})
        assert (task.status, task.error, task.result) == (TaskStatus.COMPLETED, None, {"ok": True})
        stored = await rt.get_task(task_id)
        assert stored is not None
        assert stored.error is None
        (completed,) = [e for e in await events_of(rt, task_id) if e.type == "task.completed"]
        assert "error" not in completed.data
        assert [r.error for r in await rt.get_runs(task_id)] == ["boom", None]


async def test_backoff_holds_the_task_back(db_path: str) -> None:
    async with runtime(db_path) as rt:
        task_id = await rt.create_task("job", max_retries=1)
        c = await claim(rt)
        # The backoff counts from the failure, not from the checks after it: measured
        # from them, at load ~15 what remained of it was 0.01-0.17 s in 8 runs of 300
        # (this claim was answered at most 0.14 s after the failure began).
        failing = anyio.current_time()
        await rt.fail_task(c.lease, "later", retry_after=0.3)
        assert await rt.claim_task("w1") is None  # still backing off
        queued = await rt.get_queued_tasks()
        assert [t.id for t in queued] == [task_id]  # but queued
        again = await claim(rt, wait=SOON)
        assert again.task.id == task_id
        assert anyio.current_time() - failing >= 0.3 - EARLY


async def test_a_non_retryable_failure_fails_at_once(db_path: str) -> None:
    async with runtime(db_path) as rt:
        await rt.create_task("job", max_retries=5)
        c = await claim(rt)
        task = await rt.fail_task(c.lease, "bad input", retryable=False)
        assert (task.status, task.attempts, task.error) == (TaskStatus.FAILED, 1, "bad input")


async def test_release_task_requeues_without_counting_an_attempt(db_path: str) -> None:
    async with runtime(db_path) as rt:
        task_id = await rt.create_task("job", max_retries=0)
        c = await claim(rt)
        task = await rt.release_task(c.lease, reason="shutting down")
        assert (task.status, task.attempts) == (TaskStatus.QUEUED, 0)
        (run,) = await rt.get_runs(task_id)
        assert (run.status, run.error) == (RunStatus.RELEASED, "shutting down")
        again = await claim(rt)  # at once: no backoff
        assert again.task.id == task_id


async def test_a_run_past_the_task_timeout_ends_timed_out(db_path: str) -> None:
    async with runtime(db_path) as rt:
        task_id = await rt.create_task("job", timeout=0.2, max_retries=0)
        # Started as claimed: the timeout counts from the claim, so a start_task of its
        # own, 0.2 s late on a loaded machine, found the run timed out already.
        c = await claim(rt, lease=60, start=True)
        await wait_for_status(rt, task_id, TaskStatus.TIMED_OUT)
        task = await rt.get_task(task_id)
        assert task is not None
        assert task.attempts == 1
        assert task.error is not None
        assert "timeout" in task.error
        (run,) = await rt.get_runs(task_id)
        assert run.status is RunStatus.TIMED_OUT
        with pytest.raises(LeaseLostError):
            await rt.complete_task(c.lease)
        types = [e.type for e in await events_of(rt, task_id)]
        assert types[-1] == "task.timed_out"


async def test_a_timed_out_run_is_retried_while_attempts_remain(db_path: str) -> None:
    async with runtime(db_path) as rt:
        task_id = await rt.create_task("job", timeout=0.2, max_retries=1)
        c = await claim(rt, lease=60)
        # Heartbeats renew the lease, not the timeout.
        again = await claim(rt, "job", worker="w2", wait=SOON)
        assert again.task.id == task_id
        with pytest.raises(LeaseLostError):
            await rt.heartbeat(c.lease)
        retrying = [e for e in await events_of(rt, task_id) if e.type == "task.retrying"]
        assert [e.data["reason"] for e in retrying] == ["timed_out"]
        await rt.complete_task(again.lease)


# -- concurrency limits -----------------------------------------------------------------------


async def test_a_concurrency_key_limits_claims_across_workers(db_path: str) -> None:
    async with runtime(db_path) as rt:
        first = await rt.create_task("job", priority=9, concurrency_key="tenant-a")
        second = await rt.create_task("job", priority=9, concurrency_key="tenant-a")
        other = await rt.create_task("job", priority=1, concurrency_key="tenant-b")
        a = await claim(rt)
        assert a.task.id == first
        assert (await claim(rt)).task.id == other  # tenant-a is full; b is not
        assert await rt.claim_task("w3") is None
        got: list[Claim | None] = []
        async with anyio.create_task_group() as tg:

            async def waiter() -> None:
                got.append(await rt.claim_task("w3", wait=SOON))

            tg.start_soon(waiter)
            await parked()
            await rt.complete_task(a.lease)  # frees tenant-a's slot: no polling needed
        assert got[0] is not None
        assert got[0].task.id == second


async def test_a_concurrency_limit_above_one(db_path: str) -> None:
    async with runtime(db_path) as rt:
        for _ in range(4):
            await rt.create_task("job", concurrency_key="k", concurrency_limit=2)
        held = [await claim(rt), await claim(rt)]
        assert await rt.claim_task("w1") is None
        await rt.fail_task(held[0].lease, "x", retryable=False)
        assert await rt.claim_task("w1") is not None


async def test_a_task_type_limit_from_the_config(db_path: str) -> None:
    async with runtime(db_path, concurrency_limits={"deploy": 1}) as rt:
        await rt.create_task("deploy", priority=5)
        await rt.create_task("deploy", priority=5)
        build = await rt.create_task("build", priority=1)
        d = await claim(rt)
        assert d.task.task_type == "deploy"
        assert (await claim(rt)).task.id == build
        assert await rt.claim_task("w1", "deploy") is None
        await rt.release_task(d.lease)
        assert (await claim(rt, "deploy")).task.task_type == "deploy"


# -- restarts ---------------------------------------------------------------------------------


async def test_a_reopen_requeues_claimed_tasks_and_counts_the_attempt(db_path: str) -> None:
    async with runtime(db_path) as rt:
        task_id = await rt.create_task("job")
        c = await claim(rt)
        await rt.start_task(c.lease)
    async with runtime(db_path) as rt:
        task = await rt.get_task(task_id)
        assert task is not None
        assert (task.status, task.attempts) == (TaskStatus.QUEUED, 1)
        with pytest.raises(LeaseLostError):
            await rt.complete_task(c.lease)
        again = await claim(rt)
        assert again.lease.attempt == 2


async def test_a_failed_commit_leaves_the_claim_unmade(db_path: str) -> None:
    async with runtime(db_path) as rt:
        task_id = await rt.create_task("job")
        # Make the next write fail inside the database: a trigger refuses new runs.
        async with refusing_writes(db_path, "runs", "no runs today"):
            with pytest.raises(StorageError, match="no runs today"):
                await rt.claim_task("w1")
            task = await rt.get_task(task_id)
            assert task is not None
            assert task.status is TaskStatus.QUEUED
            assert await rt.get_runs(task_id) == []
        c = await claim(rt)
        assert c.task.id == task_id
        assert c.lease.attempt == 1


async def test_a_failed_completion_leaves_the_claim_as_it_was(db_path: str) -> None:
    """Memory is put back with the claim's run and the proof of its lease (the undo
    record of a task that has runs): the same token completes it once storage takes
    writes again."""
    async with runtime(db_path) as rt:
        task_id = await rt.create_task("job")
        c = await rt.claim_task("w1", start=True)
        assert c is not None
        async with refusing_writes(db_path, "runs", "no run ends today", event="UPDATE"):
            with pytest.raises(StorageError, match="no run ends today"):
                await rt.complete_task(c.lease, {"n": 1})
            task = await rt.get_task(task_id)
            assert task is not None
            assert task.status is TaskStatus.RUNNING
            [run] = await rt.get_runs(task_id)
            assert (run.id, run.status) == (c.lease.run_id, RunStatus.RUNNING)
        done = await rt.complete_task(c.lease, {"n": 2})
        assert (done.status, done.result) == (TaskStatus.COMPLETED, {"n": 2})


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"worker_id": ""}, "worker_id"),
        ({"worker_id": 5}, "worker_id"),
        ({"task_types": ""}, "task_types"),
        ({"task_types": []}, "task_types"),
        ({"task_types": ["ok", 3]}, "task_types[1]"),
        ({"task_types": 7}, "task_types"),
        ({"task_types": [f"t{n}" for n in range(257)]}, "task_types"),
        ({"lease": 0}, "lease"),
        ({"lease": -1}, "lease"),
        ({"lease": math.nan}, "lease"),
        ({"lease": math.inf}, "lease"),
        ({"lease": "10"}, "lease"),
        ({"lease": True}, "lease"),
        ({"wait": -0.5}, "wait"),
        ({"wait": math.nan}, "wait"),
    ],
)
async def test_bad_claim_arguments_are_refused(
    db_path: str, kwargs: dict[str, Any], field: str
) -> None:
    async with runtime(db_path) as rt:
        await rt.create_task("job")
        args: dict[str, Any] = {"worker_id": "w1"}
        args.update(kwargs)
        with pytest.raises(InvalidInputError) as caught:
            await rt.claim_task(**args)
        assert caught.value.field == field
        assert (await rt.get_queued_tasks())[0].status is TaskStatus.QUEUED


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"timeout": 0}, "timeout"),
        ({"timeout": -3}, "timeout"),
        ({"timeout": math.nan}, "timeout"),
        ({"timeout": "5"}, "timeout"),
        ({"concurrency_limit": 2}, "concurrency_limit"),
        ({"concurrency_key": "k", "concurrency_limit": 0}, "concurrency_limit"),
        ({"concurrency_key": "k", "concurrency_limit": 1.5}, "concurrency_limit"),
        ({"concurrency_key": ""}, "concurrency_key"),
    ],
)
async def test_bad_claim_settings_on_create_are_refused(
    db_path: str, kwargs: dict[str, Any], field: str
) -> None:
    async with runtime(db_path) as rt:
        with pytest.raises(InvalidInputError) as caught:
            await rt.create_task("job", **kwargs)
        assert caught.value.field == field
        assert await rt.get_queued_tasks() == []


async def test_bad_worker_calls_are_refused_and_change_nothing(db_path: str) -> None:
    async with runtime(db_path) as rt:
        task_id = await rt.create_task("job")
        c = await claim(rt)
        cases: list[tuple[Any, str]] = [
            (rt.complete_task({"task_id": task_id}), "lease"),  # type: ignore[arg-type]
            (rt.complete_task(c.lease, {"x": math.nan}), "result.x"),
            (rt.fail_task(c.lease, ""), "error"),
            (rt.fail_task(c.lease, "e", retryable="yes"), "retryable"),  # type: ignore[arg-type]
            (rt.fail_task(c.lease, "e", retry_after=-1), "retry_after"),
            (rt.heartbeat(c.lease, extend=0), "extend"),
            (rt.heartbeat(c.lease, progress={"bad": object()}), "progress.bad"),
            (rt.release_worker_tasks(""), "worker_id"),
        ]
        for call, field in cases:
            with pytest.raises(InvalidInputError) as caught:
                await call
            assert caught.value.field == field
        task = await rt.get_task(task_id)
        assert task is not None
        assert task.status is TaskStatus.ASSIGNED
        (run,) = await rt.get_runs(task_id)
        assert run.status is RunStatus.ASSIGNED
        await rt.complete_task(c.lease)


async def test_a_task_deleted_before_its_claim_is_reported(db_path: str) -> None:
    async with runtime(db_path) as rt:
        with pytest.raises(NotFoundError):
            await rt.delete_task("missing")
        assert await rt.release_worker_tasks("nobody") == 0


@pytest.mark.sqlite_only("another connection holds SQLite's write lock (BEGIN IMMEDIATE)")
async def test_a_slow_commit_is_waited_for_so_memory_matches_the_database(
    db_path: str,
) -> None:
    """The caller's deadline passes while another process holds the write lock; the write
    lands afterwards, and the TaskManager knows the task it created."""
    import sqlite3

    from hive_orchestration import RequestTimeoutError

    async with runtime(db_path, ask_timeout=0.5, busy_timeout=5.0) as rt:
        other = sqlite3.connect(db_path, isolation_level=None, timeout=10)
        try:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(RequestTimeoutError):
                await rt.create_task("job", idempotency_key="k")
            await anyio.sleep(0.3)
            other.execute("ROLLBACK")
            task_id = await rt.create_task("job", idempotency_key="k")  # the same task
            (stored,) = other.execute("SELECT id FROM tasks").fetchall()
        finally:
            other.close()
        assert stored == (task_id,)
        assert [t.id for t in await rt.get_queued_tasks()] == [task_id]
        assert (await claim(rt)).task.id == task_id


async def test_a_token_whose_task_is_deleted_in_the_same_batch_is_lost(db_path: str) -> None:
    async with runtime(db_path) as rt:
        task_id = await rt.create_task("job")
        c = await claim(rt)
        errors: list[Exception] = []

        async def beat() -> None:
            try:
                await rt.heartbeat(c.lease)
            except Exception as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(rt.delete_task, task_id)
            tg.start_soon(beat)
        await beat()
        assert errors
        assert all(isinstance(e, LeaseLostError) for e in errors)


async def test_a_manual_requeue_clears_the_worker(db_path: str) -> None:
    async with runtime(db_path) as rt:
        task_id = await rt.create_task("job")
        await claim(rt, worker="w1")
        await rt.update_task_status(task_id, "queued")
        task = await rt.get_task(task_id)
        assert task is not None
        assert task.assigned_worker is None
        (event,) = [e for e in await events_of(rt, task_id) if e.type == "task.retrying"]
        assert event.data["worker_id"] == "w1"  # who had it
