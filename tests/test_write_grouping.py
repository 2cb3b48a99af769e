"""The storage actor applies a write's row ops grouped (deletes, tasks, runs), each row
once. Property: on any sequence of ops that applies cleanly one by one, grouping leaves
exactly the same rows. (Grouping may also accept a run put before its task in the same
write, which in order breaks the foreign key; the TaskManager never writes that.)

A state op (SetTaskState, SetRunState) writes only the state columns of a row that
exists; the TaskManager sends one only for a row it put before, with that row's fixed
columns unchanged. The property generates state ops that keep that invariant, and the
direct tests below show how a state op is written alone, after a put in the same write,
and that a driver refuses (rolls back) a transaction whose state UPDATE finds no row."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import anyio
import msgspec
import pytest
from _raw import raw_rows
from hypothesis import given, settings
from hypothesis import strategies as st

from hive_orchestration import RuntimeConfig
from hive_orchestration.errors import StorageError
from hive_orchestration.messages.events import Event
from hive_orchestration.messages.storage import (
    AppendEvent,
    DeleteTaskRow,
    FenceTask,
    PutRun,
    PutTask,
    SetRunState,
    SetTaskState,
    StorageMessage,
    Write,
    WriteOp,
)
from hive_orchestration.messages.tasks import Run, RunStatus, Task, TaskStatus
from hive_orchestration.runtime import ActorRef, ChildSpec, Supervisor
from hive_orchestration.storage import StorageActor
from hive_orchestration.storage.actor import _in_order, _row_statements
from hive_orchestration.storage.grouping import _grouped, _task_path
from hive_orchestration.storage.rows import (
    FENCE_TASK,
    RUN_COLUMNS,
    SET_RUN_STATE,
    SET_TASK_STATE,
    SET_TASK_STATE_FENCED,
    TASK_COLUMNS,
    run_from_row,
    run_statement,
    task_from_row,
    task_statement,
)
from hive_orchestration.storage.sqlite.drivers import Driver, Statement, _transaction_sync, connect
from hive_orchestration.storage.sqlite.schema import MIGRATIONS

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TASK_IDS = ["t1", "t2", "t3"]
RUN_IDS = ["r1", "r2", "r3"]
TASK_STATUSES = list(TaskStatus)
RUN_STATUSES = list(RunStatus)


def _migrated() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    for migration in MIGRATIONS:
        for statement in migration:
            conn.execute(statement)
    return conn


_SCHEMA = _migrated()


def fresh() -> sqlite3.Connection:
    """An empty database with the schema (copied: faster than migrating each time)."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    _SCHEMA.backup(conn)
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def apply(
    statements: list[Statement], setup: Sequence[Statement] = (), *, checked: bool = False
) -> object:
    """The rows after ``setup`` (each statement committed alone, those that fail
    skipped) and then ``statements`` in one transaction; "error" if that transaction
    fails. Plain execute, or ``checked``: as the drivers run it (consecutive statements
    coalesced into executemany, and an UPDATE that finds fewer rows than it was given
    fails the transaction)."""
    conn = fresh()
    for sql, params in setup:
        with contextlib.suppress(sqlite3.IntegrityError):  # each its own write
            conn.execute(sql, params)
    try:
        if checked:
            _transaction_sync(conn, statements)
        else:
            conn.execute("BEGIN")
            for sql, params in statements:
                conn.execute(sql, params)
            conn.execute("COMMIT")
    except sqlite3.Error:
        return "error"
    tasks = conn.execute("SELECT * FROM tasks ORDER BY id").fetchall()
    runs = conn.execute("SELECT * FROM runs ORDER BY id").fetchall()
    return tasks, runs


def task(task_id: str, n: int, key: str | None) -> Task:
    return Task(
        id=task_id,
        title=f"v{n}",
        task_type="job",
        status=TASK_STATUSES[n % len(TASK_STATUSES)],
        priority=n,
        idempotency_key=key,
        created_at=T0,
        updated_at=T0 + timedelta(seconds=n),
    )


