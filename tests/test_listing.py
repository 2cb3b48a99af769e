"""Listings page with a ``limit`` and an ``after`` cursor (hive_orchestration/listing.py):
every task that stays in the listing is read exactly once, with no gap and no duplicate,
while writes go on; bad limits and cursors are refused naming the field, in every way a
caller can reach the runtime; and a page is a range of an index, never a sort of all."""

from __future__ import annotations

import json
import sqlite3
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import pytest

from hive_orchestration import (
    OrchestrationClient,
    Runtime,
    SyncOrchestrationClient,
    Task,
    call_json,
)
from hive_orchestration.errors import InvalidInputError
from hive_orchestration.listing import DEFAULT_LIMIT, MAX_LIMIT
from hive_orchestration.storage.sqlite.pages import tasks_page_sql

sys.path.insert(0, str(Path(__file__).parent))
import anyio.lowlevel
from test_remote import owner

pytestmark = pytest.mark.anyio

DEADLINE = 60.0  # a failure detector: what waits here takes well under a second


async def _page_through(rt: Runtime | OrchestrationClient, status: str, limit: int) -> list[Task]:
    seen: list[Task] = []
    after: str | None = None
    while True:
        page = await rt.get_tasks_by_status(status, limit=limit, after=after)
        seen += page
        if len(page) < limit:
            return seen
        after = page[-1].id
        await anyio.lowlevel.checkpoint()  # let the writers in between pages


def _in_order(tasks: list[Task]) -> bool:
    keys = [(-t.priority, t.created_at, t.id) for t in tasks]
    return keys == sorted(keys)


@pytest.mark.parametrize("status", ["completed", "queued"])
async def test_paging_reads_every_task_once_while_writes_go_on(
    db_path: str, anyio_backend: str, status: str
) -> None:
    """Completed tasks are read from SQLite (a reader), queued ones from the TaskManager's
    memory: either way, the tasks that stay in the status while the pager pages are each
    read once, the pages are in order, and no task is read twice, while a writer creates
    tasks of every priority and moves others in and out of the status."""
    async with Runtime.open(db_path) as rt:
        await rt.register_worker("w", "w", ["stay", "churn"])
        stay: list[str] = []
        for n in range(60):
            task_id = await rt.create_task("stay", {"n": n}, priority=n % 4)
            stay.append(task_id)
        if status == "completed":
            for _ in stay:
                claim = await rt.claim_task("w", "stay")
                assert claim is not None
                await rt.complete_task(claim.lease)
        stop = anyio.Event()

        async def writer() -> None:
            n = 0
            while not stop.is_set():
                # New tasks at every priority, some ahead of the pager, some behind it.
                await rt.create_task("churn", {"n": n}, priority=n % 5)
                claim = await rt.claim_task("w", "churn")
                assert claim is not None
                if n % 2:
                    await rt.complete_task(claim.lease)  # into "completed"
                n += 1

        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(writer)
                seen = await _page_through(rt, status, limit=7)
                stop.set()
    ids = [task.id for task in seen]
    assert len(ids) == len(set(ids)), "a task was read twice"
    assert set(stay) <= set(ids), "a task that stayed in the status was missed"
    assert _in_order(seen)


async def test_a_seeds_call_gets_the_default_limit(db_path: str, anyio_backend: str) -> None:
    """``get_tasks_by_status(status)`` with no limit returns the first 1000 (it returned
    every one before); the next page follows from the last one's id."""
    async with Runtime.open(db_path) as rt:
        await rt.create_tasks([{"task_type": "bulk"} for _ in range(1000)])
        await rt.create_tasks([{"task_type": "bulk"} for _ in range(5)])
        first = await rt.get_tasks_by_status("queued")
        assert len(first) == DEFAULT_LIMIT
        rest = await rt.get_tasks_by_status("queued", after=first[-1].id)
        assert len(rest) == 5
        assert len(await rt.get_pending_tasks()) == DEFAULT_LIMIT
        assert len(await rt.get_queued_tasks()) == 10  # the seeds' own default
        assert len(await rt.get_queued_tasks(10, after=first[-1].id)) == 5


BAD: list[tuple[dict[str, Any], str]] = [
    ({"limit": 0}, "limit"),
    ({"limit": -1}, "limit"),
    ({"limit": MAX_LIMIT + 1}, "limit"),
    ({"limit": True}, "limit"),
    ({"limit": "10"}, "limit"),
    ({"after": 12}, "after"),
    ({"after": ""}, "after"),
    ({"after": "no-such-task"}, "after"),
]


@pytest.mark.parametrize(("args", "field"), BAD)
async def test_bad_limits_and_cursors_are_refused_naming_the_field(
    db_path: str, anyio_backend: str, args: dict[str, Any], field: str
) -> None:
    async with Runtime.open(db_path) as rt:
        await rt.create_task("t")
        for status in ("queued", "completed"):
            with pytest.raises(InvalidInputError) as caught:
                await rt.get_tasks_by_status(status, **args)
            assert caught.value.field == field
        with pytest.raises(InvalidInputError) as caught:
            await rt.get_queued_tasks(**args)
        assert caught.value.field == field
        # As JSON bytes: the same refusal.
        client = rt.client()
        request = json.dumps({"op": "get_tasks_by_status", "args": {"status": "queued", **args}})
        with pytest.raises(InvalidInputError) as caught:
            await call_json(client, request)
        assert caught.value.field == field


