"""What the TaskManager's safety sweep costs a node on PostgreSQL, in CPU of its event
loop's thread per sweep.

A node reads every ready queue's head again each second (``sweep_interval``), up to
``ready_queue_head`` tasks a queue, and reconciles what it holds with the read (tasks
queued elsewhere taken in, tasks gone let go of, tasks held at another version taken as
read). This shape fills ``--queues`` (4) queues of ``--tasks`` (1 024, the default head)
tasks each from one runtime, then times ``--sweeps`` (200) sweeps in a row on the idle
node, moving the version of ``--changed`` (0) tasks by SQL before each (as another
node's writes would), and prints the median and mean CPU of the loop's thread per sweep
and its wall time, with the load average. The read's decoding is most of it; to compare
two versions of the code, alternate runs of each (``PYTHONPATH=...``).

The server: ``HIVE_BENCH_PG`` (or ``HIVE_TEST_PG``), else a throwaway cluster as
``bench/nodes.py`` makes one. Run from the repository root::

    python bench/pg_sweep.py
    python bench/pg_sweep.py --changed 64 --backend trio
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import anyio
import psycopg
from nodes import scratch_database

from hive_orchestration import Runtime
from hive_orchestration.actors.task_manager import TaskManager


async def shape(url: str, args: argparse.Namespace) -> str:
    managers: list[TaskManager] = []
    started = TaskManager.started

    async def keep(self: TaskManager) -> None:
        managers.append(self)
        await started(self)

    TaskManager.started = keep  # type: ignore[method-assign]
    async with Runtime.open(url) as runtime:
        for queue in range(args.queues):
            for first in range(0, args.tasks, 500):
                count = min(500, args.tasks - first)
                await runtime.create_tasks([{"task_type": f"q{queue}"}] * count)
        (manager,) = managers
        conn: psycopg.Connection[Any] = psycopg.connect(url, autocommit=True)
        cpu: list[float] = []
        wall: list[float] = []
        for _ in range(args.sweeps):
            if args.changed:
                conn.execute(
                    "UPDATE tasks SET version = version + 1 WHERE id IN (SELECT id FROM tasks"
                    " WHERE status = 'queued' ORDER BY random() LIMIT %s)",
                    (args.changed,),
                )
            began, began_cpu = time.perf_counter(), time.thread_time()
            await manager._sweep()
            cpu.append(time.thread_time() - began_cpu)
            wall.append(time.perf_counter() - began)
        conn.close()
        held = len(manager._tasks)
    load = os.getloadavg()[0]
    return (
        f"{args.queues} queues x {args.tasks} tasks ({held} held), {args.changed} changed a"
        f" sweep: loop CPU median {statistics.median(cpu) * 1e3:.2f} ms, mean"
        f" {statistics.fmean(cpu) * 1e3:.2f} ms; wall median"
        f" {statistics.median(wall) * 1e3:.2f} ms (load {load:.1f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--queues", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=1024)
    parser.add_argument("--sweeps", type=int, default=200)
    parser.add_argument("--changed", type=int, default=0)
    args = parser.parse_args()
    with scratch_database("sweep") as (_admin, url):
        print(anyio.run(shape, url, args, backend=args.backend))


if __name__ == "__main__":
    main()
