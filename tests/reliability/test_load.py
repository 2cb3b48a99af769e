"""Load: 200 concurrent clients on one runtime, on a real SQLite file, both backends.

Each client is an agent of its own (``runtime.client(source_agent=...)``): producers create
tasks, workers register, claim (waiting), start, heartbeat and complete or fail them, and
readers read tasks, lists and the event log, all at once for a bounded time; then the
producers stop and the workers drain the queue. Afterwards nothing may be wrong: no call
failed, every task created exists once, in one status (completed), completed exactly once
by the event log and by its runs, the log has no gap, a reader that followed the whole
log live saw every event once, in order, and the database says the same after reopening.

The load phase has two halves. In the first, latency is measured (p50/p99 of
``create_task``, and of a worker's claim -> start -> heartbeat -> complete): reported, never
asserted; print it with ``pytest -s``, it is also attached to the test's report
(``record_property``). In the second, Python memory is traced (tracemalloc, which halves
the throughput, hence not while measuring latency) and its peak must stay under a ceiling.
The default run has 3 s of load per backend; the ``slow`` variant 30 s.
"""

from __future__ import annotations

import random
import time
import tracemalloc
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import pytest

from hive_orchestration import (
    Event,
    OrchestrationClient,
    Runtime,
    RuntimeConfig,
    TaskStatus,
)

from ._audit import audit_tasks, every_task, read_log

pytestmark = pytest.mark.anyio

PRODUCERS, WORKERS, READERS = 80, 80, 40  # 200 clients
#: Producers wait while this many created tasks are not finished: a closed loop, so the
#: load is "as fast as the runtime takes it" without a backlog that the drain must clear.
BACKLOG = 400
#: The Python memory (tracemalloc) that the traced half of the load may allocate and hold
#: at its peak. A fixed, generous ceiling rather than a comparison of two points: what the
#: runtime keeps legitimately grows with the tasks it has seen, up to its own bounds (every
#: live task, the 10 000 most recently finished ones with their runs, bounded mailboxes
#: and subscriber buffers): 4-8 KiB per task measured, so under 128 MiB even once that
#: cache is full, against about 5 MiB in the default run and 14 MiB in the slow one. Growth
#: without a bound at the rate of the load (every event or request kept somewhere) crosses
#: it. SQLite's own page cache is not Python memory and is not counted.
MEMORY_CEILING = 256 * 2**20
SEED = 20240607


@dataclass
class Load:
    """What the clients did and saw."""

    stop_at: float
    rng: random.Random
    created: list[str] = field(default_factory=list)
    backlog: anyio.Semaphore = field(default_factory=lambda: anyio.Semaphore(BACKLOG))
    completed_by_workers: Counter[str] = field(default_factory=Counter)
    claims: Counter[str] = field(default_factory=Counter)  # by run id
    claims_per_task: Counter[str] = field(default_factory=Counter)
    failures: int = 0
    reads: int = 0
    errors: list[str] = field(default_factory=list)
    create_latency: list[float] = field(default_factory=list)
    cycle_latency: list[float] = field(default_factory=list)
    producers_done: anyio.Event = field(default_factory=anyio.Event)
    #: True in the first half of the load: latency is measured, memory not traced.
    measuring: bool = True
    #: Cancelled by the first error.
    halt: anyio.CancelScope = field(default_factory=anyio.CancelScope)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


async def guarded(
    load: Load, name: str, body: Callable[..., Awaitable[None]], *args: object
) -> None:
    """Run a client's loop. An exception is recorded and stops the whole load at once
    (the others would wait for this client's work): the test then fails with it."""
    try:
        await body(*args)
    except Exception as exc:
        load.errors.append(f"{name}: {type(exc).__name__}: {exc}")
        load.halt.cancel()


