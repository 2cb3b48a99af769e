"""Worker death: workers that stop mid-task, silently; every task they held is requeued
within the configured bound and completed by another worker, exactly once.

Several workers, each with two slots (two tasks held at once), claim tasks, start them
(at once, or only when done: a task may be held ``assigned`` or ``running``), renew their
liveness while they work, and complete them. Some of them die: at a random moment while
each of their slots holds a task and sleeps between two calls, the worker's cancel scope is
cancelled, so it sends nothing more: no heartbeat, no completion, no release. Two ways the
runtime must notice:

- **lease expiry**: the workers never registered; their liveness is their leases, renewed
  by ``heartbeat(lease)``. A dead worker's task goes back when its lease runs out:
  ``task.retrying`` with ``reason: lease_expired`` at least ``lease`` after the last renewal
  was sent and at most ``lease`` + :data:`LATENESS` after it was answered.
- **the worker registry**: the workers registered and call ``update_worker_heartbeat``;
  their work (claims and lease calls, which the TaskManager reports to the registry) is a
  sign of life too, so their last sign of life is their last call of any kind. Their
  leases are far longer than the test. A dead worker is declared offline
  ``worker_timeout`` after its last sign of life (``worker.offline``) and its tasks go
  back: ``reason: worker_lost``, within ``worker_timeout`` (+ :data:`LATENESS`) of it,
  never before.

Either way the lost run counts an attempt (the event's ``attempts`` and the task's agree
with the runs lost) and the task is claimable again at once (``retry_in`` 0, though a
retry backoff is configured).

Times are taken with ``anyio.current_time()`` by the test: the worker's last renewal (sent
and answered), the moment the runtime acted (its ``task.retrying`` event's timestamp: the
runtime's wall clock is made to follow the event loop's, see ``tests/_timing.py``) and
the moment a live subscriber receives that event. The runtime keeps these deadlines with
an alarm set to the deadline itself (no polling tick), so the only allowance for acting is
:data:`LATENESS`: waking up and one batch (for the registry, its batch and commit before
the TaskManager's); then the commit and the event's way to the subscriber take at most
:data:`DELIVERY`. On a loaded machine the process may be ready to act and still wait for
a CPU, for longer than those allowances (measured at load ~11 on the 2-core machine:
requeued 305 ms late, and the process had waited 315 ms for a CPU in that span); so each
allowance is extended by exactly the time the process waited for a CPU over the span it
bounds, as Linux counts it (run-queue time, ``tests/_sched.py``): nothing on an idle
machine, and never the time a timer or a batch of the runtime's own makes it wait. On
PostgreSQL the wait of the server's backend that serves the runtime's writes is added too:
its commits are that process's work. Then
each such task is completed by a surviving worker, once; every task completed exactly
once; the audit of tasks, runs and log is clean; and the same after
reopening the file. The seed is printed when a test fails (``HIVE_RELIABILITY_SEED``
replays the plan of deaths, not the scheduler).
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import anyio
import pytest
from _raw import is_postgres
from _sched import RunQueueWait, pg_writer_pids
from _timing import loop_time, loop_wall_clock

from hive_orchestration import (
    Claim,
    Event,
    OrchestrationClient,
    RunStatus,
    Runtime,
    RuntimeConfig,
    TaskStatus,
    WorkerStatus,
)

from ._audit import HOLDING, audit_tasks, read_log

pytestmark = pytest.mark.anyio

Path = Literal["lease", "registry"]
JOB = "job"
#: The lease of the lease-expiry test's claims, and the registry test's worker_timeout.
#: Long enough beside RENEW_EVERY that a live worker keeps renewing within it through a
#: stall of the whole process (CI's load stalled it ~0.4 s: with 0.5 s, live workers were
#: rightly declared offline, and "only the dead workers' tasks went back" failed).
BOUND = 1.0
#: The registry test's leases: far past the test, so only the registry can requeue.
LONG_LEASE = 600.0
#: How late after its deadline the runtime may act (the batch that requeues): the alarm
#: fires at the deadline, then one batch of the TaskManager (and, for the registry, one
#: batch and commit of the registry before it). Measured: a few ms on an idle 2-core
#: machine; the margin is for a loaded one, and still fails a deadline that fires 200 ms
#: late or a registry that waits three times ``worker_timeout``. The time the process
#: waited for a CPU meanwhile is added to it (the module's docstring).
LATENESS = 0.15
#: From acting to a subscriber holding the event: the commit (an fsync) and the fan-out,
#: on a loaded machine (plus, as for LATENESS, the process's wait for a CPU meanwhile).
DELIVERY = 1.0
#: A clock allowance for "never early": the runtime and the test read the same monotonic
#: clock, at slightly different moments.
EARLY = 0.01
SLOTS = 2
#: Live workers renew their liveness this often: 10 renewals per bound, so a stall of up
#: to 0.9 s of the process does not take their liveness away.
RENEW_EVERY = BOUND / 10
SAFETY = 60.0


@dataclass
class Held:
    """A task a worker holds: its claim, and whether it was started."""

    claim: Claim
    started: bool = False


@dataclass
class Worker:
    id: str
    doomed: bool
    client: OrchestrationClient
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    holding: dict[str, Held] = field(default_factory=dict)
    #: The last renewal of liveness, by task id for leases ("" for the registry: the
    #: worker's last call): when it was sent and when it was answered.
    sent: dict[str, float] = field(default_factory=dict)
    acked: dict[str, float] = field(default_factory=dict)
    #: Slots (and the registry heartbeat) asleep between two calls: killable cleanly.
    idle: int = 0
    died_at: float | None = None
    held_at_death: dict[str, Held] = field(default_factory=dict)
    #: Renewal times at death, as above.
    sent_at_death: dict[str, float] = field(default_factory=dict)
    acked_at_death: dict[str, float] = field(default_factory=dict)
    completed: list[str] = field(default_factory=list)

    def dead(self) -> bool:
        return self.scope.cancel_called

    @contextmanager
    def asleep(self) -> Iterator[None]:
        self.idle += 1
        try:
            yield
        finally:
            self.idle -= 1

    @contextmanager
    def renewing(self, *keys: str) -> Iterator[None]:
        """Around a call that renews liveness: of a lease (the task's id), or of the worker
        for the registry (\"\": any call, as claims and lease calls count as work)."""
        sent = anyio.current_time()
        yield
        acked = anyio.current_time()
        for key in keys:
            self.sent[key] = max(self.sent.get(key, sent), sent)
            self.acked[key] = max(self.acked.get(key, acked), acked)


@dataclass
class Run:
    path: Path
    rng: random.Random
    lease: float
    tasks: list[str] = field(default_factory=list)
    retrying: list[tuple[float, Event]] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)
    stop: anyio.Event = field(default_factory=anyio.Event)
    #: How long the process waited for a CPU, sampled while the workers run.
    cpu_wait: RunQueueWait = field(default_factory=RunQueueWait)


async def slot(worker: Worker, run: Run) -> None:
    """Claim, start (now or at the end), work while renewing, complete; until stopped."""
    client, rng = worker.client, random.Random(run.rng.random())
    lease_key = run.path == "lease"
    while not run.stop.is_set() and not worker.dead():
        claim_sent = anyio.current_time()
        with worker.renewing(""):
            claim = await client.claim_task(worker.id, JOB, lease=run.lease, wait=0.05)
        if claim is None:
            continue
        task_id = claim.task.id
        held = worker.holding[task_id] = Held(claim)
        if lease_key:  # the claim's own time: the lease starts with it
            worker.sent[task_id], worker.acked[task_id] = claim_sent, anyio.current_time()
        if rng.random() < 0.5:
            with worker.renewing(""):
                await client.start_task(claim.lease)
            held.started = True
        work = rng.uniform(0.05, 0.2)
        while work > 0:
            step = min(work, RENEW_EVERY)
            with worker.asleep():
                await anyio.sleep(step)
            if worker.dead():
                return  # killed as its sleep ended: it must not send anything more
            work -= step
            if lease_key:
                with worker.renewing(task_id, ""):
                    await client.heartbeat(claim.lease)
        with worker.renewing(""):
            if not held.started:
                await client.start_task(claim.lease)
            await client.complete_task(claim.lease, {"by": worker.id})
        del worker.holding[task_id]
        worker.completed.append(task_id)


async def beat(worker: Worker, run: Run) -> None:
    """The registry path: the worker's own heartbeat, as a live worker sends it."""
    while not run.stop.is_set():
        with worker.asleep():
            await anyio.sleep(RENEW_EVERY)
        if worker.dead():
            return
        with worker.renewing(""):
            assert await worker.client.update_worker_heartbeat(worker.id)


async def live(worker: Worker, run: Run) -> None:
    """The worker: its slots (and its registry heartbeat), in its own cancel scope."""
    with worker.scope:
        if run.path == "registry":
            with worker.renewing(""):
                await worker.client.register_worker(worker.id, "loader", [JOB])
        async with anyio.create_task_group() as tg:
            for _ in range(SLOTS):
                tg.start_soon(slot, worker, run)
            if run.path == "registry":
                tg.start_soon(beat, worker, run)


async def reaper(worker: Worker, run: Run, after: float) -> None:
    """Kills ``worker`` at the first moment past ``after`` seconds at which each slot holds
    a task and every one of its tasks is asleep between two calls (none is mid-call: what
    it sent last is known)."""
    await anyio.sleep(after)
    with anyio.fail_after(10):
        while True:
            sleepers = SLOTS + (run.path == "registry")
            if worker.idle == sleepers and len(worker.holding) == SLOTS:
                # No checkpoint from the check to the cancel: nothing moves in between.
                worker.scope.cancel()
                worker.died_at = anyio.current_time()
                worker.held_at_death = dict(worker.holding)
                worker.sent_at_death = dict(worker.sent)
                worker.acked_at_death = dict(worker.acked)
                return
            await anyio.sleep(0.001)


async def follow_retries(runtime: Runtime, run: Run, ready: anyio.Event) -> None:
    async with runtime.subscribe("task.retrying") as requeued:
        ready.set()
        async for event in requeued:
            run.retrying.append((anyio.current_time(), event))


def seed() -> int:
    return int(os.environ.get("HIVE_RELIABILITY_SEED", "0")) or random.randrange(2**32)


@dataclass
class Measured:
    """For each task a dead worker held: how long after its deadline it went back."""

    #: When the runtime requeued minus (last renewal answered + bound): at most LATENESS.
    late: list[float] = field(default_factory=list)
    #: When the runtime requeued minus (last renewal sent + bound): at least -EARLY.
    after_sent: list[float] = field(default_factory=list)
    #: When a subscriber received the requeue minus when the runtime requeued.
    delivered: list[float] = field(default_factory=list)
    #: When the runtime requeued minus the worker's death.
    after_death: list[float] = field(default_factory=list)
    #: How long the process waited for a CPU from each deadline to the requeue.
    cpu_waits: list[float] = field(default_factory=list)


async def run_deaths(
    db_path: str, path: Path, *, workers: int, doomed: int, tasks: int, chosen: int
) -> Measured:
    rng = random.Random(chosen)
    # The registry test's workers are declared offline BOUND after their last heartbeat;
    # the lease test's workers never register, so the registry plays no part.
    # A retry backoff that would show: a lost run must be claimable again at once.
    config = RuntimeConfig(retry_backoff=5.0, retry_backoff_max=5.0, worker_timeout=BOUND)
    run = Run(path, rng, LONG_LEASE if path == "registry" else BOUND)
    measured = Measured()
    with anyio.fail_after(SAFETY):
        async with Runtime.open(db_path, config=config, wall_clock=loop_wall_clock) as runtime:
            if is_postgres(db_path):  # its commits wait for the server's backend too
                run.cpu_wait.watch(await anyio.to_thread.run_sync(pg_writer_pids, db_path))
            client = runtime.client(source_agent="auditor")
            run.tasks = [await client.create_task(JOB, {"n": n}) for n in range(tasks)]
            dying = set(rng.sample(range(workers), doomed))
            run.workers = [
                Worker(f"w{i}", i in dying, runtime.client(source_agent=f"w{i}"))
                for i in range(workers)
            ]
            async with anyio.create_task_group() as tg:
                tg.start_soon(run.cpu_wait.run)
                ready = anyio.Event()
                tg.start_soon(follow_retries, runtime, run, ready)
                await ready.wait()
                async with anyio.create_task_group() as everyone:
                    for worker in run.workers:
                        everyone.start_soon(live, worker, run)
                    async with anyio.create_task_group() as reapers:
                        for worker in run.workers:
                            if worker.doomed:
                                reapers.start_soon(reaper, worker, run, rng.uniform(0.05, 0.3))
                    await drained(client, run)
                    if path == "registry":
                        await check_workers(runtime, client, run)
                    run.stop.set()
                tg.cancel_scope.cancel()
            await check(runtime, client, run, measured)
        async with Runtime.open(db_path, config=config) as runtime:
            client = runtime.client(source_agent="auditor")
            _, found, runs, problems = await audit_tasks(client, await read_log(client))
            assert problems == []
            assert set(found) == set(run.tasks)
            assert {t.status for t in found.values()} == {TaskStatus.COMPLETED}
            assert not [r for rs in runs.values() for r in rs if r.status is RunStatus.ASSIGNED]
    return measured


async def drained(client: OrchestrationClient, run: Run) -> None:
    """Until every task has completed (the dead workers' ones too)."""
    with anyio.fail_after(SAFETY / 2):
        while True:
            done = await client.get_tasks_by_status(TaskStatus.COMPLETED)
            if len(done) == len(run.tasks):
                return
            await anyio.sleep(0.02)


async def check(
    runtime: Runtime, client: OrchestrationClient, run: Run, measured: Measured
) -> None:
    bound = run.lease if run.path == "lease" else BOUND
    reason = "lease_expired" if run.path == "lease" else "worker_lost"
    events = await read_log(client)
    ledger, tasks, runs, problems = await audit_tasks(client, events)
    assert problems == []
    assert set(tasks) == set(run.tasks)
    assert {t.status for t in tasks.values()} == {TaskStatus.COMPLETED}
    assert all(ledger.completed[task_id] == 1 for task_id in run.tasks)
    by_worker = {w.id: w for w in run.workers}
    survivors = {w.id for w in run.workers if not w.doomed}
    acknowledged = Counter(task_id for w in run.workers for task_id in w.completed)
    assert max(acknowledged.values()) == 1
    requeued = {str(e.data["run_id"]): (at, e) for at, e in run.retrying}
    dead = [w for w in run.workers if w.doomed]
    assert all(w.died_at is not None for w in dead)
    for worker in dead:
        assert worker.died_at is not None
        assert len(worker.held_at_death) == SLOTS
        assert not worker.completed or all(t not in worker.held_at_death for t in worker.completed)
        for task_id, held in worker.held_at_death.items():
            where = f"{worker.id}'s task {task_id}"
            found = requeued.get(held.claim.lease.run_id)
            assert found is not None, f"{where} was never requeued"
            at, event = found
            assert event.data["reason"] == reason, (where, event.data)
            assert event.data["retry_in"] == 0, (where, event.data)
            key = task_id if run.path == "lease" else ""
            sent, acked = worker.sent_at_death[key], worker.acked_at_death[key]
            # Never before the bound has passed since the last renewal, at most LATENESS
            # after it passed since that renewal was answered; seen DELIVERY after that.
            acted = loop_time(event.timestamp)
            assert acted - (sent + bound) >= -EARLY, (where, acted - (sent + bound))
            # The allowances, plus the time the process waited for a CPU meanwhile (none
            # on an idle machine): what a loaded machine delays, not the runtime.
            waited = run.cpu_wait.between(acked + bound, acted)
            late = acted - (acked + bound)
            assert late <= LATENESS + waited, (where, late, f"waited for a CPU {waited}")
            waited_delivery = run.cpu_wait.between(acted, at)
            assert 0 <= at - acted <= DELIVERY + waited_delivery, (where, at - acted)
            measured.late.append(late)
            measured.cpu_waits.append(waited)
            measured.after_sent.append(acted - (sent + bound))
            measured.delivered.append(at - acted)
            measured.after_death.append(acted - worker.died_at)
            # Then a surviving worker completed it, once; the dead worker's run was lost.
            task_runs = runs[task_id]
            lost = [r for r in task_runs if r.id == held.claim.lease.run_id]
            assert [r.status for r in lost] == [RunStatus.LOST], (where, lost)
            error = lost[0].error or ""
            assert ("lease expired" if run.path == "lease" else "no heartbeat") in error, error
            # The lost run counted an attempt: one per run lost up to this one.
            lost_so_far = [
                r
                for r in task_runs
                if r.status is RunStatus.LOST and r.run_number <= lost[0].run_number
            ]
            assert event.data["attempts"] == len(lost_so_far), (where, event.data, task_runs)
            done = [r for r in task_runs if r.status is RunStatus.COMPLETED]
            assert len(done) == 1, (where, task_runs)
            assert done[0].worker_id in survivors, (where, done[0].worker_id)
            assert acknowledged[task_id] == 1
            assert task_id in by_worker[str(done[0].worker_id)].completed
    # Only the dead workers' tasks went back: the live ones kept theirs.
    doomed_ids = {w.id for w in dead}
    lost_by = Counter(str(e.data.get("worker_id")) for _, e in run.retrying)
    assert set(lost_by) <= doomed_ids, lost_by
    assert sum(lost_by.values()) == sum(len(w.held_at_death) for w in dead)
    assert not [t for t in tasks.values() if t.status in HOLDING]
    # Every task's attempts are its lost runs (nothing else ends a run unsuccessfully here).
    for task_id, task in tasks.items():
        lost_runs = [r for r in runs[task_id] if r.status is RunStatus.LOST]
        assert task.attempts == len(lost_runs), (task_id, task.attempts, runs[task_id])


async def check_workers(runtime: Runtime, client: OrchestrationClient, run: Run) -> None:
    """While the live workers still heartbeat: exactly the dead ones were declared offline."""
    for worker in run.workers:
        record = await runtime.get_worker(worker.id)
        assert record is not None
        expected = WorkerStatus.OFFLINE if worker.doomed else WorkerStatus.ACTIVE
        assert record.status is expected, (worker.id, record.status)
    events = await read_log(client)
    offline = Counter(str(e.worker_id) for e in events if e.type == "worker.offline")
    assert offline == Counter(w.id for w in run.workers if w.doomed)


def report(path: Path, chosen: int, measured: Measured) -> str:
    def ms(values: list[float]) -> str:
        return f"{min(values) * 1000:.1f}..{max(values) * 1000:.1f} ms"

    bound = "lease" if path == "lease" else "worker_timeout"
    return (
        f"\n{path} (seed {chosen}): {len(measured.late)} tasks of dead workers requeued "
        f"{ms(measured.after_sent)} after (last renewal sent + {bound} {BOUND:g} s), "
        f"{ms(measured.late)} after (last renewal answered + {bound}) [allowed "
        f"{LATENESS * 1000:.0f} ms + the process's wait for a CPU meanwhile, "
        f"{ms(measured.cpu_waits)}], {ms(measured.after_death)} after the death; seen "
        f"{ms(measured.delivered)} after [allowed {DELIVERY * 1000:.0f} ms + the same]"
    )


@pytest.mark.parametrize("path", ["lease", "registry"])
async def test_dead_workers_tasks_are_requeued_in_time_and_completed_by_others(
    path: Path, db_path: str, record_property: Callable[[str, object], None]
) -> None:
    chosen = seed()
    record_property("seed", chosen)
    try:
        measured = await run_deaths(db_path, path, workers=6, doomed=3, tasks=40, chosen=chosen)
    except BaseException:
        print(f"\nseed: {chosen} (HIVE_RELIABILITY_SEED={chosen} replays it)")
        raise
    print(report(path, chosen, measured))
    record_property("late_ms_max", round(max(measured.late) * 1000, 2))


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a long variant: past the suite's 300 s (pyproject.toml)
@pytest.mark.parametrize("path", ["lease", "registry"])
async def test_many_dead_workers_tasks_are_requeued_in_time_and_completed_by_others(
    path: Path, db_path: str, record_property: Callable[[str, object], None]
) -> None:
    chosen = seed()
    record_property("seed", chosen)
    try:
        measured = await run_deaths(db_path, path, workers=16, doomed=8, tasks=400, chosen=chosen)
    except BaseException:
        print(f"\nseed: {chosen} (HIVE_RELIABILITY_SEED={chosen} replays it)")
        raise
    print(report(path, chosen, measured))
    record_property("late_ms_max", round(max(measured.late) * 1000, 2))