def run(run_id: str, task_id: str, n: int) -> Run:
    return Run(id=run_id, task_id=task_id, run_number=n, status=RunStatus.RUNNING)


def task_state(base: Task, n: int) -> Task:
    """``base`` with only its state fields changed (what a SetTaskState carries)."""
    return msgspec.structs.replace(
        base,
        status=TASK_STATUSES[(n + 3) % len(TASK_STATUSES)],
        current_phase=f"phase{n}",
        updated_at=T0 + timedelta(minutes=n),
        assigned_worker=None if n % 3 == 0 else f"w{n}",
        attempts=n,
        result=None if n % 2 else {"n": n},
        error=None if n % 2 == 0 else f"e{n}",
        available_at=None if n % 4 else T0 + timedelta(hours=n),
    )


def run_state(base: Run, n: int) -> Run:
    """``base`` with only its state fields changed (what a SetRunState carries)."""
    return msgspec.structs.replace(
        base,
        status=RUN_STATUSES[n % len(RUN_STATUSES)],
        phase=f"p{n}",
        result=None if n % 2 else {"n": n},
        error=None if n % 2 == 0 else f"e{n}",
        output_log=None if n % 3 else f"log{n}",
        started_at=T0 + timedelta(seconds=n),
        completed_at=None if n % 2 else T0 + timedelta(minutes=n),
        lease_expires_at=T0 + timedelta(hours=n),
        progress=None if n % 3 == 1 else {"done": n},
    )


# With no earlier put of its id, a state op is based on these (its UPDATE finds no row
# in order, and so must it grouped).
ORPHAN_TASK = Task(id="?", title="orphan", task_type="other", status=TaskStatus.QUEUED,
                   created_at=T0, updated_at=T0)  # fmt: skip
ORPHAN_RUN = Run(id="?", task_id="t1", run_number=7, status=RunStatus.ASSIGNED)

# An op as generated: (kind, id, ...); state ops are made concrete by `materialise`.
RawOp = tuple[object, ...]

put_task_ops = st.tuples(
    st.just("put_task"),
    st.sampled_from(TASK_IDS),
    st.integers(0, 50),
    st.sampled_from([None, None, "k1", "k2"]),
)
put_run_ops = st.tuples(
    st.just("put_run"),
    st.sampled_from(RUN_IDS),
    st.sampled_from(TASK_IDS),
    st.integers(1, 9),
)
raw_ops = st.one_of(
    put_task_ops,
    put_run_ops,
    st.tuples(st.just("delete"), st.sampled_from(TASK_IDS)),
    st.tuples(st.just("set_task"), st.sampled_from(TASK_IDS), st.integers(0, 50)),
    st.tuples(st.just("set_run"), st.sampled_from(RUN_IDS), st.integers(0, 50)),
)
#: What earlier writes left: rows for the state ops of the write under test to find.
earlier_ops = st.one_of(put_task_ops, put_run_ops)


def materialise(raw: Sequence[RawOp]) -> list[WriteOp]:
    """The ops, each state op based on the last put of its row earlier in ``raw`` (the
    same task or run with only state fields changed), else on the orphan.

    A task keeps the idempotency key of its first put, and a run the task of its first
    put, until deleted, as the TaskManager's do (each is put once, at its creation, and
    neither changes): a put that moved a key between two stored tasks, or a run to
    another task, could need an order no grouping knows without reading the database."""
    tasks: dict[str, Task] = {}
    runs: dict[str, Run] = {}
    keys: dict[str, str | None] = {}
    run_tasks: dict[str, str] = {}
    ops: list[WriteOp] = []
    for op in raw:
        match op:
            case ("put_task", str(i), int(n), key):
                kept = keys.setdefault(i, key if isinstance(key, str) else None)
                tasks[i] = task(i, n, kept)
                ops.append(PutTask(tasks[i]))
            case ("put_run", str(i), str(t), int(n)):
                runs[i] = run(i, run_tasks.setdefault(i, t), n)
                ops.append(PutRun(runs[i]))
            case ("delete", str(i)):
                keys.pop(i, None)
                for run_id in [r for r, t in run_tasks.items() if t == i]:
                    del run_tasks[run_id]  # deleted with its task
                ops.append(DeleteTaskRow(i))
            case ("set_task", str(i), int(n)):
                base = tasks.get(i, msgspec.structs.replace(ORPHAN_TASK, id=i))
                ops.append(SetTaskState(task_state(base, n)))
            case ("set_run", str(i), int(n)):
                base_run = runs.get(i, msgspec.structs.replace(ORPHAN_RUN, id=i))
                ops.append(SetRunState(run_state(base_run, n)))
            case _:
                raise AssertionError(op)
    return ops