async def producer(client: OrchestrationClient, i: int, load: Load) -> None:
    rng = random.Random(load.rng.random())
    n = 0
    while time.perf_counter() < load.stop_at:
        await load.backlog.acquire()  # given back when a worker completes a task
        measuring, start = load.measuring, time.perf_counter()
        task_id = await client.create_task(
            "load", {"producer": i, "n": n}, priority=rng.randrange(5), max_retries=3
        )
        if measuring:
            load.create_latency.append(time.perf_counter() - start)
        load.created.append(task_id)
        n += 1
        await anyio.sleep(rng.uniform(0, 0.01))


async def worker(client: OrchestrationClient, worker_id: str, load: Load) -> None:
    rng = random.Random(load.rng.random())
    await client.register_worker(worker_id, "loader", ["load"])
    # No registry heartbeat: claims and lease calls keep a working worker alive.
    while True:
        claim = await client.claim_task(worker_id, wait=0.1)  # its capabilities: "load"
        if claim is None:
            if load.producers_done.is_set():
                return  # nothing left: the producers stopped and the queue is empty
            continue
        measuring, start = load.measuring, time.perf_counter()
        load.claims[claim.lease.run_id] += 1
        load.claims_per_task[claim.task.id] += 1
        await client.start_task(claim.lease)
        await client.heartbeat(claim.lease, progress={"step": 1})
        if claim.lease.attempt == 1 and rng.random() < 0.1:
            # Some first attempts fail: retried at once by whoever claims next.
            await client.fail_task(claim.lease, "injected failure", retry_after=0)
            load.failures += 1
            continue
        await client.complete_task(claim.lease, {"by": worker_id})
        if measuring:
            load.cycle_latency.append(time.perf_counter() - start)
        load.completed_by_workers[claim.task.id] += 1
        load.backlog.release()


async def reader(client: OrchestrationClient, load: Load) -> None:
    rng = random.Random(load.rng.random())
    statuses = [TaskStatus.QUEUED, TaskStatus.ASSIGNED, TaskStatus.RUNNING, TaskStatus.COMPLETED]
    while time.perf_counter() < load.stop_at:
        pick = rng.random()
        if pick < 0.4 and load.created:
            task_id = rng.choice(load.created)
            task = await client.get_task(task_id)
            assert task is not None, f"created task {task_id} cannot be read"
        elif pick < 0.7:
            await client.get_tasks_by_status(rng.choice(statuses), limit=50)
        else:
            end = await client.last_seq()
            after = max(0, end - 200)
            seqs = [event.seq for event in await client.read_events(after, limit=200)]
            # From where asked, without a gap, up to at least what was durable before.
            assert seqs == list(range(after + 1, after + 1 + len(seqs))), (after, seqs)
            assert end == 0 or seqs[-1] >= end, (end, seqs)
        load.reads += 1
        await anyio.sleep(rng.uniform(0, 0.01))


async def follower(client: OrchestrationClient, seen: list[Event], end: str) -> None:
    """Replays the log from its start, then follows it live, until the ``end`` event."""
    async with client.events(after=0) as stream:
        async for event in stream:
            seen.append(event)
            if event.type == end:
                return


