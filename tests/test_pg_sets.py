"""A run of one row statement sent as one set-based statement (storage/pg/sets.py), on a
real PostgreSQL server: it leaves exactly the rows the statements one by one leave (every
kind of value: NULLs, times, floats, bytes, quotes, backslashes, non-ASCII text), fails
the whole transaction when one of its rows is missing or fenced by a stale version, takes
its tasks' row locks in id order, stays one statement at a time where a row is named
twice, and looks its rows up by the primary key however small the table seems."""

from __future__ import annotations

import re
import threading
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import anyio.to_thread
import pytest

psycopg = pytest.importorskip("psycopg")

import _pg  # noqa: E402

from hive_orchestration.messages.tasks import Run, RunStatus, Task, TaskStatus  # noqa: E402
from hive_orchestration.storage.pg import driver as pg_driver  # noqa: E402
from hive_orchestration.storage.pg.driver import PostgresDriver, translate  # noqa: E402
from hive_orchestration.storage.pg.sets import (  # noqa: E402
    JOINS_BY_INDEX,
    MAX_JSON,
    set_statement,
)
from hive_orchestration.storage.port import Params, Statement, StoreIntegrityError  # noqa: E402
from hive_orchestration.storage.rows import (  # noqa: E402
    FENCE_TASK,
    SET_RUN_STATE,
    SET_TASK_STATE_FENCED,
    fenced_task_state_statement,
    run_state_statement,
    run_statement,
    task_statement,
)

NOW = datetime(2026, 12, 7, 17, 0, 0, 123456, tzinfo=UTC)
#: Every column but what the database sets itself from its own clock.
TASK_ROWS = "SELECT * FROM tasks ORDER BY id"
RUN_ROWS = (
    "SELECT id, task_id, worker_id, run_number, status, phase, result_data, error_message,"
    " output_log, started_at, completed_at, lease_seconds, lease_expires_at, progress,"
    " lease_hash FROM runs ORDER BY id"
)


def raw(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql, params or None)
        return cursor.fetchall() if cursor.description else []


@pytest.fixture
async def db(anyio_backend: str) -> AsyncIterator[tuple[PostgresDriver, str]]:
    url = _pg.new_database(migrated=True)
    driver = await PostgresDriver.open(url)
    try:
        yield driver, url
    finally:
        await driver.close()


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The statements the driver sent as one set-based statement, by their row SQL."""
    made: list[str] = []

    def spy(sql: str, rows: Any) -> tuple[str, Params] | None:
        found = set_statement(sql, rows)
        if found is not None:
            made.append(sql)
        return found

    monkeypatch.setattr(pg_driver, "set_statement", spy)
    return made


def one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver as before set-based statements: every run an ``executemany``."""
    monkeypatch.setattr(pg_driver, "set_statement", lambda sql, rows: None)


def task(n: int, **changes: Any) -> Task:
    fields: dict[str, Any] = {
        "id": f"task-{n:03d}",
        "title": f'it\'s a "task" \\ n\u00b0{n} \u2603',
        "task_type": "kind",
        "status": TaskStatus.QUEUED,
        "created_at": NOW + timedelta(microseconds=n),
        "updated_at": NOW,
    }
    if n % 2:
        fields |= {
            "description": "back\\slash 'quote' %s ? $1",
            "priority": 7,
            "payload": {"n": n, "text": 'a\nb\t"c"', "none": None, "list": [1.5, True]},
            "tags": ("x", "y"),
            "due_date": NOW + timedelta(days=1),
            "idempotency_key": f"key-{n}",
            "timeout": 2.5,
            "available_at": NOW - timedelta(seconds=1),
            "concurrency_key": "slot",
            "concurrency_limit": 3,
            "requires": ("gpu", "ram"),
            "traceparent": "00-abc-def-01",
            "run_at": None,
            "expires_at": NOW + timedelta(hours=2),
            "idempotency_scope": "active",
        }
    return Task(**(fields | changes))


def run(n: int, **changes: Any) -> Run:
    fields: dict[str, Any] = {"id": f"run-{n:03d}", "task_id": f"task-{n:03d}"}
    if n % 2:
        fields |= {
            "worker_id": "w\u00e9",
            "started_at": NOW,
            "lease_seconds": 30.0,
            "lease_expires_at": NOW + timedelta(seconds=30),
            "progress": {"done": 0.25},
            "output_log": "line 1\nline 2 \\ '",
        }
    return Run(**(fields | changes))