#: Earlier writes that stored every task and run id: most state ops find their row.
every_row_stored = st.tuples(
    st.lists(st.integers(0, 50), min_size=len(TASK_IDS), max_size=len(TASK_IDS)),
    st.lists(st.sampled_from(TASK_IDS), min_size=len(RUN_IDS), max_size=len(RUN_IDS)),
).map(
    lambda drawn: (
        [("put_task", i, n, None) for i, n in zip(TASK_IDS, drawn[0], strict=True)]
        + [("put_run", i, t, 1) for i, t in zip(RUN_IDS, drawn[1], strict=True)]
    )
)


def check_grouping(before: list[RawOp], raw: list[RawOp]) -> None:
    # ``before`` is committed first, so that a state op of ``raw`` may find its row
    # written by an earlier write, as the TaskManager's usually do.
    ops = materialise(before + raw)
    setup, write = ops[: len(before)], ops[len(before) :]
    setup_statements = [_in_order(op) for op in setup]
    in_order = apply([_in_order(op) for op in write], setup_statements)
    if in_order != "error":
        assert apply(_row_statements(write), setup_statements) == in_order
    # With the drivers' check, a write whose state ops all find their rows one by one
    # (as the TaskManager's do) is accepted grouped too, and leaves the same rows.
    if apply([_in_order(op) for op in write], setup_statements, checked=True) != "error":
        assert apply(_row_statements(write), setup_statements, checked=True) == in_order


@settings(max_examples=200, deadline=None)
@given(st.lists(earlier_ops, max_size=8), st.lists(raw_ops, max_size=12))
def test_grouped_statements_leave_the_same_rows_as_ops_in_order(
    before: list[RawOp], raw: list[RawOp]
) -> None:
    check_grouping(before, raw)


@settings(max_examples=200, deadline=None)
@given(every_row_stored, st.lists(raw_ops, max_size=12))
def test_state_ops_of_stored_rows_group_as_they_apply_in_order(
    before: list[RawOp], raw: list[RawOp]
) -> None:
    check_grouping(before, raw)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(raw_ops, max_size=12),
    st.booleans(),
    st.lists(st.integers(0, 12), max_size=4),
    st.lists(st.integers(0, 12), max_size=2),
)
def test_the_task_paths_short_way_gives_the_same_statements(
    raw: list[RawOp], active: bool, events: list[int], ended: list[int]
) -> None:
    """A write of tasks, runs and events only (the TaskManager's creates, claims and
    ends) takes a short way to its statements (grouping.py, _task_path): the very
    statements of the general way, in the same order, keys freed by an end (an
    ``active`` key of a task that ended) first; any other op takes the general way."""
    write = materialise(raw)
    if active:  # the tasks hold their keys while live only: an end frees one
        write = [
            type(op)(msgspec.structs.replace(op.task, idempotency_scope="active"))
            if isinstance(op, PutTask | SetTaskState) and op.task.idempotency_key is not None
            else op
            for op in write
        ]
    for n, at in enumerate(ended):  # a stored task whose end frees its key
        done = task(f"ended{n}", 0, f"k-ended{n}")
        done = msgspec.structs.replace(
            done, status=TaskStatus.COMPLETED, idempotency_scope="active"
        )
        write.insert(min(at, len(write)), SetTaskState(done))
    event = Event(type="task.created", timestamp=0.0, source="test", data={})
    for at in events:
        write.insert(min(at, len(write)), AppendEvent(event, b"{}"))
    fast = _task_path(write)
    if any(isinstance(op, DeleteTaskRow) for op in write):
        assert fast is None
    else:
        assert fast == _grouped(write)
        assert _row_statements(write) == fast


