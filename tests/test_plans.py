"""Execution plans through the public Runtime API, on real SQLite files, both backends:
shapes (a diamond, a fan-out/fan-in, a long chain) run each subtask once and in
dependency order, pushed to waiting claimers; the failure policies, retries and
timeouts; cancelling a plan; the plan operations and the planning queue; the events;
validation before anything is written; and a plan going on after a reopen.

Nothing here sleeps to synchronise. Where a test must know that the PlanExecutor has
handled everything caused so far (subtask rows written, tasks cancelled), it runs a
*barrier*: a one-subtask plan of its own, taken to its end. The executor reads task
events in log order and handles its batches one after the other (effects included), so
once the barrier plan has completed, every task event committed before the barrier's
was handled and what it caused was applied.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from _raw import raw_execute, raw_rows

from hive_orchestration import (
    Claim,
    Event,
    ExecutionPlan,
    FailurePolicy,
    IllegalTransitionError,
    InvalidInputError,
    LeaseLostError,
    NotFoundError,
    PlanningStatus,
    PlanStatus,
    RunStatus,
    Runtime,
    RuntimeConfig,
    RuntimeStoppedError,
    StorageError,
    SubtaskState,
    SubtaskStatus,
    TaskStatus,
)
from hive_orchestration.messages.plans import ClaimPlanningRequest, Resync, StartPlan

pytestmark = pytest.mark.anyio

#: Bound on anything that should happen "soon": generous, so a loaded machine passes.
SOON = 10.0

Spec = dict[str, Any]


@asynccontextmanager
async def runtime(db_path: str, **config: Any) -> AsyncIterator[Runtime]:
    settings: dict[str, Any] = {"retry_backoff": 0.01, "retry_backoff_max": 0.05}
    settings.update(config)
    async with Runtime.open(db_path, config=RuntimeConfig(**settings)) as rt:
        yield rt


# -- plan data -------------------------------------------------------------------------------


def sub(subtask_id: str, *dependencies: str, task_type: str = "job", **fields: Any) -> Spec:
    spec: Spec = {"id": subtask_id, "task_type": task_type, **fields}
    if dependencies:
        spec["dependencies"] = list(dependencies)
    return spec


def plan_of(*subtasks: Spec, **extra: Any) -> Spec:
    return {**extra, "subtasks": list(subtasks)}


def diamond() -> Spec:
    return plan_of(sub("a"), sub("b", "a"), sub("c", "a"), sub("d", "b", "c"))


def fan(width: int = 20) -> Spec:
    middle = [f"m{i:02d}" for i in range(width)]
    return plan_of(sub("root"), *(sub(m, "root") for m in middle), sub("sink", *middle))


def chain(length: int = 50) -> Spec:
    steps = [f"s{i:02d}" for i in range(length)]
    return plan_of(sub(steps[0]), *(sub(b, a) for a, b in itertools.pairwise(steps)))


# -- helpers ---------------------------------------------------------------------------------


async def started(rt: Runtime, data: Mapping[str, object], **kwargs: Any) -> str:
    plan_id = await rt.create_execution_plan(data, **kwargs)
    assert await rt.mark_plan_execution_started(plan_id) is True
    return plan_id


async def states(rt: Runtime, plan_id: str) -> dict[str, SubtaskState]:
    return {s.subtask_id: s for s in await rt.get_plan_subtasks(plan_id)}


async def tasks_of(rt: Runtime, plan_id: str) -> dict[str, str]:
    """Subtask id -> its task id (every subtask of the plan has one)."""
    found: dict[str, str] = {}
    for state in await rt.get_plan_subtasks(plan_id):
        assert state.task_id is not None, state
        found[state.subtask_id] = state.task_id
    return found


async def task_status(rt: Runtime, task_id: str) -> TaskStatus:
    task = await rt.get_task(task_id)
    assert task is not None
    return task.status


async def claim(
    rt: Runtime, *types: str, worker: str = "w1", wait: float = SOON, **kwargs: Any
) -> Claim:
    got = await rt.claim_task(worker, types or None, wait=wait, **kwargs)
    assert got is not None, f"expected a task of {types or 'any type'} to claim"
    return got


async def finish(rt: Runtime, got: Claim, result: Mapping[str, object] | None = None) -> None:
    await rt.start_task(got.lease)
    await rt.complete_task(got.lease, result or {"ok": True})


_barriers = itertools.count()


async def barrier(rt: Runtime) -> None:
    """Return once the PlanExecutor has handled (and applied the effects of) every task
    event committed before this call: see the module docstring."""
    kind = f"barrier-{next(_barriers)}"
    plan_id = await started(rt, plan_of(sub("probe", task_type=kind)))
    await finish(rt, await claim(rt, kind, worker="barrier"))
    plan = await rt.wait_for_plan(plan_id, timeout=SOON)
    assert plan.status is PlanStatus.COMPLETED


async def all_events(rt: Runtime) -> list[Event]:
    return await rt.read_events(0, limit=10_000)


def query(db_path: str, sql: str, *params: object) -> list[tuple[Any, ...]]:
    return raw_rows(db_path, sql, params)


def tasks_per_subtask(db_path: str, plan_id: str) -> dict[str, int]:
    rows = query(
        db_path,
        "SELECT subtask_id, COUNT(*) FROM tasks WHERE plan_id = ? GROUP BY subtask_id",
        plan_id,
    )
    return {str(subtask_id): int(count) for subtask_id, count in rows}


def assert_one_task_per_subtask(db_path: str, plan: ExecutionPlan) -> None:
    assert tasks_per_subtask(db_path, plan.id) == {s.id: 1 for s in plan.subtasks}


async def run_workers(rt: Runtime, plan_id: str, *, workers: int = 4) -> ExecutionPlan:
    """Complete every subtask of a started plan with ``workers`` concurrent claimers, and
    return the plan once it ended. Each claim checks that the claimed subtask's
    dependencies' tasks had all completed."""
    plan = await rt.get_execution_plan(plan_id)
    assert plan is not None
    needs = {spec.id: spec.dependencies for spec in plan.subtasks}
    task_ids = await tasks_of(rt, plan_id)
    kinds = sorted({spec.task_type for spec in plan.subtasks})
    early: list[tuple[str, str, TaskStatus]] = []

    async def worker(name: str) -> None:
        while True:
            got = await rt.claim_task(name, kinds, wait=SOON)
            if got is None:
                continue
            subtask_id = got.task.subtask_id
            assert subtask_id is not None
            for need in needs[subtask_id]:
                status = await task_status(rt, task_ids[need])
                if status is not TaskStatus.COMPLETED:
                    early.append((subtask_id, need, status))
            await rt.start_task(got.lease)
            await rt.complete_task(got.lease, {"by": name})

    async with anyio.create_task_group() as tg:
        for n in range(workers):
            tg.start_soon(worker, f"worker-{n}")
        ended = await rt.wait_for_plan(plan_id, timeout=SOON)
        tg.cancel_scope.cancel()
    assert early == [], "claimed before a dependency completed"
    return ended


async def assert_dependency_order(rt: Runtime, plan: ExecutionPlan) -> None:
    """In the durable log: every subtask has exactly one ``plan.subtask_ready``, which
    comes after the ``task.completed`` of each of its dependencies' tasks (and so does
    its task's first ``task.assigned``)."""
    events = await all_events(rt)
    task_ids = await tasks_of(rt, plan.id)
    subtask_of = {task_id: subtask_id for subtask_id, task_id in task_ids.items()}
    completed = {e.task_id: e.seq for e in events if e.type == "task.completed"}
    ready = [e for e in events if e.type == "plan.subtask_ready" and e.plan_id == plan.id]
    assert Counter(str(e.data["subtask_id"]) for e in ready) == {s.id: 1 for s in plan.subtasks}
    first_assigned: dict[str, int] = {}
    for e in events:
        if e.type == "task.assigned" and e.task_id in subtask_of:
            first_assigned.setdefault(subtask_of[e.task_id], e.seq)
    for e in ready:
        subtask_id = str(e.data["subtask_id"])
        assert e.task_id == task_ids[subtask_id]
        spec = next(s for s in plan.subtasks if s.id == subtask_id)
        for need in spec.dependencies:
            assert completed[task_ids[need]] < e.seq, (subtask_id, need)
            assert completed[task_ids[need]] < first_assigned[subtask_id], (subtask_id, need)
        assert e.seq < first_assigned[subtask_id]


# -- shapes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "workers"),
    [(diamond(), 2), (fan(20), 8), (chain(50), 3)],
    ids=["diamond", "fan-out-20-fan-in", "chain-50"],
)
async def test_a_plan_runs_each_subtask_once_in_dependency_order(
    db_path: str, data: Spec, workers: int
) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, data, source_agent="planner")
        plan = await run_workers(rt, plan_id, workers=workers)
        assert plan.status is PlanStatus.COMPLETED
        assert plan.error is None
        assert plan.completed_at is not None
        assert plan.started_at is not None
        assert plan.generated_at <= plan.started_at <= plan.completed_at
        await assert_dependency_order(rt, plan)
        assert_one_task_per_subtask(db_path, plan)
        subtasks = await states(rt, plan_id)
        assert {s.status for s in subtasks.values()} == {SubtaskStatus.COMPLETED}
        for s in subtasks.values():
            task = await rt.get_task(s.task_id or "")
            assert task is not None
            assert task.status is TaskStatus.COMPLETED
            assert (task.plan_id, task.subtask_id) == (plan_id, s.subtask_id)
        progress = await rt.get_plan_progress(plan_id)
        assert progress.counts == {"completed": len(plan.subtasks)}
        assert progress.total == progress.done == len(plan.subtasks)
        assert progress.percent == 100.0
        assert await rt.get_execution_plan_status(plan_id) == "completed"
        assert await rt.get_execution_plan_status_cached(plan_id) == "completed"


async def test_a_diamond_step_by_step(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, diamond())
        a = await claim(rt, wait=0)
        assert a.task.subtask_id == "a"
        assert await rt.claim_task("w2", "job") is None  # b and c wait for a
        await finish(rt, a)
        first = await claim(rt, worker="w1")
        second = await claim(rt, worker="w2")
        assert {first.task.subtask_id, second.task.subtask_id} == {"b", "c"}  # both need only a
        tasks = await tasks_of(rt, plan_id)
        assert await task_status(rt, tasks["d"]) is TaskStatus.BLOCKED
        assert await rt.get_queued_tasks(10) == []
        await finish(rt, first)
        await finish(rt, second)
        d = await claim(rt, worker="w3")
        assert d.task.subtask_id == "d"
        await finish(rt, d)
        plan = await rt.wait_for_plan(plan_id, timeout=SOON)
        assert plan.status is PlanStatus.COMPLETED
        await assert_dependency_order(rt, plan)


