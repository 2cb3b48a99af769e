"""Child process of ``tests/test_claim_recovery.py``: holds claims until it is killed.

Usage::

    python _claimer.py BACKEND DB_PATH [MODE]

``MODE`` ``mixed`` (the default): creates six ``job`` tasks (priorities 1 to 6), claims
two of them and starts the first (so one task is running and one assigned), claims and
completes a third, and leaves three untouched. ``exhausted``: creates two ``job`` tasks
with ``max_retries=0``, claims both and starts the first.

Then prints ONE JSON line with the task ids and flushes, and sleeps until it is killed:
``{"running": ID, "assigned": ID, "completed": ID, "queued": [ID, ...]}`` (``mixed``) or
``{"running": ID, "assigned": ID}`` (``exhausted``). Nothing else goes to stdout; a failed
check raises, so the parent sees the end of output and the traceback on stderr.
"""

from __future__ import annotations

import json
import sys

import anyio

from hive_orchestration import Runtime, TaskStatus

WORKER = "worker-1"
TASK_TYPE = "job"
LEASE = 60.0


async def expect(runtime: Runtime, task_id: str, status: TaskStatus) -> None:
    task = await runtime.get_task(task_id)
    assert task is not None, task_id
    assert task.status is status, (task_id, task.status, status)


async def mixed(runtime: Runtime) -> dict[str, object]:
    ids = [await runtime.create_task(TASK_TYPE, {"n": p}, priority=p) for p in range(1, 7)]
    best_first = ids[::-1]  # priorities 6, 5, 4, ...
    first = await runtime.claim_task(WORKER, TASK_TYPE, lease=LEASE)
    second = await runtime.claim_task(WORKER, TASK_TYPE, lease=LEASE)
    assert first is not None
    assert second is not None
    assert [first.task.id, second.task.id] == best_first[:2]
    await runtime.start_task(first.lease)
    third = await runtime.claim_task(WORKER, TASK_TYPE, lease=LEASE)
    assert third is not None
    assert third.task.id == best_first[2]
    await runtime.complete_task(third.lease, {"ok": True})

    await expect(runtime, first.task.id, TaskStatus.RUNNING)
    await expect(runtime, second.task.id, TaskStatus.ASSIGNED)
    await expect(runtime, third.task.id, TaskStatus.COMPLETED)
    return {
        "running": first.task.id,
        "assigned": second.task.id,
        "completed": third.task.id,
        "queued": best_first[3:],
    }


async def exhausted(runtime: Runtime) -> dict[str, object]:
    ids = [await runtime.create_task(TASK_TYPE, max_retries=0, priority=p) for p in (2, 1)]
    first = await runtime.claim_task(WORKER, TASK_TYPE, lease=LEASE)
    second = await runtime.claim_task(WORKER, TASK_TYPE, lease=LEASE)
    assert first is not None
    assert second is not None
    assert [first.task.id, second.task.id] == ids
    await runtime.start_task(first.lease)
    await expect(runtime, first.task.id, TaskStatus.RUNNING)
    await expect(runtime, second.task.id, TaskStatus.ASSIGNED)
    return {"running": first.task.id, "assigned": second.task.id}


async def main(path: str, mode: str) -> None:
    async with Runtime.open(path) as runtime:
        ids = await (mixed if mode == "mixed" else exhausted)(runtime)
        sys.stdout.write(json.dumps(ids) + "\n")
        sys.stdout.flush()
        await anyio.sleep_forever()


if __name__ == "__main__":
    backend, db, *rest = sys.argv[1:]
    mode = rest[0] if rest else "mixed"
    if mode not in ("mixed", "exhausted"):
        raise SystemExit(f"unknown mode {mode!r}")
    anyio.run(main, db, mode, backend=backend)
