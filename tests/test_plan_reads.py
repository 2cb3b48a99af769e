"""Reads of a plan right after a call that ended one of its tasks, both backends.

The promise: once a call that finishes a plan's subtask returns (``update_task_status``,
``complete_task``, ``complete_tasks``, ``fail_task``, ``fail_tasks``, ``cancel_task``,
``delete_task``, publishing a
lifecycle event), every read of that plan reflects what the end released: the next
subtask, dependency checks, the status and its cached copy, progress and the subtasks.
No test here waits or sleeps between the call and the read: that is the point.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from hive_orchestration import (
    OrchestrationClient,
    PlanStatus,
    Runtime,
    RuntimeConfig,
    SubtaskStatus,
    TaskCompletedEvent,
    TaskStatus,
)

pytestmark = pytest.mark.anyio


def chain(length: int) -> dict[str, Any]:
    steps = [{"id": "s0", "task_type": "step"}]
    for i in range(1, length):
        steps.append({"id": f"s{i}", "task_type": "step", "dependencies": [f"s{i - 1}"]})
    return {"title": "chain", "subtasks": steps}


@asynccontextmanager
async def client_on(db_path: str) -> AsyncIterator[OrchestrationClient]:
    async with OrchestrationClient(db_path=db_path, source_agent="orchestrator") as client:
        yield client


@pytest.mark.parametrize(
    "finish", ["update_task_status", "publish", "complete_task", "complete_tasks"]
)
async def test_the_seeds_loop_runs_every_subtask_of_a_plan(db_path: str, finish: str) -> None:
    """The seeds' loop: ``while (t := get_next_planned_subtask(p)) is not None: run t``.

    Each subtask is read the instant the previous one's completion returns; before the
    plan barrier it returned None and the loop ended after the first subtask."""
    async with client_on(db_path) as client:
        for _ in range(10):
            plan_id = await client.create_execution_plan(chain(4))
            assert await client.mark_plan_execution_started(plan_id)
            ran = []
            while (task := await client.get_next_planned_subtask(plan_id)) is not None:
                ran.append(task.subtask_id)
                if finish == "complete_task":
                    claimed = await client.claim_task("w1", ["step"], start=True)
                    assert claimed is not None
                    assert claimed.task.id == task.id
                    await client.complete_task(claimed.lease, {"ok": True})
                elif finish == "complete_tasks":
                    claimed = await client.claim_task("w1", ["step"], start=True)
                    assert claimed is not None
                    [done] = await client.complete_tasks([{"lease": claimed.lease}])
                    assert done.result().id == task.id
                elif finish == "publish":
                    await client.update_task_status(task.id, "running")
                    await client.publish_task_event(TaskCompletedEvent(task_id=task.id))
                else:
                    await client.update_task_status(task.id, "running")
                    await client.update_task_status(task.id, "completed")
            assert ran == ["s0", "s1", "s2", "s3"]
            assert await client.get_execution_plan_status(plan_id) == "completed"
            assert await client.get_execution_plan_status_cached(plan_id) == "completed"


async def test_every_plan_read_sees_a_release_at_once(db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        for _ in range(5):
            plan_id = await rt.create_execution_plan(chain(3))
            await rt.mark_plan_execution_started(plan_id)
            subs = {s.subtask_id: s.task_id for s in await rt.get_plan_subtasks(plan_id)}
            assert await rt.check_subtask_dependencies(subs["s1"] or "") is False
            # Resolved by hand, straight from queued (no run).
            assert await rt.update_task_status(subs["s0"] or "", "completed", result={"n": 0})
            assert await rt.check_subtask_dependencies(subs["s1"] or "") is True
            nxt = await rt.get_next_planned_subtask(plan_id)
            assert nxt is not None
            assert nxt.id == subs["s1"]
            assert nxt.status is TaskStatus.QUEUED
            states = {s.subtask_id: s.status for s in await rt.get_plan_subtasks(plan_id)}
            assert states == {
                "s0": SubtaskStatus.COMPLETED,
                "s1": SubtaskStatus.READY,
                "s2": SubtaskStatus.PENDING,
            }
            progress = await rt.get_plan_progress(plan_id)
            assert progress.counts.get("completed") == 1
            assert progress.counts.get("queued") == 1  # ready, its task queued
            await rt.update_task_status(subs["s1"] or "", "completed")
            await rt.update_task_status(subs["s2"] or "", "completed")
            # The last completion ended the plan: its status says so at once.
            assert await rt.get_execution_plan_status_cached(plan_id) == "completed"
            plan = await rt.get_execution_plan(plan_id)
            assert plan is not None
            assert plan.status is PlanStatus.COMPLETED
            assert (await rt.get_plan_progress(plan_id)).counts == {"completed": 3}


@pytest.mark.parametrize(
    "end", ["fail_task", "fail_tasks", "cancel_task", "delete_task", "failed_by_hand"]
)
async def test_a_failure_is_seen_by_the_next_read(db_path: str, end: str) -> None:
    """fail_fast: the plan has failed by the time the ending call returns."""
    config = RuntimeConfig(retry_backoff=0.01)
    async with Runtime.open(db_path, config=config) as rt:
        data = {
            "subtasks": [
                {"id": "a", "task_type": "step", "max_retries": 0},
                {"id": "b", "task_type": "step", "dependencies": ["a"]},
                {"id": "c", "task_type": "other"},
            ]
        }
        plan_id = await rt.create_execution_plan(data, failure_policy="fail_fast")
        await rt.mark_plan_execution_started(plan_id)
        subs = {s.subtask_id: s.task_id or "" for s in await rt.get_plan_subtasks(plan_id)}
        if end == "fail_task":
            claimed = await rt.claim_task("w1", ["step"])
            assert claimed is not None
            await rt.fail_task(claimed.lease, "broken")
        elif end == "fail_tasks":
            claimed = await rt.claim_task("w1", ["step"])
            assert claimed is not None
            [failed] = await rt.fail_tasks([{"lease": claimed.lease, "error": "broken"}])
            assert failed.result().status is TaskStatus.FAILED
        elif end == "cancel_task":
            await rt.cancel_task(subs["a"], reason="not needed")
        elif end == "delete_task":
            assert await rt.delete_task(subs["a"])
        else:
            assert await rt.update_task_status(subs["a"], "failed", error="by hand")
        assert await rt.get_execution_plan_status(plan_id) == "failed"
        assert await rt.get_execution_plan_status_cached(plan_id) == "failed"
        assert await rt.get_next_planned_subtask(plan_id) is None  # c was cancelled too
        c = await rt.get_task(subs["c"])
        assert c is not None
        assert c.status is TaskStatus.CANCELLED
