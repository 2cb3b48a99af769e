"""Child process of ``tests/test_pg_leader.py``: one node on a PostgreSQL database, with
its own workers, until it is killed (or told to stop on stdin's end).

Usage::

    python _pg_node.py BACKEND URL WORKERS LEASE WORK [HOLD]

Opens a runtime on ``URL`` (a node), prints ``ready`` and flushes, then runs ``WORKERS``
workers (``<pid>-w<i>``), each claiming ``job`` tasks one at a time (``lease`` seconds,
started), working ``WORK`` seconds and completing them; each completion acknowledged (the
call returned) prints ``done <task id>`` and flushes, so the parent knows what was
acknowledged before a SIGKILL. A claim lost meanwhile prints ``lost <task id>``. Nothing
else goes to stdout. ``HOLD`` more workers (default 0) each claim one task and keep it
without ending it, so that a SIGKILL surely finds this node holding a claim (the others'
claims may all be committing their completions at that instant, and commit).
"""

from __future__ import annotations

import os
import sys

import anyio

from hive_orchestration import HiveError, Runtime


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def worker(runtime: Runtime, name: str, lease: float, work: float) -> None:
    while True:
        claim = await runtime.claim_task(name, "job", lease=lease, wait=0.5, start=True)
        if claim is None:
            continue
        await anyio.sleep(work)
        try:
            await runtime.complete_task(claim.lease, {"by": name})
        except HiveError:
            say(f"lost {claim.task.id}")
        else:
            say(f"done {claim.task.id}")


async def holder(runtime: Runtime, name: str, lease: float) -> None:
    while await runtime.claim_task(name, "job", lease=lease, wait=0.5, start=True) is None:
        pass
    await anyio.sleep_forever()


async def main(url: str, workers: int, lease: float, work: float, hold: int) -> None:
    async with Runtime.open(url) as runtime, anyio.create_task_group() as group:
        for index in range(workers):
            group.start_soon(worker, runtime, f"{os.getpid()}-w{index}", lease, work)
        for index in range(hold):
            group.start_soon(holder, runtime, f"{os.getpid()}-h{index}", lease)
        say("ready")
        # Until the parent closes stdin (or kills this process).
        await anyio.to_thread.run_sync(sys.stdin.read)
        group.cancel_scope.cancel()


if __name__ == "__main__":
    backend, url, count, lease, work = sys.argv[1:6]
    hold = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    anyio.run(main, url, int(count), float(lease), float(work), hold, backend=backend)
