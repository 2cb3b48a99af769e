"""After creation, a task's or run's row is written only in its state columns
(SetTaskState / SetRunState: TASK_STATE_COLUMNS, RUN_STATE_COLUMNS). End to end through
the public API: every path that changes a task or a run is driven, and what the runtime
reports (get_task, get_runs) is compared field for field with what is stored: in the
file, read directly once the runtime is closed, and as a reopened runtime reads it back.
A change the state columns miss would show as a difference.

The one report that is not stored on purpose: a bare heartbeat (no progress, no phase)
moves the lease in memory only (the lease lives as long as the process). The scenario
below ends every claim it renews that way with a durable change, and a separate test
pins that behaviour down.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import msgspec
import pytest
from _raw import is_postgres, raw_rows

from hive_orchestration import (
    Claim,
    RunStatus,
    Runtime,
    RuntimeConfig,
    TaskStatus,
)
from hive_orchestration.messages.tasks import Run, Task
from hive_orchestration.storage.rows import (
    RUN_COLUMNS,
    RUN_STATE_COLUMNS,
    TASK_COLUMNS,
    TASK_STATE_COLUMNS,
    run_from_row,
    run_state_statement,
    run_statement,
    task_from_row,
    task_state_statement,
    task_statement,
)
from hive_orchestration.storage.sqlite.schema import MIGRATIONS

pytestmark = pytest.mark.anyio

#: Bound on anything that should happen "soon": generous, so a loaded machine passes.
SOON = 10.0
#: A lease or run timeout short enough to expire within the test.
SHORT = 0.2
#: What recovery on open writes as the error of a claim the previous process held.
RECOVERED = "the runtime stopped while a worker held the task"

#: Task fields fixed when the task is created: a state write leaves them alone.
TASK_FIXED = {
    "id", "title", "description", "task_type", "priority", "workflow", "payload", "tags",
    "max_retries", "due_date", "idempotency_key", "correlation_id", "source_agent",
    "timeout", "concurrency_key", "concurrency_limit", "requires", "plan_id", "subtask_id",
    "created_at", "idempotency_scope", "traceparent", "tracestate", "expires_at",
}  # fmt: skip
#: Run fields fixed when the run is opened.
RUN_FIXED = {"id", "task_id", "worker_id", "run_number", "lease_seconds"}
#: Run columns whose struct field has another name.
RUN_FIELD_OF_COLUMN = {"result_data": "result", "error_message": "error"}


def columns(names: str) -> list[str]:
    return [name.strip() for name in names.split(",")]


# -- the state columns are exactly the fields that change -----------------------------------


def test_every_task_field_not_fixed_at_creation_is_a_state_column() -> None:
    """A mutable Task field added without its state column fails here (its changes would
    be reported but never stored)."""
    state = columns(TASK_STATE_COLUMNS)
    fields = set(Task.__struct_fields__)
    assert len(state) == len(set(state))
    assert set(state) <= fields
    assert fields - set(state) == TASK_FIXED
    assert set(columns(TASK_COLUMNS)) == fields


def test_every_run_field_not_fixed_at_creation_is_a_state_column() -> None:
    state = [RUN_FIELD_OF_COLUMN.get(name, name) for name in columns(RUN_STATE_COLUMNS)]
    fields = set(Run.__struct_fields__)
    assert len(state) == len(set(state))
    assert set(state) <= fields
    assert fields - set(state) == RUN_FIXED
    assert {RUN_FIELD_OF_COLUMN.get(name, name) for name in columns(RUN_COLUMNS)} == fields


T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _schema() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    for migration in MIGRATIONS:
        for statement in migration:
            conn.execute(statement)
    return conn


def test_a_state_statement_writes_each_state_field_to_its_own_column() -> None:
    """Every state field set to a value of its own (none shared, none None): read back,
    the row has the new state and the old fixed fields, so no parameter is out of place."""
    created = Task(
        id="t1", title="title", task_type="job", status=TaskStatus.QUEUED, priority=5,
        description="d", workflow={"w": 1}, payload={"p": 1}, tags=("a",), max_retries=4,
        due_date=T0 + timedelta(days=1), idempotency_key="k", correlation_id="c",
        source_agent="s", timeout=9.5, concurrency_key="ck", concurrency_limit=2,
        requires=("gpu",), plan_id="plan", subtask_id="sub", created_at=T0, updated_at=T0,
    )  # fmt: skip
    changed = msgspec.structs.replace(
        created,
        status=TaskStatus.RUNNING,
        current_phase="phase",
        updated_at=T0 + timedelta(seconds=1),
        assigned_worker="worker",
        attempts=3,
        result={"r": 2},
        error="error",
        available_at=T0 + timedelta(seconds=2),
    )
    assert {name: getattr(changed, name) for name in TASK_FIXED} == {
        name: getattr(created, name) for name in TASK_FIXED
    }
    opened = Run(
        id="r1", task_id="t1", worker_id="w", run_number=2, status=RunStatus.ASSIGNED,
        lease_seconds=7.5,
    )  # fmt: skip
    closed = msgspec.structs.replace(
        opened,
        status=RunStatus.FAILED,
        phase="ph",
        result={"x": 1},
        error="err",
        output_log="log",
        started_at=T0 + timedelta(seconds=3),
        completed_at=T0 + timedelta(seconds=4),
        lease_expires_at=T0 + timedelta(seconds=5),
        progress={"pct": 50},
    )
    conn = _schema()
    for sql, params in (task_statement(created), run_statement(opened)):
        conn.execute(sql, params)
    for sql, params in (task_state_statement(changed), run_state_statement(closed)):
        assert conn.execute(sql, params).rowcount == 1
    (task_row,) = conn.execute(f"SELECT {TASK_COLUMNS} FROM tasks").fetchall()
    (run_row,) = conn.execute(f"SELECT {RUN_COLUMNS} FROM runs").fetchall()
    assert_same(task_from_row(task_row), changed)
    assert_same(run_from_row(run_row), closed)


# -- helpers ---------------------------------------------------------------------------------


def assert_same(got: msgspec.Struct, want: msgspec.Struct, what: str = "") -> None:
    """Equal field for field (a readable diff of the fields that differ)."""
    got_fields, want_fields = msgspec.structs.asdict(got), msgspec.structs.asdict(want)
    differ = {
        name: (got_fields[name], want_fields[name])
        for name in want_fields
        if got_fields[name] != want_fields[name]
    }
    assert differ == {}, f"{what}: (got, want) per field"
    assert got == want


Snapshot = dict[str, tuple[Task, list[Run]]]


def stored_in(path: str) -> Snapshot:
    """Every task and its runs, as the database holds them (read without the runtime)."""
    tasks = raw_rows(path, f"SELECT {TASK_COLUMNS} FROM tasks ORDER BY id")
    # Runs in the order get_runs gives them: on SQLite by rowid (the order written);
    # PostgreSQL has no rowid, so ties of run_number are taken in id order there.
    order = "id" if is_postgres(path) else "rowid"
    runs = raw_rows(path, f"SELECT {RUN_COLUMNS} FROM runs ORDER BY task_id, run_number, {order}")
    found: Snapshot = {}
    for row in tasks:
        task = task_from_row(row)
        found[task.id] = (task, [])
    for row in runs:
        run = run_from_row(row)
        found[run.task_id][1].append(run)
    return found


async def reported_by(rt: Runtime) -> Snapshot:
    """Every task (listed by status, then get_task) and its runs (get_runs), as the
    runtime reports them."""
    found: Snapshot = {}
    for status in dict.fromkeys(TaskStatus):
        for listed in await rt.get_tasks_by_status(status):
            task = await rt.get_task(listed.id)
            assert task is not None
            # Terminal tasks are listed from storage and got from memory: the same.
            assert_same(task, listed, f"task {task.id}, listed vs got")
            found[task.id] = (task, await rt.get_runs(task.id))
    return found


def assert_snapshots_equal(got: Snapshot, want: Snapshot, what: str) -> None:
    assert sorted(got) == sorted(want), what
    for task_id, (want_task, want_runs) in want.items():
        got_task, got_runs = got[task_id]
        assert_same(got_task, want_task, f"{what}: task {want_task.title}")
        assert [run.id for run in got_runs] == [run.id for run in want_runs], what
        for got_run, want_run in zip(got_runs, want_runs, strict=True):
            assert_same(
                got_run, want_run, f"{what}: run {want_run.run_number} of {want_task.title}"
            )


@asynccontextmanager
async def runtime(db_path: str, **config: Any) -> AsyncIterator[Runtime]:
    # A long backoff: a task requeued after a failure stays delayed (available_at set).
    settings: dict[str, Any] = {"retry_backoff": 30.0, "retry_backoff_max": 60.0}
    settings.update(config)
    async with Runtime.open(db_path, config=RuntimeConfig(**settings)) as rt:
        yield rt


async def claim(rt: Runtime, task_type: str, worker: str = "w1", **kwargs: Any) -> Claim:
    got = await rt.claim_task(worker, task_type, **kwargs)
    assert got is not None, f"expected a {task_type} task to claim"
    assert got.task.task_type == task_type
    return got


async def wait_for(rt: Runtime, task_id: str, status: TaskStatus) -> Task:
    with anyio.fail_after(SOON):
        while True:
            task = await rt.get_task(task_id)
            assert task is not None
            if task.status is status:
                return task
            await anyio.sleep(0.02)


@dataclass
class Scenario:
    """The tasks the scenario made (title -> id), as each was created, and the ones a
    claim still holds (title -> id)."""

    ids: dict[str, str] = field(default_factory=dict)
    created: dict[str, Task] = field(default_factory=dict)
    held: dict[str, str] = field(default_factory=dict)

    async def new(self, rt: Runtime, name: str, **kwargs: Any) -> str:
        """A task titled and typed ``name`` (each task its own type: claims pick it)."""
        task_id = await rt.create_task(name, {"name": name}, title=name, **kwargs)
        task = await rt.get_task(task_id)
        assert task is not None
        self.ids[name] = task_id
        self.created[task_id] = task
        return task_id


RESULT: Mapping[str, object] = {"ok": True, "items": [1, 2.5, "three", None], "n": {"k": []}}


async def drive_every_change(rt: Runtime, s: Scenario) -> None:
    # Claimed, renewed (bare, then with progress and phase), started, completed.
    await s.new(rt, "complete", priority=7, tags=["x"], description="d", max_retries=1)
    got = await claim(rt, "complete", lease=60.0)
    await rt.heartbeat(got.lease)
    await rt.heartbeat(got.lease, extend=120.0)
    await rt.heartbeat(got.lease, progress={"pct": 10}, phase="fetch")
    await rt.report_progress(got.lease, {"pct": 90})
    started = await rt.start_task(got.lease)
    await rt.heartbeat(got.lease, phase="upload")
    await rt.heartbeat(got.lease)  # bare, then a durable change: the lease is written
    assert started == await rt.get_task(started.id)
    done = await rt.complete_task(got.lease, RESULT)
    assert done == await rt.get_task(done.id)

    # Completed without a result.
    await s.new(rt, "complete-bare")
    got = await claim(rt, "complete-bare")
    await rt.complete_task(got.lease)

    # Failed with retries left (requeued with a backoff), then claimed again and failed
    # for good: attempts, error and available_at at each step.
    await s.new(rt, "retry", max_retries=1)
    got = await claim(rt, "retry")
    await rt.start_task(got.lease)
    requeued = await rt.fail_task(got.lease, "first failure")
    assert requeued.status is TaskStatus.QUEUED
    assert requeued.available_at is not None
    assert requeued.attempts == 1
    await s.new(rt, "retry-now", max_retries=2)
    got = await claim(rt, "retry-now")
    await rt.fail_task(got.lease, "try again", retry_after=0.0)
    got = await claim(rt, "retry-now", worker="w2")
    await rt.fail_task(got.lease, "and again", retry_after=0.0)
    got = await claim(rt, "retry-now", worker="w3")
    await rt.start_task(got.lease)
    failed = await rt.fail_task(got.lease, "out of attempts")
    assert failed.status is TaskStatus.FAILED
    assert failed.attempts == 3
    await s.new(rt, "not-retryable", max_retries=5)
    got = await claim(rt, "not-retryable")
    await rt.fail_task(got.lease, "fatal", retryable=False)
    await s.new(rt, "no-retries", max_retries=0)
    got = await claim(rt, "no-retries")
    await rt.fail_task(got.lease, "once only")

    # Released: queued again at once, no attempt counted; then completed by another.
    await s.new(rt, "release")
    got = await claim(rt, "release")
    await rt.start_task(got.lease)
    await rt.release_task(got.lease, reason="shutting down")
    await s.new(rt, "release-then-done")
    got = await claim(rt, "release-then-done")
    await rt.release_task(got.lease)
    got = await claim(rt, "release-then-done", worker="w2")
    await rt.complete_task(got.lease, {"second": True})

    # Cancelled: queued, assigned, running.
    await rt.cancel_task(await s.new(rt, "cancel-queued"), reason="not needed")
    await s.new(rt, "cancel-assigned")
    await claim(rt, "cancel-assigned")
    await rt.cancel_task(s.ids["cancel-assigned"])
    await s.new(rt, "cancel-running")
    got = await claim(rt, "cancel-running")
    await rt.start_task(got.lease)
    await rt.heartbeat(got.lease, progress={"pct": 50})
    await rt.cancel_task(s.ids["cancel-running"], reason="stop", source_agent="boss")

    # By hand, with metadata: assigned, running, back to queued, running, completed.
    task_id = await s.new(rt, "by-hand")
    meta = {"assigned_worker": "hand", "current_phase": "setup"}
    assert await rt.update_task_status(task_id, "assigned", meta)
    assert await rt.update_task_status(task_id, "running", {"current_phase": "build"})
    assert await rt.update_task_status(task_id, "queued", {"current_phase": "again"})
    assert await rt.update_task_status(task_id, "running", {"assigned_worker": "other"})
    assert await rt.update_task_status(task_id, "completed", result={"by": "hand"})
    task_id = await s.new(rt, "by-hand-failed")
    assert await rt.update_task_status(task_id, "running")
    assert await rt.update_task_status(task_id, "failed", error="broken", source_agent="ops")
    task_id = await s.new(rt, "by-hand-timed-out")
    assert await rt.update_task_status(task_id, "assigned", {"assigned_worker": "w9"})
    assert await rt.update_task_status(task_id, "timed_out", error="too slow")
    task_id = await s.new(rt, "by-hand-requeued-with-worker")
    assert await rt.update_task_status(task_id, "assigned", {"assigned_worker": "a"})
    assert await rt.update_task_status(task_id, "queued", {"assigned_worker": "b"})
    task_id = await s.new(rt, "by-hand-cancelled")
    assert await rt.update_task_status(task_id, "cancelled", error="no")

    # By hand while a claim holds the task: its run moves along (running, released, ...).
    task_id = await s.new(rt, "claimed-by-hand")
    await claim(rt, "claimed-by-hand")
    assert await rt.update_task_status(task_id, "running", {"current_phase": "p"})
    assert await rt.update_task_status(task_id, "queued")
    await claim(rt, "claimed-by-hand", worker="w2")
    assert await rt.update_task_status(task_id, "completed", result={"r": 1}, error="e")
    for status in ("failed", "timed_out", "cancelled"):
        task_id = await s.new(rt, f"claimed-then-{status}")
        await claim(rt, f"claimed-then-{status}")
        assert await rt.update_task_status(task_id, status, error=f"set {status}")

    # Runs opened and moved by hand (not claims).
    task_id = await s.new(rt, "runs")
    run1 = await rt.create_run(task_id, "rw", phase="one")
    assert await rt.update_run_status(
        run1, "completed", result={"rows": 3}, phase="done", output_log="line 1\nline 2"
    )
    run2 = await rt.create_run(task_id)
    assert await rt.update_run_status(run2, RunStatus.FAILED, error="crashed")
    run3 = await rt.create_run(task_id, "rw2")
    assert await rt.update_run_status(run3, "assigned", phase="waiting")
    assert await rt.update_run_status(run3, "running")
    assert await rt.update_run_status(run3, "cancelled", output_log="bye")
    await rt.create_run(task_id, "rw3", phase="left open")
    # A run still open when its task ends, then moved.
    task_id = await s.new(rt, "run-outlives-task")
    run4 = await rt.create_run(task_id, "rw4")
    await rt.cancel_task(task_id)
    assert await rt.update_run_status(run4, "lost", error="gone with the task")

    # A worker declared lost: what it holds goes back (one attempt) or fails.
    await s.new(rt, "worker-lost")
    got = await claim(rt, "worker-lost", worker="lost-worker")
    await rt.start_task(got.lease)
    await s.new(rt, "worker-lost-last", max_retries=0)
    await claim(rt, "worker-lost-last", worker="lost-worker")
    assert await rt.release_worker_tasks("lost-worker", reason="no heartbeat") == 2

    # Leases that expire (short lease argument) and a run timeout.
    await s.new(rt, "lease-expires")
    await claim(rt, "lease-expires", lease=SHORT)
    # (No start_task on these: it would race the deadline on a loaded machine.)
    await s.new(rt, "lease-expires-last", max_retries=0)
    await claim(rt, "lease-expires-last", lease=SHORT)
    await s.new(rt, "times-out", timeout=SHORT, max_retries=0)
    await claim(rt, "times-out", lease=60.0)
    await wait_for(rt, s.ids["lease-expires"], TaskStatus.QUEUED)
    await wait_for(rt, s.ids["lease-expires-last"], TaskStatus.FAILED)
    await wait_for(rt, s.ids["times-out"], TaskStatus.TIMED_OUT)

    # A plan: a completed subtask queues its dependent (blocked -> queued); a failed one
    # (fail_fast) cancels its blocked dependent (blocked -> cancelled).
    plan = {
        "subtasks": [
            {"id": "a", "task_type": "plan-a"},
            {"id": "b", "task_type": "plan-b", "dependencies": ["a"]},
            {"id": "x", "task_type": "plan-x"},
            {"id": "y", "task_type": "plan-y", "dependencies": ["x"]},
        ]
    }
    plan_id = await rt.create_execution_plan(plan, failure_policy="fail_fast")
    assert await rt.mark_plan_execution_started(plan_id)
    subtask_tasks = {st.subtask_id: st.task_id for st in await rt.get_plan_subtasks(plan_id)}
    got = await claim(rt, "plan-a")
    await rt.complete_task(got.lease, {"a": 1})
    got = await claim(rt, "plan-b", wait=SOON)  # queued by the plan once "a" completed
    await rt.start_task(got.lease)
    await rt.complete_task(got.lease, {"b": 2})
    got = await claim(rt, "plan-x")
    await rt.fail_task(got.lease, "x broke", retryable=False)
    ended = await rt.wait_for_plan(plan_id, timeout=SOON)
    assert ended.status.value == "failed"
    y = subtask_tasks["y"]
    assert y is not None
    await wait_for(rt, y, TaskStatus.CANCELLED)
    for subtask_id, plan_task_id in subtask_tasks.items():
        assert plan_task_id is not None
        s.ids[f"plan-{subtask_id}"] = plan_task_id
        task = await rt.get_task(plan_task_id)
        assert task is not None
        s.created[plan_task_id] = task  # only its fixed fields are compared below

    # Held when the runtime closes: running with progress, and only assigned.
    await s.new(rt, "held-running", max_retries=2)
    got = await claim(rt, "held-running", worker="holder")
    await rt.start_task(got.lease)
    await rt.heartbeat(got.lease, progress={"pct": 30}, phase="working")
    s.held["held-running"] = got.task.id
    await s.new(rt, "held-assigned", max_retries=0)
    got = await claim(rt, "held-assigned", worker="holder")
    s.held["held-assigned"] = got.task.id

    # Deleted after a run: gone from both.
    task_id = await s.new(rt, "deleted")
    await claim(rt, "deleted")
    assert await rt.delete_task(task_id)
    del s.ids["deleted"], s.created[task_id]


def recovered(task: Task, runs: list[Run], now: datetime) -> tuple[Task, list[Run]]:
    """What recovery on open makes of a task a claim held at close: its open run ends
    lost and the task goes back to the queue (or fails, with no attempt left)."""
    attempts = task.attempts + 1
    status = TaskStatus.QUEUED if attempts <= task.max_retries else TaskStatus.FAILED
    task = msgspec.structs.replace(
        task,
        status=status,
        attempts=attempts,
        assigned_worker=None,
        error=RECOVERED,
        updated_at=now,
        **({"available_at": None} if status is TaskStatus.QUEUED else {}),
    )
    runs = [
        msgspec.structs.replace(run, status=RunStatus.LOST, completed_at=now, error=RECOVERED)
        if run.status in (RunStatus.ASSIGNED, RunStatus.RUNNING)
        else run
        for run in runs
    ]
    return task, runs


async def test_what_the_runtime_reports_is_what_is_stored(db_path: str) -> None:
    s = Scenario()
    async with runtime(db_path) as rt:
        await drive_every_change(rt, s)
        reported = await reported_by(rt)
    assert sorted(reported) == sorted(s.ids.values())

    # Every change reached the file: the rows equal the reports, held claims included.
    assert_snapshots_equal(stored_in(db_path), reported, "file after close")

    # Whatever changed, the fixed fields are as created.
    for task_id, created in s.created.items():
        task = reported[task_id][0]
        for name in TASK_FIXED:
            assert getattr(task, name) == getattr(created, name), (task.title, name)

    # Reopened: the same tasks and runs, but for the claims recovery ended.
    async with runtime(db_path) as rt:
        again = await reported_by(rt)
    held = set(s.held.values())
    assert held
    assert held <= set(reported)
    assert_snapshots_equal(
        {k: v for k, v in again.items() if k not in held},
        {k: v for k, v in reported.items() if k not in held},
        "reopened",
    )
    for name, task_id in s.held.items():
        now = again[task_id][0].updated_at
        assert now > reported[task_id][0].updated_at, name
        want = recovered(*reported[task_id], now)
        assert_snapshots_equal({task_id: again[task_id]}, {task_id: want}, f"recovered {name}")
    statuses = {name: again[task_id][0].status for name, task_id in s.held.items()}
    assert statuses == {
        "held-running": TaskStatus.QUEUED,
        "held-assigned": TaskStatus.FAILED,
    }
    # And what recovery changed is stored as reported too.
    assert_snapshots_equal(stored_in(db_path), again, "file after reopen")


async def test_a_bare_heartbeat_moves_the_lease_in_memory_only(db_path: str) -> None:
    """The one reported change that is not stored, on purpose: a heartbeat without
    progress or phase. The next durable change of the run writes the lease it reached.
    On PostgreSQL (a store several nodes share) it is stored too: the database keeps the
    lease's deadline by its own clock, which the leader reaps by (POSTGRES.md)."""
    async with runtime(db_path) as rt:
        task_id = await rt.create_task("job", title="job")
        got = await claim(rt, "job", lease=60.0)
        expires = await rt.heartbeat(got.lease, extend=600.0)
        (run,) = await rt.get_runs(task_id)
        assert run.lease_expires_at == expires
        (stored_run,) = stored_in(db_path)[task_id][1]
        if is_postgres(db_path):
            assert_same(stored_run, run)
        else:
            assert stored_run.lease_expires_at == got.expires_at < expires
            assert_same(stored_run, msgspec.structs.replace(run, lease_expires_at=got.expires_at))
        renewed = await rt.heartbeat(got.lease, phase="p", extend=900.0)
        (run,) = await rt.get_runs(task_id)
        assert run.lease_expires_at == renewed > expires
        assert_same(stored_in(db_path)[task_id][1][0], run)
