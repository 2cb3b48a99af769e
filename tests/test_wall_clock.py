"""Deadlines follow a monotonic clock, never the wall clock: stepping the wall clock (NTP,
a VM resumed, an operator) neither ends live claims nor delays a dead worker's requeue.

The runtime's wall clock is injected (``Runtime.open(wall_clock=...)``) and stepped by an
hour while workers run, on real SQLite files and both backends; the machine's clock is not
touched. Stored and shown times (``lease_expires_at``, ``last_heartbeat``, event
timestamps) follow the stepped wall clock; every deadline (leases, run timeouts, retry
backoffs, worker liveness, claim waits) runs on the event loop's monotonic clock.

Timing bounds: :data:`LATE` is how late after its deadline a requeue or the end of a wait
may be seen, on a loaded 2-core machine (one alarm wake-up, a batch, a commit); an hour's
step would show as an hour, so the margin is wide without letting the bug through.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import anyio
import pytest
from _raw import is_postgres, refusing_writes

from hive_orchestration import (
    ActorFailedError,
    Claim,
    Event,
    Runtime,
    RuntimeConfig,
    StorageError,
    TaskStatus,
    WorkerStatus,
)
from hive_orchestration.actors.task_manager import TaskManager
from hive_orchestration.messages.tasks import GetTask

pytestmark = pytest.mark.anyio

HOUR = timedelta(hours=1)
#: Leases, worker_timeout and waits of these tests.
BOUND = 1.0
#: How late after its deadline something may be seen on a loaded machine (measured: a few
#: ms on an idle one; 0.6 s once, with the suite on both cores and a browser test beside
#: it). Still far below the hour a stepped clock would cost, and below a second BOUND.
LATE = 0.75
#: Never early: allowance for the test and the runtime reading the monotonic clock apart.
EARLY = 0.01
SOON = 10.0


class SteppedClock:
    """The machine's wall clock plus an offset the test moves."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def step(self, by: timedelta) -> None:
        self.offset += by


@asynccontextmanager
async def stepped_runtime(
    db_path: str, **config: Any
) -> AsyncIterator[tuple[Runtime, SteppedClock]]:
    settings: dict[str, Any] = {
        "retry_backoff": 0.01,
        "retry_backoff_max": 0.05,
        "worker_timeout": BOUND,
    }
    settings.update(config)
    clock = SteppedClock()
    async with Runtime.open(db_path, config=RuntimeConfig(**settings), wall_clock=clock) as rt:
        yield rt, clock


async def all_events(rt: Runtime) -> list[Event]:
    return await rt.read_events(0, limit=10_000)


async def test_a_forward_step_loses_no_live_claim_and_no_live_worker(db_path: str) -> None:
    """An hour forward while a registered worker holds 50 leases (and one task with a run
    timeout) and heartbeats them: no lease is lost, the worker stays active, no task is
    failed, requeued or timed out (``max_retries=0``: a lost lease would fail it for good),
    and every task completes on its first attempt."""
    async with stepped_runtime(db_path) as (rt, clock):
        ids = [await rt.create_task("job", {"n": n}, max_retries=0) for n in range(50)]
        timed = await rt.create_task("job", {"timed": True}, max_retries=0, timeout=SOON)
        # Registered once its tasks are there: 51 creates, each its own commit, took up to
        # 1.7 s on PostgreSQL at load ~12, past its worker_timeout with no sign of life.
        await rt.register_worker("w", capabilities=["job"])
        claims = await rt.claim_tasks("w", "job", limit=51, lease=BOUND, start=True)
        assert sorted(c.task.id for c in claims) == sorted([*ids, timed])
        first_expiry = max(c.expires_at for c in claims)

        async def renew() -> datetime:
            # All at once, as workers of their own would: one after another, each
            # heartbeat that the PostgreSQL store writes (every 0.5 s of a lease's move)
            # waits for its own commit, and 51 commits in a row took 0.4-0.55 s at load
            # ~12: with the pause, more than a lease between two renewals of a claim.
            expires: list[datetime] = []

            async def one(claim: Claim) -> None:
                expires.append(await rt.heartbeat(claim.lease))

            async def worker() -> None:
                assert await rt.update_worker_heartbeat("w")

            async with anyio.create_task_group() as tg:
                for claim in claims:
                    tg.start_soon(one, claim)
                tg.start_soon(worker)
            return max(expires)

        await renew()
        clock.step(HOUR)
        stepped_at = anyio.current_time()
        # Renew for more than two leases and two worker timeouts after the step: each of
        # them would have run out at once on the wall clock.
        while anyio.current_time() - stepped_at < 2.5 * BOUND:
            await anyio.sleep(BOUND / 5)
            expires = await renew()
        # Shown times follow the stepped wall clock.
        assert expires >= first_expiry + HOUR
        worker = await rt.get_worker("w")
        assert worker is not None
        assert worker.status is WorkerStatus.ACTIVE
        assert worker.last_heartbeat >= clock() - timedelta(seconds=SOON)
        done: list[tuple[TaskStatus, int]] = []

        async def complete(claim: Claim) -> None:
            task = await rt.complete_task(claim.lease, {"ok": True})  # LeaseLostError if lost
            done.append((task.status, task.attempts))

        async with anyio.create_task_group() as tg:  # at once too, within a lease
            for claim in claims:
                tg.start_soon(complete, claim)
        assert done == [(TaskStatus.COMPLETED, 0)] * len(claims)
        bad = {"task.failed", "task.retrying", "task.timed_out", "worker.offline"}
        assert [e for e in await all_events(rt) if e.type in bad] == []


