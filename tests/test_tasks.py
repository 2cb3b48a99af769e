"""The TaskManager through the public Runtime API: every operation, the state machine
(every (from, to) pair), events, idempotency keys, durability across a reopen, bad input
and concurrent creates. Real SQLite files, both backends."""

from __future__ import annotations

import math
import sqlite3
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from itertools import product

import anyio
import pytest
from _raw import raw_rows

from hive_orchestration import (
    Event,
    IllegalTransitionError,
    InvalidInputError,
    NotFoundError,
    Run,
    RunStatus,
    Runtime,
    RuntimeConfig,
    StorageError,
    Task,
    TaskStatus,
)
from hive_orchestration.actors.task_manager import TRANSITIONS

pytestmark = pytest.mark.anyio

STATUSES = list(TaskStatus)  # distinct members: PENDING is an alias of QUEUED
TERMINAL = {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.TIMED_OUT}


def path_to(target: TaskStatus) -> list[TaskStatus]:
    """The shortest sequence of legal transitions from queued to ``target``."""
    seen = {TaskStatus.QUEUED: [TaskStatus.QUEUED]}
    todo = deque([TaskStatus.QUEUED])
    while todo:
        current = todo.popleft()
        for (start, end), _ in TRANSITIONS.items():
            if start is current and end not in seen:
                seen[end] = [*seen[current], end]
                todo.append(end)
    return seen[target][1:]


async def last_seq(rt: Runtime) -> int:
    return (await rt.statistics()).storage.last_seq


async def all_tasks(rt: Runtime) -> list[Task]:
    found: list[Task] = []
    for status in STATUSES:
        found.extend(await rt.get_tasks_by_status(status))
    return found


async def task_in(rt: Runtime, status: TaskStatus, **kwargs: object) -> str:
    """A new task brought to ``status`` through legal transitions."""
    if status is TaskStatus.BLOCKED:
        # Only a plan makes a blocked task: the second step of a started two-step plan.
        plan = {
            "subtasks": [
                {"id": "a", "task_type": "job"},
                {"id": "b", "task_type": "job", "dependencies": ["a"]},
            ]
        }
        plan_id = await rt.create_execution_plan(plan, source_agent="agent")
        assert await rt.mark_plan_execution_started(plan_id)
        [blocked] = [s.task_id for s in await rt.get_plan_subtasks(plan_id) if s.subtask_id == "b"]
        assert blocked is not None
        return blocked
    task_id = await rt.create_task("job", **kwargs)  # type: ignore[arg-type]
    for step in path_to(status):
        if step is TaskStatus.CANCELLED:
            await rt.cancel_task(task_id)
        else:
            assert await rt.update_task_status(task_id, step.value)
    task = await rt.get_task(task_id)
    assert task is not None
    assert task.status is status
    return task_id


def utc_aware(value: datetime | None) -> bool:
    return value is not None and value.utcoffset() == timedelta(0)


def stored_count(db_path: str, sql: str, *params: object) -> int:
    return int(raw_rows(db_path, sql, params)[0][0])


# -- operations ----------------------------------------------------------------------------


async def test_create_task_defaults(db_path: str) -> None:
    before = datetime.now(UTC)
    async with Runtime.open(db_path) as rt:
        task_id = await rt.create_task("deployment", {"script": "deploy.sh"})
        task = await rt.get_task(task_id)
    assert isinstance(task_id, str)
    assert task_id
    assert task is not None
    assert task.id == task_id
    assert task.status is TaskStatus.QUEUED
    assert task.title == "deployment"
    assert task.task_type == "deployment"
    assert task.type == "deployment"
    assert task.payload == {"script": "deploy.sh"}
    assert task.priority == 1
    assert task.max_retries == 3
    assert task.attempts == 0
    assert task.description is None
    assert task.workflow is None
    assert task.tags == ()
    assert task.due_date is None
    assert task.assigned_worker is None
    assert task.result is None
    assert task.error is None
    assert utc_aware(task.created_at)
    assert utc_aware(task.updated_at)
    assert task.created_at >= before
    assert task.updated_at == task.created_at


async def test_create_task_without_payload_and_with_every_field(db_path: str) -> None:
    due = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    async with Runtime.open(db_path) as rt:
        bare = await rt.get_task(await rt.create_task("bare"))
        task_id = await rt.create_task(
            "build",
            {"n": 1},
            title="Build it",
            description="all of it",
            priority=7,
            workflow={"steps": ["a", "b"]},
            tags=["x", "y"],
            max_retries=0,
            due_date=due,
            correlation_id="corr-1",
            source_agent="planner",
        )
        task = await rt.get_task(task_id)
    assert bare is not None
    assert bare.payload == {}
    assert task is not None
    assert (task.title, task.description, task.priority) == ("Build it", "all of it", 7)
    assert task.workflow == {"steps": ["a", "b"]}
    assert task.tags == ("x", "y")
    assert task.max_retries == 0
    assert task.due_date == due
    assert task.correlation_id == "corr-1"
    assert task.source_agent == "planner"


