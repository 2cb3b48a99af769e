"""Child process of ``tests/test_plan_steps_recovery.py``: fails a fail-fast plan that has
a step that always runs, then waits to be killed.

Usage::

    python _plan_steps_child.py BACKEND DB_PATH

Creates and starts the plan of :func:`plan_data`, claims and starts ``slow``, then claims
``boom`` and fails it for good, and prints ``{"failed": PLAN_ID}`` once that returned;
then, once the plan executor has applied the failure (``idle`` was cancelled),
``{"applied": PLAN_ID}``. Then it sleeps until it is killed (SIGKILL, by the parent). No
worker ever takes ``tidy``: it is left for the parent to run after the restart.
"""

from __future__ import annotations

import json
import sys

import anyio

from hive_orchestration import Runtime, SubtaskStatus

LEASE = 600.0


def plan_data() -> dict[str, object]:
    def sub(name: str, *needs: str, **more: object) -> dict[str, object]:
        return {"id": name, "task_type": name, "dependencies": list(needs), **more}

    return {
        "subtasks": [
            sub("boom"),
            sub("slow"),  # running when boom fails
            sub("idle"),  # queued, never claimed: cancelled by the failure
            sub("tidy", "boom", "slow", "idle", always_run=True),
            sub("after", "tidy"),  # an ordinary step: cancelled by the failure
        ]
    }


def emit(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def main(db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        plan_id = await rt.create_execution_plan(plan_data())
        assert await rt.mark_plan_execution_started(plan_id)
        slow = await rt.claim_task("child-slow", ["slow"], lease=LEASE, wait=10.0)
        assert slow is not None
        await rt.start_task(slow.lease)
        boom = await rt.claim_task("child-boom", ["boom"], lease=LEASE, wait=10.0)
        assert boom is not None
        await rt.start_task(boom.lease)
        async with rt.subscribe("task.cancelled") as cancelled:
            await rt.fail_task(boom.lease, "boom broke", retryable=False)
            emit(failed=plan_id)
            while True:
                states = {s.subtask_id: s for s in await rt.get_plan_subtasks(plan_id)}
                if states["idle"].status is SubtaskStatus.CANCELLED:
                    break
                await cancelled.receive()
        emit(applied=plan_id)
        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, sys.argv[2], backend=sys.argv[1])
