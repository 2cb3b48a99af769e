"""Benchmark of ``AgentRunner`` against the bare worker loop it wraps, in the same run.

``--tasks`` no-op tasks (3 000) are created in batches of 500 once the workers wait; the
rate is tasks per second from the first create to the last ``task.completed`` event.
Two sides, each with ``--copies`` workers (8 and 32) running one task at a time, on a
fresh file database at the default ``synchronous=FULL``:

- the ceiling: the least a worker can do per task, ``claim_task(..., start=True)`` then
  ``complete_task``, with nothing else (no lease renewal, no cancellation check, no
  timeout, no stop handling);
- ``AgentRunner`` with a handler that returns at once: everything an agent gets (the
  lease renewed in the background, a task's cancellation or timeout reaching its
  handler, a clean stop).

The ratio is the runner's rate over the ceiling's. Main-thread CPU per task is printed too:
a copy that waits on commits leaves the event loop idle, a busy one does not.

Run from the repository root::

    python bench/agents.py                  # asyncio
    python bench/agents.py --backend trio
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio

from hive_orchestration import AgentRegistry, AgentRunner, Runtime, RuntimeConfig, TaskContext

BATCH = 500
TASK_TYPE = "job"


@dataclass
class Side:
    rate: float  # tasks/s
    cpu_per_task: float  # seconds of the event loop's thread
    busy: float  # that thread's CPU time over the wall time


@dataclass
class Shape:
    copies: int
    bare: Side
    runner: Side


@dataclass
class Result:
    backend: str
    tasks: int
    shapes: list[Shape]


async def timed(
    path: Path, count: int, run_workers: Callable[[Runtime, anyio.Event], Coroutine[Any, Any, None]]
) -> Side:
    """Create ``count`` tasks while ``run_workers`` runs; time until the last completes."""
    config = RuntimeConfig(lease_timeout=60.0)
    async with Runtime.open(path, config=config) as rt:
        stop = anyio.Event()
        async with (
            rt.subscribe("task.completed", buffer=count + 10) as completions,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(run_workers, rt, stop)
            await anyio.sleep(0.2)  # every worker waits in its claim
            start, cpu = time.perf_counter(), time.thread_time()
            for first in range(0, count, BATCH):
                size = min(BATCH, count - first)
                await rt.create_tasks([{"task_type": TASK_TYPE}] * size)
            seen = 0
            async for _ in completions:
                seen += 1
                if seen == count:
                    break
            wall, cpu = time.perf_counter() - start, time.thread_time() - cpu
            stop.set()
    return Side(rate=count / wall, cpu_per_task=cpu / count, busy=cpu / wall)


async def bare(path: Path, count: int, copies: int) -> Side:
    async def run_workers(rt: Runtime, stop: anyio.Event) -> None:
        async def worker(name: str) -> None:
            while not stop.is_set():
                claim = await rt.claim_task(name, TASK_TYPE, wait=0.2, start=True)
                if claim is not None:
                    await rt.complete_task(claim.lease, {})

        async with anyio.create_task_group() as tg:
            for n in range(copies):
                tg.start_soon(worker, f"bare-{n}")

    return await timed(path, count, run_workers)


async def runner(path: Path, count: int, copies: int) -> Side:
    async def handler(context: TaskContext) -> Mapping[str, object]:
        return {}

    registry = AgentRegistry()
    registry.register(TASK_TYPE, handler, copies=copies)

    async def run_workers(rt: Runtime, stop: anyio.Event) -> None:
        async with AgentRunner(rt, registry, claim_wait=0.2):
            await stop.wait()

    return await timed(path, count, run_workers)


async def run(backend: str, count: int, copy_counts: list[int]) -> Result:
    shapes = []
    with tempfile.TemporaryDirectory(prefix="hive-bench-") as folder:
        for copies in copy_counts:
            base = await bare(Path(folder) / f"bare-{copies}.db", count, copies)
            agents = await runner(Path(folder) / f"runner-{copies}.db", count, copies)
            shapes.append(Shape(copies, base, agents))
    return Result(backend, count, shapes)


def render(r: Result) -> str:
    lines = [
        f"backend: {r.backend}  (synchronous=FULL, file database, WAL; {r.tasks:,} no-op"
        " tasks, one at a time per worker)"
    ]
    for s in r.shapes:
        for name, side in (("bare loop", s.bare), ("AgentRunner", s.runner)):
            lines.append(
                f"{s.copies:>3} x {name:<12} {side.rate:>7,.0f} tasks/s;"
                f" event loop thread {side.cpu_per_task * 1e6:>5,.0f} us CPU per task,"
                f" busy {side.busy:.0%}"
            )
        lines.append(
            f"{s.copies:>3} copies: AgentRunner = {s.runner.rate / s.bare.rate:.2f}x the bare loop"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--tasks", type=int, default=3_000)
    parser.add_argument("--copies", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    result = anyio.run(run, args.backend, args.tasks, args.copies, backend=args.backend)
    print(render(result))
    if args.json:
        print(json.dumps(asdict(result), indent=2))


if __name__ == "__main__":
    main()
