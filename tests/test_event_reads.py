"""Event reads by type use the type index (schema version 8): a pattern that matches
nothing reads no event, and a prefix or exact type reads only its own range of the index,
whatever the log holds; and they answer exactly what a scan of the log would."""

from __future__ import annotations

import fnmatch
import random
import sqlite3
from contextlib import closing

import anyio
import pytest

from hive_orchestration import Runtime, RuntimeConfig
from hive_orchestration.messages.storage import ReadEvents
from hive_orchestration.storage.sqlite.drivers import Params, Row
from hive_orchestration.storage.sqlite.event_reads import (
    _ALL_TYPES_SQL,
    _TYPES_SQL,
    MAX_TYPES,
    _merged_sql,
    events_sql,
    read_event_rows,
)
from hive_orchestration.storage.sqlite.schema import SCHEMA_VERSION

pytestmark = pytest.mark.anyio

TYPES = ["job.created", "job.completed", "job.failed", "deploy.started", "app.note", "zeta"]


class _Recorder:
    """A driver on a plain sqlite3 connection that keeps every statement it ran, and how
    many rows each one stepped through (SQLite's own count of the VM's row visits)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.statements: list[str] = []

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        self.statements.append(sql)
        return self.conn.execute(sql, params).fetchall()


def _matches(type_: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(type_, pattern)


def _plan(conn: sqlite3.Connection, sql: str, params: Params) -> str:
    return " | ".join(str(row[3]) for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))


async def _filled(db_path: str, count: int) -> None:
    rng = random.Random(7)
    async with Runtime.open(db_path) as rt:
        for start in range(0, count, 100):
            async with anyio.create_task_group() as tg:
                for n in range(start, min(start + 100, count)):
                    tg.start_soon(rt.publish, rng.choice(TYPES[3:]), {"n": n})
        for _ in range(5):
            await rt.publish("job.created", {})
        await rt.publish("job.completed", {})


@pytest.mark.sqlite_only("reads SQLite's EXPLAIN QUERY PLAN of the SQLite store's own SQL")
async def test_reads_by_type_use_the_type_index(db_path: str, anyio_backend: str) -> None:
    await _filled(db_path, 300)
    with closing(sqlite3.connect(db_path)) as conn:
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(events)")}
        assert "idx_events_type" in indexes
        # The distinct types a prefix can match: a walk of the index, no scan of the log.
        plan = _plan(conn, _TYPES_SQL, ("job.", "job/", MAX_TYPES + 1, "job.*"))
        # Both bounds are ranges of the index: past the range's last type, the walk stops
        # (with the upper bound a mere filter, it read the index to its end: 0.8 s).
        assert "USING COVERING INDEX idx_events_type (type>? AND type<?)" in plan, plan
        assert "SCAN events" not in plan, plan
        # Each type found: its range of the index, from after, in seq order.
        for newest in (False, True):
            read = ReadEvents(after=10, limit=50, pattern="job.*", newest=newest)
            sql, params = _merged_sql(read, ["job.completed", "job.created"], 10_000)
            plan = _plan(conn, sql, params)
            assert plan.count("INDEX idx_events_type (type=? AND rowid>? AND rowid<?)") == 2, plan
            assert "SCAN events" not in plan, plan
        # The one-statement form (too many types, or an id given) never sorts a type's
        # whole range: it keeps off the type index.
        sql, params = events_sql(ReadEvents(pattern="job.*"))
        assert "idx_events_type" not in _plan(conn, sql, params)
        sql, params = events_sql(ReadEvents(pattern="job.*", task_id="x"))
        assert "INDEX idx_events_task_id (task_id=? AND rowid>?)" in _plan(conn, sql, params)


@pytest.mark.parametrize(
    "pattern", ["nothing.*", "nothing.here", "*.nothing", "job.*", "job.created", "zeta"]
)
@pytest.mark.sqlite_only("runs the SQLite store's event-read SQL on a sqlite3 connection")
async def test_a_type_read_answers_what_a_scan_would(
    db_path: str, anyio_backend: str, pattern: str
) -> None:
    await _filled(db_path, 400)
    with closing(sqlite3.connect(db_path)) as conn:
        everything = conn.execute("SELECT seq, type FROM events ORDER BY seq").fetchall()
        recorder = _Recorder(conn)
        for after in (0, 57, 390):
            for limit in (1, 7, 1000):
                for newest in (False, True):
                    read = ReadEvents(after=after, limit=limit, pattern=pattern, newest=newest)
                    rows = await read_event_rows(recorder, read)  # type: ignore[arg-type]
                    want = [
                        s for s, t in everything if s > after and fnmatch.fnmatchcase(t, pattern)
                    ]
                    want = want[-limit:] if newest else want[:limit]
                    assert [row[0] for row in rows] == want, (after, limit, newest)
        if not any(fnmatch.fnmatchcase(t, pattern) for t in TYPES):
            # Nothing matches: the answer came from the type index alone.
            assert all(sql in (_TYPES_SQL, _ALL_TYPES_SQL) for sql in recorder.statements)


async def test_a_page_by_type_leaves_no_gap_while_new_types_are_written(
    db_path: str, anyio_backend: str
) -> None:
    """Paging by a prefix while events of types never seen before are published: every
    event of the prefix is read once, in order."""
    async with Runtime.open(db_path, config=RuntimeConfig(read_connections=2)) as rt:
        written: list[int] = []

        async def writer() -> None:
            for n in range(300):
                event = await rt.publish(f"burst.kind{n % 40}", {"n": n})
                written.append(event.seq)
                if n % 3 == 0:
                    await rt.publish("other.thing", {})

        seen: list[int] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            after = 0
            while len(seen) < 300:
                page = await rt.read_events(after, limit=7, pattern="burst.*")
                seen += [event.seq for event in page]
                after = page[-1].seq if page else after
                await anyio.lowlevel.checkpoint()
        assert seen == written


@pytest.mark.sqlite_only("builds a version-7 database from SQLite's migrations")
async def test_a_version_7_database_gains_the_version_8_indexes(
    db_path: str, anyio_backend: str
) -> None:
    async with Runtime.open(db_path) as rt:
        await rt.publish("app.note", {})
    with closing(sqlite3.connect(db_path)) as conn:
        conn.execute("DROP INDEX idx_events_type")  # what version 8 adds
        conn.execute("DROP INDEX idx_tasks_status_order")
        conn.execute("DROP INDEX idx_tasks_ready")  # what version 9 adds
        conn.execute("DROP INDEX idx_runs_lease_deadline")  # what version 18 adds
        conn.execute("ALTER TABLE runs DROP COLUMN lease_deadline")
        conn.execute("DROP INDEX idx_tasks_node")  # what version 15 adds
        conn.execute("DROP INDEX idx_tasks_held_key")
        conn.execute("ALTER TABLE tasks DROP COLUMN node_id")
        conn.execute("ALTER TABLE tasks DROP COLUMN version")
        conn.execute("ALTER TABLE workers DROP COLUMN node_id")
        conn.execute("ALTER TABLE execution_plans DROP COLUMN node_id")
        conn.execute("DROP TABLE schedules")  # what version 14 adds
        conn.execute("DROP INDEX idx_tasks_delayed")  # what version 12 adds
        conn.execute("DROP INDEX idx_tasks_expiring")
        conn.execute("DROP INDEX idx_runs_started")
        conn.execute("ALTER TABLE tasks DROP COLUMN run_at")
        conn.execute("ALTER TABLE tasks DROP COLUMN expires_at")
        conn.execute("ALTER TABLE tasks DROP COLUMN traceparent")  # version 11
        conn.execute("ALTER TABLE tasks DROP COLUMN tracestate")
        conn.execute("DROP TABLE revoked_task_types")  # version 10
        conn.execute("DROP INDEX idx_tasks_idempotency_key")
        conn.execute("ALTER TABLE tasks DROP COLUMN idempotency_scope")
        conn.execute(  # as version 2 made it
            "CREATE UNIQUE INDEX idx_tasks_idempotency_key ON tasks (idempotency_key)"
            " WHERE idempotency_key IS NOT NULL"
        )
        conn.execute("PRAGMA user_version = 7")
    async with Runtime.open(db_path) as rt:
        assert [e.type for e in await rt.read_events(pattern="app.*")] == ["app.note"]
    with closing(sqlite3.connect(db_path)) as conn:
        assert "idx_events_type" in {row[1] for row in conn.execute("PRAGMA index_list(events)")}
        assert "idx_tasks_status_order" in {
            row[1] for row in conn.execute("PRAGMA index_list(tasks)")
        }
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
