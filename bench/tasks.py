"""Benchmark of the task life cycle end to end, against raw sqlite3 in the same run.

What is measured, on a file database at the default ``synchronous=FULL``:

1. End to end: ``--tasks`` tasks (10 000) go through create, claim, start and complete,
   while one subscriber receives every ``task.*`` event; the rate is tasks per second
   from the first create to the last completion. 8 in-process workers claim (waiting,
   no polling), start and complete. Two shapes: each worker runs one task at a time
   with 8 concurrent creators (bound by commit latency: every task costs a worker three
   durable round trips in a row), and each worker runs 16 tasks at once (its slots, as
   an agent runner does) with 128 concurrent creators. A third shape uses the batch
   calls: 8 creators each ``create_tasks`` 100 at a time, and each worker takes up to 16
   tasks in one ``claim_tasks(..., start=True)`` and completes them concurrently, one
   ``complete_task`` each; a fourth is the same but completes each claim's tasks in one
   ``complete_tasks`` (the batch calls all the way).
2. The same statements through raw stdlib sqlite3, batched 1 000 tasks per transaction:
   for each task the task insert and its ``task.created`` event, then per transition the
   task's state update, the run's insert (at the claim) or state update, and the event
   (the runtime's own statements, built by its storage/rows.py). This is the ceiling of
   the storage work alone, with no concurrency, messaging, validation or durability per
   request.
3. Hand-off latency: 8 workers wait in ``claim_task``; one producer creates tasks one at
   a time; the latency is from calling ``create_task`` to a waiting worker holding the
   claim (p50, p99).
4. The floor of that hand-off, in the same run: the rows the runtime commits for it (the
   task, its run, its two events, built before the clock starts) sent over a bare anyio
   memory stream to one task that commits them through the runtime's own storage driver
   (aiosqlite's thread on asyncio, anyio's worker thread on trio), which then wakes the
   waiting receiver through another stream. No actor, validation or bookkeeping: what
   any durable hand-off costs on this machine and disk, today. The hand-off is reported
   as a multiple of it.

Each end-to-end shape also prints what a task cost in CPU: the event loop's thread
(``time.thread_time``: the runtime's own work, which other processes on a loaded
machine delay but do not add to) and the whole process's (the loop plus the database
connection's thread), and how many passes the cycle collector made (generations 0/1/2).

Goals: >= 10 000 tasks/s end to end, p50 hand-off < 1 ms.

Run from the repository root::

    python bench/tasks.py                   # asyncio
    python bench/tasks.py --backend trio
    python bench/tasks.py --json
    python bench/tasks.py --batch-only      # the batch calls' shapes alone (issue 21's goal)
    python bench/tasks.py --batch-only --completions-only --claim-wait 300 --tasks 2500
        # the complete_tasks shape alone, for a count of instructions: run it under
        # `valgrind --tool=callgrind --separate-threads=yes` at two sizes (say 2 500 and
        # 500 tasks); the difference of the event loop's thread (the first thread's file)
        # over the difference of the sizes is its instructions per task. Under callgrind
        # a claim's 1 s wait runs out and adds claims of its own, hence --claim-wait.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from hive_orchestration import Claim, Runtime, RuntimeConfig
from hive_orchestration._ids import new_id
from hive_orchestration.messages.tasks import Run, RunStatus, Task, TaskStatus
from hive_orchestration.storage.rows import (
    run_state_statement,
    run_statement,
    task_state_statement,
    task_statement,
)
from hive_orchestration.storage.sqlite.drivers import Statement, connect
from hive_orchestration.storage.sqlite.schema import MIGRATIONS

RATE_GOAL = 10_000.0  # tasks per second, end to end
LATENCY_GOAL = 0.001  # seconds, p50 create -> waiting worker
WORKERS = 8
DRIVER: Any = os.environ.get("HIVE_BENCH_DRIVER", "auto")
#: How long a worker's claim waits for a task (--claim-wait).
CLAIM_WAIT = 1.0
#: (tasks each worker runs at once, concurrent creators, batch calls, batch completions).
#: One slot per worker is bound by commit latency: each task costs each worker three
#: durable round trips. Sixteen slots per worker is how agent runners use a worker (its
#: concurrency). Batched: creators send 100 tasks per create_tasks, workers claim (and
#: start) up to their slots per claim_tasks, and complete them one complete_task each, or
#: all in one complete_tasks.
SHAPES = ((1, 8, False, False), (16, 128, False, False), (16, 8, True, False), (16, 8, True, True))
CREATE_CHUNK = 100
INSERT_EVENT = (
    "INSERT INTO events (seq, type, timestamp, source, correlation_id, task_id, plan_id,"
    " worker_id, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


@dataclass
class Shape:
    slots: int
    producers: int
    batched: bool
    batch_completions: bool  # complete_tasks per claim_tasks, not complete_task per task
    rate: float  # tasks/s
    events_seen: int
    transactions: int
    writes: int
    loop_cpu: float  # seconds of the event loop's thread's CPU per task
    process_cpu: float  # seconds of the process's CPU per task
    collections: list[int]  # the cycle collector's passes, generations 0, 1 and 2


@dataclass
class Result:
    backend: str
    tasks: int
    shapes: list[Shape]
    # None with --batch-only (not measured):
    raw_batched: float | None  # tasks/s
    handoffs: int
    p50: float | None  # seconds
    p99: float | None
    floor_p50: float | None  # seconds: a bare hand-off through one durable commit


@contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="hive-bench-") as folder:
        yield Path(folder)


# -- 1. end to end ----------------------------------------------------------------------------


async def end_to_end(
    folder: Path,
    count: int,
    slots: int,
    producers: int,
    batched: bool,
    batch_completions: bool = False,
) -> tuple[float, int, int, int, float, float, list[int]]:
    config = RuntimeConfig(lease_timeout=60.0, storage_driver=DRIVER)
    suffix = "-completions" if batch_completions else "-batched" if batched else ""
    name = f"e2e-{slots}{suffix}.db"
    async with Runtime.open(folder / name, config=config) as rt:
        seen = 0
        done = anyio.Event()
        expected_events = count * 4  # created, assigned, started, completed

        async def subscriber() -> None:
            nonlocal seen
            async with rt.subscribe("task.*", buffer=expected_events + 10) as events:
                ready.set()
                async for _ in events:
                    seen += 1
                    if seen == expected_events:
                        done.set()
                        return

        async def producer(first: int, step: int) -> None:
            for n in range(first, count, step):
                await rt.create_task("bench", {"n": n})

        async def batch_producer(first: int, step: int) -> None:
            for n in range(first * CREATE_CHUNK, count, step * CREATE_CHUNK):
                end = min(n + CREATE_CHUNK, count)
                await rt.create_tasks(
                    [{"task_type": "bench", "payload": {"n": m}} for m in range(n, end)]
                )

        completed = 0
        last_completion = 0.0

        def count_completed(n: int) -> None:
            nonlocal completed, last_completion
            completed += n
            if completed == count:
                # The clock stops at the last completion: the other workers, parked
                # in a claim that will get nothing, are not waited for.
                last_completion = time.perf_counter()
                work.cancel_scope.cancel()

        async def complete(claim: Claim) -> None:
            await rt.complete_task(claim.lease, {"ok": True})
            count_completed(1)

        async def worker(name: str) -> None:
            while completed < count:
                claim = await rt.claim_task(name, "bench", wait=CLAIM_WAIT)
                if claim is None:
                    continue
                await rt.start_task(claim.lease)
                await complete(claim)

        async def batch_worker(name: str) -> None:
            while completed < count:
                claims = await rt.claim_tasks(
                    name, "bench", limit=slots, start=True, wait=CLAIM_WAIT
                )
                if batch_completions:
                    if claims:
                        items = [{"lease": c.lease, "result": {"ok": True}} for c in claims]
                        outcomes = await rt.complete_tasks(items)
                        assert all(o.refused is None for o in outcomes)
                        count_completed(len(claims))
                    continue
                async with anyio.create_task_group() as running:
                    for claim in claims:
                        running.start_soon(complete, claim)

        ready = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(subscriber)
            await ready.wait()
            before = (await rt.statistics()).storage
            passes = [generation["collections"] for generation in gc.get_stats()]
            start = time.perf_counter()
            loop_cpu, process_cpu = time.thread_time(), time.process_time()
            async with anyio.create_task_group() as work:
                for w in range(WORKERS):
                    if batched:
                        work.start_soon(batch_worker, f"worker-{w}")
                        continue
                    for _ in range(slots):
                        work.start_soon(worker, f"worker-{w}")
                for p in range(producers):
                    work.start_soon(batch_producer if batched else producer, p, producers)
            elapsed = last_completion - start
            with anyio.fail_after(60):
                await done.wait()
            loop_cpu = time.thread_time() - loop_cpu
            process_cpu = time.process_time() - process_cpu
            passes = [g["collections"] - p for g, p in zip(gc.get_stats(), passes, strict=True)]
        after = (await rt.statistics()).storage
        return (
            count / elapsed,
            seen,
            after.transactions - before.transactions,
            after.writes - before.writes,
            loop_cpu / count,
            process_cpu / count,
            passes,
        )


# -- 2. raw sqlite3, the same statements batched ----------------------------------------------


def raw_batched(folder: Path, count: int, per_txn: int = 1000) -> float:
    conn = sqlite3.connect(folder / "raw.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    for migration in MIGRATIONS:
        for statement in migration:
            conn.execute(statement)
    # Every statement is built before the clock starts: the ceiling is SQLite's work.
    batches: list[list[tuple[str, tuple[object, ...]]]] = []
    seq = 0
    for first in range(0, count, per_txn):
        batch: list[tuple[str, tuple[object, ...]]] = []
        for n in range(first, min(first + per_txn, count)):
            task = _task(n, TaskStatus.QUEUED)
            now = task.created_at
            seq += 1
            batch += [task_statement(task), (INSERT_EVENT, _event(seq, "task.created", task))]
            run = Run(id=new_id(), task_id=task.id, worker_id="w", status=RunStatus.ASSIGNED)
            for status, run_status in (
                (TaskStatus.ASSIGNED, RunStatus.ASSIGNED),
                (TaskStatus.RUNNING, RunStatus.RUNNING),
                (TaskStatus.COMPLETED, RunStatus.COMPLETED),
            ):
                task = Task(**{**_fields(task), "status": status, "updated_at": now})
                opened = run_status is RunStatus.ASSIGNED
                run = Run(**{**_fields(run), "status": run_status})
                seq += 1
                event = (INSERT_EVENT, _event(seq, f"task.{status.value}", task))
                run_row = run_statement(run) if opened else run_state_statement(run)
                batch += [task_state_statement(task), run_row, event]
        batches.append(batch)
    start = time.perf_counter()
    for batch in batches:
        conn.execute("BEGIN")
        for sql, params in batch:
            conn.execute(sql, params)
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return count / elapsed


def _task(n: int, status: TaskStatus, assigned_worker: str | None = None) -> Task:
    now = datetime.now(UTC)
    return Task(
        id=new_id(),
        title="bench",
        task_type="bench",
        status=status,
        payload={"n": n},
        created_at=now,
        updated_at=now,
        assigned_worker=assigned_worker,
    )


def _event(seq: int, kind: str, task: Task) -> tuple[object, ...]:
    return (seq, kind, time.time(), "bench", None, task.id, None, None, '{"k":1}')


def _fields(struct: Task | Run) -> dict[str, Any]:
    return {name: getattr(struct, name) for name in struct.__struct_fields__}


# -- 3. hand-off latency ----------------------------------------------------------------------


async def handoff(folder: Path, count: int) -> list[float]:
    latencies: list[float] = []
    config = RuntimeConfig(storage_driver=DRIVER)
    async with Runtime.open(folder / "latency.db", config=config) as rt:
        received = anyio.Event()
        sent_at = 0.0

        async def worker(name: str) -> None:
            nonlocal received
            while True:
                claim: Claim | None = await rt.claim_task(name, "bench", wait=5.0)
                if claim is None:
                    continue
                latencies.append(time.perf_counter() - sent_at)
                received.set()
                await rt.complete_task(claim.lease)

        async with anyio.create_task_group() as tg:
            for w in range(WORKERS):
                tg.start_soon(worker, f"worker-{w}")
            await anyio.sleep(0.1)  # every worker is waiting
            for n in range(count):
                received = anyio.Event()
                sent_at = time.perf_counter()
                await rt.create_task("bench", {"n": n})
                await received.wait()
                await anyio.sleep(0.002)  # let the worker complete and wait again
            tg.cancel_scope.cancel()
    return latencies


# -- 4. the floor of a hand-off ----------------------------------------------------------------


async def handoff_floor(folder: Path, count: int) -> list[float]:
    driver = await connect(str(folder / "floor.db"), driver=DRIVER, busy_timeout=5.0)
    try:
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON"):
            await driver.execute(f"PRAGMA {pragma}")
        await driver.transaction([(sql, ()) for migration in MIGRATIONS for sql in migration])
        hand_offs = [_handoff_rows(n) for n in range(count)]
        latencies: list[float] = []
        to_storage, storage_box = anyio.create_memory_object_stream[tuple[float, list[Statement]]](
            1
        )
        to_worker, worker_box = anyio.create_memory_object_stream[float](1)
        received = anyio.Event()

        async def storage() -> None:
            async for sent_at, statements in storage_box:
                await driver.transaction(statements)
                await to_worker.send(sent_at)

        async def worker() -> None:
            async for sent_at in worker_box:
                latencies.append(time.perf_counter() - sent_at)
                received.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(storage)
            tg.start_soon(worker)
            for statements in hand_offs:
                received = anyio.Event()
                await to_storage.send((time.perf_counter(), statements))
                await received.wait()
                await anyio.sleep(0.002)  # the same pace as the runtime's hand-offs
            tg.cancel_scope.cancel()
    finally:
        await driver.close()
    return latencies


def _handoff_rows(n: int) -> list[Statement]:
    """What the runtime commits for one hand-off: a task created and assigned to a parked
    claim in one write (the task's row once, in its last state), its run, two events."""
    task = _task(n, TaskStatus.ASSIGNED, assigned_worker="w")
    run = Run(id=new_id(), task_id=task.id, worker_id="w", status=RunStatus.ASSIGNED)
    return [
        task_statement(task),
        run_statement(run),
        (INSERT_EVENT, _event(2 * n + 1, "task.created", task)),
        (INSERT_EVENT, _event(2 * n + 2, "task.assigned", task)),
    ]


async def run(
    backend: str,
    count: int,
    handoffs: int,
    batch_only: bool = False,
    completions_only: bool = False,
) -> Result:
    with scratch() as folder:
        shapes = [
            Shape(
                slots,
                producers,
                batched,
                completions,
                *await end_to_end(folder, count, slots, producers, batched, completions),
            )
            for slots, producers, batched, completions in SHAPES
            if (batched or not batch_only) and (completions or not completions_only)
        ]
        if batch_only or completions_only:
            return Result(backend, count, shapes, None, 0, None, None, None)
        raw = raw_batched(folder, count)
        latencies = sorted(await handoff(folder, handoffs))
        floor = await handoff_floor(folder, handoffs)
    return Result(
        backend=backend,
        tasks=count,
        shapes=shapes,
        raw_batched=raw,
        handoffs=len(latencies),
        p50=statistics.median(latencies),
        p99=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        floor_p50=statistics.median(floor),
    )


def render(r: Result) -> str:
    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    lines = [
        f"backend: {r.backend}  (synchronous=FULL, file database, WAL; {r.tasks:,} tasks,"
        f" {WORKERS} workers, 1 subscriber; load average {os.getloadavg()[0]:.2f})",
    ]
    if r.raw_batched is not None:
        lines.append(
            f"raw sqlite3, same statements, 1000 tasks/txn:  {r.raw_batched:>8,.0f} tasks/s"
        )
    for shape in r.shapes:
        of_raw = "" if r.raw_batched is None else f" = {shape.rate / r.raw_batched:6.1%} of raw"
        calls = ""
        if shape.batched:
            calls = ", batch calls" + (
                " + complete_tasks" if shape.batch_completions else " + complete_task each"
            )
        lines.append(
            f"end to end, {shape.slots:>2} slot(s)/worker, {shape.producers:>3} creators"
            f"{calls}:"
            f" {shape.rate:>8,.0f} tasks/s{of_raw};"
            f" {shape.transactions:,} commits ({shape.transactions / r.tasks:.3f}/task);"
            f" subscriber saw {shape.events_seen:,} events"
            f"  goal >= {RATE_GOAL:,.0f} {verdict(shape.rate >= RATE_GOAL)}"
        )
        lines.append(
            f"    CPU per task: loop {shape.loop_cpu * 1e6:.0f} us,"
            f" process {shape.process_cpu * 1e6:.0f} us;"
            f" collector passes {'/'.join(str(n) for n in shape.collections)}"
        )
    if r.p50 is None or r.p99 is None or r.floor_p50 is None:
        return "\n".join(lines)
    lines.append(
        f"hand-off create -> waiting worker ({r.handoffs} tasks):"
        f" p50 {r.p50 * 1e3:.3f} ms ({r.p50 / r.floor_p50:.1f}x the floor),"
        f" p99 {r.p99 * 1e3:.3f} ms"
        f"  goal p50 < {LATENCY_GOAL * 1e3:g} ms {verdict(r.p50 < LATENCY_GOAL)}"
    )
    lines.append(
        f"floor: the same rows, bare streams to a bare task committing them through the"
        f" same driver: p50 {r.floor_p50 * 1e3:.3f} ms"
    )
    return "\n".join(lines)


def main() -> None:
    global CLAIM_WAIT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--handoffs", type=int, default=1_000)
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument(
        "--batch-only",
        action="store_true",
        help="only the batch calls' shape (no other shape, raw sqlite3 or hand-off)",
    )
    parser.add_argument(
        "--completions-only",
        action="store_true",
        help="only the shape completing with complete_tasks (the batch calls all the way)",
    )
    parser.add_argument(
        "--claim-wait",
        type=float,
        default=CLAIM_WAIT,
        help="seconds a worker's claim waits for a task (longer under valgrind)",
    )
    args = parser.parse_args()
    CLAIM_WAIT = args.claim_wait
    result: Result = anyio.run(
        run,
        args.backend,
        args.tasks,
        args.handoffs,
        args.batch_only,
        args.completions_only,
        backend=args.backend,
    )
    print(render(result))
    if args.json:
        print(json.dumps(asdict(result), indent=2))


if __name__ == "__main__":
    main()