async def test_the_fan_in_waits_for_every_branch(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, fan(20))
        await finish(rt, await claim(rt))  # root
        middle = [await claim(rt, worker=f"w{i}") for i in range(20)]
        assert sorted(c.task.subtask_id or "" for c in middle) == [f"m{i:02d}" for i in range(20)]
        for got in middle[:-1]:
            await finish(rt, got)
        await barrier(rt)
        assert await rt.claim_task("w1", "job") is None  # one branch is still running
        tasks = await tasks_of(rt, plan_id)
        assert await task_status(rt, tasks["sink"]) is TaskStatus.BLOCKED
        assert await rt.check_subtask_dependencies(tasks["sink"]) is False
        await finish(rt, middle[-1])
        sink = await claim(rt)
        assert sink.task.subtask_id == "sink"
        assert await rt.check_subtask_dependencies(tasks["sink"]) is True
        await finish(rt, sink)
        plan = await rt.wait_for_plan(plan_id, timeout=SOON)
        assert plan.status is PlanStatus.COMPLETED
        await assert_dependency_order(rt, plan)
        assert_one_task_per_subtask(db_path, plan)


async def test_a_dependent_is_not_queued_before_all_its_dependencies_complete(
    db_path: str,
) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, diamond())
        await finish(rt, await claim(rt))  # a
        b = await claim(rt, worker="w1")
        c = await claim(rt, worker="w2")
        await finish(rt, b)
        await barrier(rt)
        assert await rt.claim_task("w3", "job") is None  # d still needs c
        assert await rt.get_next_planned_subtask(plan_id) is None
        await finish(rt, c)
        d = await claim(rt, worker="w3")
        assert d.task.subtask_id == "d"
        await finish(rt, d)
        assert (await rt.wait_for_plan(plan_id, timeout=SOON)).status is PlanStatus.COMPLETED


# -- push, not poll --------------------------------------------------------------------------


async def test_a_waiting_claimer_gets_the_dependent_as_soon_as_its_dependency_completes(
    db_path: str,
) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, plan_of(sub("first", task_type="build"), sub("then", "first")))
        first = await claim(rt, "build")
        await rt.start_task(first.lease)
        got: list[Claim | None] = []

        async def waiter() -> None:
            got.append(await rt.claim_task("w2", "job", wait=SOON * 3))

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()  # the claim is parked: "then" is blocked
            assert got == []
            start = anyio.current_time()
            # The worker completes its task; nobody calls any plan operation.
            await rt.complete_task(first.lease, {"built": True})
        assert got[0] is not None
        assert got[0].task.subtask_id == "then"
        assert got[0].task.plan_id == plan_id
        # Woken by the completion, not by the end of its wait.
        assert anyio.current_time() - start < SOON


