"""Steps that always run: a plan subtask marked ``always_run`` runs once its dependencies
have ended, whatever their outcome (a cleanup or report step), under both failure
policies; the plan's final status then; cancel_plan; validation. Real SQLite files, both
backends (after SIGKILL: test_plan_steps_recovery.py)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import pytest

from hive_orchestration import (
    Claim,
    Event,
    InvalidInputError,
    PlanStatus,
    Runtime,
    RuntimeConfig,
    SubtaskStatus,
    TaskStatus,
)

pytestmark = pytest.mark.anyio

SOON = 10.0
Spec = dict[str, Any]


@asynccontextmanager
async def runtime(db_path: str) -> AsyncIterator[Runtime]:
    config = RuntimeConfig(retry_backoff=0.01, retry_backoff_max=0.05)
    async with Runtime.open(db_path, config=config) as rt:
        yield rt


def sub(subtask_id: str, *dependencies: str, **fields: Any) -> Spec:
    return {"id": subtask_id, "task_type": subtask_id, "dependencies": list(dependencies), **fields}


def cleanup(subtask_id: str, *dependencies: str, **fields: Any) -> Spec:
    return sub(subtask_id, *dependencies, always_run=True, **fields)


async def started(rt: Runtime, *subtasks: Spec, **kwargs: Any) -> str:
    plan_id = await rt.create_execution_plan({"subtasks": list(subtasks)}, **kwargs)
    assert await rt.mark_plan_execution_started(plan_id) is True
    return plan_id


async def claim(rt: Runtime, kind: str) -> Claim:
    got = await rt.claim_task(f"w-{kind}", [kind], wait=SOON)
    assert got is not None, f"expected a {kind} task to claim"
    await rt.start_task(got.lease)
    return got


async def complete(rt: Runtime, kind: str, result: Mapping[str, object] | None = None) -> None:
    got = await claim(rt, kind)
    await rt.complete_task(got.lease, result or {"done": kind})


async def fail(rt: Runtime, kind: str) -> None:
    got = await claim(rt, kind)
    await rt.fail_task(got.lease, f"{kind} broke", retryable=False)


_barriers = itertools.count()


async def barrier(rt: Runtime) -> None:
    """Once a plan of its own has completed, every task event before it was handled."""
    kind = f"barrier-{next(_barriers)}"
    plan_id = await started(rt, sub(kind))
    await complete(rt, kind)
    assert (await rt.wait_for_plan(plan_id, timeout=SOON)).status is PlanStatus.COMPLETED


async def statuses(rt: Runtime, plan_id: str) -> dict[str, SubtaskStatus]:
    return {s.subtask_id: s.status for s in await rt.get_plan_subtasks(plan_id)}


async def queued(rt: Runtime, plan_id: str, subtask_id: str) -> bool:
    for state in await rt.get_plan_subtasks(plan_id):
        if state.subtask_id == subtask_id:
            assert state.task_id is not None
            task = await rt.get_task(state.task_id)
            assert task is not None
            return task.status is TaskStatus.QUEUED
    raise AssertionError(subtask_id)


async def events_of(rt: Runtime, plan_id: str) -> list[Event]:
    return [e for e in await rt.read_events(0, limit=10_000) if e.plan_id == plan_id]


async def test_an_always_run_step_runs_after_a_plan_that_completes(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, sub("a"), sub("b", "a"), cleanup("report", "a", "b"))
        await complete(rt, "a")
        await barrier(rt)
        assert not await queued(rt, plan_id, "report")  # b has not ended yet
        await complete(rt, "b")
        await complete(rt, "report")
        plan = await rt.wait_for_plan(plan_id, timeout=SOON)
        assert plan.status is PlanStatus.COMPLETED
        assert set((await statuses(rt, plan_id)).values()) == {SubtaskStatus.COMPLETED}


async def test_continue_skips_up_to_an_always_run_step_which_then_runs(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(
            rt,
            sub("a"),
            sub("b", "a"),  # skipped: a failed
            sub("c"),
            cleanup("tidy", "b", "c"),  # runs once b is skipped and c completed
            sub("after", "tidy"),  # judged by tidy's outcome: runs
            failure_policy="continue",
        )
        await fail(rt, "a")
        await barrier(rt)
        assert (await statuses(rt, plan_id))["b"] is SubtaskStatus.SKIPPED
        assert not await queued(rt, plan_id, "tidy")  # c is still to end
        await complete(rt, "c")
        await complete(rt, "tidy")
        await complete(rt, "after")
        plan = await rt.wait_for_plan(plan_id, timeout=SOON)
        assert plan.status is PlanStatus.FAILED  # a cleanup does not rescue the plan
        assert await statuses(rt, plan_id) == {
            "a": SubtaskStatus.FAILED,
            "b": SubtaskStatus.SKIPPED,
            "c": SubtaskStatus.COMPLETED,
            "tidy": SubtaskStatus.COMPLETED,
            "after": SubtaskStatus.COMPLETED,
        }


async def test_fail_fast_runs_the_always_run_steps_and_then_fails_the_plan(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(
            rt,
            sub("boom"),
            sub("slow"),  # running when boom fails: it finishes
            sub("idle"),  # queued, never started: cancelled
            sub("next", "slow"),  # blocked: cancelled
            cleanup("tidy", "boom", "slow", "next"),
            sub("after", "tidy"),  # an ordinary step: cancelled by the failure
        )
        slow = await claim(rt, "slow")
        await fail(rt, "boom")
        await barrier(rt)
        # Failing, not failed: the cleanup still has to run, and waits for slow.
        assert await rt.get_execution_plan_status(plan_id) == "executing"
        now = await statuses(rt, plan_id)
        assert now["idle"] is now["next"] is now["after"] is SubtaskStatus.CANCELLED
        assert now["tidy"] is SubtaskStatus.PENDING
        assert not await queued(rt, plan_id, "tidy")
        await rt.complete_task(slow.lease, {"late": True})
        await complete(rt, "tidy")
        plan = await rt.wait_for_plan(plan_id, timeout=SOON)
        assert plan.status is PlanStatus.FAILED
        assert plan.error is not None
        assert "'boom'" in plan.error  # the failure's reason, not the cleanup's
        assert "boom broke" in plan.error
        assert await statuses(rt, plan_id) == {
            "boom": SubtaskStatus.FAILED,
            "slow": SubtaskStatus.COMPLETED,
            "idle": SubtaskStatus.CANCELLED,
            "next": SubtaskStatus.CANCELLED,
            "tidy": SubtaskStatus.COMPLETED,
            "after": SubtaskStatus.CANCELLED,
        }
        # plan.failed comes once, after the cleanup's task completed.
        events = await events_of(rt, plan_id)
        (failed,) = [e for e in events if e.type == "plan.failed"]
        tidy_done = [e for e in events if e.type == "task.completed" and e.seq < failed.seq]
        assert len(tidy_done) == 2  # slow and tidy
        assert failed.data["reason"] == plan.error
        assert failed.data["subtask_id"] == "boom"


async def test_a_failing_cleanup_fails_a_plan_whose_steps_completed(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, sub("a"), cleanup("tidy", "a"))
        await complete(rt, "a")
        await fail(rt, "tidy")
        plan = await rt.wait_for_plan(plan_id, timeout=SOON)
        assert plan.status is PlanStatus.FAILED
        assert plan.error is not None
        assert "'tidy'" in plan.error


async def test_a_cancelled_or_timed_out_dependency_lets_the_cleanup_run(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(
            rt,
            sub("gone"),
            sub("late", timeout=0.5, max_retries=0),
            cleanup("tidy", "gone", "late"),
            failure_policy="continue",
        )
        tasks = {s.subtask_id: s.task_id for s in await rt.get_plan_subtasks(plan_id)}
        await rt.cancel_task(str(tasks["gone"]), reason="not needed")
        await claim(rt, "late")  # never reported: it times out
        await complete(rt, "tidy")
        plan = await rt.wait_for_plan(plan_id, timeout=SOON)
        assert plan.status is PlanStatus.FAILED
        assert await statuses(rt, plan_id) == {
            "gone": SubtaskStatus.CANCELLED,
            "late": SubtaskStatus.FAILED,
            "tidy": SubtaskStatus.COMPLETED,
        }


async def test_cancel_plan_cancels_the_always_run_steps_too(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, sub("a"), cleanup("tidy", "a"))
        plan = await rt.cancel_plan(plan_id, reason="changed my mind")
        assert plan.status is PlanStatus.CANCELLED
        await barrier(rt)
        assert await statuses(rt, plan_id) == {
            "a": SubtaskStatus.CANCELLED,
            "tidy": SubtaskStatus.CANCELLED,
        }
        assert await rt.claim_task("w", ["a", "tidy"]) is None


async def test_always_run_must_be_a_boolean(db_path: str) -> None:
    async with runtime(db_path) as rt:
        bad = {"subtasks": [sub("a"), {**sub("b", "a"), "always_run": "yes"}]}
        with pytest.raises(InvalidInputError) as refused:
            await rt.create_execution_plan(bad)
        assert refused.value.field == "plan_data.subtasks[1].always_run"
        assert await rt.get_execution_plans() == []


async def test_while_failing_a_retry_is_cancelled_but_the_cleanup_retries(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(
            rt,
            sub("boom"),
            sub("slow", max_retries=3),  # running when boom fails, then fails retryably
            cleanup("tidy", "boom", "slow", max_retries=3),
        )
        slow = await claim(rt, "slow")
        await fail(rt, "boom")
        await barrier(rt)
        await rt.fail_task(slow.lease, "flaky")  # attempts left: back to the queue...
        await barrier(rt)
        tasks = {s.subtask_id: s.task_id for s in await rt.get_plan_subtasks(plan_id)}
        gone = await rt.get_task(str(tasks["slow"]))
        assert gone is not None
        assert gone.status is TaskStatus.CANCELLED  # ...but the failing plan will not run it
        # The cleanup, now queued, is retried like any task while attempts remain.
        first = await claim(rt, "tidy")
        await rt.fail_task(first.lease, "tidy hiccup")
        await complete(rt, "tidy")
        plan = await rt.wait_for_plan(plan_id, timeout=SOON)
        assert plan.status is PlanStatus.FAILED
        assert await statuses(rt, plan_id) == {
            "boom": SubtaskStatus.FAILED,
            "slow": SubtaskStatus.CANCELLED,
            "tidy": SubtaskStatus.COMPLETED,
        }


async def test_an_always_run_step_waits_across_a_reopen(db_path: str) -> None:
    """The count of what an always-run step still waits for is rebuilt from the rows."""
    async with runtime(db_path) as rt:
        plan_id = await started(
            rt,
            sub("a"),
            sub("b", "a"),  # skipped once a fails
            sub("c"),
            cleanup("tidy", "b", "c"),
            failure_policy="continue",
        )
        await fail(rt, "a")
        await barrier(rt)
    async with runtime(db_path) as rt:
        assert (await statuses(rt, plan_id))["b"] is SubtaskStatus.SKIPPED
        assert not await queued(rt, plan_id, "tidy")  # c has not ended
        await complete(rt, "c")
        await complete(rt, "tidy")
        plan = await rt.wait_for_plan(plan_id, timeout=SOON)
        assert plan.status is PlanStatus.FAILED
        assert (await statuses(rt, plan_id))["tidy"] is SubtaskStatus.COMPLETED
