"""hive against Huey, the queue users pick today, in the same run, on the same disk.

What is measured, on file databases in one temporary folder, both at ``synchronous=FULL``
(Huey's ``SqliteHuey`` default; hive's default), each round in this order:

1. Huey: ``SqliteHuey`` with a consumer of 2 worker threads (its defaults otherwise:
   polling from 0.1 s with backoff), a no-op task, one ``SIGNAL_COMPLETE`` handler as the
   event subscriber. ``--tasks`` tasks (5 000) enqueued by one producer thread, then by 8
   producer threads; the rate is tasks per second from the first enqueue to the last
   completion.
2. hive, on each backend (asyncio, asyncio with uvloop, trio): the same count through
   ``create_task``, 8 in-process workers each waiting in ``claim_task`` then calling
   ``complete_task``, one subscriber receiving every ``task.*`` event; one producer
   awaiting each create, then 8 concurrent producers. Then the batch calls, as
   bench/tasks.py runs them (8 producers of ``create_tasks`` x 100, workers taking up to
   16 in one ``claim_tasks(start=True)`` and completing them in one ``complete_tasks``;
   and, for comparison with the figures before ``complete_tasks``, the same completing
   each with its own ``complete_task``), and the hand-off from ``create_task`` to a
   waiting worker holding the claim, with its floor (the same rows through a bare stream
   and the same driver: see bench/tasks.py, whose code both come from).

Each figure is printed with its ratio to Huey's in the same round (the batch calls
against Huey's 8 producers, its best shape) and the hand-off with its ratio to the floor.

Goals (issue 21): one producer >= 1.2x Huey; 8 producers >= 3x Huey; the batch calls
>= 12 000 tasks/s; hand-off p50 within 1.2x the floor; trio >= 0.8x asyncio.

Needs the ``bench`` extra (``pip install -e '.[bench]'``: huey, uvloop). Run from the
repository root::

    python bench/peers.py                       # every backend, one round
    python bench/peers.py --repeat 3            # three rounds, then the medians
    python bench/peers.py --backend asyncio --backend uvloop --json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio

# bench/tasks.py: its batch-call shape, its hand-off and the hand-off's floor are reused.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import tasks as house

from hive_orchestration import Claim, Runtime, RuntimeConfig

WORKERS = house.WORKERS  # 8
PRODUCERS = 8
HUEY_WORKERS = 2
SEQUENTIAL_GOAL = 1.2  # x Huey
CONCURRENT_GOAL = 3.0  # x Huey
BATCH_GOAL = 12_000.0  # tasks/s
HANDOFF_GOAL = 1.2  # x the floor
TRIO_GOAL = 0.8  # x asyncio
BACKENDS = ("asyncio", "uvloop", "trio")


@dataclass
class HiveFigures:
    backend: str
    sequential: float  # tasks/s, one producer awaiting each create
    concurrent: float  # tasks/s, 8 producers
    sequential_cpu: float  # seconds of the event loop's thread's CPU per task
    concurrent_cpu: float
    batched: float  # tasks/s, create_tasks + claim_tasks + complete_tasks
    batched_cpu: float  # seconds of the event loop's thread's CPU per task
    batched_commits: float  # commits per task
    batched_each: float  # tasks/s, the same completing task by task (complete_task)
    batched_each_cpu: float
    commits_per_task: float  # in the sequential shape
    handoff_p50: float  # seconds
    handoff_p99: float
    floor_p50: float


@dataclass
class Round:
    load: tuple[float, float, float]
    huey_sequential: float
    huey_concurrent: float
    hive: list[HiveFigures] = field(default_factory=list)


# -- Huey --------------------------------------------------------------------------------------


def huey_rate(folder: Path, count: int, producers: int) -> float:
    """Tasks per second through SqliteHuey, first enqueue to last completion."""
    from huey import SqliteHuey, signals

    huey = SqliteHuey("bench", filename=str(folder / f"huey-{producers}.db"))
    completed = 0
    last = 0.0
    lock = threading.Lock()
    done = threading.Event()

    @huey.task()  # type: ignore[misc]
    def noop(n: int) -> None:
        return None

    @huey.signal(signals.SIGNAL_COMPLETE)  # type: ignore[misc]
    def subscriber(signal_name: str, task: object) -> None:
        nonlocal completed, last
        with lock:
            completed += 1
            if completed == count:
                last = time.perf_counter()
                done.set()

    def produce(first: int) -> None:
        for n in range(first, count, producers):
            noop(n)

    consumer = huey.create_consumer(workers=HUEY_WORKERS, worker_type="thread", periodic=False)
    # The consumer sets handlers for SIGINT, SIGTERM and SIGHUP: put this script's back.
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    consumer.start()
    try:
        threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if not done.wait(120):
            raise RuntimeError(f"Huey completed {completed} of {count} tasks in 120 s")
    finally:
        consumer.stop(graceful=True)
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        huey.storage.close()
    return count / (last - start)


# -- hive --------------------------------------------------------------------------------------


async def hive_rate(
    folder: Path, name: str, count: int, producers: int
) -> tuple[float, float, float]:
    """Tasks per second through the runtime (first create to last completion), the
    commits per task, and the event loop's thread's CPU per task: the loop's own work,
    which other processes on a loaded machine delay but do not add to (the writes to
    SQLite run on another thread)."""
    config = RuntimeConfig(lease_timeout=60.0, storage_driver=house.DRIVER)
    async with Runtime.open(folder / f"{name}.db", config=config) as rt:
        expected = count * 3  # created, assigned, completed
        seen = 0
        done = anyio.Event()
        ready = anyio.Event()
        completed = 0
        last = 0.0

        async def subscriber() -> None:
            nonlocal seen
            async with rt.subscribe("task.*", buffer=expected + 10) as events:
                ready.set()
                async for _ in events:
                    seen += 1
                    if seen == expected:
                        done.set()
                        return

        async def producer(first: int) -> None:
            for n in range(first, count, producers):
                await rt.create_task("bench", {"n": n})

        async def worker(worker_id: str) -> None:
            nonlocal completed, last
            while completed < count:
                claim: Claim | None = await rt.claim_task(worker_id, "bench", wait=1.0)
                if claim is None:
                    continue
                await rt.complete_task(claim.lease)
                completed += 1
                if completed == count:
                    last = time.perf_counter()
                    work.cancel_scope.cancel()  # the others wait in claims that get nothing

        async with anyio.create_task_group() as tg:
            tg.start_soon(subscriber)
            await ready.wait()
            before = (await rt.statistics()).storage.transactions
            start = time.perf_counter()
            cpu = time.thread_time()
            async with anyio.create_task_group() as work:
                for w in range(WORKERS):
                    work.start_soon(worker, f"worker-{w}")
                for p in range(producers):
                    work.start_soon(producer, p)
            with anyio.fail_after(60):
                await done.wait()
            cpu = time.thread_time() - cpu
        commits = (await rt.statistics()).storage.transactions - before
    return count / (last - start), commits / count, cpu / count


async def hive_figures(backend: str, folder: Path, count: int, handoffs: int) -> HiveFigures:
    sequential, commits, sequential_cpu = await hive_rate(folder, f"{backend}-1", count, 1)
    concurrent, _, concurrent_cpu = await hive_rate(
        folder, f"{backend}-{PRODUCERS}", count, PRODUCERS
    )
    batch = await house.end_to_end(folder / backend, count, 16, PRODUCERS, True, True)
    each = await house.end_to_end(folder / backend, count, 16, PRODUCERS, True, False)
    latencies = sorted(await house.handoff(folder / backend, handoffs))
    floor = await house.handoff_floor(folder / backend, handoffs)
    return HiveFigures(
        backend=backend,
        sequential=sequential,
        concurrent=concurrent,
        sequential_cpu=sequential_cpu,
        concurrent_cpu=concurrent_cpu,
        batched=batch[0],
        batched_cpu=batch[4],
        batched_commits=batch[2] / count,
        batched_each=each[0],
        batched_each_cpu=each[4],
        commits_per_task=commits,
        handoff_p50=statistics.median(latencies),
        handoff_p99=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        floor_p50=statistics.median(floor),
    )


def run_backend(backend: str, folder: Path, count: int, handoffs: int) -> HiveFigures:
    (folder / backend).mkdir()
    options: dict[str, Any] = {"use_uvloop": True} if backend == "uvloop" else {}
    name = "trio" if backend == "trio" else "asyncio"
    figures: HiveFigures = anyio.run(
        hive_figures, backend, folder, count, handoffs, backend=name, backend_options=options
    )
    return figures


def one_round(backends: list[str], count: int, handoffs: int) -> Round:
    with house.scratch() as folder:
        result = Round(
            load=os.getloadavg(),
            huey_sequential=huey_rate(folder, count, 1),
            huey_concurrent=huey_rate(folder, count, PRODUCERS),
        )
        for backend in backends:
            result.hive.append(run_backend(backend, folder, count, handoffs))
    return result


# -- report ------------------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def render(r: Round, title: str) -> str:
    lines = [
        f"{title}  (load average {r.load[0]:.2f} {r.load[1]:.2f} {r.load[2]:.2f})",
        f"  Huey {HUEY_WORKERS} threads: one producer {r.huey_sequential:>7,.0f} tasks/s;"
        f" {PRODUCERS} producers {r.huey_concurrent:>7,.0f} tasks/s",
    ]
    base = next((h for h in r.hive if h.backend == "asyncio"), None)
    for h in r.hive:
        seq = h.sequential / r.huey_sequential
        conc = h.concurrent / r.huey_concurrent
        lines += [
            f"  hive {h.backend}:",
            f"    one producer      {h.sequential:>7,.0f} tasks/s  {seq:5.2f}x Huey"
            f"  goal >= {SEQUENTIAL_GOAL}x {_verdict(seq >= SEQUENTIAL_GOAL)}"
            f"  ({h.commits_per_task:.2f} commits/task, loop CPU"
            f" {h.sequential_cpu * 1e6:.0f} us/task)",
            f"    {PRODUCERS} producers       {h.concurrent:>7,.0f} tasks/s  {conc:5.2f}x Huey"
            f"  goal >= {CONCURRENT_GOAL}x {_verdict(conc >= CONCURRENT_GOAL)}"
            f"  (loop CPU {h.concurrent_cpu * 1e6:.0f} us/task)",
            f"    batch calls       {h.batched:>7,.0f} tasks/s"
            f"  {h.batched / r.huey_concurrent:5.2f}x Huey ({PRODUCERS} producers)"
            f"  goal >= {BATCH_GOAL:,.0f} {_verdict(h.batched >= BATCH_GOAL)}"
            f"  ({h.batched_commits:.3f} commits/task, loop CPU"
            f" {h.batched_cpu * 1e6:.0f} us/task)",
            f"      completing each {h.batched_each:>7,.0f} tasks/s"
            f"  (complete_task per task, as before complete_tasks; loop CPU"
            f" {h.batched_each_cpu * 1e6:.0f} us/task)",
            f"    hand-off p50 {h.handoff_p50 * 1e3:.3f} ms (p99 {h.handoff_p99 * 1e3:.3f})"
            f"  {h.handoff_p50 / h.floor_p50:4.2f}x the floor ({h.floor_p50 * 1e3:.3f} ms)"
            f"  goal <= {HANDOFF_GOAL}x {_verdict(h.handoff_p50 <= HANDOFF_GOAL * h.floor_p50)}",
        ]
        if h.backend == "trio" and base is not None:
            ratios = [
                h.sequential / base.sequential,
                h.concurrent / base.concurrent,
                h.batched / base.batched,
            ]
            lines.append(
                "    trio / asyncio   "
                + " / ".join(f"{x:.2f}" for x in ratios)
                + f" (one producer / {PRODUCERS} producers / batch calls)"
                + f"  goal >= {TRIO_GOAL} {_verdict(min(ratios) >= TRIO_GOAL)}"
            )
    return "\n".join(lines)


def medians(rounds: list[Round]) -> Round:
    def med(values: list[float]) -> float:
        return statistics.median(values)

    loads = [r.load for r in rounds]
    result = Round(
        load=(med([x[0] for x in loads]), med([x[1] for x in loads]), med([x[2] for x in loads])),
        huey_sequential=med([r.huey_sequential for r in rounds]),
        huey_concurrent=med([r.huey_concurrent for r in rounds]),
    )
    for i, first in enumerate(rounds[0].hive):
        each = [r.hive[i] for r in rounds]

        def m(get: Callable[[HiveFigures], float], each: list[HiveFigures] = each) -> float:
            return med([get(h) for h in each])

        result.hive.append(
            HiveFigures(
                backend=first.backend,
                sequential=m(lambda h: h.sequential),
                concurrent=m(lambda h: h.concurrent),
                sequential_cpu=m(lambda h: h.sequential_cpu),
                concurrent_cpu=m(lambda h: h.concurrent_cpu),
                batched=m(lambda h: h.batched),
                batched_cpu=m(lambda h: h.batched_cpu),
                batched_commits=m(lambda h: h.batched_commits),
                batched_each=m(lambda h: h.batched_each),
                batched_each_cpu=m(lambda h: h.batched_each_cpu),
                commits_per_task=m(lambda h: h.commits_per_task),
                handoff_p50=m(lambda h: h.handoff_p50),
                handoff_p99=m(lambda h: h.handoff_p99),
                floor_p50=m(lambda h: h.floor_p50),
            )
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend",
        dest="backends",
        action="append",
        choices=BACKENDS,
        help="repeat for several; default: all three",
    )
    parser.add_argument("--tasks", type=int, default=5_000)
    parser.add_argument("--handoffs", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=1, help="rounds; medians follow")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    logging.getLogger("huey").setLevel(logging.WARNING)
    backends = args.backends or list(BACKENDS)
    rounds = []
    for n in range(args.repeat):
        rounds.append(one_round(backends, args.tasks, args.handoffs))
        print(render(rounds[-1], f"round {n + 1} of {args.repeat}"), flush=True)
    if args.repeat > 1:
        print(render(medians(rounds), f"medians of {args.repeat} rounds"))
    if args.json:
        figures = {
            "backend": " ".join(backends),
            "tasks": args.tasks,
            "handoffs": args.handoffs,
            "rounds": [asdict(r) for r in rounds],
        }
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