async def test_a_waiting_claimer_is_handed_the_roots_when_the_plan_starts(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await rt.create_execution_plan(plan_of(sub("root", task_type="deploy")))
        got: list[Claim | None] = []

        async def waiter() -> None:
            got.append(await rt.claim_task("w1", "deploy", wait=SOON * 3))

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            assert got == []
            assert await rt.mark_plan_execution_started(plan_id)
        assert got[0] is not None
        assert got[0].task.subtask_id == "root"


# -- failure policies ------------------------------------------------------------------------


def fail_fast_plan(**extra: Any) -> Spec:
    return plan_of(
        sub("boom", task_type="boom"),
        sub("slow", task_type="slow"),  # running when boom fails: it finishes
        sub("held", task_type="held"),  # claimed, not started: cancelled
        sub("idle", task_type="idle"),  # queued, never claimed: cancelled
        sub("next", "slow"),  # blocked: cancelled
        sub("after", "boom"),  # blocked: cancelled
        **extra,
    )


async def test_fail_fast_fails_the_plan_and_cancels_what_has_not_started(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, fail_fast_plan())
        tasks = await tasks_of(rt, plan_id)
        slow = await claim(rt, "slow")
        await rt.start_task(slow.lease)
        held = await claim(rt, "held", worker="w2")
        boom = await claim(rt, "boom", worker="w3")
        await rt.start_task(boom.lease)
        failed_task = await rt.fail_task(boom.lease, "disk full", retryable=False)
        assert failed_task.status is TaskStatus.FAILED

        plan = await rt.wait_for_plan(plan_id, timeout=SOON)
        assert plan.status is PlanStatus.FAILED
        assert plan.error is not None
        assert "'boom'" in plan.error
        assert "disk full" in plan.error
        assert plan.completed_at is not None
        assert await rt.get_execution_plan_status(plan_id) == "failed"
        assert await rt.get_execution_plan_status_cached(plan_id) == "failed"

        await barrier(rt)
        for name in ("held", "idle", "next", "after"):
            assert await task_status(rt, tasks[name]) is TaskStatus.CANCELLED, name
        assert await task_status(rt, tasks["slow"]) is TaskStatus.RUNNING
        with pytest.raises(LeaseLostError):
            await rt.start_task(held.lease)
        assert await rt.claim_task("w4", ["boom", "slow", "held", "idle", "job"]) is None

        # The running subtask still finishes, and its outcome is recorded.
        done = await rt.complete_task(slow.lease, {"late": True})
        assert done.status is TaskStatus.COMPLETED
        await barrier(rt)
        subtasks = await states(rt, plan_id)
        assert {k: s.status for k, s in subtasks.items()} == {
            "boom": SubtaskStatus.FAILED,
            "slow": SubtaskStatus.COMPLETED,
            "held": SubtaskStatus.CANCELLED,
            "idle": SubtaskStatus.CANCELLED,
            "next": SubtaskStatus.CANCELLED,
            "after": SubtaskStatus.CANCELLED,
        }
        assert subtasks["boom"].error is not None
        assert "disk full" in subtasks["boom"].error
        for name in ("boom", "slow", "held", "idle", "next", "after"):
            assert subtasks[name].completed_at is not None, name
        plan = await rt.wait_for_plan(plan_id, timeout=SOON)
        assert plan.status is PlanStatus.FAILED  # the late completion changes nothing
        progress = await rt.get_plan_progress(plan_id)
        assert progress.counts == {"failed": 1, "completed": 1, "cancelled": 4}
        assert progress.done == progress.total == 6
        # "next" depended on "slow", which completed: the failed plan queues nothing more.
        assert await task_status(rt, tasks["next"]) is TaskStatus.CANCELLED
        assert_one_task_per_subtask(db_path, plan)
        failed_events = [
            e for e in await all_events(rt) if e.type == "plan.failed" and e.plan_id == plan_id
        ]
        assert len(failed_events) == 1
        assert failed_events[0].data["subtask_id"] == "boom"
        # plan.failed is published before the cancellations it causes.
        mine = set(tasks.values())
        cancellations = [
            e.seq for e in await all_events(rt) if e.type == "task.cancelled" and e.task_id in mine
        ]
        assert len(cancellations) == 4
        assert failed_events[0].seq < min(cancellations)


async def test_fail_fast_is_the_default_policy(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, plan_of(sub("x"), sub("y", "x"), sub("z")))
        plan = await rt.get_execution_plan(plan_id)
        assert plan is not None
        assert plan.failure_policy is FailurePolicy.FAIL_FAST
        got = await claim(rt)
        await rt.fail_task(got.lease, "nope", retryable=False)
        plan = await rt.wait_for_plan(plan_id, timeout=SOON)
        assert plan.status is PlanStatus.FAILED
        assert plan.error is not None
        assert repr(got.task.subtask_id) in plan.error


async def test_continue_skips_the_dependents_of_a_failure_and_runs_the_rest(db_path: str) -> None:
    data = plan_of(
        sub("bad", task_type="bad"),
        sub("child", "bad"),
        sub("grandchild", "child"),
        sub("good", task_type="good"),
        sub("mixed", "good", "child"),  # downstream of bad through child: skipped
        sub("good2", "good", task_type="good"),
    )
    async with runtime(db_path) as rt:
        plan_id = await started(rt, data, failure_policy="continue")
        tasks = await tasks_of(rt, plan_id)
        bad = await claim(rt, "bad")
        await rt.start_task(bad.lease)
        await rt.fail_task(bad.lease, "broken", retryable=False)
        await barrier(rt)
        assert await rt.get_execution_plan_status(plan_id) == "executing"
        assert await rt.get_execution_plan_status_cached(plan_id) == "executing"
        subtasks = await states(rt, plan_id)
        assert subtasks["bad"].status is SubtaskStatus.FAILED
        for name in ("child", "grandchild", "mixed"):
            assert subtasks[name].status is SubtaskStatus.SKIPPED, name
            assert subtasks[name].error is not None
            assert await task_status(rt, tasks[name]) is TaskStatus.CANCELLED, name
        assert subtasks["good"].status is SubtaskStatus.READY

        # The independent branch goes on.
        await finish(rt, await claim(rt, "good"))
        good2 = await claim(rt, "good")
        assert good2.task.subtask_id == "good2"
        await finish(rt, good2)
        plan = await rt.wait_for_plan(plan_id, timeout=SOON)
        assert plan.status is PlanStatus.FAILED
        assert plan.error is not None
        assert "bad" in plan.error
        subtasks = await states(rt, plan_id)
        assert {k: s.status for k, s in subtasks.items()} == {
            "bad": SubtaskStatus.FAILED,
            "child": SubtaskStatus.SKIPPED,
            "grandchild": SubtaskStatus.SKIPPED,
            "good": SubtaskStatus.COMPLETED,
            "mixed": SubtaskStatus.SKIPPED,
            "good2": SubtaskStatus.COMPLETED,
        }
        progress = await rt.get_plan_progress(plan_id)
        assert progress.counts == {"failed": 1, "skipped": 3, "completed": 2}
        assert await rt.claim_task("w9", ["bad", "good", "job"]) is None
        assert_one_task_per_subtask(db_path, plan)
        ready = {
            str(e.data["subtask_id"])
            for e in await all_events(rt)
            if e.type == "plan.subtask_ready" and e.plan_id == plan_id
        }
        assert ready == {"bad", "good", "good2"}  # the skipped ones were never queued


@pytest.mark.parametrize("policy", ["fail_fast", "continue"])
async def test_a_plan_whose_subtasks_all_complete_is_completed(db_path: str, policy: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, diamond(), failure_policy=policy)
        plan = await run_workers(rt, plan_id)
        assert plan.status is PlanStatus.COMPLETED
        assert plan.failure_policy is FailurePolicy(policy)


@pytest.mark.parametrize("policy", ["fail_fast", "continue"])
async def test_retries_with_attempts_left_do_not_fail_the_plan(db_path: str, policy: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(
            rt, plan_of(sub("flaky", max_retries=2), sub("then", "flaky")), failure_policy=policy
        )
        tasks = await tasks_of(rt, plan_id)
        for attempt in (1, 2):
            got = await claim(rt)
            assert got.task.subtask_id == "flaky"
            assert got.lease.attempt == attempt
            await rt.start_task(got.lease)
            again = await rt.fail_task(got.lease, f"glitch {attempt}")
            assert again.status is TaskStatus.QUEUED
            await barrier(rt)
            assert await rt.get_execution_plan_status(plan_id) == "executing"
            assert (await states(rt, plan_id))["flaky"].status is SubtaskStatus.READY
        got = await claim(rt)
        assert (got.task.subtask_id, got.lease.attempt) == ("flaky", 3)
        await finish(rt, got)
        await finish(rt, await claim(rt))  # then
        plan = await rt.wait_for_plan(plan_id, timeout=SOON)
        assert plan.status is PlanStatus.COMPLETED
        assert len(await rt.get_runs(tasks["flaky"])) == 3
        assert_one_task_per_subtask(db_path, plan)
        ready = [
            e
            for e in await all_events(rt)
            if e.type == "plan.subtask_ready" and e.data.get("subtask_id") == "flaky"
        ]
        assert len(ready) == 1  # a retry requeues the task; it is not made ready again


async def test_a_timed_out_run_with_attempts_left_is_retried(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, plan_of(sub("slowpoke", timeout=0.2, max_retries=1)))
        # Claimed and started in one call: a run's timeout counts from its claim, so a
        # start_task of its own, 0.2 s late on a loaded machine, found the run timed out.
        first = await claim(rt, start=True)
        # Nothing reported: the run times out and the task comes back for another try.
        second = await claim(rt, worker="w2")
        assert second.task.subtask_id == "slowpoke"
        assert second.lease.attempt == 2
        runs = {run.id: run.status for run in await rt.get_runs(second.task.id)}
        assert runs[first.lease.run_id] is RunStatus.TIMED_OUT
        assert await rt.get_execution_plan_status(plan_id) == "executing"
        with pytest.raises(LeaseLostError):
            await rt.complete_task(first.lease, {})
        await finish(rt, second)
        plan = await rt.wait_for_plan(plan_id, timeout=SOON)
        assert plan.status is PlanStatus.COMPLETED


async def test_a_subtask_timing_out_for_good_fails_the_plan(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, plan_of(sub("hang", timeout=0.2, max_retries=0), sub("z")))
        # Started as claimed: the run's timeout counts from the claim (see above).
        got = await claim(rt, wait=0, start=True)
        assert got.task.subtask_id in ("hang", "z")
        if got.task.subtask_id == "z":
            await rt.complete_task(got.lease, {"ok": True})
            got = await claim(rt, start=True)
        plan = await rt.wait_for_plan(plan_id, timeout=SOON)
        assert plan.status is PlanStatus.FAILED
        assert plan.error is not None
        assert "'hang'" in plan.error
        tasks = await tasks_of(rt, plan_id)
        assert await task_status(rt, tasks["hang"]) is TaskStatus.TIMED_OUT
        await barrier(rt)
        assert (await states(rt, plan_id))["hang"].status is SubtaskStatus.FAILED


async def test_cancelling_a_subtask_task_ends_the_subtask_cancelled(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, plan_of(sub("a"), sub("b", "a"), sub("c")))
        tasks = await tasks_of(rt, plan_id)
        await rt.cancel_task(tasks["a"], reason="not needed")
        plan = await rt.wait_for_plan(plan_id, timeout=SOON)
        assert plan.status is PlanStatus.FAILED
        assert plan.error is not None
        assert "'a' was cancelled" in plan.error
        await barrier(rt)
        subtasks = await states(rt, plan_id)
        assert subtasks["a"].status is SubtaskStatus.CANCELLED
        assert subtasks["b"].status is SubtaskStatus.CANCELLED
        assert subtasks["c"].status is SubtaskStatus.CANCELLED
        assert await task_status(rt, tasks["c"]) is TaskStatus.CANCELLED


# -- cancelling a plan -----------------------------------------------------------------------


async def test_cancel_plan_mid_run_cancels_every_task_that_has_not_ended(db_path: str) -> None:
    data = plan_of(
        sub("done", task_type="done"),
        sub("running", task_type="run"),
        sub("held", task_type="held"),
        sub("queued", task_type="idle"),
        sub("blocked", "running"),
    )
    async with runtime(db_path) as rt:
        plan_id = await started(rt, data)
        tasks = await tasks_of(rt, plan_id)
        await finish(rt, await claim(rt, "done"))
        running = await claim(rt, "run")
        await rt.start_task(running.lease)
        held = await claim(rt, "held", worker="w2")
        async with rt.subscribe("plan.*", plan_id=plan_id) as events:
            plan = await rt.cancel_plan(plan_id, "operator said stop", source_agent="ops")
            assert plan.status is PlanStatus.CANCELLED
            assert plan.error == "operator said stop"
            assert plan.completed_at is not None
            with anyio.fail_after(SOON):
                event = await events.receive()
        assert event.type == "plan.cancelled"
        assert event.plan_id == event.correlation_id == plan_id
        assert event.source == "ops"
        assert event.data["reason"] == "operator said stop"
        assert await rt.get_execution_plan_status(plan_id) == "cancelled"
        assert await rt.get_execution_plan_status_cached(plan_id) == "cancelled"

        # cancel_plan returns once its tasks are cancelled, the running one included.
        for name in ("running", "held", "queued", "blocked"):
            assert await task_status(rt, tasks[name]) is TaskStatus.CANCELLED, name
        assert await task_status(rt, tasks["done"]) is TaskStatus.COMPLETED
        with pytest.raises(LeaseLostError):
            await rt.complete_task(running.lease, {"too": "late"})
        with pytest.raises(LeaseLostError):
            await rt.start_task(held.lease)
        assert await rt.claim_task("w3", ["done", "run", "held", "idle", "job"]) is None
        assert (await rt.wait_for_plan(plan_id, timeout=SOON)).status is PlanStatus.CANCELLED

        await barrier(rt)
        subtasks = await states(rt, plan_id)
        assert {k: s.status for k, s in subtasks.items()} == {
            "done": SubtaskStatus.COMPLETED,
            "running": SubtaskStatus.CANCELLED,
            "held": SubtaskStatus.CANCELLED,
            "queued": SubtaskStatus.CANCELLED,
            "blocked": SubtaskStatus.CANCELLED,
        }
        assert_one_task_per_subtask(db_path, plan)
        with pytest.raises(IllegalTransitionError) as caught:
            await rt.cancel_plan(plan_id)
        assert (caught.value.current, caught.value.requested) == ("cancelled", "cancelled")
        cancelled = [
            e for e in await all_events(rt) if e.type == "plan.cancelled" and e.plan_id == plan_id
        ]
        assert len(cancelled) == 1


@pytest.mark.parametrize("outcome", ["completed", "failed"])
async def test_cancelling_a_finished_plan_is_refused(db_path: str, outcome: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, plan_of(sub("only")))
        got = await claim(rt)
        if outcome == "completed":
            await finish(rt, got)
        else:
            await rt.fail_task(got.lease, "no", retryable=False)
        assert (await rt.wait_for_plan(plan_id, timeout=SOON)).status == outcome
        with pytest.raises(IllegalTransitionError) as caught:
            await rt.cancel_plan(plan_id, "too late")
        assert caught.value.current == outcome
        assert await rt.get_execution_plan_status(plan_id) == outcome
        assert await rt.get_execution_plan_status_cached(plan_id) == outcome


@pytest.mark.parametrize("materialized", [False, True])
async def test_cancelling_a_draft_plan(db_path: str, materialized: bool) -> None:
    async with runtime(db_path) as rt:
        plan_id = await rt.create_execution_plan(diamond())
        if materialized:
            assert await rt.create_planned_subtasks_from_plan(plan_id) == 4
        plan = await rt.cancel_plan(plan_id)
        assert plan.status is PlanStatus.CANCELLED
        assert plan.error == "plan cancelled"
        subtasks = await states(rt, plan_id)
        assert {s.status for s in subtasks.values()} == {SubtaskStatus.CANCELLED}
        count = 4 if materialized else 0
        cancelled = query(
            db_path,
            "SELECT COUNT(*) FROM tasks WHERE plan_id = ? AND status = 'cancelled'",
            plan_id,
        )
        assert cancelled == [(count,)]
        assert query(db_path, "SELECT COUNT(*) FROM tasks WHERE plan_id = ?", plan_id) == [(count,)]
        assert await rt.mark_plan_execution_started(plan_id) is False
        assert await rt.create_planned_subtasks_from_plan(plan_id) == 0
        with pytest.raises(IllegalTransitionError):
            await rt.approve_plan(plan_id)
        assert await rt.claim_task("w1", "job") is None


async def test_plan_operations_on_an_unknown_plan(db_path: str) -> None:
    async with runtime(db_path) as rt:
        for operation in (
            rt.cancel_plan,
            rt.approve_plan,
            rt.mark_plan_execution_started,
            rt.create_planned_subtasks_from_plan,
            rt.get_plan_progress,
            rt.wait_for_plan,
        ):
            with pytest.raises(NotFoundError) as caught:
                await operation("no-such-plan")
            assert caught.value.kind == "plan"
            assert caught.value.id == "no-such-plan"
        assert await rt.get_execution_plan("no-such-plan") is None
        assert await rt.get_execution_plan_status("no-such-plan") is None
        assert await rt.get_execution_plan_status_cached("no-such-plan") is None
        assert await rt.get_plan_subtasks("no-such-plan") == []
        assert await rt.get_next_planned_subtask("no-such-plan") is None
        assert await rt.get_execution_plans() == []


# -- operations ------------------------------------------------------------------------------


async def test_materializing_a_draft_creates_blocked_tasks_once(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await rt.create_execution_plan(diamond())
        assert await rt.get_plan_subtasks(plan_id) != []
        assert {s.task_id for s in await rt.get_plan_subtasks(plan_id)} == {None}
        assert await rt.create_planned_subtasks_from_plan(plan_id) == 4
        assert await rt.create_planned_subtasks_from_plan(plan_id) == 0
        plan = await rt.get_execution_plan(plan_id)
        assert plan is not None
        assert_one_task_per_subtask(db_path, plan)
        tasks = await tasks_of(rt, plan_id)
        for task_id in tasks.values():
            assert await task_status(rt, task_id) is TaskStatus.BLOCKED
        # A draft runs nothing.
        assert await rt.claim_task("w1", "job") is None
        assert await rt.get_queued_tasks(10) == []
        assert await rt.get_next_planned_subtask(plan_id) is None
        assert {s.status for s in await rt.get_plan_subtasks(plan_id)} == {SubtaskStatus.PENDING}
        assert await rt.get_execution_plan_status(plan_id) == "draft"
        progress = await rt.get_plan_progress(plan_id)
        assert progress.counts == {"pending": 4}
        assert not [e for e in await all_events(rt) if e.type == "plan.subtask_ready"]

        assert await rt.mark_plan_execution_started(plan_id) is True
        assert await rt.create_planned_subtasks_from_plan(plan_id) == 0
        assert await tasks_of(rt, plan_id) == tasks  # starting reused them
        got = await claim(rt, wait=0)
        assert got.task.id == tasks["a"]
        assert_one_task_per_subtask(db_path, plan)


async def test_starting_a_plan_creates_its_tasks_and_queues_the_roots(db_path: str) -> None:
    async with runtime(db_path) as rt:
        data = plan_of(sub("r1", priority=3), sub("r2", priority=7), sub("x", "r1", "r2"))
        plan_id = await rt.create_execution_plan(data)
        assert await rt.mark_plan_execution_started(plan_id) is True
        tasks = await tasks_of(rt, plan_id)
        assert await task_status(rt, tasks["r1"]) is TaskStatus.QUEUED
        assert await task_status(rt, tasks["r2"]) is TaskStatus.QUEUED
        assert await task_status(rt, tasks["x"]) is TaskStatus.BLOCKED
        assert await rt.create_planned_subtasks_from_plan(plan_id) == 0
        progress = await rt.get_plan_progress(plan_id)
        assert progress.status is PlanStatus.EXECUTING
        assert progress.counts == {"queued": 2, "pending": 1}
        assert (progress.total, progress.done) == (3, 0)
        subtasks = await states(rt, plan_id)
        assert subtasks["r1"].status is SubtaskStatus.READY
        assert subtasks["r1"].started_at is not None
        assert subtasks["x"].status is SubtaskStatus.PENDING
        assert subtasks["x"].dependencies == ("r1", "r2")


async def test_mark_plan_execution_started_only_from_draft_or_approved(db_path: str) -> None:
    async with runtime(db_path) as rt:
        draft = await rt.create_execution_plan(plan_of(sub("a")))
        assert await rt.mark_plan_execution_started(draft, source_agent="boss") is True
        assert await rt.mark_plan_execution_started(draft) is False  # executing already
        assert await rt.get_execution_plan_status(draft) == "executing"

        approved = await rt.create_execution_plan(plan_of(sub("a")), approved=True)
        assert await rt.get_execution_plan_status(approved) == "approved"
        assert await rt.mark_plan_execution_started(approved) is True

        approved_later = await rt.create_execution_plan(plan_of(sub("a")))
        await rt.approve_plan(approved_later)
        assert await rt.mark_plan_execution_started(approved_later) is True

        for plan_id in (draft, approved, approved_later):
            await finish(rt, await claim(rt))
            assert (await rt.wait_for_plan(plan_id, timeout=SOON)).status is PlanStatus.COMPLETED
            assert await rt.mark_plan_execution_started(plan_id) is False
            assert await rt.get_execution_plan_status(plan_id) == "completed"
        started_events = [e for e in await all_events(rt) if e.type == "plan.started"]
        assert [e.plan_id for e in started_events] == [draft, approved, approved_later]
        assert started_events[0].source == "boss"
        assert started_events[0].data["previous"] == "draft"
        assert started_events[1].data["previous"] == "approved"


async def test_approve_plan_moves_a_draft_to_approved_only(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await rt.create_execution_plan(plan_of(sub("a")))
        assert await rt.get_execution_plan_status(plan_id) == "draft"
        plan = await rt.approve_plan(plan_id, source_agent="reviewer")
        assert plan.status is PlanStatus.APPROVED
        assert await rt.get_execution_plan_status(plan_id) == "approved"
        assert await rt.get_execution_plan_status_cached(plan_id) == "approved"
        with pytest.raises(IllegalTransitionError) as caught:
            await rt.approve_plan(plan_id)
        assert (caught.value.current, caught.value.requested) == ("approved", "approved")
        assert await rt.claim_task("w1", "job") is None  # approved is not started
        assert await rt.mark_plan_execution_started(plan_id)
        with pytest.raises(IllegalTransitionError) as caught:
            await rt.approve_plan(plan_id)
        assert caught.value.current == "executing"
        approved_events = [e for e in await all_events(rt) if e.type == "plan.approved"]
        assert len(approved_events) == 1
        assert approved_events[0].source == "reviewer"
        assert approved_events[0].data["previous"] == "draft"


async def test_plan_status_and_its_cached_copy_agree_at_every_step(db_path: str) -> None:
    async with runtime(db_path) as rt:

        async def both(plan_id: str) -> str | None:
            stored = await rt.get_execution_plan_status(plan_id)
            cached = await rt.get_execution_plan_status_cached(plan_id)
            assert stored == cached
            plan = await rt.get_execution_plan(plan_id)
            assert (plan.status.value if plan else None) == stored
            return stored

        assert await both("unknown-plan") is None
        done = await rt.create_execution_plan(plan_of(sub("a"), sub("b", "a")))
        assert await both(done) == "draft"
        await rt.approve_plan(done)
        assert await both(done) == "approved"
        await rt.create_planned_subtasks_from_plan(done)
        assert await both(done) == "approved"
        await rt.mark_plan_execution_started(done)
        assert await both(done) == "executing"
        await finish(rt, await claim(rt))
        assert await both(done) == "executing"
        await finish(rt, await claim(rt))
        await rt.wait_for_plan(done, timeout=SOON)
        assert await both(done) == "completed"

        failed = await started(rt, plan_of(sub("a")))
        assert await both(failed) == "executing"
        await rt.fail_task((await claim(rt)).lease, "no", retryable=False)
        await rt.wait_for_plan(failed, timeout=SOON)
        assert await both(failed) == "failed"

        cancelled = await rt.create_execution_plan(plan_of(sub("a")))
        await rt.cancel_plan(cancelled)
        assert await both(cancelled) == "cancelled"
        for plan_id, status in ((done, "completed"), (failed, "failed"), (cancelled, "cancelled")):
            assert await both(plan_id) == status

    # A fresh runtime (empty cache) reads the same from the database.
    async with runtime(db_path) as rt:
        for plan_id, status in ((done, "completed"), (failed, "failed"), (cancelled, "cancelled")):
            assert await rt.get_execution_plan_status_cached(plan_id) == status
            assert await rt.get_execution_plan_status(plan_id) == status
        assert await rt.get_execution_plan_status_cached("unknown-plan") is None


async def test_check_subtask_dependencies(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, diamond())
        tasks = await tasks_of(rt, plan_id)
        plain = await rt.create_task("job", {"n": 1})
        assert await rt.check_subtask_dependencies(plain) is True  # no plan: nothing to wait for
        assert await rt.check_subtask_dependencies(tasks["a"]) is True  # no dependencies
        for name in ("b", "c", "d"):
            assert await rt.check_subtask_dependencies(tasks[name]) is False, name
        with pytest.raises(NotFoundError) as caught:
            await rt.check_subtask_dependencies("no-such-task")
        assert (caught.value.kind, caught.value.id) == ("task", "no-such-task")

        a = await claim(rt, wait=0)
        assert a.task.id == tasks["a"]
        await rt.start_task(a.lease)
        assert await rt.check_subtask_dependencies(tasks["b"]) is False  # running, not done
        await rt.complete_task(a.lease, {})
        assert await rt.check_subtask_dependencies(tasks["b"]) is True
        assert await rt.check_subtask_dependencies(tasks["c"]) is True
        assert await rt.check_subtask_dependencies(tasks["d"]) is False  # b and c pending

        batch = await rt.check_subtask_dependencies_batch(
            [tasks["a"], tasks["b"], tasks["c"], tasks["d"], plain, "no-such-task", tasks["d"]]
        )
        assert batch == {
            tasks["a"]: True,
            tasks["b"]: True,
            tasks["c"]: True,
            tasks["d"]: False,
            plain: True,
        }
        assert await rt.check_subtask_dependencies_batch([]) == {}
        assert await rt.check_subtask_dependencies_batch(["nope", "nada"]) == {}
        with pytest.raises(InvalidInputError) as bad:
            await rt.check_subtask_dependencies_batch(tasks["a"])
        assert bad.value.field == "task_ids"
        with pytest.raises(InvalidInputError) as bad:
            await rt.check_subtask_dependencies_batch([tasks["a"], 3])  # type: ignore[list-item]
        assert bad.value.field == "task_ids[1]"

        # d needs both: one completed is not enough.
        await finish(rt, await claim(rt, worker="w1"))
        await barrier(rt)
        assert await rt.check_subtask_dependencies(tasks["d"]) is False
        await finish(rt, await claim(rt, worker="w2"))
        assert await rt.check_subtask_dependencies(tasks["d"]) is True


async def test_a_failed_dependency_never_counts_as_met(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, plan_of(sub("a"), sub("b", "a")), failure_policy="continue")
        tasks = await tasks_of(rt, plan_id)
        await rt.fail_task((await claim(rt)).lease, "no", retryable=False)
        assert (await rt.wait_for_plan(plan_id, timeout=SOON)).status is PlanStatus.FAILED
        assert await rt.check_subtask_dependencies(tasks["b"]) is False


async def test_get_next_planned_subtask_is_the_best_queued_task_of_the_plan(db_path: str) -> None:
    async with runtime(db_path) as rt:
        data = plan_of(
            sub("low", priority=1),
            sub("high", priority=9),
            sub("mid", priority=5),
            sub("mid2", priority=5),
            sub("later", "low", priority=100),
        )
        plan_id = await rt.create_execution_plan(data)
        assert await rt.get_next_planned_subtask(plan_id) is None  # a draft queues nothing
        await rt.mark_plan_execution_started(plan_id)
        other = await started(rt, plan_of(sub("elsewhere", priority=50)))
        await rt.create_task("job", priority=1000)  # not of the plan
        order: list[str | None] = []
        for _ in range(4):
            best = await rt.get_next_planned_subtask(plan_id)
            assert best is not None
            assert best.plan_id == plan_id
            assert best.status is TaskStatus.QUEUED
            order.append(best.subtask_id)
            # Take exactly that task off the queue (not a claim, which could pick another).
            await rt.update_task_status(best.id, "assigned")
        assert order == ["high", "mid", "mid2", "low"]
        assert await rt.get_next_planned_subtask(plan_id) is None  # "later" is blocked
        nxt = await rt.get_next_planned_subtask(other)
        assert nxt is not None
        assert nxt.subtask_id == "elsewhere"


async def test_get_plan_progress_counts_subtasks_by_status(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await rt.create_execution_plan(fan(3))
        progress = await rt.get_plan_progress(plan_id)
        assert (progress.plan_id, progress.status) == (plan_id, PlanStatus.DRAFT)
        assert progress.counts == {"pending": 5}
        assert (progress.total, progress.done, progress.percent) == (5, 0, 0.0)
        await rt.mark_plan_execution_started(plan_id)
        assert (await rt.get_plan_progress(plan_id)).counts == {"queued": 1, "pending": 4}
        root = await claim(rt)
        assert (await rt.get_plan_progress(plan_id)).counts == {"assigned": 1, "pending": 4}
        await rt.start_task(root.lease)
        assert (await rt.get_plan_progress(plan_id)).counts == {"running": 1, "pending": 4}
        await rt.complete_task(root.lease, {})
        m0 = await claim(rt)  # the middle was queued: the root's completion was handled
        await barrier(rt)
        progress = await rt.get_plan_progress(plan_id)
        assert progress.counts == {"completed": 1, "assigned": 1, "queued": 2, "pending": 1}
        assert (progress.total, progress.done) == (5, 1)
        assert progress.percent == 20.0
        await finish(rt, m0)
        await finish(rt, await claim(rt))
        await finish(rt, await claim(rt))
        await finish(rt, await claim(rt))  # sink
        await rt.wait_for_plan(plan_id, timeout=SOON)
        progress = await rt.get_plan_progress(plan_id)
        assert progress.status is PlanStatus.COMPLETED
        assert progress.counts == {"completed": 5}
        assert progress.percent == 100.0


async def test_get_execution_plans_lists_by_status_newest_first(db_path: str) -> None:
    async with runtime(db_path) as rt:
        first = await rt.create_execution_plan(plan_of(sub("a")))
        second = await rt.create_execution_plan(plan_of(sub("a")), approved=True)
        third = await rt.create_execution_plan(plan_of(sub("a")))
        running = await started(rt, plan_of(sub("b", task_type="other")))
        await rt.cancel_plan(third)
        assert [p.id for p in await rt.get_execution_plans()] == [running, third, second, first]
        assert [p.id for p in await rt.get_execution_plans(limit=2)] == [running, third]
        assert [p.id for p in await rt.get_execution_plans("draft")] == [first]
        assert [p.id for p in await rt.get_execution_plans(PlanStatus.APPROVED)] == [second]
        assert [p.id for p in await rt.get_execution_plans("cancelled")] == [third]
        executing = await rt.get_execution_plans("executing")
        assert [p.id for p in executing] == [running]
        assert executing[0].status is PlanStatus.EXECUTING
        assert await rt.get_execution_plans("completed") == []
        with pytest.raises(InvalidInputError) as caught:
            await rt.get_execution_plans("running")
        assert caught.value.field == "status"


async def test_get_execution_plan_keeps_every_field(db_path: str) -> None:
    data = plan_of(
        sub(
            "build",
            title="Build it",
            description="compile everything",
            payload={"target": "all", "flags": ["-O2"]},
            priority=7,
            max_retries=5,
            timeout=60,
            requires=["docker", "linux"],
            estimated_duration=12.5,
        ),
        sub("test", "build"),
        {"id": "ship", "type": "deploy", "dependencies": ["build", "test"]},
        title="Release 1.0",
        owner={"team": "infra"},
    )
    async with runtime(db_path) as rt:
        request = await rt.queue_planning_request("release")
        plan_id = await rt.create_execution_plan(
            data,
            planning_task_id=request.id,
            estimated_duration=3600,
            estimated_complexity="high",
            generated_workflow="build >> test >> ship",
            failure_policy=FailurePolicy.CONTINUE,
            source_agent="planner-1",
        )
        plan = await rt.get_execution_plan(plan_id)
        assert plan is not None
        assert plan.id == plan_id
        assert plan.status is PlanStatus.DRAFT
        assert plan.planning_task_id == request.id
        assert (plan.subtask_count, plan.dependency_count) == (3, 3)
        assert plan.failure_policy is FailurePolicy.CONTINUE
        assert (plan.estimated_duration, plan.estimated_complexity) == (3600, "high")
        assert plan.generated_workflow == "build >> test >> ship"
        assert plan.source_agent == "planner-1"
        assert plan.generated_at.tzinfo is not None
        assert (plan.started_at, plan.completed_at, plan.error) == (None, None, None)
        assert plan.title == "Release 1.0"
        assert plan.plan_data["title"] == "Release 1.0"
        assert plan.plan_data["owner"] == {"team": "infra"}
        assert [s.id for s in plan.subtasks] == ["build", "test", "ship"]
        assert [s.subtask_id for s in await rt.get_plan_subtasks(plan_id)] == [
            "build",
            "test",
            "ship",
        ]
        build, test, ship = plan.subtasks
        assert (build.title, build.description) == ("Build it", "compile everything")
        assert build.payload == {"target": "all", "flags": ["-O2"]}
        assert (build.priority, build.max_retries, build.timeout) == (7, 5, 60)
        assert (build.requires, build.estimated_duration) == (("docker", "linux"), 12.5)
        assert (test.task_type, test.dependencies, test.priority, test.max_retries) == (
            "job",
            ("build",),
            1,
            3,
        )
        assert (ship.task_type, ship.dependencies) == ("deploy", ("build", "test"))  # "type"
        stored = query(
            db_path,
            "SELECT subtask_count, dependency_count, planning_task_id, failure_policy,"
            " source_agent, status FROM execution_plans WHERE id = ?",
            plan_id,
        )
        assert stored == [(3, 3, request.id, "continue", "planner-1", "draft")]

        # The tasks carry what their subtasks say, and name their plan.
        assert await rt.mark_plan_execution_started(plan_id)
        tasks = await tasks_of(rt, plan_id)
        task = await rt.get_task(tasks["build"])
        assert task is not None
        assert (task.title, task.task_type, task.description) == (
            "Build it",
            "job",
            "compile everything",
        )
        assert task.payload == {"target": "all", "flags": ["-O2"]}
        assert (task.priority, task.max_retries, task.timeout) == (7, 5, 60)
        assert task.requires == ("docker", "linux")
        assert (task.plan_id, task.subtask_id) == (plan_id, "build")
        assert (task.correlation_id, task.source_agent) == (plan_id, "planner-1")
        ship_task = await rt.get_task(tasks["ship"])
        assert ship_task is not None
        assert (ship_task.title, ship_task.task_type) == ("ship", "deploy")

    # The same after a reopen, from the database.
    async with runtime(db_path) as rt:
        again = await rt.get_execution_plan(plan_id)
        assert again is not None
        assert again.subtasks == plan.subtasks
        assert again.plan_data["title"] == "Release 1.0"
        assert again.plan_data["owner"] == {"team": "infra"}
        assert (again.subtask_count, again.dependency_count) == (3, 3)
        assert again.planning_task_id == request.id
        assert again.failure_policy is FailurePolicy.CONTINUE
        assert again.status is PlanStatus.EXECUTING


async def test_type_is_an_alias_of_task_type(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, plan_of({"id": "x", "type": "lint"}))
        plan = await rt.get_execution_plan(plan_id)
        assert plan is not None
        assert plan.subtasks[0].task_type == "lint"
        got = await claim(rt, "lint")
        assert got.task.task_type == "lint"
        assert got.task.subtask_id == "x"
        # Both, agreeing, are fine; disagreeing is refused.
        same = plan_of({"id": "y", "type": "lint", "task_type": "lint"})
        assert await rt.create_execution_plan(same)
        with pytest.raises(InvalidInputError) as caught:
            await rt.create_execution_plan(plan_of({"id": "z", "type": "a", "task_type": "b"}))
        assert caught.value.field == "plan_data.subtasks[0].type"


# -- the planning queue ----------------------------------------------------------------------


async def test_planning_requests_are_claimed_by_priority_then_age(db_path: str) -> None:
    async with runtime(db_path) as rt:
        assert await rt.claim_planning_request("planner") is None
        low = await rt.queue_planning_request("tidy up", priority=10)
        old = await rt.queue_planning_request(
            "Deploy to production",
            priority=90,
            requestor="alice",
            context_data={"env": "prod", "regions": ["eu", "us"]},
            complexity_estimate="high",
        )
        new = await rt.queue_planning_request("Rotate keys", priority=90)
        assert old.status is PlanningStatus.PENDING
        assert (old.priority, old.requestor, old.complexity_estimate) == (90, "alice", "high")
        assert old.context_data == {"env": "prod", "regions": ["eu", "us"]}
        assert await rt.get_planning_request(old.id) == old
        assert await rt.get_planning_request("no-such-request") is None
        queue = await rt.get_planning_queue()
        assert [r.id for r in queue] == [old.id, new.id, low.id]

        claimed = []
        for agent in ("p1", "p2", "p3"):
            got = await rt.claim_planning_request(agent)
            assert got is not None
            assert got.status is PlanningStatus.ASSIGNED
            assert got.assigned_agent == agent
            assert got.assigned_at is not None
            claimed.append(got.id)
        assert claimed == [old.id, new.id, low.id]
        assert await rt.claim_planning_request("p4") is None
        assert await rt.get_planning_queue() == []
        assigned = await rt.get_planning_queue("assigned")
        assert [r.id for r in assigned] == [old.id, new.id, low.id]
        stored = await rt.get_planning_request(old.id)
        assert stored is not None
        assert (stored.status, stored.assigned_agent) == (PlanningStatus.ASSIGNED, "p1")
        assert stored.context_data == {"env": "prod", "regions": ["eu", "us"]}
        # Each event names who acted: the requestor queued it, the planner took it.
        events = await rt.read_events(correlation_id=old.id)
        assert [(e.type, e.source) for e in events] == [
            ("planning.requested", "alice"),
            ("planning.assigned", "p1"),
        ]


async def test_a_waiting_planner_is_woken_by_a_request_queued_later(db_path: str) -> None:
    async with runtime(db_path) as rt:
        got: list[Any] = []

        async def planner() -> None:
            got.append(await rt.claim_planning_request("planner", wait=SOON * 3))

        async with anyio.create_task_group() as tg:
            tg.start_soon(planner)
            await anyio.wait_all_tasks_blocked()  # it is waiting, subscribed
            assert got == []
            start = anyio.current_time()
            request = await rt.queue_planning_request("Deploy to production")
        assert got[0] is not None
        assert got[0].id == request.id
        assert got[0].assigned_agent == "planner"
        assert anyio.current_time() - start < SOON


async def test_a_waiting_planner_ends_empty_at_its_deadline(db_path: str) -> None:
    async with runtime(db_path) as rt:
        start = anyio.current_time()
        assert await rt.claim_planning_request("planner", wait=0.2) is None
        assert anyio.current_time() - start >= 0.19
        # A request left pending is not lost by a planner that gave up.
        request = await rt.queue_planning_request("later")
        got = await rt.claim_planning_request("other")
        assert got is not None
        assert got.id == request.id


async def test_cancel_and_fail_planning_requests(db_path: str) -> None:
    async with runtime(db_path) as rt:
        # Both claimed (assigned): one is withdrawn, its planner gives up on the other.
        pending = await rt.queue_planning_request("withdrawn", priority=99)
        assigned = await rt.queue_planning_request("too hard")
        taken = await rt.claim_planning_request("planner")
        assert taken is not None
        assert taken.id == pending.id  # the best one
        other = await rt.claim_planning_request("planner")
        assert other is not None
        assert other.id == assigned.id

        cancelled = await rt.cancel_planning_request(pending.id, "changed my mind")
        assert cancelled.status is PlanningStatus.CANCELLED
        assert cancelled.error == "changed my mind"
        assert cancelled.completed_at is not None
        failed = await rt.fail_planning_request(assigned.id, "cannot plan this")
        assert failed.status is PlanningStatus.FAILED
        assert failed.error == "cannot plan this"
        assert await rt.get_planning_request(pending.id) == cancelled
        assert await rt.get_planning_request(assigned.id) == failed

        for request_id in (pending.id, assigned.id):
            with pytest.raises(IllegalTransitionError):
                await rt.cancel_planning_request(request_id)
            with pytest.raises(IllegalTransitionError):
                await rt.fail_planning_request(request_id, "again")
        with pytest.raises(NotFoundError):
            await rt.cancel_planning_request("no-such-request")
        with pytest.raises(InvalidInputError) as caught:
            await rt.fail_planning_request(assigned.id, "  ")
        assert caught.value.field == "error"
        assert [r.id for r in await rt.get_planning_queue("cancelled")] == [pending.id]
        assert [r.id for r in await rt.get_planning_queue("failed")] == [assigned.id]
        assert len(await rt.get_planning_queue(None)) == 2


async def test_a_cancelled_pending_request_is_never_claimed(db_path: str) -> None:
    async with runtime(db_path) as rt:
        first = await rt.queue_planning_request("first", priority=80)
        second = await rt.queue_planning_request("second", priority=20)
        await rt.cancel_planning_request(first.id)
        got = await rt.claim_planning_request("planner")
        assert got is not None
        assert got.id == second.id
        assert await rt.claim_planning_request("planner") is None


async def test_a_plan_for_a_request_marks_it_planned(db_path: str) -> None:
    async with runtime(db_path) as rt:
        request = await rt.queue_planning_request("Deploy to production")
        claimed = await rt.claim_planning_request("planner")
        assert claimed is not None
        plan_id = await rt.create_execution_plan(
            diamond(), planning_task_id=request.id, source_agent="planner"
        )
        planned = await rt.get_planning_request(request.id)
        assert planned is not None
        assert planned.status is PlanningStatus.PLANNED
        assert planned.completed_at is not None
        plan = await rt.get_execution_plan(plan_id)
        assert plan is not None
        assert plan.planning_task_id == request.id
        assert await rt.get_planning_queue("assigned") == []
        with pytest.raises(IllegalTransitionError):
            await rt.fail_planning_request(request.id, "too late")
        events = [e for e in await all_events(rt) if e.correlation_id == request.id]
        assert [e.type for e in events] == [
            "planning.requested",
            "planning.assigned",
            "planning.planned",
        ]
        assert events[-1].data["plan_id"] == plan_id

        # A pending (unclaimed) request can be answered directly too.
        direct = await rt.queue_planning_request("quick one")
        await rt.create_execution_plan(plan_of(sub("x")), planning_task_id=direct.id)
        answered = await rt.get_planning_request(direct.id)
        assert answered is not None
        assert answered.status is PlanningStatus.PLANNED
        assert await rt.claim_planning_request("planner") is None
        with pytest.raises(NotFoundError):
            await rt.create_execution_plan(plan_of(sub("x")), planning_task_id="no-such-request")


@pytest.mark.parametrize(
    ("title", "description"), [("Nightly build", "Nightly build"), (None, None)]
)
async def test_a_plan_without_a_request_gets_a_planned_one(
    db_path: str, title: str | None, description: str | None
) -> None:
    async with runtime(db_path) as rt:
        extra = {} if title is None else {"title": title}
        plan_id = await rt.create_execution_plan(plan_of(sub("x"), **extra), source_agent="cron")
        plan = await rt.get_execution_plan(plan_id)
        assert plan is not None
        request = await rt.get_planning_request(plan.planning_task_id)
        assert request is not None
        assert request.status is PlanningStatus.PLANNED
        assert request.requestor == "cron"
        if description is not None:
            assert request.task_description == description
        else:
            assert request.task_description  # a default description
        assert await rt.get_planning_queue() == []
        assert await rt.claim_planning_request("planner") is None
        assert [r.id for r in await rt.get_planning_queue("planned")] == [request.id]


async def test_planning_queue_input_is_checked(db_path: str) -> None:
    async with runtime(db_path) as rt:
        loose: Any = rt  # wrong types on purpose
        cases: list[tuple[str, tuple[Any, ...], dict[str, Any], str]] = [
            ("queue_planning_request", (5,), {}, "task_description"),
            ("queue_planning_request", ("x",), {"priority": -1}, "priority"),
            ("queue_planning_request", ("x",), {"priority": "high"}, "priority"),
            ("queue_planning_request", ("x",), {"context_data": [1]}, "context_data"),
            ("queue_planning_request", ("x",), {"requestor": ""}, "requestor"),
            ("claim_planning_request", ("",), {}, "agent_id"),
            ("claim_planning_request", ("p",), {"wait": -1}, "wait"),
            ("get_planning_queue", ("nonsense",), {}, "status"),
            ("get_planning_request", ("",), {}, "request_id"),
            ("cancel_planning_request", ("",), {}, "request_id"),
            ("fail_planning_request", ("r", ""), {}, "error"),
        ]
        for name, args, kwargs, field in cases:
            with pytest.raises(InvalidInputError) as caught:
                await getattr(loose, name)(*args, **kwargs)
            assert caught.value.field == field, name
        assert query(db_path, "SELECT COUNT(*) FROM planning_queue") == [(0,)]


# -- events ----------------------------------------------------------------------------------


async def test_plan_events_carry_the_plan_id_as_correlation_id(db_path: str) -> None:
    async with runtime(db_path) as rt:
        async with rt.subscribe("plan.*") as live:
            plan_id = await rt.create_execution_plan(
                plan_of(sub("a"), sub("b", "a")), source_agent="planner"
            )
            await rt.approve_plan(plan_id)
            await rt.mark_plan_execution_started(plan_id)
            await finish(rt, await claim(rt))
            await finish(rt, await claim(rt))
            seen: list[Event] = []
            with anyio.fail_after(SOON):
                async for event in live:
                    seen.append(event)
                    if event.type == "plan.completed":
                        break
        assert [e.type for e in seen] == [
            "plan.created",
            "plan.approved",
            "plan.started",
            "plan.subtask_ready",
            "plan.subtask_ready",
            "plan.completed",
        ]
        assert [e.data.get("subtask_id") for e in seen if e.type == "plan.subtask_ready"] == [
            "a",
            "b",
        ]
        for event in seen:
            assert event.plan_id == plan_id, event
            assert event.correlation_id == plan_id, event
        created = seen[0]
        assert created.source == "planner"
        assert created.data["subtask_count"] == 2
        assert created.data["dependency_count"] == 1
        assert created.data["failure_policy"] == "fail_fast"
        assert created.data["status"] == "draft"
        assert seen[-1].data["status"] == "completed"
        assert seen[-1].data["previous"] == "executing"

        failed = await started(rt, plan_of(sub("a")))
        await rt.fail_task((await claim(rt)).lease, "no", retryable=False)
        await rt.wait_for_plan(failed, timeout=SOON)
        cancelled = await started(rt, plan_of(sub("a")))
        await rt.cancel_plan(cancelled)

        log = await all_events(rt)
        for pid, last in ((plan_id, "plan.completed"), (failed, "plan.failed")):
            kinds = [e.type for e in log if e.type.startswith("plan.") and e.plan_id == pid]
            assert kinds[-1] == last
        ends = {
            e.plan_id: e.type
            for e in log
            if e.type in ("plan.completed", "plan.failed", "plan.cancelled")
        }
        assert ends[plan_id] == "plan.completed"
        assert ends[failed] == "plan.failed"
        assert ends[cancelled] == "plan.cancelled"
        for event in log:
            if event.type.startswith("plan."):
                assert event.plan_id is not None, event
                assert event.correlation_id == event.plan_id, event

        # Every event of a plan's tasks names the plan, as plan id and correlation id.
        for pid in (plan_id, failed, cancelled):
            task_ids = set((await tasks_of(rt, pid)).values())
            mine = [e for e in log if e.task_id in task_ids]
            assert mine
            for event in mine:
                assert event.plan_id == pid, event
                assert event.correlation_id == pid, event
        task_event_types = {e.type for e in log if e.plan_id == plan_id and e.task_id is not None}
        assert {
            "task.created",
            "task.assigned",
            "task.started",
            "task.completed",
            "plan.subtask_ready",
        } <= task_event_types


async def test_wait_for_plan_times_out_on_a_plan_that_has_not_ended(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, plan_of(sub("a")))
        with pytest.raises(TimeoutError):
            await rt.wait_for_plan(plan_id, timeout=0.1)
        await finish(rt, await claim(rt))
        assert (await rt.wait_for_plan(plan_id, timeout=SOON)).status is PlanStatus.COMPLETED


async def test_a_subscription_filtered_by_plan_sees_only_that_plan(db_path: str) -> None:
    async with runtime(db_path) as rt:
        mine = await rt.create_execution_plan(plan_of(sub("a", task_type="mine")))
        other = await rt.create_execution_plan(plan_of(sub("a", task_type="theirs")))
        async with rt.subscribe("plan.*", plan_id=mine) as live:
            await rt.mark_plan_execution_started(other)
            await rt.mark_plan_execution_started(mine)
            await finish(rt, await claim(rt, "theirs"))
            await finish(rt, await claim(rt, "mine"))
            seen = []
            with anyio.fail_after(SOON):
                async for event in live:
                    seen.append(event)
                    if event.type == "plan.completed":
                        break
        assert [e.type for e in seen] == ["plan.started", "plan.subtask_ready", "plan.completed"]
        assert {e.plan_id for e in seen} == {mine}


# -- validation: refused whole, nothing written ----------------------------------------------

_TABLES = ("execution_plans", "plan_execution", "planning_queue", "tasks", "events")


def written(db_path: str) -> dict[str, int]:
    return {t: int(query(db_path, f"SELECT COUNT(*) FROM {t}")[0][0]) for t in _TABLES}


BAD_PLANS: list[tuple[str, Any, str, str]] = [
    ("empty", {"subtasks": []}, "plan_data.subtasks", "at least one"),
    ("missing", {"title": "no subtasks"}, "plan_data.subtasks", "missing"),
    ("not-a-list", {"subtasks": {"id": "a"}}, "plan_data.subtasks", "list"),
    ("none", {"subtasks": None}, "plan_data.subtasks", ""),
    ("subtask-not-object", {"subtasks": ["a"]}, "plan_data.subtasks[0]", ""),
    (
        "duplicate-id",
        plan_of(sub("a"), sub("a")),
        "plan_data.subtasks[1].id",
        "subtasks[0]",
    ),
    (
        "unknown-dependency",
        plan_of(sub("a", "ghost")),
        "plan_data.subtasks[0].dependencies[0]",
        "'ghost'",
    ),
    (
        "unknown-second-dependency",
        plan_of(sub("a"), sub("b", "a", "ghost")),
        "plan_data.subtasks[1].dependencies[1]",
        "'ghost'",
    ),
    ("cycle", plan_of(sub("a", "b"), sub("b", "a")), "plan_data.subtasks", "'a' -> 'b' -> 'a'"),
    (
        "longer-cycle",
        plan_of(sub("x"), sub("a", "c", "x"), sub("b", "a"), sub("c", "b")),
        "plan_data.subtasks",
        "'a' -> 'b' -> 'c' -> 'a'",
    ),
    ("self-dependency", plan_of(sub("a", "a")), "plan_data.subtasks", "'a' -> 'a'"),
    (
        "misspelt-key",
        {"subtasks": [{"id": "a", "task_type": "job", "dependecies": ["b"]}]},
        "plan_data.subtasks[0]",
        "dependecies",
    ),
    ("missing-id", {"subtasks": [{"task_type": "job"}]}, "plan_data.subtasks[0]", "id"),
    ("missing-type", {"subtasks": [{"id": "a"}]}, "plan_data.subtasks[0]", "task_type"),
    ("priority-str", plan_of(sub("a", priority="high")), "plan_data.subtasks[0].priority", ""),
    ("priority-negative", plan_of(sub("a", priority=-1)), "plan_data.subtasks[0].priority", ""),
    ("priority-huge", plan_of(sub("a", priority=2**40)), "plan_data.subtasks[0].priority", ""),
    ("priority-float", plan_of(sub("a", priority=1.5)), "plan_data.subtasks[0].priority", ""),
    ("empty-task-type", plan_of(sub("a", task_type="")), "plan_data.subtasks[0].task_type", ""),
    ("blank-task-type", plan_of(sub("a", task_type="  ")), "plan_data.subtasks[0].task_type", ""),
    (
        "task-type-int",
        {"subtasks": [{"id": "a", "task_type": 3}]},
        "plan_data.subtasks[0].task_type",
        "",
    ),
    ("empty-id", plan_of(sub("")), "plan_data.subtasks[0].id", ""),
    ("id-int", {"subtasks": [{"id": 1, "task_type": "job"}]}, "plan_data.subtasks[0].id", ""),
    (
        "dependencies-str",
        plan_of(sub("a"), sub("b", dependencies="a")),
        "plan_data.subtasks[1].dependencies",
        "",
    ),
    (
        "dependency-empty",
        plan_of(sub("a"), sub("b", dependencies=[""])),
        "plan_data.subtasks[1].dependencies[0]",
        "",
    ),
    (
        "max-retries-negative",
        plan_of(sub("a", max_retries=-1)),
        "plan_data.subtasks[0].max_retries",
        "",
    ),
    ("timeout-zero", plan_of(sub("a", timeout=0)), "plan_data.subtasks[0].timeout", ""),
    ("payload-not-object", plan_of(sub("a", payload=[1])), "plan_data.subtasks[0].payload", ""),
    ("title-empty", plan_of(sub("a", title=" ")), "plan_data.subtasks[0].title", ""),
    ("requires-empty", plan_of(sub("a", requires=[""])), "plan_data.subtasks[0].requires[0]", ""),
    (
        "requires-too-many",
        plan_of(sub("a", requires=[f"r{n}" for n in range(257)])),
        "plan_data.subtasks[0].requires",
        "more than 256",
    ),
    ("plan-data-list", [sub("a")], "plan_data", "dict"),
    ("plan-data-str", "subtasks", "plan_data", ""),
    ("plan-data-none", None, "plan_data.subtasks", ""),
]


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [case[1:] for case in BAD_PLANS],
    ids=[case[0] for case in BAD_PLANS],
)
async def test_a_bad_plan_is_refused_and_nothing_is_written(
    db_path: str, data: Any, field: str, reason: str
) -> None:
    async with runtime(db_path) as rt:
        before = written(db_path)
        with pytest.raises(InvalidInputError) as caught:
            await rt.create_execution_plan(data)
        assert caught.value.field == field
        assert reason in caught.value.reason
        assert await rt.get_execution_plans() == []
        assert await rt.get_planning_queue(None) == []
        assert written(db_path) == before
    assert written(db_path) == before
    assert written(db_path)["execution_plans"] == 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"failure_policy": "keep_going"}, "failure_policy"),
        ({"failure_policy": 1}, "failure_policy"),
        ({"approved": "yes"}, "approved"),
        ({"estimated_duration": -1}, "estimated_duration"),
        ({"estimated_duration": 1.5}, "estimated_duration"),
        ({"source_agent": ""}, "source_agent"),
        ({"planning_task_id": ""}, "planning_task_id"),
        ({"generated_workflow": 5}, "generated_workflow"),
    ],
)
async def test_bad_plan_arguments_are_refused_and_nothing_is_written(
    db_path: str, kwargs: dict[str, Any], field: str
) -> None:
    async with runtime(db_path) as rt:
        before = written(db_path)
        with pytest.raises(InvalidInputError) as caught:
            await rt.create_execution_plan(diamond(), **kwargs)
        assert caught.value.field == field
        assert written(db_path) == before
    assert written(db_path)["execution_plans"] == 0


