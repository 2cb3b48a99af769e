"""A worker with slots, fed in batches: create_tasks, then claim_tasks(start=True).

    python examples/batch_worker.py [DB_PATH] [--backend trio]

An app queues a day's image thumbnails in one call (one durable commit, all or nothing).
Two workers, each with 4 slots, take as many tasks as they have free slots in one call
(each task claimed and started in the same commit), run them concurrently, and complete
each one as it finishes (a worker that finishes a batch all at once can end it in one call
and one commit with complete_tasks / fail_tasks, each item decided on its own). A task
that is too big fails and is retried with backoff, then fails for good.
Runs on asyncio by default; the database defaults to a temporary file.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

import anyio

from hive_orchestration import Claim, Runtime, RuntimeConfig, TaskStatus

SLOTS = 4
IMAGES = [f"img-{n:02}.png" for n in range(12)]


async def thumbnail(runtime: Runtime, claim: Claim) -> None:
    name = str(claim.task.payload["image"])
    if name == "img-07.png":  # this one is too big, every time
        await runtime.fail_task(claim.lease, f"{name}: larger than 50 MB")
        return
    await anyio.sleep(0.01)  # the work
    await runtime.complete_task(claim.lease, {"thumbnail": name.replace(".png", "-small.png")})


async def worker(runtime: Runtime, worker_id: str) -> None:
    free = anyio.Semaphore(SLOTS)
    async with anyio.create_task_group() as running:
        while True:
            await free.acquire()  # at least one slot is free: take what fits
            wanted = 1 + free.value
            for _ in range(free.value):
                await free.acquire()
            claims = await runtime.claim_tasks(
                worker_id, "thumbnail", limit=wanted, lease=30, wait=0.5, start=True
            )
            for _ in range(wanted - len(claims)):
                free.release()  # slots that got nothing
            for claim in claims:

                async def run(claim: Claim = claim) -> None:
                    try:
                        await thumbnail(runtime, claim)
                    finally:
                        free.release()

                running.start_soon(run)


async def main(db_path: str) -> None:
    config = RuntimeConfig(retry_backoff=0.05, retry_backoff_max=0.1)
    async with Runtime.open(db_path, config=config) as runtime:
        async with runtime.subscribe("task.*") as events:
            ids = await runtime.create_tasks(
                {"task_type": "thumbnail", "payload": {"image": image}, "max_retries": 2}
                for image in IMAGES
            )
            print(f"queued {len(ids)} task(s) in one commit")
            async with anyio.create_task_group() as workers:
                for n in (1, 2):
                    workers.start_soon(worker, runtime, f"thumbnailer-{n}")
                ended = 0
                async for event in events:  # the workers run until every task has ended
                    ended += event.type in ("task.completed", "task.failed")
                    if ended == len(ids):
                        workers.cancel_scope.cancel()
                        break
        completed = await runtime.get_tasks_by_status(TaskStatus.COMPLETED)
        failed = await runtime.get_tasks_by_status(TaskStatus.FAILED)
        for task in failed:
            print(f"{task.payload['image']}: failed after {task.attempts} attempt(s): {task.error}")
        by_worker = Counter(task.assigned_worker for task in completed)
        print(f"completed by worker: {dict(sorted(by_worker.items()))}")
        print(
            f"completed {len(completed)} of {len(ids)} thumbnail(s), {len(failed)} failed for good"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db_path", nargs="?", help="database file (default: a temporary one)")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.db_path or str(Path(tmp) / "example.db")
        anyio.run(main, path, backend=args.backend)
