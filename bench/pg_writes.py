"""What a task costs one runtime on PostgreSQL, in one process: its event loop, its
database threads and the server's writer backend, in CPU milliseconds per task.

``bench/nodes.py`` times whole processes (nodes, workers over sockets, PostgreSQL) and
needs several runs to tell a change from the load of a shared machine. This shape has no
socket and no other process of its own, so the write path's share stands out: one
runtime (``Runtime.open(URL)``), a producer sending ``create_tasks`` of 100 and
``--workers`` (6) workers of its own client, each taking up to 16 tasks per
``claim_tasks(start=True)`` and ending them with one ``complete_tasks``, until
``--tasks`` (6 000) are done. Printed: tasks/s, and CPU ms per task of the event loop's
thread, of the process's other threads (psycopg runs on them: the write connection, the
readers, the log tailer's listener, the leader) and of the writer's backend (read from
``/proc``, so only for a server on this machine), with the load average. To compare two
versions of the code, alternate runs of each (``PYTHONPATH=...``).

The server: ``HIVE_BENCH_PG`` (or ``HIVE_TEST_PG``), else a throwaway cluster as
``bench/nodes.py`` makes one. Run from the repository root::

    python bench/pg_writes.py
    python bench/pg_writes.py --backend trio --tasks 10000
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import time

import anyio
import psycopg
from nodes import scratch_database

from hive_orchestration import Runtime

WRITER = "hive-orchestration:writer"


def _ticks(path: str) -> int:
    with open(path) as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def threads_cpu() -> tuple[float, float]:
    """This process's CPU seconds: the main thread's (the event loop's), the others'."""
    pid = os.getpid()
    main = other = 0
    for path in glob.glob(f"/proc/{pid}/task/*/stat"):
        try:
            ticks = _ticks(path)
        except OSError:  # a thread that ended meanwhile
            continue
        if path.split("/")[4] == str(pid):
            main += ticks
        else:
            other += ticks
    hz = os.sysconf("SC_CLK_TCK")
    return main / hz, other / hz


def backend_cpu(admin: psycopg.Connection[tuple[object, ...]], database: str) -> float:
    """CPU seconds of the database's writer backends (0 when the server is elsewhere)."""
    rows = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND datname = %s",
        (WRITER, database),
    ).fetchall()
    total = 0
    for (pid,) in rows:
        with contextlib.suppress(OSError):  # the backend ended meanwhile
            total += _ticks(f"/proc/{pid}/stat")
    return total / os.sysconf("SC_CLK_TCK")


async def shape(
    url: str, admin: psycopg.Connection[tuple[object, ...]], args: argparse.Namespace
) -> str:
    name = url.rsplit("/", 1)[1]
    count = args.tasks
    async with Runtime.open(url) as runtime:
        client = runtime.client(source_agent="bench")
        for n in range(args.workers):
            await client.register_worker(f"w{n}", capabilities=["noop"])
        done = 0

        async def produce() -> None:
            for start in range(0, count, 100):
                end = min(count, start + 100)
                await client.create_tasks(
                    [{"task_type": "noop", "payload": {"i": i}} for i in range(start, end)]
                )

        async def work(worker: str) -> None:
            nonlocal done
            while done < count:
                claims = await client.claim_tasks(worker, ["noop"], limit=16, wait=0.2, start=True)
                if claims:
                    await client.complete_tasks(
                        [{"lease": c.lease, "result": {"ok": 1}} for c in claims]
                    )
                    done += len(claims)

        load = os.getloadavg()[0]
        main0, other0 = threads_cpu()
        writer0 = backend_cpu(admin, name)
        began = time.perf_counter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            for n in range(args.workers):
                tg.start_soon(work, f"w{n}")
        took = time.perf_counter() - began
        main1, other1 = threads_cpu()
        writer1 = backend_cpu(admin, name)
    per = 1000 / count
    return (
        f"{count / took:7,.0f} tasks/s  CPU ms per task: event loop {(main1 - main0) * per:.3f}"
        f"  other threads {(other1 - other0) * per:.3f}"
        f"  writer backend {(writer1 - writer0) * per:.3f}"
        f"  (load {load:.1f} -> {os.getloadavg()[0]:.1f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--tasks", type=int, default=6000)
    parser.add_argument("--workers", type=int, default=6)
    args = parser.parse_args()
    with scratch_database("hive_writes") as (admin, url):
        line = anyio.run(shape, url, admin, args, backend=args.backend)
        print(f"{args.tasks:,} tasks, {args.workers} workers, {args.backend}: {line}")


if __name__ == "__main__":
    main()