async def test_a_subtask_payload_over_the_limit_is_refused(db_path: str) -> None:
    async with runtime(db_path, max_payload_bytes=100) as rt:
        before = written(db_path)
        data = plan_of(sub("a", payload={"ok": 1}), sub("b", payload={"blob": "x" * 200}))
        with pytest.raises(InvalidInputError) as caught:
            await rt.create_execution_plan(data)
        assert caught.value.field == "plan_data.subtasks[1].payload"
        assert "100" in caught.value.reason
        assert written(db_path) == before
        # The whole plan may be larger than one payload: each payload is within the limit.
        fine = plan_of(*(sub(f"s{i}", payload={"blob": "x" * 50}) for i in range(10)))
        assert await rt.create_execution_plan(fine)


async def test_a_plan_over_max_plan_bytes_is_refused(db_path: str) -> None:
    async with runtime(db_path, max_plan_bytes=2_000) as rt:
        before = written(db_path)
        big = plan_of(*(sub(f"subtask-{i:04d}") for i in range(100)))
        with pytest.raises(InvalidInputError) as caught:
            await rt.create_execution_plan(big)
        assert caught.value.field == "plan_data"
        assert written(db_path) == before


async def test_a_repeated_dependency_is_one_dependency(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, plan_of(sub("a"), sub("b", "a", "a")))
        plan = await rt.get_execution_plan(plan_id)
        assert plan is not None
        assert plan.subtasks[1].dependencies == ("a",)
        assert plan.dependency_count == 1
        done = await run_workers(rt, plan_id, workers=1)
        assert done.status is PlanStatus.COMPLETED