async def test_another_process_and_the_sync_client_page_the_same(
    db_path: str, anyio_backend: str
) -> None:
    """Through the socket (a client of another process) and the blocking client: the
    same pages, and the same refusal of a bad cursor."""
    async with Runtime.open(db_path) as rt:
        for n in range(12):
            await rt.create_task("t", {"n": n}, priority=n % 3)
        local = await _page_through(rt, "queued", limit=5)
    async with owner(db_path, anyio_backend), OrchestrationClient(db_path=db_path) as client:
        assert client.remote
        remote = await _page_through(client, "queued", limit=5)
        with pytest.raises(InvalidInputError) as caught:
            await client.get_tasks_by_status("queued", after="no-such-task")
        assert caught.value.field == "after"

        def sync_pages() -> list[Task]:
            with SyncOrchestrationClient(db_path=db_path, backend=anyio_backend) as sync:
                first = sync.get_tasks_by_status("queued", limit=5)
                return first + sync.get_tasks_by_status("queued", limit=50, after=first[-1].id)

        blocking = await anyio.to_thread.run_sync(sync_pages)
    assert [t.id for t in remote] == [t.id for t in local] == [t.id for t in blocking]
    assert len(local) == 12


@pytest.mark.sqlite_only("reads SQLite's EXPLAIN QUERY PLAN of the SQLite store's own SQL")
async def test_a_page_of_tasks_is_a_range_of_the_status_index(
    db_path: str, anyio_backend: str
) -> None:
    async with Runtime.open(db_path) as rt:
        task_id = await rt.create_task("t")
        task = await rt.get_task(task_id)
        assert task is not None
    key = (task.priority, task.created_at, task.id)
    with closing(sqlite3.connect(db_path)) as conn:
        for task_type in (None, "t"):
            sql, params = tasks_page_sql("completed", task_type, key, 100)
            plan = " | ".join(
                str(row[3]) for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)
            )
            same = "status=? AND priority=? AND (created_at,id)>(?,?)"
            assert f"USING INDEX idx_tasks_status_order ({same})" in plan, plan
            assert "USING INDEX idx_tasks_status_order (status=? AND priority<?)" in plan, plan
        # The first page: the index's own order, no sort at all.
        sql = "SELECT id FROM tasks WHERE status = ? ORDER BY priority DESC, created_at, id LIMIT ?"
        plan = " | ".join(
            str(row[3]) for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", ("completed", 10))
        )
        assert "idx_tasks_status_order" in plan, plan
        assert "TEMP B-TREE" not in plan, plan


async def _pages(list_page: Any, limit: int, key: str = "id") -> list[Any]:
    """Every item of a listing, ``limit`` at a time, through its ``after`` cursor."""
    seen: list[Any] = []
    after: str | None = None
    while True:
        page = await list_page(limit=limit, after=after)
        seen += page
        if len(page) < limit:
            return seen
        after = getattr(page[-1], key)


async def test_plans_requests_unroutable_and_the_inspector_page_the_same_way(
    db_path: str, anyio_backend: str
) -> None:
    """Every other listing with a cursor: paged 3 at a time, each reads what one large
    page reads, in the same order, and refuses an unknown cursor naming ``after``."""
    from hive_orchestration.inspector import Inspector

    async with Runtime.open(db_path) as rt:
        for n in range(8):
            await rt.queue_planning_request(f"plan {n}", priority=n % 3)
            await rt.create_execution_plan(
                {"title": f"p{n}", "subtasks": [{"id": "a", "task_type": "nobody-does-this"}]}
            )
        await rt.register_worker("w", "w", ["something-else"])
        for n in range(8):
            await rt.create_task("nobody-does-this", {"n": n}, priority=n % 3)
        listings = {
            "get_execution_plans": lambda **kw: rt.get_execution_plans(None, **kw),
            "get_planning_queue": lambda **kw: rt.get_planning_queue(None, **kw),
            "get_unroutable_tasks": rt.get_unroutable_tasks,
        }
        for name, listing in listings.items():
            whole = await listing(limit=100)
            assert len(whole) >= 8, name  # a plan queues its own planning request too
            assert [x.id for x in await _pages(listing, 3)] == [x.id for x in whole], name
            with pytest.raises(InvalidInputError) as caught:
                await listing(limit=3, after="no-such-id")
            assert caught.value.field == "after", name
            with pytest.raises(InvalidInputError) as caught:
                await listing(limit=MAX_LIMIT + 1)
            assert caught.value.field == "limit", name
    async with Inspector.open(db_path) as inspector:
        for name, listing in {"tasks": inspector.tasks, "plans": inspector.plans}.items():
            whole = await listing(limit=100)
            assert len(whole) >= 8, name  # a plan queues its own planning request too
            assert [x.id for x in await _pages(listing, 3)] == [x.id for x in whole], name
            with pytest.raises(InvalidInputError) as caught:
                await listing(limit=3, after="no-such-id")
            assert caught.value.field == "after", name
