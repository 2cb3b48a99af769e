"""A plan_execution row names its task only while the task exists.

The PlanExecutor writes subtask rows while the TaskManager may delete the same subtask's
task (delete_task of a plan's task). When the delete commits first, the row is written
with task_id NULL, which is what ON DELETE SET NULL would have made of it a moment later,
and the PlanExecutor's write commits; it used to fail on the foreign key, and the
executor restarted to reconcile (found by tests/reliability/test_fuzz.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from hive_orchestration.messages.plans import SubtaskState, SubtaskStatus
from hive_orchestration.storage.plans import subtask_statement
from hive_orchestration.storage.sqlite.schema import MIGRATIONS

pytestmark = pytest.mark.sqlite_only("the SQLite store's subtask statement on a sqlite3 connection")


def database(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys=ON")
    for migration in MIGRATIONS:
        for statement in migration:
            conn.execute(statement)
    conn.execute("INSERT INTO planning_queue (id, task_description) VALUES ('r1', 'deploy')")
    conn.execute(
        "INSERT INTO execution_plans (id, planning_task_id, plan_data) VALUES ('p1', 'r1', '{}')"
    )
    conn.execute("INSERT INTO tasks (id, title, task_type) VALUES ('t1', 'build', 'build')")
    return conn


def put(conn: sqlite3.Connection, subtask_id: str, task_id: str | None) -> None:
    state = SubtaskState(
        plan_id="p1", subtask_id=subtask_id, task_id=task_id, status=SubtaskStatus.READY
    )
    conn.execute(*subtask_statement(state))


def task_of(conn: sqlite3.Connection, subtask_id: str) -> object:
    row = conn.execute(
        "SELECT task_id FROM plan_execution WHERE subtask_id = ?", (subtask_id,)
    ).fetchone()
    return row[0]


def test_a_subtask_row_keeps_a_task_that_exists(tmp_path: Path) -> None:
    conn = database(tmp_path / "p.db")
    put(conn, "build", "t1")
    assert task_of(conn, "build") == "t1"


def test_a_subtask_row_naming_a_deleted_task_is_written_with_no_task(tmp_path: Path) -> None:
    conn = database(tmp_path / "p.db")
    put(conn, "build", "t1")
    conn.execute("DELETE FROM tasks WHERE id = 't1'")  # the TaskManager's delete lands first
    put(conn, "build", "t1")  # the PlanExecutor's write, made before it heard of it
    put(conn, "test", "never-created")
    assert task_of(conn, "build") is None
    assert task_of(conn, "test") is None
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