# -- recovery --------------------------------------------------------------------------------


async def test_a_plan_goes_on_after_the_runtime_is_reopened(db_path: str) -> None:
    data = plan_of(
        sub("a"),
        sub("b", "a"),
        sub("c", "a"),
        sub("d", "b", "c"),
        sub("e", "d"),
        sub("side"),
    )
    async with runtime(db_path) as rt:
        plan_id = await started(rt, data)
        tasks = await tasks_of(rt, plan_id)
        for _ in range(2):  # a, then one of b / c (or side)
            await finish(rt, await claim(rt))
        held = await claim(rt)  # claimed and left: the runtime stops under it
        await rt.start_task(held.lease)
    async with runtime(db_path) as rt:
        assert await rt.get_execution_plan_status(plan_id) == "executing"
        assert await rt.get_execution_plan_status_cached(plan_id) == "executing"
        assert await tasks_of(rt, plan_id) == tasks  # the same tasks, none made again
        plan = await run_workers(rt, plan_id, workers=3)
        assert plan.status is PlanStatus.COMPLETED
        await assert_dependency_order(rt, plan)
        assert_one_task_per_subtask(db_path, plan)
        assert {s.status for s in (await states(rt, plan_id)).values()} == {SubtaskStatus.COMPLETED}
    async with runtime(db_path) as rt:
        assert await rt.get_execution_plan_status(plan_id) == "completed"
        assert await rt.create_planned_subtasks_from_plan(plan_id) == 0
        assert await rt.claim_task("w1", "job") is None


