"""A queue's lock on PostgreSQL walks ``idx_tasks_ready`` in claim order and
stops after ``limit`` rows, whatever the backlog, in the generic plan that psycopg's
prepared statements settle on (storage/pg/queues.py, ``_QUEUE_ORDER``). With the bare
order (``priority DESC, created_at, id``) PostgreSQL sorted every ready task of a queue
whose ``requires`` or ``concurrency_key`` is NULL: a claim's lock cost 8-18 ms at 10 000
queued tasks, and grew with them."""

from __future__ import annotations

from typing import Any

import pytest

psycopg = pytest.importorskip("psycopg")

import _pg  # noqa: E402

from hive_orchestration.storage.pg.driver import translate  # noqa: E402
from hive_orchestration.storage.pg.queues import _lock_sql, _queue_where  # noqa: E402

_QUEUED = 3_000
_LIMIT = 16


def _generic_plan(url: str, sql: str, params: tuple[object, ...]) -> dict[str, Any]:
    """EXPLAIN ANALYZE of ``sql`` in the plan a prepared statement keeps after a few runs
    (planned without its parameters' values), in a transaction rolled back."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        conn.execute("BEGIN")
        try:
            [(found,)] = conn.execute(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + translate(sql)[0], params, prepare=True
            ).fetchall()
        finally:
            conn.execute("ROLLBACK")
    plan: dict[str, Any] = found[0]["Plan"]
    return plan


def _read(node: dict[str, Any]) -> int:
    """The rows of ``tasks`` the scans under ``node`` read (handed on, or passed over by
    their filter), in the loops they ran."""
    read = 0
    if node.get("Relation Name") == "tasks" and node.get("Actual Loops", 0):
        rows = node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)
        read += rows * node["Actual Loops"]
    for child in node.get("Plans", ()):
        read += _read(child)
    return read


@pytest.fixture(scope="module")
def url() -> str:
    # _QUEUED tasks of one queue among nine times as many of another, interleaved in time:
    # the queue cannot be read in claim order from an index of every queued task without
    # passing over the other's.
    url = _pg.new_database(migrated=True)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO tasks (id, title, task_type, status, created_at, updated_at)"
            " SELECT 't' || lpad(g::text, 6, '0'), 'x', CASE g %% 10 WHEN 0 THEN 'job' ELSE"
            " 'other' END, 'queued', now() + g * interval '1 ms', now()"
            " FROM generate_series(1, %s) AS g",
            (10 * _QUEUED,),
        )
        conn.execute("ANALYZE tasks")
    return url


def test_a_lock_reads_no_more_of_the_queue_than_it_locks(url: str) -> None:
    where, queue = _queue_where("job", None, None)
    plan = _generic_plan(url, _lock_sql(where), (*queue, [], _LIMIT, *queue, _LIMIT))
    assert _read(plan) <= _LIMIT, plan