async def test_a_forward_step_neither_ends_a_claim_wait_nor_shortens_a_backoff(
    db_path: str,
) -> None:
    async with stepped_runtime(db_path) as (rt, clock):
        async with anyio.create_task_group() as tg:
            got: list[Claim | None] = []

            async def wait_for_work() -> None:
                got.append(await rt.claim_task("waiter", "later", wait=4 * BOUND))

            tg.start_soon(wait_for_work)
            await anyio.sleep(0.05)  # let the claim park (a step before it would not matter)
            clock.step(HOUR)
            await anyio.sleep(BOUND)
            # Still waiting: the wait ends 4 * BOUND after it began, not at the step.
            task_id = await rt.create_task("later")
        (claimed,) = got
        assert claimed is not None
        assert claimed.task.id == task_id

        await rt.create_task("job")
        first = await rt.claim_task("w", "job", lease=60)
        assert first is not None
        failed_at = anyio.current_time()
        await rt.fail_task(first.lease, "boom", retry_after=BOUND)
        clock.step(HOUR)
        again = await rt.claim_task("w", "job", lease=60, wait=SOON)
        waited = anyio.current_time() - failed_at
        assert again is not None
        assert again.task.id == first.task.id
        assert waited >= BOUND - EARLY, waited  # the backoff was not cut short by the step
        assert waited <= BOUND + LATE, waited


@pytest.mark.parametrize("path", ["lease", "registry"])
async def test_a_backward_step_does_not_delay_a_dead_workers_requeue(
    db_path: str, path: Literal["lease", "registry"]
) -> None:
    """An hour back after a worker died holding tasks: they are requeued ``BOUND`` after
    its last sign of life, by lease expiry (an unregistered worker) or by the registry
    declaring it offline (a registered one with leases far longer than the test)."""
    async with stepped_runtime(db_path) as (rt, clock):
        ids = [await rt.create_task("job") for _ in range(5)]
        lease = BOUND if path == "lease" else 600.0
        if path == "registry":
            await rt.register_worker("doomed", capabilities=["job"])
        seen: list[tuple[float, Event]] = []
        async with rt.subscribe("task.retrying") as requeued:
            sent = anyio.current_time()
            claims = await rt.claim_tasks("doomed", "job", limit=5, lease=lease, start=True)
            acked = anyio.current_time()
            assert sorted(c.task.id for c in claims) == sorted(ids)
            # The worker dies: it sends nothing more. Then the wall clock goes back.
            clock.step(-HOUR)
            with anyio.fail_after(SOON):
                while len(seen) < len(ids):
                    event = await requeued.receive()
                    seen.append((anyio.current_time(), event))
        reason = "lease_expired" if path == "lease" else "worker_lost"
        assert sorted(str(e.task_id) for _, e in seen) == sorted(ids)
        for at, event in seen:
            assert event.data["reason"] == reason
            assert at - (sent + BOUND) >= -EARLY, at - (sent + BOUND)
            assert at - (acked + BOUND) <= LATE, at - (acked + BOUND)
            # Shown times follow the stepped clock.
            assert event.timestamp < (clock() + timedelta(seconds=1)).timestamp()
        if path == "registry":
            worker = await rt.get_worker("doomed")
            assert worker is not None
            assert worker.status is WorkerStatus.OFFLINE


async def test_a_backward_step_does_not_stretch_a_claim_wait_a_backoff_or_a_timeout(
    db_path: str,
) -> None:
    async with stepped_runtime(db_path, ask_timeout=SOON) as (rt, clock):
        began = anyio.current_time()
        async with anyio.create_task_group() as tg:
            ended: list[float] = []

            async def wait_for_nothing() -> None:
                assert await rt.claim_task("waiter", "never", wait=BOUND) is None
                ended.append(anyio.current_time())

            tg.start_soon(wait_for_nothing)
            await anyio.sleep(0.05)
            clock.step(-HOUR)
        assert BOUND - EARLY <= ended[0] - began <= BOUND + LATE, ended[0] - began

        await rt.create_task("job", timeout=BOUND)
        claimed_at = anyio.current_time()
        c = await rt.claim_task("w", "job", lease=600, start=True)
        assert c is not None
        clock.step(-HOUR)
        # The run times out BOUND after its claim, then the task is queued after a backoff.
        again = await rt.claim_task("w2", "job", lease=600, wait=SOON)
        took = anyio.current_time() - claimed_at
        assert again is not None
        assert again.task.id == c.task.id
        assert BOUND - EARLY <= took <= BOUND + 0.05 + LATE, took

        failed_at = anyio.current_time()
        await rt.fail_task(again.lease, "boom", retry_after=BOUND)
        clock.step(-HOUR)
        third = await rt.claim_task("w3", "job", lease=600, wait=SOON)
        took = anyio.current_time() - failed_at
        assert third is not None
        assert BOUND - EARLY <= took <= BOUND + LATE, took