async def test_a_completion_just_before_close_is_acted_on_after_reopen(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, chain(3))
        await finish(rt, await claim(rt))
        await finish(rt, await claim(rt))
        last = await claim(rt)
        await finish(rt, last)  # the runtime closes at once: the plan may not be told yet
    async with runtime(db_path) as rt:
        plan = await rt.wait_for_plan(plan_id, timeout=SOON)
        assert plan.status is PlanStatus.COMPLETED
        assert_one_task_per_subtask(db_path, plan)
        await assert_dependency_order(rt, plan)


async def test_a_draft_materialized_before_a_reopen_starts_with_the_same_tasks(
    db_path: str,
) -> None:
    async with runtime(db_path) as rt:
        plan_id = await rt.create_execution_plan(diamond())
        assert await rt.create_planned_subtasks_from_plan(plan_id) == 4
        tasks = await tasks_of(rt, plan_id)
    async with runtime(db_path) as rt:
        assert await rt.get_execution_plan_status_cached(plan_id) == "draft"
        assert await rt.claim_task("w1", "job") is None
        assert await rt.create_planned_subtasks_from_plan(plan_id) == 0
        assert await rt.mark_plan_execution_started(plan_id) is True
        assert await tasks_of(rt, plan_id) == tasks
        plan = await run_workers(rt, plan_id)
        assert plan.status is PlanStatus.COMPLETED
        assert_one_task_per_subtask(db_path, plan)