def writes() -> list[list[Statement]]:
    """Transactions whose runs of one statement have several rows: tasks put, claimed
    (their state fenced, their runs put with a lease's hash) and ended (state and run)."""
    n = range(1, 7)
    claimed = {i: task(i, status=TaskStatus.RUNNING, assigned_worker="w", attempts=1) for i in n}
    return [
        [task_statement(task(i)) for i in n],
        [fenced_task_state_statement(claimed[i], 0) for i in n]
        + [run_statement(run(i), bytes([i, 0, 255, 92])) for i in n],
        [
            fenced_task_state_statement(
                task(i, status=TaskStatus.COMPLETED, result={"ok": i}, attempts=1), 1
            )
            for i in n
        ]
        + [
            run_state_statement(
                run(i, status=RunStatus.COMPLETED, completed_at=NOW, result={"r": "\u00e9"})
            )
            for i in n
        ],
        [(FENCE_TASK, (f"task-{i:03d}", 2)) for i in n],
    ]


@pytest.mark.anyio
async def test_a_run_as_one_statement_leaves_the_rows_its_rows_one_by_one_leave(
    db: tuple[PostgresDriver, str], sent: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    driver, url = db
    for statements in writes():
        await driver.transaction(statements)
    assert set(sent) == {
        task_statement(task(1))[0],
        SET_TASK_STATE_FENCED,
        run_statement(run(1))[0],
        SET_RUN_STATE,
        FENCE_TASK,
    }
    tasks, runs = raw(url, TASK_ROWS), raw(url, RUN_ROWS)
    assert len(tasks) == len(runs) == 6
    assert {row[-1] for row in raw(url, "SELECT version FROM tasks")} == {3}

    other = await PostgresDriver.open(_pg.new_database(migrated=True))
    try:
        one_by_one(monkeypatch)
        for statements in writes():
            await other.transaction(statements)
    finally:
        await other.close()
    assert raw(other.url, TASK_ROWS) == tasks
    assert raw(other.url, RUN_ROWS) == runs


@pytest.mark.anyio
async def test_a_stale_version_in_a_run_fails_the_whole_transaction(
    db: tuple[PostgresDriver, str], sent: list[str]
) -> None:
    driver, url = db
    await driver.transaction([task_statement(task(i)) for i in range(1, 5)])
    before = raw(url, TASK_ROWS)
    ended = [task(i, status=TaskStatus.CANCELLED) for i in range(1, 5)]
    statements = [fenced_task_state_statement(t, 0) for t in ended]
    statements[2] = fenced_task_state_statement(ended[2], 1)  # another node moved it
    with pytest.raises(StoreIntegrityError, match="a tasks row to update is missing"):
        await driver.transaction([task_statement(task(9)), *statements])
    assert sent.count(SET_TASK_STATE_FENCED) == 1
    assert raw(url, TASK_ROWS) == before  # nothing applied, not even the put before it
    # A missing row fails it the same way.
    gone = [fenced_task_state_statement(t, 0) for t in ended[:2]]
    gone.append(fenced_task_state_statement(task(99), 0))
    with pytest.raises(StoreIntegrityError, match="a tasks row to update is missing"):
        await driver.transaction(gone)
    assert raw(url, TASK_ROWS) == before
    await driver.transaction([fenced_task_state_statement(t, 0) for t in ended])
    assert {row[0] for row in raw(url, "SELECT status FROM tasks")} == {"cancelled"}


@pytest.mark.anyio
async def test_a_row_named_twice_stays_one_statement_at_a_time(
    db: tuple[PostgresDriver, str], sent: list[str]
) -> None:
    driver, url = db
    await driver.transaction([task_statement(task(i)) for i in (1, 2)])
    # One write applied in order: the same task twice, each fenced by the version the
    # one before it left.
    statements = [
        fenced_task_state_statement(task(1, status=TaskStatus.RUNNING), 0),
        fenced_task_state_statement(task(2, status=TaskStatus.RUNNING), 0),
        fenced_task_state_statement(task(1, status=TaskStatus.COMPLETED), 1),
    ]
    await driver.transaction(statements)
    assert SET_TASK_STATE_FENCED not in sent
    assert raw(url, "SELECT id, status, version FROM tasks ORDER BY id") == [
        ("task-001", "completed", 2),
        ("task-002", "running", 1),
    ]


@pytest.mark.anyio
async def test_fenced_rows_are_locked_in_task_id_order(
    db: tuple[PostgresDriver, str], sent: list[str]
) -> None:
    """Another transaction holds task 5: the run of tasks 8 down to 1 waits for it
    holding the locks of tasks 1 to 4 and none of 6 to 8, as rows locked one by one in
    id order would; a write that locked 8 first could deadlock with one that holds 8 and
    waits for 1."""
    driver, url = db
    await driver.transaction([task_statement(task(i)) for i in range(1, 9)])
    holder = psycopg.connect(url, autocommit=True)
    holder.execute("BEGIN")
    holder.execute("SELECT id FROM tasks WHERE id = 'task-005' FOR UPDATE")
    statements = [
        fenced_task_state_statement(task(i, status=TaskStatus.RUNNING), 0) for i in range(8, 0, -1)
    ]
    pid = await driver.run(lambda conn: conn.info.backend_pid)
    done = threading.Event()

    async def write() -> None:
        await driver.transaction(statements)
        done.set()

    def nowait(task_id: str) -> bool:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("BEGIN")
            try:
                conn.execute("SELECT id FROM tasks WHERE id = %s FOR UPDATE NOWAIT", (task_id,))
            except psycopg.errors.LockNotAvailable:
                return False
            finally:
                conn.execute("ROLLBACK")
            return True

    free: list[bool] = []
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(write)
            try:
                for _ in range(500):  # until the write waits for task 5's lock
                    if raw(url, _WAITING, (pid,)):
                        break
                    await anyio.sleep(0.02)
                assert not done.is_set()
                for i in range(1, 9):
                    free.append(await anyio.to_thread.run_sync(nowait, f"task-{i:03d}"))
            finally:
                holder.execute("COMMIT")  # the write goes on, whatever was found
    finally:
        holder.close()
    assert free == [False] * 5 + [True] * 3
    assert sent == [task_statement(task(1))[0], SET_TASK_STATE_FENCED]
    assert raw(url, "SELECT DISTINCT status, version FROM tasks") == [("running", 1)]


@pytest.mark.anyio
async def test_fenced_rows_are_locked_no_more_than_an_update_locks_them(
    db: tuple[PostgresDriver, str], sent: list[str]
) -> None:
    """Another transaction checks a key of task 1 (``FOR KEY SHARE``, as the insert of a
    run of it does): the run's UPDATE does not wait for it, as an UPDATE of the row does
    not; a lock stronger than the UPDATE's would wait, and could deadlock where row by
    row did not."""
    driver, url = db
    await driver.transaction([task_statement(task(i)) for i in (1, 2)])
    holder = psycopg.connect(url, autocommit=True)
    holder.execute("BEGIN")
    holder.execute("SELECT id FROM tasks WHERE id = 'task-001' FOR KEY SHARE")
    statements = [
        fenced_task_state_statement(task(i, status=TaskStatus.RUNNING), 0) for i in (1, 2)
    ]
    done = threading.Event()

    async def write() -> None:
        await driver.transaction(statements)
        done.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(write)
            try:
                for _ in range(150):  # 3 s
                    if done.is_set():
                        break
                    await anyio.sleep(0.02)
                finished = done.is_set()
            finally:
                holder.execute("ROLLBACK")  # the write goes on, whatever was found
    finally:
        holder.close()
    assert finished
    assert sent == [task_statement(task(1))[0], SET_TASK_STATE_FENCED]


_WAITING = "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'"


def _plan(url: str, sql: str, setup: Callable[[Any], None]) -> str:
    """The generic plan PostgreSQL keeps for ``sql`` (as psycopg's prepared statement
    would, after a few runs), planned after ``setup``."""
    with psycopg.connect(url, autocommit=True, cursor_factory=psycopg.ClientCursor) as conn:
        setup(conn)
        conn.execute("SET plan_cache_mode = force_generic_plan")
        text = translate(sql)[0].replace("%s", "$1", 1).replace("%s", "$2", 1)
        conn.execute(f"PREPARE p (text, int) AS {text}")
        rows = conn.execute("EXPLAIN EXECUTE p ('[]', 2)").fetchall()
        return "\n".join(str(row[0]) for row in rows)


def test_rows_are_looked_up_by_key_however_small_the_table_seems() -> None:
    """A table just created (no statistics, a few rows) makes a hash join over a scan of
    the whole table look cheaper, and a prepared statement would keep that plan as the
    table grows; under the transaction's settings (JOINS_BY_INDEX) every row is one
    lookup of the primary key."""
    url = _pg.new_database(migrated=True)
    raw(
        url,
        "INSERT INTO tasks (id, title, task_type, created_at, updated_at)"
        " SELECT 't' || g, 'x', 'k', now(), now() FROM generate_series(1, 20) AS g",
    )
    raw(url, "INSERT INTO runs (id, task_id) SELECT 'r' || id, id FROM tasks")
    tasks_sql = set_statement(SET_TASK_STATE_FENCED, [(*("x",) * 9, "a", 0), (*("x",) * 9, "b", 0)])
    runs_sql = set_statement(SET_RUN_STATE, [(*("x",) * 9, "a"), (*("x",) * 9, "b")])
    assert tasks_sql is not None
    assert runs_sql is not None
    for sql, table in ((tasks_sql[0], "tasks"), (runs_sql[0], "runs")):
        plain = _plan(url, sql, lambda conn: None)
        assert re.search(rf"Seq Scan on {table}\b", plain)  # what the settings are for
        planned = _plan(
            url, sql, lambda conn: conn.execute(JOINS_BY_INDEX.replace("true", "false"))
        )
        assert not re.search(
            r"Seq Scan on (tasks|runs)\b|Hash (Semi |Anti )?Join|Merge", planned
        ), planned
        assert f"Index Scan using {table}_pkey" in planned


@pytest.mark.anyio
async def test_the_settings_end_with_the_transaction(
    db: tuple[PostgresDriver, str], sent: list[str]
) -> None:
    driver, _ = db
    await driver.transaction([task_statement(task(i)) for i in (1, 2)])
    await driver.transaction(
        [fenced_task_state_statement(task(i, status=TaskStatus.RUNNING), 0) for i in (1, 2)]
    )
    assert sent == [task_statement(task(1))[0], SET_TASK_STATE_FENCED]
    rows = await driver.fetchall("SELECT current_setting('enable_hashjoin')")
    assert rows == [("on",)]


def test_one_row_or_a_statement_of_no_set_form_stays_as_it_is() -> None:
    one = fenced_task_state_statement(task(1), 0)
    assert set_statement(one[0], [one[1]]) is None
    # Values JSON cannot carry go row by row, where psycopg tells what is wrong.
    assert set_statement(FENCE_TASK, [("\ud800", 0), ("task-002", 0)]) is None
    assert set_statement(FENCE_TASK, [(object(), 0), ("task-002", 0)]) is None
    other = "UPDATE workers SET role = ? WHERE id = ?"
    assert set_statement(other, [("a", "w1"), ("b", "w2")]) is None


@pytest.mark.anyio
async def test_a_run_of_large_rows_is_written_row_by_row(
    db: tuple[PostgresDriver, str], sent: list[str]
) -> None:
    """A run whose JSON is longer than MAX_JSON (three tasks of 3 MB payloads) is sent
    row by row, and leaves its rows whole; a run of small rows is still one statement.
    Why the bound: the next test."""
    driver, url = db
    blob = "y" * (MAX_JSON // 3 + 1)
    big = [task_statement(task(i, payload={"blob": blob})) for i in range(3)]
    await driver.transaction(big)
    assert sent == []
    assert raw(url, "SELECT count(*), sum(length(payload)) FROM tasks") == [
        (3, sum(len(params[8] or "") for _, params in big))
    ]
    await driver.transaction([task_statement(task(i)) for i in range(300, 306)])
    assert len(sent) == 1


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_run_past_what_one_jsonb_value_holds_is_written(
    db: tuple[PostgresDriver, str],
) -> None:
    """``jsonb`` holds at most 256 MiB: 270 tasks of 1 MB payloads (``create_tasks``
    takes 1 000 items of up to ``max_payload_bytes``, 1 MiB by default) made one JSON
    parameter failed the whole write ('total size of jsonb array elements exceeds the
    maximum'), every time it was tried. About 15 s and 1.5 GB of memory: slow."""
    driver, url = db
    blob = "x" * 1_000_000
    big = [task_statement(task(i, payload={"blob": blob, "n": i})) for i in range(270)]
    await driver.transaction(big)
    assert raw(url, "SELECT count(*) FROM tasks") == [(270,)]
