"""Periodic schedules: a cron job in a time zone, a fixed interval, a worker doing what
they create, and the schedules still there after the runtime is closed and reopened.

    python examples/periodic_schedules.py [DB_PATH] [--backend trio]

Cron schedules need the ``cron`` extra (``pip install 'hive-orchestration[cron]'``);
interval schedules need nothing. Runs on asyncio by default. The database defaults to a
temporary file; docs/SCHEDULES.md explains each option.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import anyio

from hive_orchestration import Runtime, ScheduleFiredEvent

SLOTS = 3


async def main(db_path: str) -> None:
    async with Runtime.open(db_path) as runtime:
        app = runtime.client(source_agent="ops-app")
        nightly = await app.create_schedule(
            "nightly-report",
            "0 3 * * *",  # 03:00 every day, on Paris wall time (summer or winter)
            "report",
            {"kind": "daily"},
            timezone="Europe/Paris",
            catch_up="once",  # down at 03:00? one report when it comes back, not several
        )
        print(f"{nightly.name}: next at {nightly.next_slot} (03:00 in {nightly.timezone})")
        await app.create_schedule("health-check", 0.2, "probe", {"url": "/health"})  # 0.2 s
        async with app.subscribe("schedule.fired") as fired:
            done = 0
            while done < SLOTS:
                # Each slot is one task, claimed and completed by a worker like any other.
                claim = await app.claim_task("prober-1", "probe", wait=10.0, start=True)
                if claim is None:
                    continue
                event = ScheduleFiredEvent.from_event(await fired.receive())
                print(f"slot {event.slot:%H:%M:%S.%f} -> task {event.task_id[:8]}")
                await app.complete_task(claim.lease, {"status": 200})
                done += 1
        await app.pause_schedule("health-check")  # nothing fires while it is paused
    # Durable: closed and reopened, the schedules are there with what they fired.
    async with Runtime.open(db_path) as runtime:
        app = runtime.client(source_agent="ops-app")
        kept = {s.name: s for s in await app.list_schedules()}
        check = kept["health-check"]
        completed = await app.list_tasks("completed", task_type="probe")
        # A slot may have fired between the last claim and the pause: its task is queued.
        probes = await app.list_tasks(task_type="probe")
        await app.delete_schedule("health-check")  # its tasks stay
        print(
            f"health-check: {len(completed)} probe(s) completed, one task per fired slot:"
            f" {len(probes) == check.fired}, paused: {check.paused};"
            f" nightly-report kept: {'nightly-report' in kept}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db_path", nargs="?", help="SQLite file (default: a temporary one)")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args()
    if args.db_path:
        anyio.run(main, args.db_path, backend=args.backend)
    else:
        with tempfile.TemporaryDirectory() as folder:
            anyio.run(main, str(Path(folder) / "schedules.db"), backend=args.backend)