def test_a_key_freed_by_a_delete_can_be_taken_in_the_same_write() -> None:
    conn_ops: list[WriteOp] = [PutTask(task("t1", 1, "k1"))]
    assert apply(_row_statements(conn_ops)) != "error"
    # t1 (holding k1) is already stored; a write deletes it and creates t2 with k1.
    conn = fresh()
    for sql, params in _row_statements(conn_ops):
        conn.execute(sql, params)
    for sql, params in _row_statements([DeleteTaskRow("t1"), PutTask(task("t2", 2, "k1"))]):
        conn.execute(sql, params)
    assert conn.execute("SELECT id FROM tasks").fetchall() == [("t2",)]


def test_each_row_is_written_once() -> None:
    write: list[WriteOp] = [PutTask(task("t1", n, None)) for n in range(5)]
    statements = _row_statements(write)
    assert len(statements) == 1
    assert apply(statements) == apply([_in_order(op) for op in write])


def stored(conn: sqlite3.Connection) -> tuple[list[Task], list[Run]]:
    tasks = conn.execute(f"SELECT {TASK_COLUMNS} FROM tasks ORDER BY id").fetchall()
    runs = conn.execute(f"SELECT {RUN_COLUMNS} FROM runs ORDER BY id").fetchall()
    return [task_from_row(row) for row in tasks], [run_from_row(row) for row in runs]


def test_a_row_put_then_changed_in_one_write_is_one_upsert_of_its_last_state() -> None:
    created = task("t1", 1, "k1")
    claimed = task_state(created, 2)
    done = task_state(created, 5)
    opened = run("r1", "t1", 1)
    closed = run_state(opened, 4)
    write: list[WriteOp] = [
        PutTask(created),
        SetTaskState(claimed),
        PutRun(opened),
        SetRunState(closed),
        SetTaskState(done),
    ]
    # One whole-row upsert per row (it may be new), of the row's last state; no UPDATE.
    assert _row_statements(write) == [task_statement(done), run_statement(closed)]
    conn = fresh()
    for sql, params in _row_statements(write):
        conn.execute(sql, params)
    assert stored(conn) == ([done], [closed])


def test_a_state_op_alone_updates_only_the_state_columns() -> None:
    created = task("t1", 1, "k1")
    opened = run("r1", "t1", 1)
    conn = fresh()
    for sql, params in _row_statements([PutTask(created), PutRun(opened)]):
        conn.execute(sql, params)
    # Fixed columns changed by hand: a state write must leave them as they are.
    conn.execute("UPDATE tasks SET title = 'by hand', priority = 99 WHERE id = 't1'")
    conn.execute("UPDATE runs SET worker_id = 'by hand', lease_seconds = 9.5 WHERE id = 'r1'")
    changed = task_state(created, 3)
    closed = run_state(opened, 5)
    statements = _row_statements([SetTaskState(changed), SetRunState(closed)])
    assert [sql for sql, _ in statements] == [SET_TASK_STATE, SET_RUN_STATE]
    assert SET_TASK_STATE.startswith("UPDATE tasks SET ")
    assert SET_RUN_STATE.startswith("UPDATE runs SET ")
    for sql, params in statements:
        conn.execute(sql, params)
    tasks, runs = stored(conn)
    assert tasks == [msgspec.structs.replace(changed, title="by hand", priority=99)]
    assert runs == [msgspec.structs.replace(closed, worker_id="by hand", lease_seconds=9.5)]