# -- stored wall times, turned into deadlines once -------------------------------------------


async def test_a_reopen_turns_a_stored_backoff_into_what_remains_of_it(db_path: str) -> None:
    """Tasks failed with a backoff, then the runtime stops and opens again with the wall
    clock an hour back: the backoff ends by what remains of it by the wall clock, at most
    the span that was set, counted from the reopened runtime's read of it (the stored
    wall time cannot say more), not an hour later, and not before it was set to end. An
    hour forward, what remains of a 600 s backoff is nothing: the task is ready at open.
    On PostgreSQL a backoff read back from the database ends by the database's clock
    (docs/POSTGRES.md, "Due by the database's clock"), which no node's clock moves: 600 s
    remain.

    The span counts from the read, inside ``Runtime.open``, not from the failure (a node
    whose clock is behind holds a backoff it read for at most its span: POSTGRES.md), so
    the end is measured from the open's return, the latest the read can be: the close and
    the open took up to 1.6 s on PostgreSQL at load ~16."""
    async with stepped_runtime(db_path) as (rt, _):
        back, ahead = await rt.create_task("back"), await rt.create_task("ahead")
        failing = anyio.current_time()
        for task_type, backoff in (("back", 2 * BOUND), ("ahead", 600.0)):
            c = await rt.claim_task("w", task_type, lease=600)
            assert c is not None
            await rt.fail_task(c.lease, "boom", retry_after=backoff)
    config = RuntimeConfig(retry_backoff=0.01)
    async with Runtime.open(db_path, config=config, wall_clock=lambda: _utc() - HOUR) as rt:
        opened = anyio.current_time()
        again = await rt.claim_task("w", "back", lease=600, wait=SOON)
        claimed = anyio.current_time()
        assert again is not None
        assert again.task.id == back
        assert claimed - failing >= 2 * BOUND - EARLY, claimed - failing
        assert claimed - opened <= 2 * BOUND + LATE, claimed - opened
    async with Runtime.open(db_path, config=config, wall_clock=lambda: _utc() + HOUR) as rt:
        got = await rt.claim_task("w", "ahead", lease=600)  # no wait: ready at open
        if is_postgres(db_path):
            assert got is None
        else:
            assert got is not None
            assert got.task.id == ahead


def _utc() -> datetime:
    return datetime.now(UTC)


async def test_a_restarted_task_manager_restarts_each_lease_whole(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TaskManager crashes and restarts after the wall clock went back an hour: the
    claims stand, and a dead worker's lease runs out ``lease`` after the restart, not an
    hour later (stored wall times are read once, at start-up, each lease restarted)."""
    original = TaskManager._handle

    async def crash_on_demand(self: TaskManager, message: Any, work: Any, now: Any) -> Any:
        if isinstance(message, GetTask) and message.task_id == "crash-now":
            raise RuntimeError("injected fault")
        return await original(self, message, work, now)

    monkeypatch.setattr(TaskManager, "_handle", crash_on_demand)
    async with stepped_runtime(db_path) as (rt, clock):
        task_id = await rt.create_task("job")
        dead = await rt.claim_task("doomed", "job", lease=BOUND, start=True)
        assert dead is not None
        clock.step(-HOUR)
        with pytest.raises(ActorFailedError):
            await rt.get_task("crash-now")
        restarted = anyio.current_time()
        again = await rt.claim_task("w2", "job", lease=600, wait=SOON)
        took = anyio.current_time() - restarted
        assert again is not None
        assert again.task.id == task_id
        assert took <= BOUND + LATE, took
        (lost, _) = await rt.get_runs(task_id)
        assert lost.error is not None
        assert "lease expired" in lost.error


async def test_a_failed_commit_keeps_the_deadlines_of_the_claims(db_path: str) -> None:
    """A failed commit puts memory back, deadlines included: after an hour's step forward, a
    live claim is not ended by deadlines rebuilt from its stored wall times."""
    async with stepped_runtime(db_path) as (rt, clock):
        held_id = await rt.create_task("job", max_retries=0)
        held = await rt.claim_task("w", "job", lease=60)
        assert held is not None
        await rt.create_task("other")
        clock.step(HOUR)
        async with refusing_writes(db_path, "runs", "no runs today"):
            with pytest.raises(StorageError, match="no runs today"):
                await rt.claim_task("w", "other", lease=60)
        await rt.heartbeat(held.lease)  # LeaseLostError if the failed commit ended it
        done = await rt.complete_task(held.lease)
        assert done.id == held_id
        assert (done.status, done.attempts) == (TaskStatus.COMPLETED, 0)
