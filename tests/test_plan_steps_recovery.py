"""A plan failing fast with a step that always runs goes on after SIGKILL: the cleanup
still runs once, what the failure cancels is cancelled, and the plan then ends failed
with the first failure's reason. A real child process (``_plan_steps_child.py``) is killed
right after the failure returned (the executor may not have seen it) or once the executor
had applied it (the plan is failing, waiting for its cleanup); both backends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from _raw import raw_rows
from anyio.streams.buffered import BufferedByteReceiveStream

from hive_orchestration import PlanStatus, Runtime, SubtaskStatus, TaskStatus

pytestmark = pytest.mark.anyio

CHILD = Path(__file__).with_name("_plan_steps_child.py")
DEADLINE = 60.0


async def run_and_kill(db_path: str, backend: str, at: str, stderr_path: Path) -> str:
    """Run the child until it prints ``at``; SIGKILL it; return the plan id."""
    command = [sys.executable, str(CHILD), backend, db_path]
    with stderr_path.open("wb") as stderr:
        process = await anyio.open_process(command, stdout=subprocess.PIPE, stderr=stderr)
    try:
        assert process.stdout is not None
        lines = BufferedByteReceiveStream(process.stdout)
        with anyio.fail_after(DEADLINE):
            while True:
                try:
                    line = json.loads(await lines.receive_until(b"\n", 1 << 16))
                except (anyio.EndOfStream, anyio.IncompleteRead):
                    raise AssertionError(f"the child ended early: see {stderr_path}") from None
                if at in line:
                    break
            os.kill(process.pid, signal.SIGKILL)
            assert await process.wait() == -signal.SIGKILL
        return str(line[at])
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()


@pytest.mark.parametrize("at", ["failed", "applied"])
async def test_a_failing_plan_runs_its_cleanup_after_sigkill(
    anyio_backend: str, db_path: str, tmp_path: Path, at: str
) -> None:
    plan_id = await run_and_kill(db_path, anyio_backend, at, tmp_path / "child.stderr")
    async with Runtime.open(db_path) as rt:
        with anyio.fail_after(DEADLINE):
            # Nothing else runs: the cleanup is queued once the failure's cancellations
            # (slow's run was lost in the crash and is not run again) have ended it all.
            got = await rt.claim_task("cleaner", ["tidy", "slow", "idle", "after"], wait=30)
        assert got is not None
        assert got.task.subtask_id == "tidy"
        assert await rt.get_execution_plan_status(plan_id) == "executing"
        await rt.start_task(got.lease)
        await rt.complete_task(got.lease, {"tidied": True})
        plan = await rt.wait_for_plan(plan_id, timeout=DEADLINE)
        assert plan.status is PlanStatus.FAILED
        assert plan.error is not None
        assert "'boom'" in plan.error
        assert "boom broke" in plan.error
        states = {s.subtask_id: s for s in await rt.get_plan_subtasks(plan_id)}
        assert {k: s.status for k, s in states.items()} == {
            "boom": SubtaskStatus.FAILED,
            "slow": SubtaskStatus.CANCELLED,
            "idle": SubtaskStatus.CANCELLED,
            "tidy": SubtaskStatus.COMPLETED,
            "after": SubtaskStatus.CANCELLED,
        }
        for name in ("slow", "idle", "after"):
            task_id = states[name].task_id
            assert task_id is not None
            task = await rt.get_task(task_id)
            assert task is not None
            assert task.status is TaskStatus.CANCELLED, name
        failed = [
            e
            for e in await rt.read_events(0, limit=10_000)
            if e.type == "plan.failed" and e.plan_id == plan_id
        ]
        assert len(failed) == 1
    per_subtask = raw_rows(
        db_path,
        "SELECT subtask_id, COUNT(*) FROM tasks WHERE plan_id = ? GROUP BY subtask_id",
        (plan_id,),
    )
    assert dict(per_subtask) == {name: 1 for name in states}