def test_state_writes_follow_the_new_rows_of_their_write() -> None:
    """A write that creates one task and changes another: the new row's upsert first,
    then the state UPDATE (and with no put, no upsert at all)."""
    old = task("t1", 1, None)
    new = task("t2", 2, None)
    changed = task_state(old, 7)
    statements = _row_statements([SetTaskState(changed), PutTask(new)])
    assert [sql for sql, _ in statements] == [task_statement(new)[0], SET_TASK_STATE]
    assert apply(statements, [task_statement(old)]) == apply(
        [_in_order(SetTaskState(changed)), _in_order(PutTask(new))], [task_statement(old)]
    )


def test_a_fenced_state_write_is_one_update_that_holds_the_fence() -> None:
    """On a store several nodes share, a write that fences a task (at the version it
    read) and sets its state is one UPDATE of the row, not the fence's and the state's:
    it leaves what the two left (the state, the version moved on once), and fails the
    write where the fence would (the version moved on since). A fence whose task's state
    the write does not set stays a fence of its own."""
    t1, t2 = task("t1", 1, None), task("t2", 2, None)
    setup = [task_statement(t1), task_statement(t2)]
    changed = task_state(t1, 3)
    write: list[WriteOp] = [FenceTask("t2", 0), FenceTask("t1", 0), SetTaskState(changed)]
    statements = _row_statements(write)
    assert [sql for sql, _ in statements] == [SET_TASK_STATE_FENCED, FENCE_TASK]
    apart = [(FENCE_TASK, ("t1", 0)), (FENCE_TASK, ("t2", 0)), _in_order(SetTaskState(changed))]
    after = apply(statements, setup, checked=True)
    assert after == apply(apart, setup, checked=True)
    assert after != "error"
    assert [row[-1] for row in fresh_rows(statements, setup)] == [1, 1]  # the versions
    # Read at a version that moved on: the write fails, as its fence alone would.
    stale = _row_statements([FenceTask("t1", 1), SetTaskState(changed)])
    assert [sql for sql, _ in stale] == [SET_TASK_STATE_FENCED]
    assert apply(stale, setup, checked=True) == "error"
    assert apply([(FENCE_TASK, ("t1", 1))], setup, checked=True) == "error"


def fresh_rows(statements: list[Statement], setup: Sequence[Statement]) -> list[tuple[object, ...]]:
    """The tasks' (id, version) after ``setup`` and ``statements``."""
    conn = fresh()
    for sql, params in [*setup, *statements]:
        conn.execute(sql, params)
    return conn.execute("SELECT id, version FROM tasks ORDER BY id").fetchall()


# -- check_updated, through a real driver transaction --------------------------------------

DriverKind = Literal["thread", "aiosqlite"]


@pytest.fixture(params=["thread", "aiosqlite"])
def driver_kind(request: pytest.FixtureRequest, anyio_backend: str) -> DriverKind:
    return request.param  # type: ignore[no-any-return]


@asynccontextmanager
async def write_connection(path: Path, kind: DriverKind) -> AsyncIterator[Driver]:
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        for migration in MIGRATIONS:
            for statement in migration:
                conn.execute(statement)
    driver = await connect(str(path), driver=kind, busy_timeout=5.0)
    assert driver.name == kind
    try:
        await driver.execute("PRAGMA foreign_keys=ON")
        yield driver
    finally:
        await driver.close()


def stored_file(path: Path | str) -> tuple[list[Task], list[Run]]:
    """What the database holds (a file, or on PostgreSQL a URL), by its own connection."""
    tasks = raw_rows(str(path), f"SELECT {TASK_COLUMNS} FROM tasks ORDER BY id")
    runs = raw_rows(str(path), f"SELECT {RUN_COLUMNS} FROM runs ORDER BY id")
    return [task_from_row(row) for row in tasks], [run_from_row(row) for row in runs]


