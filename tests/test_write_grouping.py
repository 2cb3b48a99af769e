"""The storage actor applies a write's row ops grouped (deletes, tasks, runs), each row
once. Property: on any sequence of ops that applies cleanly one by one, grouping leaves
exactly the same rows. (Grouping may also accept a run put before its task in the same
write, which in order breaks the foreign key; the TaskManager never writes that.)"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from hive_orchestration.messages.storage import DeleteTaskRow, PutRun, PutTask, WriteOp
from hive_orchestration.messages.tasks import Run, RunStatus, Task, TaskStatus
from hive_orchestration.storage.actor import _in_order, _row_statements
from hive_orchestration.storage.schema import MIGRATIONS

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TASK_IDS = ["t1", "t2", "t3"]
RUN_IDS = ["r1", "r2", "r3"]


def fresh() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("PRAGMA foreign_keys=ON")
    for migration in MIGRATIONS:
        for statement in migration:
            conn.execute(statement)
    return conn


def apply(statements: list[tuple[str, tuple[object, ...]]]) -> object:
    conn = fresh()
    try:
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
        status=list(TaskStatus)[n % 7],
        priority=n,
        idempotency_key=key,
        created_at=T0,
        updated_at=T0 + timedelta(seconds=n),
    )


ops = st.one_of(
    st.builds(
        lambda i, n, key: PutTask(task(i, n, key)),
        st.sampled_from(TASK_IDS),
        st.integers(0, 50),
        st.sampled_from([None, None, "k1", "k2"]),
    ),
    st.builds(
        lambda i, t, n: PutRun(Run(id=i, task_id=t, run_number=n, status=RunStatus.RUNNING)),
        st.sampled_from(RUN_IDS),
        st.sampled_from(TASK_IDS),
        st.integers(1, 9),
    ),
    st.builds(lambda i: DeleteTaskRow(i), st.sampled_from(TASK_IDS)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=12))
def test_grouped_statements_leave_the_same_rows_as_ops_in_order(write: list[WriteOp]) -> None:
    in_order = apply([_in_order(op) for op in write])
    if in_order != "error":
        assert apply(_row_statements(write)) == in_order


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