async def test_a_failed_plan_stays_failed_after_a_reopen(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, fail_fast_plan())
        tasks = await tasks_of(rt, plan_id)
        slow = await claim(rt, "slow")
        await rt.start_task(slow.lease)  # running when the plan fails, and at close
        await rt.fail_task((await claim(rt, "boom")).lease, "no", retryable=False)
        await rt.wait_for_plan(plan_id, timeout=SOON)
    async with runtime(db_path) as rt:
        plan = await rt.wait_for_plan(plan_id, timeout=SOON)
        assert plan.status is PlanStatus.FAILED
        # Recovery hands the running task back to the queue; a failed plan runs nothing
        # more, so it is cancelled rather than handed out again.
        await barrier(rt)
        for name in ("slow", "held", "idle", "next", "after"):
            assert await task_status(rt, tasks[name]) is TaskStatus.CANCELLED, name
        assert await rt.claim_task("w1", ["slow", "held", "idle", "job"]) is None
        await barrier(rt)
        subtasks = await states(rt, plan_id)
        assert subtasks["boom"].status is SubtaskStatus.FAILED
        assert {subtasks[n].status for n in ("slow", "held", "idle", "next", "after")} == {
            SubtaskStatus.CANCELLED
        }
        assert (await rt.wait_for_plan(plan_id, timeout=SOON)).status is PlanStatus.FAILED
        assert_one_task_per_subtask(db_path, plan)


