"""Time: a delayed task, a task that expires, and a rate-limited task type (docs/TIMING.md).

    python examples/timed_tasks.py [DB_PATH] [--backend trio]

An app schedules a reminder half a second from now (``delay``), offers a discount that
no one may take after 0.3 s (``expires_in``: nobody handles offers, so it expires), and
queues five emails that the mail provider lets through at most 2 per second
(``RuntimeConfig.rate_limits``). One worker waits for work with ``claim_task(wait=...)``:
nothing polls, the runtime hands each task over when it may go.
Runs on asyncio by default; the database defaults to a temporary file.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import anyio

from hive_orchestration import RateLimit, Runtime, RuntimeConfig, TaskStatus

EMAILS = 5
PER = 1.0


async def main(db_path: str) -> None:
    config = RuntimeConfig(rate_limits={"email": RateLimit(starts=2, per=PER)})
    async with Runtime.open(db_path, config=config) as runtime:
        start = anyio.current_time()
        reminder = await runtime.create_task("reminder", {"to": "ops"}, delay=0.5)
        offer = await runtime.create_task("offer", {"discount": 10}, expires_in=0.3)
        await runtime.create_tasks(
            [{"task_type": "email", "payload": {"n": n}} for n in range(EMAILS)]
        )
        emails = 0
        reminded = 0.0
        while emails < EMAILS or not reminded:
            claim = await runtime.claim_task("worker-1", ["email", "reminder"], wait=10.0)
            assert claim is not None, "the worker waited 10 s for nothing"
            if claim.task.id == reminder:
                reminded = anyio.current_time() - start
            else:
                emails += 1
            await runtime.complete_task(claim.lease, {})
        expired = await runtime.get_task(offer)
        assert expired is not None
        assert expired.status is TaskStatus.CANCELLED, expired.status
        # When each email was claimed, as the runtime stamped it on its run.
        starts = []
        for task in await runtime.get_tasks_by_status("completed", task_type="email"):
            [run] = await runtime.get_runs(task.id)
            assert run.started_at is not None
            starts.append(run.started_at.timestamp())
        starts.sort()
        # Any 3 in a row span a whole window (a millisecond for the clocks' rounding).
        kept = all(c - a >= PER - 1e-3 for a, c in zip(starts, starts[2:], strict=False))
        print(f"reminder handed out after {reminded:.2f} s (asked for 0.5 s)")
        print(f"offer {expired.status.value}: {expired.error}")
        print(
            f"reminder after its delay: {reminded >= 0.5}; offer expired;"
            f" {len(starts)} emails, never more than 2 in {PER:g} s: {kept}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db_path", nargs="?", help="database file (default: a temporary one)")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.db_path or str(Path(tmp) / "example.db")
        anyio.run(main, path, backend=args.backend)
