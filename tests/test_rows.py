"""rows.task_from_row, written for speed, decodes every row exactly as its plain form did
(kept here as the reference): rows the runtime wrote with every column set and with
none, rows another tool left half empty, PostgreSQL's datetimes, and a status no task
has (refused the same way)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import msgspec
import pytest

from hive_orchestration import Runtime
from hive_orchestration.messages.tasks import JsonObject, Task, TaskStatus
from hive_orchestration.storage.rows import EPOCH, TASK_COLUMNS, parse_time, task_from_row

pytestmark = pytest.mark.anyio


def _parse_json(value: object) -> JsonObject | None:
    return None if value is None else cast(JsonObject, msgspec.json.decode(str(value)))


def _parse_list(value: object) -> tuple[str, ...]:
    return tuple(cast("list[str]", msgspec.json.decode(str(value)))) if value else ()


def plain_task_from_row(row: tuple[object, ...]) -> Task:
    """task_from_row as it was written before it was made faster."""
    (id_, title, description, task_type, priority, status, phase, workflow, payload,
     created_at, updated_at, assigned_worker, due_date, max_retries, tags, attempts,
     result, error, idempotency_key, correlation_id, source_agent, timeout, available_at,
     concurrency_key, concurrency_limit, requires, plan_id, subtask_id,
     idempotency_scope, traceparent, tracestate, run_at, expires_at) = row  # fmt: skip
    created = parse_time(created_at) or parse_time(updated_at) or EPOCH
    return Task(
        id=str(id_),
        title=str(title),
        description=cast("str | None", description),
        task_type=str(task_type),
        priority=1 if priority is None else cast(int, priority),
        status=TaskStatus(str(status)),
        current_phase="start" if phase is None else str(phase),
        workflow=_parse_json(workflow),
        payload=_parse_json(payload) or {},
        created_at=created,
        updated_at=parse_time(updated_at) or created,
        assigned_worker=cast("str | None", assigned_worker),
        due_date=parse_time(due_date),
        max_retries=3 if max_retries is None else cast(int, max_retries),
        tags=tuple(cast("list[str]", msgspec.json.decode(str(tags)))) if tags else (),
        attempts=0 if attempts is None else cast(int, attempts),
        result=_parse_json(result),
        error=cast("str | None", error),
        idempotency_key=cast("str | None", idempotency_key),
        correlation_id=cast("str | None", correlation_id),
        source_agent=cast("str | None", source_agent),
        timeout=cast("float | None", timeout),
        available_at=parse_time(available_at),
        concurrency_key=cast("str | None", concurrency_key),
        concurrency_limit=cast("int | None", concurrency_limit),
        requires=_parse_list(requires),
        plan_id=cast("str | None", plan_id),
        subtask_id=cast("str | None", subtask_id),
        idempotency_scope="active" if idempotency_scope == "active" else "forever",
        traceparent=cast("str | None", traceparent),
        tracestate=cast("str | None", tracestate),
        run_at=parse_time(run_at),
        expires_at=parse_time(expires_at),
    )


def same(row: tuple[object, ...]) -> None:
    fast, plain = task_from_row(row), plain_task_from_row(row)
    assert fast == plain
    # Equal, and of the same types (an enum, not its text; a tuple, not a list).
    assert msgspec.to_builtins(fast) == msgspec.to_builtins(plain)
    for field in Task.__struct_fields__:
        assert type(getattr(fast, field)) is type(getattr(plain, field)), field


@pytest.mark.sqlite_only("reads the SQLite file's rows as the SQLite store does")
async def test_rows_the_runtime_wrote_decode_as_before(tmp_path: Path) -> None:
    path = tmp_path / "rows.db"
    soon = datetime.now(UTC) + timedelta(days=1)
    async with Runtime.open(path) as rt:
        await rt.create_task("bare")
        await rt.create_task(
            "full",
            {"n": 1, "nested": {"list": [1, 2.5, None, "x"]}},
            title="a title",
            description="a description",
            priority=7,
            workflow={"steps": ["a", "b"]},
            tags=["t1", "t2"],
            max_retries=5,
            due_date=soon,
            idempotency_key="key-1",
            idempotency_scope="active",
            correlation_id="corr",
            source_agent="agent",
            timeout=12.5,
            concurrency_key="ck",
            concurrency_limit=2,
            requires=["gpu", "ram"],
            run_at=soon,
            expires_at=soon + timedelta(hours=1),
        )
        done = await rt.create_task("done", {"x": True})
        await rt.register_worker("w", "w", ["done"])
        claim = await rt.claim_task("w", "done")
        assert claim is not None
        assert claim.task.id == done
        await rt.complete_task(claim.lease, {"ok": [1, 2]})
        failing = await rt.create_task("failing", max_retries=0)
        claim = await rt.claim_task("w", "failing")
        assert claim is not None
        assert claim.task.id == failing
        await rt.fail_task(claim.lease, "broken")
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(f"SELECT {TASK_COLUMNS} FROM tasks").fetchall()
    finally:
        conn.close()
    assert len(rows) == 4
    for row in rows:
        same(row)


def test_rows_another_tool_left_half_empty_decode_as_before() -> None:
    nulls: list[object] = [None] * 33
    nulls[0], nulls[1], nulls[3], nulls[5] = "id-1", "title", "kind", "queued"
    same(tuple(nulls))  # no time at all: the epoch
    updated_only = list(nulls)
    updated_only[10] = "2026-01-02T03:04:05.000006+00:00"
    same(tuple(updated_only))
    texts = list(nulls)
    texts[8], texts[14], texts[16], texts[25] = "null", "[]", "{}", ""
    texts[9] = "2026-01-02T03:04:05+00:00"
    same(tuple(texts))


def test_postgres_datetimes_decode_as_before() -> None:
    row: list[object] = [None] * 33
    row[0], row[1], row[3], row[5] = "id-2", "title", "kind", "running"
    local = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC).astimezone()
    row[9], row[10], row[12], row[22] = local, local, local, datetime(2026, 1, 1)
    same(tuple(row))


def test_a_status_no_task_has_is_refused_as_before() -> None:
    row: list[object] = [None] * 33
    row[0], row[1], row[3], row[5] = "id-3", "title", "kind", "no-such-status"
    with pytest.raises(ValueError, match="no-such-status"):
        plain_task_from_row(tuple(row))
    with pytest.raises(ValueError, match="no-such-status"):
        task_from_row(tuple(row))