@pytest.mark.anyio
async def test_a_state_update_of_a_missing_row_fails_its_whole_transaction(
    tmp_path: Path, driver_kind: DriverKind
) -> None:
    path = tmp_path / "w.db"
    kept = task("t1", 1, None)
    async with write_connection(path, driver_kind) as db:
        await db.transaction([task_statement(kept)])
        new = task("t2", 2, "k2")
        statements = [
            task_statement(new),  # a new row: rolled back with the rest
            *_row_statements([SetTaskState(task_state(kept, 4))]),  # found: rolled back
            *_row_statements([SetTaskState(task_state(task("t9", 9, None), 9))]),  # missing
        ]
        with pytest.raises(sqlite3.IntegrityError, match="1 of 2 tasks row"):
            await db.transaction(statements)
        assert stored_file(path) == ([kept], [])
        # The connection is usable and out of the transaction: a good write commits.
        await db.transaction(statements[:2])
    assert stored_file(path) == ([task_state(kept, 4), new], [])


@pytest.mark.anyio
async def test_a_coalesced_state_update_with_one_row_missing_fails(
    tmp_path: Path, driver_kind: DriverKind
) -> None:
    """Consecutive state UPDATEs run as one executemany: one missing row among found ones
    still fails the transaction (the check counts rows, not statements)."""
    path = tmp_path / "w.db"
    t1, t2 = task("t1", 1, None), task("t2", 2, None)
    r1 = run("r1", "t1", 1)
    async with write_connection(path, driver_kind) as db:
        await db.transaction([task_statement(t1), task_statement(t2), run_statement(r1)])
        write: list[WriteOp] = [
            SetTaskState(task_state(t1, 3)),
            SetTaskState(task_state(task("t8", 8, None), 8)),
            SetTaskState(task_state(t2, 5)),
            SetRunState(run_state(r1, 2)),
            SetRunState(run_state(run("r9", "t1", 9), 9)),
        ]
        with pytest.raises(sqlite3.IntegrityError, match="1 of 3 tasks row"):
            await db.transaction(_row_statements(write))
        with pytest.raises(sqlite3.IntegrityError, match="1 of 2 runs row"):
            await db.transaction(_row_statements(write[3:]))
    assert stored_file(path) == ([t1, t2], [r1])


@pytest.mark.anyio
async def test_the_storage_actor_fails_only_the_write_with_a_missing_row(
    db_path: str, driver_kind: DriverKind
) -> None:
    """In a batch of writes, the one whose state write finds no row is refused with a
    StorageError; the others commit."""
    config = RuntimeConfig.from_mapping({"storage_driver": driver_kind})
    ref: ActorRef[StorageMessage] = ActorRef("storage", mailbox_size=4096, ask_timeout=30.0)
    supervisor = Supervisor(
        [ChildSpec(ref, lambda: StorageActor(db_path, config))],
        max_restarts=0,
        restart_window=10.0,
        shutdown_timeout=10.0,
    )
    base = [task(f"t{i}", i, None) for i in range(10)]
    outcomes: dict[int, object] = {}
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        try:
            await ref.ask(Write(tuple(PutTask(t) for t in base)))

            async def write(i: int, message: Write) -> None:
                try:
                    outcomes[i] = await ref.ask(message)
                except StorageError as exc:
                    outcomes[i] = exc

            async with anyio.create_task_group() as writers:
                for i, t in enumerate(base):
                    changed = task_state(t if i != 4 else task("gone", 0, None), 20 + i)
                    writers.start_soon(write, i, Write((SetTaskState(changed),)))
        finally:
            await supervisor.stop()
    assert isinstance(outcomes.pop(4), StorageError)
    assert len(outcomes) == 9
    assert not any(isinstance(o, StorageError) for o in outcomes.values())
    expected = [task_state(t, 20 + i) if i != 4 else t for i, t in enumerate(base)]
    assert stored_file(db_path) == (sorted(expected, key=lambda t: t.id), [])
