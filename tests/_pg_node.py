"""Child process of ``tests/test_pg_leader.py``: one node on a PostgreSQL database, with
its own workers, until it is killed (or told to stop on stdin's end).

Usage::

    python _pg_node.py BACKEND URL WORKERS LEASE WORK [HOLD [STOP [REGISTER [TIMEOUT [BUSY]]]]]

Opens a runtime on ``URL`` (a node), prints ``ready`` and flushes, then runs ``WORKERS``
workers (``<pid>-w<i>``), each claiming ``job`` tasks one at a time (``lease`` seconds,
started), working ``WORK`` seconds and completing them; each completion acknowledged (the
call returned) prints ``done <task id>`` and flushes, so the parent knows what was
acknowledged before a SIGKILL. A claim lost meanwhile prints ``lost <task id> <error
class>``. Nothing else goes to stdout. ``HOLD`` more workers (default 0) each claim one
task and keep it without ending it, so that a SIGKILL surely finds this node holding a
claim (the others' claims may all be committing their completions at that instant, and
commit). ``STOP`` 1: the first worker, having claimed its first task, prints ``claimed
<task id>`` and stops this whole process with SIGSTOP (a node that does not act: its
locks and sessions held, its event loop still), until the parent sends SIGCONT; then it
works and completes as the others do. ``REGISTER`` 1: each worker registers with the
node (``register_worker``) before its first claim, so the node watches its liveness,
and so does one more, ``<pid>-idle``, which claims nothing and heartbeats every 0.2 s.
``TIMEOUT``: the node's ``worker_timeout`` (default: the config's). ``BUSY``: seconds for
which, once ready, the node's default thread limiter (anyio's, which an app's
``to_thread.run_sync`` calls share) is full of threads that sleep: a busy node whose event
loop and workers go on.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import anyio

from hive_orchestration import HiveError, Runtime, RuntimeConfig


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def worker(
    runtime: Runtime,
    name: str,
    lease: float,
    work: float,
    stop: bool = False,
    register: bool = False,
) -> None:
    if register:
        await runtime.register_worker(name, role="builder")
    while True:
        claim = await runtime.claim_task(name, "job", lease=lease, wait=0.5, start=True)
        if claim is None:
            continue
        if stop:
            stop = False
            say(f"claimed {claim.task.id}")
            os.kill(os.getpid(), signal.SIGSTOP)
        await anyio.sleep(work)
        try:
            await runtime.complete_task(claim.lease, {"by": name})
        except HiveError as exc:
            say(f"lost {claim.task.id} {type(exc).__name__}")
        else:
            say(f"done {claim.task.id}")


async def idle(runtime: Runtime, name: str) -> None:
    await runtime.register_worker(name, role="watcher")
    while True:
        await runtime.update_worker_heartbeat(name)
        await anyio.sleep(0.2)


async def busy(seconds: float) -> None:
    limiter = anyio.to_thread.current_default_thread_limiter()
    async with anyio.create_task_group() as group:
        for _ in range(int(limiter.total_tokens)):
            group.start_soon(anyio.to_thread.run_sync, time.sleep, seconds)


async def holder(runtime: Runtime, name: str, lease: float) -> None:
    while await runtime.claim_task(name, "job", lease=lease, wait=0.5, start=True) is None:
        pass
    await anyio.sleep_forever()


async def main(
    url: str,
    workers: int,
    lease: float,
    work: float,
    hold: int,
    stop: bool,
    register: bool,
    worker_timeout: float | None,
    busy_for: float,
) -> None:
    config = RuntimeConfig()
    if worker_timeout is not None:
        config = RuntimeConfig(worker_timeout=worker_timeout)
    async with Runtime.open(url, config=config) as runtime, anyio.create_task_group() as group:
        if register:
            group.start_soon(idle, runtime, f"{os.getpid()}-idle")
        for index in range(workers):
            name = f"{os.getpid()}-w{index}"
            group.start_soon(worker, runtime, name, lease, work, stop and not index, register)
        for index in range(hold):
            group.start_soon(holder, runtime, f"{os.getpid()}-h{index}", lease)
        say("ready")
        if busy_for:
            group.start_soon(busy, busy_for)
        # Until the parent closes stdin (or kills this process).
        await anyio.to_thread.run_sync(sys.stdin.read)
        group.cancel_scope.cancel()


if __name__ == "__main__":
    backend, url, count, lease, work = sys.argv[1:6]
    hold = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    stop = len(sys.argv) > 7 and sys.argv[7] == "1"
    register = len(sys.argv) > 8 and sys.argv[8] == "1"
    timeout = float(sys.argv[9]) if len(sys.argv) > 9 and sys.argv[9] != "-" else None
    busy_for = float(sys.argv[10]) if len(sys.argv) > 10 else 0.0
    anyio.run(
        main,
        url,
        int(count),
        float(lease),
        float(work),
        hold,
        stop,
        register,
        timeout,
        busy_for,
        backend=backend,
    )