async def test_get_task_of_an_unknown_id_is_none(db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        await rt.create_task("job")
        assert await rt.get_task("no-such-task") is None


async def test_update_task_status_sets_metadata_result_and_error(db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        done = await rt.create_task("job")
        assert await rt.update_task_status(
            done, "assigned", {"assigned_worker": "w1", "current_phase": "fetch"}
        )
        assigned = await rt.get_task(done)
        assert await rt.update_task_status(done, TaskStatus.RUNNING, {"current_phase": "execute"})
        assert await rt.update_task_status(done, "completed", result={"ok": True, "n": 3})
        completed = await rt.get_task(done)

        broken = await rt.create_task("job")
        await rt.update_task_status(broken, "running")
        assert await rt.update_task_status(broken, "failed", error="boom")
        failed = await rt.get_task(broken)
        events = await rt.read_events()
    assert assigned is not None
    assert assigned.status is TaskStatus.ASSIGNED
    assert (assigned.assigned_worker, assigned.current_phase) == ("w1", "fetch")
    assert assigned.updated_at >= assigned.created_at
    assert completed is not None
    assert completed.status is TaskStatus.COMPLETED
    assert completed.assigned_worker == "w1"  # kept: None fields are unchanged
    assert completed.current_phase == "execute"
    assert completed.result == {"ok": True, "n": 3}
    assert completed.error is None
    assert failed is not None
    assert failed.status is TaskStatus.FAILED
    assert failed.error == "boom"
    assert failed.result is None
    by_type = {(e.task_id, e.type): e for e in events}
    assert by_type[(done, "task.assigned")].data["worker_id"] == "w1"
    assert by_type[(done, "task.completed")].data["result"] == {"ok": True, "n": 3}
    assert by_type[(broken, "task.failed")].data["error"] == "boom"


async def test_update_task_status_of_an_unknown_task_is_not_found(db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        await rt.create_task("job")
        seq = await last_seq(rt)
        with pytest.raises(NotFoundError) as caught:
            await rt.update_task_status("no-such-task", "running")
        assert caught.value.id == "no-such-task"
        assert await last_seq(rt) == seq


async def test_get_tasks_by_status_orders_by_priority_then_age(db_path: str) -> None:
    priorities = [1, 5, 1, 3, 5, 0, 3]
    async with Runtime.open(db_path) as rt:
        ids = [
            await rt.create_task("a" if i % 2 else "b", {"i": i}, priority=p)
            for i, p in enumerate(priorities)
        ]
        expected = [ids[i] for i in sorted(range(len(ids)), key=lambda i: -priorities[i])]
        queued = await rt.get_tasks_by_status("queued")
        limited = await rt.get_tasks_by_status(TaskStatus.QUEUED, limit=3)
        only_a = await rt.get_tasks_by_status("queued", task_type="a")
        both = await rt.get_tasks_by_status("queued", task_type="a", limit=2)
        none_running = await rt.get_tasks_by_status("running")
        # Terminal statuses are answered from storage: the same order there.
        for task_id in ids:
            await rt.update_task_status(task_id, "running")
        for task_id in reversed(ids):
            await rt.update_task_status(task_id, "completed")
        completed = await rt.get_tasks_by_status("completed")
        completed_b = await rt.get_tasks_by_status("completed", task_type="b", limit=2)
    a_ids = [task_id for task_id in expected if ids.index(task_id) % 2]
    b_ids = [task_id for task_id in expected if not ids.index(task_id) % 2]
    assert [t.id for t in queued] == expected
    assert [t.id for t in limited] == expected[:3]
    assert [t.id for t in only_a] == a_ids
    assert [t.id for t in both] == a_ids[:2]
    assert none_running == []
    assert [t.id for t in completed] == expected
    assert [t.id for t in completed_b] == b_ids[:2]


async def test_get_queued_tasks_limit_type_and_order(db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        ids = [await rt.create_task("x" if i < 8 else "y", priority=i % 3) for i in range(12)]
        await rt.update_task_status(ids[0], "running")  # not queued any more
        expected = sorted(ids[1:], key=lambda t: -(ids.index(t) % 3))
        default = await rt.get_queued_tasks()
        five = await rt.get_queued_tasks(limit=5)
        only_y = await rt.get_queued_tasks(task_type="y")
        by_status = await rt.get_tasks_by_status("queued")
    assert [t.id for t in default] == expected[:10]  # the default limit is 10
    assert [t.id for t in five] == expected[:5]
    assert [t.id for t in only_y] == [t for t in expected if ids.index(t) >= 8]
    assert [t.id for t in by_status] == expected
    assert all(t.status is TaskStatus.QUEUED for t in default)


async def test_pending_is_queued(db_path: str) -> None:
    assert TaskStatus.PENDING is TaskStatus.QUEUED
    assert TaskStatus("pending") is TaskStatus.QUEUED
    async with Runtime.open(db_path) as rt:
        ids = [await rt.create_task("job", priority=p) for p in (1, 2)]
        await rt.update_task_status(await rt.create_task("job"), "running")
        pending = await rt.get_pending_tasks()
        by_pending = await rt.get_tasks_by_status("pending")
        by_member = await rt.get_tasks_by_status(TaskStatus.PENDING)
        queued = await rt.get_queued_tasks(limit=100)
    assert [t.id for t in pending] == [ids[1], ids[0]]
    assert pending == by_pending == by_member == queued


async def test_delete_task_cascades_to_runs_and_publishes(db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        task_id = await rt.create_task("job", correlation_id="c1")
        keep = await rt.create_task("job")
        runs = [await rt.create_run(task_id, "w1") for _ in range(2)]
        kept_run = await rt.create_run(keep, "w2")
        assert stored_count(db_path, "SELECT count(*) FROM runs WHERE task_id = ?", task_id) == 2
        seq = await last_seq(rt)
        assert await rt.delete_task(task_id) is True
        assert await rt.get_task(task_id) is None
        assert await rt.get_runs(task_id) == []
        assert all([await rt.get_run(run_id) is None for run_id in runs])
        events = await rt.read_events(after=seq)
        with pytest.raises(NotFoundError):
            await rt.delete_task(task_id)
        with pytest.raises(NotFoundError):
            await rt.delete_task("no-such-task")
        assert await last_seq(rt) == seq + 1
        assert await rt.get_run(kept_run) is not None
    assert [(e.type, e.task_id, e.correlation_id) for e in events] == [
        ("task.deleted", task_id, "c1")
    ]
    assert stored_count(db_path, "SELECT count(*) FROM runs WHERE task_id = ?", task_id) == 0
    assert stored_count(db_path, "SELECT count(*) FROM tasks WHERE id = ?", task_id) == 0
    assert stored_count(db_path, "SELECT count(*) FROM runs WHERE task_id = ?", keep) == 1


async def test_delete_of_a_finished_task_after_reopen(db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        task_id = await task_in(rt, TaskStatus.RUNNING)
        await rt.create_run(task_id, "w1")
        await rt.update_task_status(task_id, "completed")
    async with Runtime.open(db_path) as rt:
        assert await rt.delete_task(task_id) is True
        assert await rt.get_task(task_id) is None
        events = await rt.read_events()
    assert events[-1].type == "task.deleted"
    assert events[-1].task_id == task_id
    assert stored_count(db_path, "SELECT count(*) FROM runs") == 0
    assert stored_count(db_path, "SELECT count(*) FROM tasks") == 0


async def test_cancel_task_returns_the_cancelled_task(db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        task_id = await rt.create_task("job")
        cancelled = await rt.cancel_task(task_id, reason="not needed", source_agent="ops")
        stored = await rt.get_task(task_id)
        events = await rt.read_events()
    assert isinstance(cancelled, Task)
    assert cancelled.id == task_id
    assert cancelled.status is TaskStatus.CANCELLED
    assert cancelled.error == "not needed"
    assert cancelled == stored
    assert [(e.type, e.source) for e in events] == [
        ("task.created", "task_manager"),
        ("task.cancelled", "ops"),
    ]


@pytest.mark.parametrize("status", sorted(TERMINAL))
async def test_cancel_task_of_a_finished_task_is_refused(db_path: str, status: TaskStatus) -> None:
    async with Runtime.open(db_path) as rt:
        task_id = await task_in(rt, status)
        before = await rt.get_task(task_id)
        seq = await last_seq(rt)
        with pytest.raises(IllegalTransitionError) as caught:
            await rt.cancel_task(task_id)
        assert await rt.get_task(task_id) == before
        assert await last_seq(rt) == seq
        with pytest.raises(NotFoundError):
            await rt.cancel_task("no-such-task")
    assert caught.value.id == task_id
    assert caught.value.current == status.value
    assert task_id in str(caught.value)
    assert status.value in str(caught.value)
    # The status asked for is "cancelled", and the error names it.
    assert caught.value.requested == TaskStatus.CANCELLED.value


async def test_runs_create_get_update(db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        task_id = await rt.create_task("job")
        first = await rt.create_run(task_id, "w1", phase="setup")
        second = await rt.create_run(task_id)
        run = await rt.get_run(first)
        assert await rt.update_run_status(
            first, "completed", result={"x": 1}, phase="done", output_log="ok\n"
        )
        finished = await rt.get_run(first)
        assert await rt.update_run_status(second, RunStatus.FAILED, error="bad")
        runs = await rt.get_runs(task_id)
        assert await rt.get_run("no-such-run") is None
        assert await rt.get_runs("no-such-task") == []
        seq = await last_seq(rt)
        with pytest.raises(IllegalTransitionError) as caught:
            await rt.update_run_status(first, "running")
        assert await rt.get_run(first) == finished
        with pytest.raises(NotFoundError):
            await rt.update_run_status("no-such-run", "completed")
        with pytest.raises(InvalidInputError) as bad:
            await rt.update_run_status(second, "sleeping")
        with pytest.raises(NotFoundError):
            await rt.create_run("no-such-task")
        assert await last_seq(rt) == seq
    assert run is not None
    assert isinstance(run, Run)
    assert (run.task_id, run.worker_id, run.phase) == (task_id, "w1", "setup")
    assert run.run_number == 1
    assert run.status is RunStatus.RUNNING
    assert utc_aware(run.started_at)
    assert run.completed_at is None
    assert finished is not None
    assert finished.status is RunStatus.COMPLETED
    assert (finished.result, finished.phase, finished.output_log) == ({"x": 1}, "done", "ok\n")
    assert utc_aware(finished.completed_at)
    assert [r.id for r in runs] == [first, second]
    assert [r.run_number for r in runs] == [1, 2]
    assert runs[1].status is RunStatus.FAILED
    assert runs[1].error == "bad"
    assert caught.value.id == first
    assert caught.value.current == "completed"
    assert bad.value.field == "status"


async def test_an_open_run_cannot_be_set_to_its_own_status(db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        run_id = await rt.create_run(await rt.create_task("job"))
        with pytest.raises(IllegalTransitionError):
            await rt.update_run_status(run_id, "running")
        run = await rt.get_run(run_id)
    assert run is not None
    assert run.status is RunStatus.RUNNING


@pytest.mark.parametrize("status", sorted(TERMINAL))
async def test_no_run_for_a_finished_task(db_path: str, status: TaskStatus) -> None:
    async with Runtime.open(db_path) as rt:
        task_id = await task_in(rt, status)
        seq = await last_seq(rt)
        with pytest.raises(IllegalTransitionError) as caught:
            await rt.create_run(task_id, "w1")
        assert await rt.get_runs(task_id) == []
        assert await last_seq(rt) == seq
    assert caught.value.id == task_id
    assert caught.value.current == status.value
    assert stored_count(db_path, "SELECT count(*) FROM runs") == 0


async def test_run_numbers_continue_after_reopen(db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        task_id = await rt.create_task("job")
        first = await rt.create_run(task_id, "w1")
        await rt.update_run_status(first, "lost")
        await rt.create_run(task_id, "w2")
    async with Runtime.open(db_path) as rt:
        third = await rt.create_run(task_id, "w3")
        runs = await rt.get_runs(task_id)
        with pytest.raises(IllegalTransitionError):
            await rt.update_run_status(first, "running")
    assert [r.run_number for r in runs] == [1, 2, 3]
    assert runs[2].id == third


# -- the state machine ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "target"),
    list(product(STATUSES, STATUSES)),
    ids=[f"{a.value}->{b.value}" for a, b in product(STATUSES, STATUSES)],
)
async def test_state_machine(db_path: str, start: TaskStatus, target: TaskStatus) -> None:
    async with Runtime.open(db_path) as rt:
        task_id = await task_in(rt, start, correlation_id="corr")
        before = await rt.get_task(task_id)
        assert before is not None
        corr = before.correlation_id  # a plan's task carries its plan's id
        seq = await last_seq(rt)
        logged = await rt.read_events()
        event = TRANSITIONS.get((start, target))
        if (start, target) == (TaskStatus.BLOCKED, TaskStatus.QUEUED):
            event = None  # only its plan queues a blocked task, never update_task_status
        if start is target and start in TERMINAL:
            # Already so, and nothing contradicts it: a no-op answered False, no event.
            assert await rt.update_task_status(task_id, target.value) is False
            assert await rt.get_task(task_id) == before
            assert await last_seq(rt) == seq
            event = None
        elif event is not None:
            assert await rt.update_task_status(task_id, target.value, source_agent="agent")
            after = await rt.get_task(task_id)
            # (Its plan, if any, reacts with events of other tasks and of its own.)
            new = [e for e in await rt.read_events(after=seq) if e.task_id == task_id]
            assert after is not None
            assert after.status is target
            assert [(e.type, e.task_id, e.correlation_id, e.source) for e in new] == [
                (event, task_id, corr, "agent")
            ]
            assert new[0].data["status"] == target.value
            assert new[0].data["previous"] == start.value
            assert new[0].seq == seq + 1
        else:
            with pytest.raises(IllegalTransitionError) as caught:
                await rt.update_task_status(task_id, target.value)
            assert await rt.get_task(task_id) == before
            assert await rt.read_events() == logged
            assert await last_seq(rt) == seq
            message = str(caught.value)
            assert task_id in message
            assert repr(start.value) in message
            assert repr(target.value) in message
            assert (caught.value.id, caught.value.current, caught.value.requested) == (
                task_id,
                start.value,
                target.value,
            )
    if event is None:
        rows = raw_rows(db_path, "SELECT status FROM tasks WHERE id = ?", (task_id,))
        assert rows == [(start.value,)]


def test_the_transition_table_is_the_documented_one() -> None:
    q, a, r = TaskStatus.QUEUED, TaskStatus.ASSIGNED, TaskStatus.RUNNING
    assert {
        (q, a): "task.assigned",
        (q, r): "task.started",
        (q, TaskStatus.COMPLETED): "task.completed",
        (q, TaskStatus.FAILED): "task.failed",
        (a, r): "task.started",
        (a, q): "task.retrying",
        (r, q): "task.retrying",
        (a, TaskStatus.COMPLETED): "task.completed",
        (r, TaskStatus.COMPLETED): "task.completed",
        (a, TaskStatus.FAILED): "task.failed",
        (r, TaskStatus.FAILED): "task.failed",
        (a, TaskStatus.TIMED_OUT): "task.timed_out",
        (r, TaskStatus.TIMED_OUT): "task.timed_out",
        (q, TaskStatus.CANCELLED): "task.cancelled",
        (a, TaskStatus.CANCELLED): "task.cancelled",
        (r, TaskStatus.CANCELLED): "task.cancelled",
        (TaskStatus.BLOCKED, q): "plan.subtask_ready",
        (TaskStatus.BLOCKED, TaskStatus.CANCELLED): "task.cancelled",
    } == TRANSITIONS
    assert not any(start in TERMINAL for start, _ in TRANSITIONS)


# -- events --------------------------------------------------------------------------------


async def test_lifecycle_events_reach_a_subscriber_in_order(db_path: str) -> None:
    """The seeds' test_complete_task_workflow, without the sleeps."""
    async with Runtime.open(db_path) as rt, rt.subscribe("*") as events:
        task_id = await rt.create_task(task_type="deployment", payload={"script": "deploy.sh"})
        await rt.update_task_status(task_id, TaskStatus.RUNNING)
        await rt.update_task_status(task_id, TaskStatus.COMPLETED)
        task = await rt.get_task(task_id)
        sentinel = await rt.publish("test.sentinel")
        received: list[Event] = []
        with anyio.fail_after(5):
            async for event in events:
                if event.type == "test.sentinel":
                    break
                received.append(event)
        assert event.seq == sentinel.seq
    assert task is not None
    assert task.status == TaskStatus.COMPLETED
    assert [e.type for e in received] == ["task.created", "task.started", "task.completed"]
    assert all(e.task_id == task_id for e in received)
    assert [e.seq for e in received] == sorted(e.seq for e in received)


async def test_every_task_event_carries_id_correlation_and_source(db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        own = await rt.create_task("job", correlation_id="c-own", source_agent="creator")
        await rt.update_task_status(own, "assigned", {"assigned_worker": "w"})
        await rt.update_task_status(own, "running", source_agent="worker")
        await rt.update_task_status(own, "queued")
        await rt.cancel_task(own)
        anon = await rt.create_task("job")
        await rt.update_task_status(anon, "running")
        await rt.update_task_status(anon, "timed_out", source_agent="reaper")
        events = await rt.read_events()
    assert [(e.type, e.task_id, e.correlation_id, e.source) for e in events] == [
        ("task.created", own, "c-own", "creator"),
        ("task.assigned", own, "c-own", "creator"),
        ("task.started", own, "c-own", "worker"),
        ("task.retrying", own, "c-own", "creator"),
        ("task.cancelled", own, "c-own", "creator"),
        ("task.created", anon, None, "task_manager"),
        ("task.started", anon, None, "task_manager"),
        ("task.timed_out", anon, None, "reaper"),
    ]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[1].data["worker_id"] == "w"
    assert events[0].data == {"task_type": "job", "title": "job", "priority": 1}


async def test_events_of_interleaved_tasks_are_logged_in_transition_order(
    db_path: str,
) -> None:
    async with Runtime.open(db_path) as rt:
        one = await rt.create_task("job")
        two = await rt.create_task("job")
        expected = [("task.created", one), ("task.created", two)]
        for task_id, status, kind in [
            (two, "running", "task.started"),
            (one, "assigned", "task.assigned"),
            (two, "failed", "task.failed"),
            (one, "running", "task.started"),
            (one, "completed", "task.completed"),
        ]:
            await rt.update_task_status(task_id, status)
            expected.append((kind, task_id))
    async with Runtime.open(db_path) as rt:
        events = await rt.read_events()
    assert [(e.type, e.task_id) for e in events] == expected


# -- idempotency keys ----------------------------------------------------------------------


async def test_idempotency_key_returns_the_first_task(db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        first = await rt.create_task("job", {"n": 1}, idempotency_key="k1")
        seq = await last_seq(rt)
        again = await rt.create_task("other", {"n": 2}, priority=9, idempotency_key="k1")
        assert await last_seq(rt) == seq
        other = await rt.create_task("job", idempotency_key="k2")
        tasks = await all_tasks(rt)
        events = await rt.read_events()
        task = await rt.get_task(first)
    assert again == first
    assert other != first
    assert sorted(t.id for t in tasks) == sorted([first, other])
    assert [e.task_id for e in events if e.type == "task.created"] == [first, other]
    assert task is not None
    assert (task.task_type, task.payload, task.idempotency_key) == ("job", {"n": 1}, "k1")


async def test_idempotency_key_survives_reopen_and_completion(db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        first = await rt.create_task("job", idempotency_key="key")
    async with Runtime.open(db_path) as rt:
        assert await rt.create_task("job", idempotency_key="key") == first
        await rt.update_task_status(first, "running")
        await rt.update_task_status(first, "completed")
        assert await rt.create_task("job", idempotency_key="key") == first
    async with Runtime.open(db_path) as rt:
        seq = await last_seq(rt)
        assert await rt.create_task("job", idempotency_key="key") == first
        assert await last_seq(rt) == seq
        tasks = await all_tasks(rt)
        created = [e for e in await rt.read_events() if e.type == "task.created"]
    assert [t.id for t in tasks] == [first]
    assert len(created) == 1
    assert stored_count(db_path, "SELECT count(*) FROM tasks") == 1


async def test_concurrent_creates_with_one_key_make_one_task(db_path: str) -> None:
    ids: list[str] = []

    async def create() -> None:
        ids.append(await rt.create_task("job", idempotency_key="same"))

    async with Runtime.open(db_path) as rt:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(create)
        events = await rt.read_events()
    assert len(ids) == 20
    assert len(set(ids)) == 1
    assert [e.type for e in events] == ["task.created"]
    assert stored_count(db_path, "SELECT count(*) FROM tasks") == 1


# -- durability ----------------------------------------------------------------------------


async def test_tasks_and_runs_survive_reopen_unchanged(db_path: str) -> None:
    due = datetime(2031, 6, 7, 8, 9, 10, 123456, tzinfo=timezone(timedelta(hours=2)))
    async with Runtime.open(db_path) as rt:
        live = await rt.create_task(
            "build",
            {"nested": {"list": [1, 2.5, "three", None, True]}, "unicode": "héllo ✓"},
            title="Build",
            description="desc",
            priority=4,
            workflow={"steps": [{"name": "a"}, {"name": "b"}]},
            tags=("t1", "t2"),
            max_retries=5,
            due_date=due,
            idempotency_key="idem",
            correlation_id="corr",
            source_agent="planner",
        )
        # Queued, with a run opened by hand: an assigned task would be requeued on open.
        open_run = await rt.create_run(live, "w1", phase="p")
        done = await task_in(rt, TaskStatus.RUNNING, payload={"x": 1})
        closed_run = await rt.create_run(done, "w2")
        await rt.update_run_status(closed_run, "completed", result={"r": [1, 2]})
        await rt.update_task_status(done, "completed", result={"answer": 42})
        saved = {task_id: await rt.get_task(task_id) for task_id in (live, done)}
        saved_runs = {task_id: await rt.get_runs(task_id) for task_id in (live, done)}
        run_ids = (open_run, closed_run)
        saved_run = {run_id: await rt.get_run(run_id) for run_id in run_ids}
    async with Runtime.open(db_path) as rt:
        loaded = {task_id: await rt.get_task(task_id) for task_id in (live, done)}
        loaded_runs = {task_id: await rt.get_runs(task_id) for task_id in (live, done)}
        loaded_run = {run_id: await rt.get_run(run_id) for run_id in run_ids}
        queued = await rt.get_tasks_by_status("queued")
    assert loaded == saved
    assert loaded_runs == saved_runs
    assert loaded_run == saved_run
    assert [t.id for t in queued] == [live]
    task = loaded[live]
    assert task is not None
    assert task.due_date == due
    assert task.tags == ("t1", "t2")
    assert task.payload["unicode"] == "héllo ✓"
    assert utc_aware(task.created_at)
    finished = loaded[done]
    assert finished is not None
    assert finished.result == {"answer": 42}
    assert [r.run_number for r in loaded_runs[live]] == [1]


async def test_a_finished_task_is_read_from_storage_after_reopen(db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        task_id = await task_in(rt, TaskStatus.RUNNING, priority=2)
        run_id = await rt.create_run(task_id, "w1")
        await rt.update_run_status(run_id, "completed")
        await rt.update_task_status(task_id, "completed", result={"ok": True})
        saved = await rt.get_task(task_id)
        saved_runs = await rt.get_runs(task_id)
    async with Runtime.open(db_path) as rt:
        # Only live tasks are loaded at start: these reads go to storage.
        loaded = await rt.get_task(task_id)
        completed = await rt.get_tasks_by_status("completed")
        runs = await rt.get_runs(task_id)
        run = await rt.get_run(run_id)
        queued = await rt.get_queued_tasks()
    assert saved is not None
    assert loaded == saved
    assert completed == [saved]
    assert runs == saved_runs
    assert run == saved_runs[0]
    assert queued == []


async def test_a_finished_task_refuses_changes_after_reopen_as_before(db_path: str) -> None:
    """Once a finished task is no longer in memory, changing it is still an illegal
    transition (the task exists: get_task returns it), not "not found"."""
    async with Runtime.open(db_path) as rt:
        task_id = await task_in(rt, TaskStatus.COMPLETED)
    async with Runtime.open(db_path) as rt:
        assert await rt.get_task(task_id) is not None
        seq = await last_seq(rt)
        with pytest.raises(IllegalTransitionError) as update:
            await rt.update_task_status(task_id, "running")
        with pytest.raises(IllegalTransitionError) as cancel:
            await rt.cancel_task(task_id)
        with pytest.raises(IllegalTransitionError) as run:
            await rt.create_run(task_id)
        assert await last_seq(rt) == seq
    assert update.value.current == "completed"
    assert cancel.value.current == "completed"
    assert run.value.current == "completed"


# -- bad input -----------------------------------------------------------------------------

BAD_CREATES: list[tuple[str, tuple[object, ...], dict[str, object]]] = [
    ("task_type", ("",), {}),
    ("task_type", ("   ",), {}),
    ("task_type", (42,), {}),
    ("task_type", (None,), {}),
    ("priority", ("job",), {"priority": -1}),
    ("priority", ("job",), {"priority": 1.5}),
    ("priority", ("job",), {"priority": "1"}),
    ("priority", ("job",), {"priority": True}),
    ("payload", ("job", {"x": math.nan}), {}),
    ("payload", ("job", {"deep": {"x": [math.inf]}}), {}),
    ("payload", ("job", ["not", "a", "dict"]), {}),
    ("payload", ("job", "text"), {}),
    ("payload", ("job", {"blob": "x" * 2000}), {}),
    ("payload", ("job", {"x": object()}), {}),
    ("due_date", ("job",), {"due_date": datetime(2030, 1, 1)}),
    ("due_date", ("job",), {"due_date": "2030-01-01T00:00:00+00:00"}),
    ("tags", ("job",), {"tags": "urgent"}),
    ("tags", ("job",), {"tags": [f"t{n}" for n in range(257)]}),
    ("tags", ("job",), {"tags": (f"t{n}" for n in range(10**9))}),  # not read to the end
    ("requires", ("job",), {"requires": [f"r{n}" for n in range(257)]}),
    ("max_retries", ("job",), {"max_retries": -1}),
    ("title", ("job",), {"title": "  "}),
    ("workflow", ("job",), {"workflow": {"f": math.nan}}),
]


@pytest.mark.parametrize(
    ("field", "args", "kwargs"),
    BAD_CREATES,
    ids=[f"{field}-{i}" for i, (field, _, _) in enumerate(BAD_CREATES)],
)
async def test_bad_create_is_refused_and_writes_nothing(
    db_path: str, field: str, args: tuple[object, ...], kwargs: dict[str, object]
) -> None:
    config = RuntimeConfig(max_payload_bytes=1024)
    async with Runtime.open(db_path, config=config) as rt:
        await rt.create_task("job")
        seq = await last_seq(rt)
        count = len(await all_tasks(rt))
        with pytest.raises(InvalidInputError) as caught:
            await rt.create_task(*args, **kwargs)  # type: ignore[arg-type]
        assert await last_seq(rt) == seq
        assert len(await all_tasks(rt)) == count
    assert caught.value.field == field or caught.value.field.startswith(f"{field}.")
    assert field in str(caught.value)
    assert stored_count(db_path, "SELECT count(*) FROM tasks") == 1


async def test_name_lists_at_the_limit_are_accepted_and_no_tags_is_none(db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        names = [f"n{n}" for n in range(256)]
        full = await rt.get_task(await rt.create_task("job", tags=names, requires=names))
        bare = await rt.get_task(await rt.create_task("job", tags=None, requires=None))
    assert full is not None
    assert full.tags == full.requires == tuple(names)
    assert bare is not None
    assert bare.tags == bare.requires == ()


async def test_a_payload_at_the_limit_is_accepted(db_path: str) -> None:
    async with Runtime.open(db_path, config=RuntimeConfig(max_payload_bytes=1024)) as rt:
        payload = {"blob": "x" * (1024 - len('{"blob":""}'))}
        task_id = await rt.create_task("job", payload)
        task = await rt.get_task(task_id)
    assert task is not None
    assert task.payload == payload


async def test_bad_arguments_to_the_other_operations(db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        task_id = await rt.create_task("job")
        before = await rt.get_task(task_id)
        seq = await last_seq(rt)
        cases: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("status", lambda: rt.update_task_status(task_id, "sleeping")),
            ("status", lambda: rt.update_task_status(task_id, 3)),  # type: ignore[arg-type]
            ("metadata", lambda: rt.update_task_status(task_id, "running", {"owner": "me"})),
            ("result", lambda: rt.update_task_status(task_id, "running", result={"x": math.nan})),
            ("task_id", lambda: rt.update_task_status(7, "running")),  # type: ignore[arg-type]
            ("task_id", lambda: rt.get_task(123)),  # type: ignore[arg-type]
            ("task_id", lambda: rt.cancel_task(None)),  # type: ignore[arg-type]
            ("task_id", lambda: rt.delete_task(b"id")),  # type: ignore[arg-type]
            ("task_id", lambda: rt.get_runs(1.0)),  # type: ignore[arg-type]
            ("task_id", lambda: rt.create_run("")),
            ("limit", lambda: rt.get_queued_tasks(limit=0)),
            ("limit", lambda: rt.get_tasks_by_status("queued", limit=-1)),
            ("status", lambda: rt.get_tasks_by_status("sleeping")),
        ]
        for field, call in cases:
            with pytest.raises(InvalidInputError) as caught:
                await call()
            got = caught.value.field
            assert got == field or got.startswith(f"{field}."), (field, caught.value)
        assert await rt.get_task(task_id) == before
        assert await last_seq(rt) == seq
        assert len(await all_tasks(rt)) == 1


# -- concurrency ---------------------------------------------------------------------------


async def test_concurrent_creates_are_distinct_durable_and_logged_once(db_path: str) -> None:
    count = 50
    ids: list[str] = []

    async def create(i: int) -> None:
        ids.append(await rt.create_task("job", {"i": i}, priority=i % 4))

    async with Runtime.open(db_path) as rt:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for i in range(count):
                    tg.start_soon(create, i)
        events = await rt.read_events()
    assert len(ids) == count
    assert len(set(ids)) == count
    assert sorted(e.task_id or "" for e in events) == sorted(ids)
    assert {e.type for e in events} == {"task.created"}
    assert [e.seq for e in events] == list(range(1, count + 1))
    async with Runtime.open(db_path) as rt:
        loaded = [await rt.get_task(task_id) for task_id in ids]
        queued = await rt.get_tasks_by_status("queued")
    assert all(task is not None and task.status is TaskStatus.QUEUED for task in loaded)
    assert sorted(t.payload["i"] for t in queued if isinstance(t.payload["i"], int)) == list(
        range(count)
    )
    assert [t.priority for t in queued] == sorted((t.priority for t in queued), reverse=True)


async def test_an_open_run_of_a_finished_task_can_be_closed_after_reopen(db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        task_id = await rt.create_task("build")
        run_id = await rt.create_run(task_id, "worker-1")
        await rt.update_task_status(task_id, "running")
        await rt.update_task_status(task_id, "completed")
    async with Runtime.open(db_path) as rt:
        with anyio.fail_after(5):
            assert await rt.update_run_status(run_id, "completed", result={"ok": True})
            run = await rt.get_run(run_id)
        assert run is not None
        assert run.status is RunStatus.COMPLETED
        assert run.result == {"ok": True}
        with pytest.raises(IllegalTransitionError):
            await rt.update_run_status(run_id, "failed")


# -- one batch, and a failed commit (regressions found in review) ----------------------------


async def _one_batch(rt: Runtime, *messages: object) -> list[object]:
    """Queue all messages at once, so that the TaskManager handles them as one batch."""
    from hive_orchestration.runtime import Envelope, Reply

    replies: list[Reply[object]] = []
    for message in messages:
        reply: Reply[object] = Reply()
        assert rt._tasks.mailbox.put_nowait(Envelope(message, reply))  # type: ignore[arg-type]
        replies.append(reply)
    outcomes: list[object] = []
    with anyio.fail_after(5):
        for reply in replies:
            try:
                outcomes.append(await reply.wait())
            except Exception as exc:
                outcomes.append(exc)
    return outcomes


async def test_a_task_deleted_earlier_in_a_batch_is_gone_for_the_rest_of_it(db_path: str) -> None:
    from hive_orchestration.messages.tasks import CreateRun, DeleteTask, UpdateTaskStatus

    async with Runtime.open(db_path) as rt:
        task_id = await rt.create_task("job")
        outcomes = await _one_batch(
            rt,
            DeleteTask(task_id),
            UpdateTaskStatus(task_id=task_id, status=TaskStatus.RUNNING),
            DeleteTask(task_id),
            CreateRun(task_id=task_id),
        )
        assert outcomes[0] is True
        assert all(isinstance(o, NotFoundError) for o in outcomes[1:]), outcomes
        assert await rt.get_task(task_id) is None
        deleted = [e for e in await rt.read_events() if e.type == "task.deleted"]
        assert len(deleted) == 1


@pytest.mark.sqlite_only("injects a SQLite I/O error into the SQLite drivers")
async def test_a_failed_commit_restores_memory_exactly(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Delete + re-create under the same idempotency key, in a batch whose commit fails:
    afterwards the key still names the original task, and nothing else changed."""
    from hive_orchestration.messages.tasks import CreateTask, DeleteTask
    from hive_orchestration.storage.sqlite import drivers

    failures = {"left": 0}
    originals = {cls: cls.transaction for cls in (drivers.ThreadDriver, drivers.AiosqliteDriver)}

    def failing(cls: type[drivers.Driver]) -> Callable[..., Awaitable[None]]:
        async def transaction(self: drivers.Driver, statements: list[drivers.Statement]) -> None:
            if failures["left"] and any("tasks" in sql for sql, _ in statements):
                failures["left"] -= 1
                raise sqlite3.OperationalError("disk I/O error (injected)")
            await originals[cls](self, statements)  # type: ignore[arg-type]

        return transaction

    for cls in originals:
        monkeypatch.setattr(cls, "transaction", failing(cls))
    async with Runtime.open(db_path) as rt:
        task_id = await rt.create_task("job", idempotency_key="K")
        before = await rt.get_task(task_id)
        failures["left"] = 1
        outcomes = await _one_batch(
            rt,
            DeleteTask(task_id),
            CreateTask(title="again", task_type="job", payload={}, idempotency_key="K"),
        )
        assert all(isinstance(o, StorageError) for o in outcomes), outcomes
        assert await rt.get_task(task_id) == before
        assert await rt.create_task("job", idempotency_key="K") == task_id
        assert [t.id for t in await rt.get_pending_tasks()] == [task_id]


async def test_payloads_are_copied_not_shared(db_path: str) -> None:
    payload: dict[str, object] = {"items": [1], "pair": (1, 2)}
    async with Runtime.open(db_path) as rt:
        task_id = await rt.create_task("job", payload)
        items = payload["items"]
        assert isinstance(items, list)
        items.append(2)
        task = await rt.get_task(task_id)
        assert task is not None
        # As stored, and the same before and after a restart: plain JSON types.
        assert task.payload == {"items": [1], "pair": [1, 2]}


async def test_due_dates_are_kept_as_the_same_instant_in_utc(db_path: str) -> None:
    india = timezone(timedelta(hours=5, minutes=30))
    due = datetime(2030, 1, 1, 12, 0, tzinfo=india)
    async with Runtime.open(db_path) as rt:
        task_id = await rt.create_task("job", due_date=due)
        with pytest.raises(InvalidInputError) as caught:
            await rt.create_task(
                "job", due_date=datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1)))
            )
        assert caught.value.field == "due_date"
    async with Runtime.open(db_path) as rt:
        task = await rt.get_task(task_id)
    assert task is not None
    assert task.due_date is not None
    assert task.due_date == due
    assert task.due_date.utcoffset() == timedelta(0)


# -- resolving a task by hand --------------------------------------------------------------


@pytest.mark.parametrize("target", [TaskStatus.COMPLETED, TaskStatus.FAILED])
async def test_a_queued_task_is_resolved_by_hand_with_its_event_and_no_run(
    db_path: str, target: TaskStatus
) -> None:
    """The extraction plan's quick start: create a task, then mark it completed."""
    async with Runtime.open(db_path) as rt:
        task_id = await rt.create_task("job", source_agent="orchestrator")
        fields: dict[str, object] = (
            {"result": {"done": True}} if target is TaskStatus.COMPLETED else {"error": "no"}
        )
        assert await rt.update_task_status(task_id, target, source_agent="ops", **fields)  # type: ignore[arg-type]
        task = await rt.get_task(task_id)
        events = [(e.type, e.source, e.data.get("previous")) for e in await rt.read_events()]
        assert await rt.get_runs(task_id) == []
        # Out of a terminal status, nothing moves.
        for other in (TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.CANCELLED):
            with pytest.raises(IllegalTransitionError):
                await rt.update_task_status(task_id, other)
        # Nobody can claim it any more.
        assert await rt.claim_task("w1") is None
    assert task is not None
    assert task.status is target
    assert events == [
        ("task.created", "orchestrator", None),
        (f"task.{target.value}", "ops", "queued"),
    ]
    if target is TaskStatus.COMPLETED:
        assert task.result == {"done": True}
    else:
        assert task.error == "no"


async def test_saying_a_finished_task_is_finished_again_is_a_no_op(db_path: str) -> None:
    async with Runtime.open(db_path) as rt:
        done = await rt.create_task("job")
        await rt.update_task_status(done, "completed", result={"n": 1})
        seq = await last_seq(rt)
        # The same outcome again (the seeds' client publishes TaskCompletedEvent with an
        # empty result after completing a task): nothing to change, nothing published.
        assert await rt.update_task_status(done, "completed") is False
        assert await rt.update_task_status(done, "completed", result={"n": 1}) is False
        assert await last_seq(rt) == seq
        # A different outcome is a change, and a finished task does not change.
        with pytest.raises(IllegalTransitionError):
            await rt.update_task_status(done, "completed", result={"n": 2})
        with pytest.raises(IllegalTransitionError):
            await rt.update_task_status(done, "completed", error="oops")
        plain = await rt.create_task("job")
        await rt.update_task_status(plain, "completed")
        assert await rt.update_task_status(plain, "completed", result={}) is False
        with pytest.raises(IllegalTransitionError):
            await rt.update_task_status(plain, "completed", result={"late": True})
        assert await last_seq(rt) == seq + 2
        task = await rt.get_task(done)
    assert task is not None
    assert task.result == {"n": 1}


async def test_a_refusal_is_raised_at_the_call_without_the_actors_frames(db_path: str) -> None:
    """The traceback a caller sees ends in the package's API, not in an actor's stack."""
    async with Runtime.open(db_path) as rt:
        task_id = await rt.create_task("job")
        await rt.cancel_task(task_id)
        with pytest.raises(IllegalTransitionError) as caught:
            await rt.update_task_status(task_id, "running")
    frames = [frame.filename for frame in traceback.extract_tb(caught.value.__traceback__)]
    internal = [f for f in frames if "/actors/" in f or "/storage/" in f]
    assert internal == []
    assert any(f.endswith("/api/ops/tasks.py") for f in frames)