async def steady_state(
    load: Load,
    producers: list[OrchestrationClient],
    readers: list[OrchestrationClient],
    seconds: float,
) -> int:
    """Producers and readers for ``seconds`` (the workers run all along): latency is
    measured in the first half, memory traced in the second. Returns the traced peak."""
    load.stop_at = time.perf_counter() + seconds
    try:
        async with anyio.create_task_group() as active:
            for i, client in enumerate(producers):
                active.start_soon(guarded, load, f"producer-{i}", producer, client, i, load)
            for i, client in enumerate(readers):
                active.start_soon(guarded, load, f"reader-{i}", reader, client, load)
            await anyio.sleep(seconds / 2)
            load.measuring = False
            tracemalloc.start()  # traces what is allocated from now on
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def run_load(
    db_path: str, seconds: float, record_property: Callable[[str, object], None]
) -> None:
    load = Load(stop_at=0.0, rng=random.Random(SEED))
    followed: list[Event] = []
    config = RuntimeConfig(retry_backoff=0.01, retry_backoff_max=0.05)
    async with Runtime.open(db_path, config=config) as runtime:
        clients = [runtime.client(source_agent=f"agent-{i}") for i in range(200)]
        producers = clients[:PRODUCERS]
        workers = clients[PRODUCERS : PRODUCERS + WORKERS]
        readers = clients[PRODUCERS + WORKERS :]
        assert len(readers) == READERS
        # A hang fails the test rather than block CI; an error stops everything at once.
        with anyio.fail_after(seconds * 4 + 60), load.halt:
            async with anyio.create_task_group() as everyone:
                everyone.start_soon(
                    guarded, load, "follower", follower, readers[0], followed, "end"
                )
                async with anyio.create_task_group() as working:
                    for client in workers:
                        worker_id = client.source_agent
                        assert worker_id is not None
                        working.start_soon(
                            guarded, load, worker_id, worker, client, worker_id, load
                        )
                    began = time.perf_counter()
                    peak = await steady_state(load, producers, readers, seconds)
                    load.producers_done.set()
                drained = time.perf_counter()
                # The follower stops at this event: it has seen the whole log.
                end = await readers[0].publish("end")
        assert load.errors == []
        assert not load.halt.cancelled_caught
        events = await read_log(clients[0])
        assert events[-1].seq == end.seq

        ledger, tasks, runs, problems = await audit_tasks(clients[0], events)
        created = set(load.created)
        assert len(created) == len(load.created), "create_task returned an id twice"
        assert created, "no task was created"
        assert problems == []
        assert set(tasks) == created  # nothing lost, nothing extra
        assert all(task.status is TaskStatus.COMPLETED for task in tasks.values()), Counter(
            task.status.value for task in tasks.values()
        )
        assert set(load.completed_by_workers) == created
        assert max(load.completed_by_workers.values()) == 1
        assert all(ledger.completed[task_id] == 1 for task_id in created)
        assert max(load.claims.values()) == 1  # a run handed to one claim only
        for task_id in created:
            assert len(runs[task_id]) == load.claims_per_task[task_id]
        assert load.failures > 0  # the retry path ran
        assert [e.seq for e in followed] == list(range(1, end.seq + 1))
        assert followed[-1].seq == end.seq

    # Reopened: the same tasks, all completed.
    async with Runtime.open(db_path, config=config) as runtime:
        client = runtime.client(source_agent="auditor")
        done = await every_task(client, TaskStatus.COMPLETED)  # past one page's limit
        assert {task.id for task in done} == created
        for status in ("queued", "assigned", "running", "failed"):
            assert await client.get_tasks_by_status(status) == []

    report = {
        "tasks": len(created),
        "tasks_per_s": round(len(created) / (drained - began), 1),
        "create_p50_ms": round(percentile(load.create_latency, 50) * 1000, 2),
        "create_p99_ms": round(percentile(load.create_latency, 99) * 1000, 2),
        "claim_to_complete_p50_ms": round(percentile(load.cycle_latency, 50) * 1000, 2),
        "claim_to_complete_p99_ms": round(percentile(load.cycle_latency, 99) * 1000, 2),
        "failures_injected": load.failures,
        "reads": load.reads,
        "events": end.seq,
        "memory_peak_mib": round(peak / 2**20, 1),
    }
    for name, value in report.items():
        record_property(name, value)
    print(f"\nload ({seconds:g} s, 200 clients): {report}")
    assert peak < MEMORY_CEILING, f"{peak / 2**20:.1f} MiB traced in the second half"


async def test_200_clients_under_load_lose_nothing(
    db_path: str, record_property: Callable[[str, object], None]
) -> None:
    await run_load(db_path, 3.0, record_property)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a long variant: past the suite's 300 s (pyproject.toml)
async def test_200_clients_under_sustained_load_lose_nothing(
    db_path: str, record_property: Callable[[str, object], None]
) -> None:
    await run_load(db_path, 30.0, record_property)
