"""Child process of the schedules' crash test: it owns the database while its Scheduler
fires, and says what it saw fired (one JSON object per line, flushed at once).

Usage::

    python _schedule_child.py BACKEND DB_PATH

Opens a runtime on the file (the Scheduler fires what is due, the catch-up first),
prints ``{"ready": PID}``, then ``{"fired": SCHEDULE, "slot": ..., "task": ...}`` for each
``schedule.fired`` event committed while it runs, until it is killed (the test's SIGKILL)
or its stdin reaches end of file.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import anyio
import anyio.to_thread

from hive_orchestration import Runtime, RuntimeConfig


def say(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def main(path: str) -> None:
    async with Runtime.open(path, config=RuntimeConfig(schedule_clock_check=0.05)) as runtime:
        client = runtime.client()
        async with client.subscribe("schedule.fired") as events, anyio.create_task_group() as tg:

            async def report() -> None:
                async for event in events:
                    say(fired=event.data["schedule"], slot=event.data["slot"], task=event.task_id)

            tg.start_soon(report)
            say(ready=os.getpid())
            await anyio.to_thread.run_sync(sys.stdin.buffer.read, abandon_on_cancel=True)
            tg.cancel_scope.cancel()


if __name__ == "__main__":
    backend, db = sys.argv[1:]
    anyio.run(main, db, backend=backend)