async def test_several_plans_at_once_share_workers(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_ids = [await started(rt, data) for data in (diamond(), fan(6), chain(8))]
        done: list[ExecutionPlan] = []

        async def wait(plan_id: str) -> None:
            done.append(await rt.wait_for_plan(plan_id, timeout=SOON))

        async def worker(name: str) -> None:
            while True:
                got = await rt.claim_task(name, "job", wait=SOON)
                if got is not None:
                    await finish(rt, got)

        async with anyio.create_task_group() as tg:
            for n in range(4):
                tg.start_soon(worker, f"w{n}")
            async with anyio.create_task_group() as waiters:
                for plan_id in plan_ids:
                    waiters.start_soon(wait, plan_id)
            tg.cancel_scope.cancel()
        assert sorted(p.id for p in done) == sorted(plan_ids)
        for plan in done:
            assert plan.status is PlanStatus.COMPLETED
            await assert_dependency_order(rt, plan)
            assert_one_task_per_subtask(db_path, plan)


async def test_a_subtask_that_requires_capabilities_goes_to_a_worker_that_has_them(
    db_path: str,
) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, plan_of(sub("train", requires=["gpu", "cuda"])))
        assert await rt.claim_task("w1", "job") is None  # its type is not enough
        assert await rt.claim_task("w1", ["gpu"]) is None  # nor half of what it needs
        got = await claim(rt, "gpu", "cuda", worker="w2", wait=0)
        assert got.task.subtask_id == "train"
        await finish(rt, got)
        assert (await rt.wait_for_plan(plan_id, timeout=SOON)).status is PlanStatus.COMPLETED


# -- regressions: bugs this suite found, now fixed -------------------------------------------


async def test_a_subtask_cancelled_before_its_plan_starts_still_ends_the_plan(
    db_path: str,
) -> None:
    async with runtime(db_path) as rt:
        plan_id = await rt.create_execution_plan(plan_of(sub("a"), sub("b", "a")))
        await rt.create_planned_subtasks_from_plan(plan_id)
        tasks = await tasks_of(rt, plan_id)
        await rt.cancel_task(tasks["a"])
        await barrier(rt)
        assert (await states(rt, plan_id))["a"].status is SubtaskStatus.CANCELLED
        assert await rt.mark_plan_execution_started(plan_id) is True
        # fail_fast: "a" will never complete, so the plan cannot: it should end failed.
        plan = await rt.wait_for_plan(plan_id, timeout=1.0)
        assert plan.status is PlanStatus.FAILED


async def test_plan_data_is_the_same_from_memory_and_from_the_database(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await rt.create_execution_plan(plan_of(sub("a"), sub("b", "a"), title="T"))
        held = await rt.get_execution_plan(plan_id)  # from the executor's memory
        (stored,) = await rt.get_execution_plans()  # from the database
        assert held is not None
        assert stored.id == plan_id
        assert held.plan_data == stored.plan_data


async def test_deleting_a_plan_task_withdraws_its_subtask(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, plan_of(sub("a"), sub("b", "a")))
        tasks = await tasks_of(rt, plan_id)
        assert await rt.delete_task(tasks["a"]) is True
        await barrier(rt)
        assert (await rt.statistics()).restarts["plans"] == 0
        assert (await states(rt, plan_id))["a"].status is SubtaskStatus.CANCELLED
        assert tasks_per_subtask(db_path, plan_id) == {"b": 1}  # no task made again for "a"
        plan = await rt.wait_for_plan(plan_id, timeout=SOON)
        assert plan.status is PlanStatus.FAILED
        assert plan.error is not None
        assert "deleted" in plan.error


# -- regressions: the review's findings, now fixed ------------------------------------------


async def test_a_resync_in_the_same_batch_as_a_start_does_not_fail_the_plan(
    db_path: str,
) -> None:
    """Reconciling compared memory with a database that did not yet hold the tasks the
    same batch had just created, and took them for deleted."""
    async with runtime(db_path) as rt:
        plan_id = await rt.create_execution_plan(plan_of(sub("a"), sub("b", "a")))
        # Queued back to back, before the PlanExecutor wakes: one batch, start first.
        reply = await rt._plans.request(StartPlan(plan_id=plan_id))
        assert rt._plans.try_tell(Resync())
        assert await reply.wait() is True
        await finish(rt, await claim(rt, "job"))
        await finish(rt, await claim(rt, "job"))
        plan = await rt.wait_for_plan(plan_id, timeout=SOON)
        assert plan.status is PlanStatus.COMPLETED, plan.error
        assert tasks_per_subtask(db_path, plan_id) == {"a": 1, "b": 1}


async def test_a_deleted_waiting_subtask_is_not_created_again_after_a_restart(
    db_path: str,
) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, plan_of(sub("a"), sub("b", "a")), failure_policy="continue")
        tasks = await tasks_of(rt, plan_id)
        assert await rt.delete_task(tasks["b"]) is True
        await barrier(rt)
    async with runtime(db_path) as rt:
        await finish(rt, await claim(rt, "job"))
        plan = await rt.wait_for_plan(plan_id, timeout=SOON)
        assert plan.status is PlanStatus.FAILED  # b never ran
        assert (await states(rt, plan_id))["b"].status is SubtaskStatus.CANCELLED
        assert tasks_per_subtask(db_path, plan_id) == {"a": 1}
        assert (await rt.statistics()).restarts["plans"] == 0


async def test_a_running_subtask_retried_after_its_plan_failed_is_not_run_again(
    db_path: str,
) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, plan_of(sub("bad", max_retries=0), sub("slow", max_retries=3)))
        first = await claim(rt, "job", worker="w1")
        second = await claim(rt, "job", worker="w2")
        slow, bad = (first, second) if first.task.subtask_id == "slow" else (second, first)
        await rt.start_task(slow.lease)
        await rt.start_task(bad.lease)
        await rt.fail_task(bad.lease, "boom")  # fail fast: the plan fails, slow runs on
        assert (await rt.wait_for_plan(plan_id, timeout=SOON)).status is PlanStatus.FAILED
        await rt.fail_task(slow.lease, "flaky")  # attempts left: back to the queue...
        await barrier(rt)
        # ...but its plan has failed: it is cancelled, not handed out again.
        assert await task_status(rt, slow.task.id) is TaskStatus.CANCELLED
        assert await rt.claim_task("w3", "job") is None


async def test_a_planning_request_whose_planner_left_goes_back_to_the_queue(
    db_path: str,
) -> None:
    async with runtime(db_path) as rt:
        request = await rt.queue_planning_request("Deploy to production")
        reply = await rt._plans.request(ClaimPlanningRequest(agent_id="gone"))
        reply.fail(RuntimeStoppedError("the planner stopped waiting"))  # as ask() does
        await rt.get_execution_plan_status_cached("unknown")  # after that batch
        again = await rt.claim_planning_request("planner-2")
        assert again is not None
        assert again.id == request.id
        assert again.assigned_agent == "planner-2"


async def test_a_plan_row_that_does_not_decode_does_not_keep_the_runtime_from_opening(
    db_path: str,
) -> None:
    async with runtime(db_path) as rt:
        good = await started(rt, plan_of(sub("a")))
        bad = await started(rt, plan_of(sub("x")))
    raw_execute(
        db_path,
        "UPDATE execution_plans SET plan_data = ? WHERE id = ?",
        ('{"subtasks": [{"id": "x", "task_type": "job", "oops": 1}]}', bad),
    )
    async with runtime(db_path) as rt:
        await finish(rt, await claim(rt, "job"))
        assert (await rt.wait_for_plan(good, timeout=SOON)).status is PlanStatus.COMPLETED
        with pytest.raises(StorageError):
            await rt.get_execution_plan(bad)


async def test_a_completed_dependency_stays_met_when_its_task_is_deleted(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, plan_of(sub("a"), sub("b", "a")))
        await finish(rt, await claim(rt, "job"))
        await barrier(rt)
        tasks = await tasks_of(rt, plan_id)
        assert await rt.check_subtask_dependencies(tasks["b"]) is True
        assert await rt.delete_task(tasks["a"]) is True
        await barrier(rt)
        assert await rt.check_subtask_dependencies(tasks["b"]) is True
