"""Data between plan steps: a subtask's handler reads its dependencies' results
(``get_dependency_results``, ``TaskContext.dependency_results``), in-process and through
the owner's socket; bounded pages for many dependencies and for large results; what an
always-run step reads of dependencies that failed; bad input. Real SQLite files, both
backends (a worker process reading them: test_worker_process.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from reliability._remote import owner

from hive_orchestration import (
    AgentRegistry,
    AgentRunner,
    DependencyResults,
    InvalidInputError,
    NotFoundError,
    OrchestrationClient,
    PlanStatus,
    Runtime,
    RuntimeConfig,
    SubtaskStatus,
    SyncOrchestrationClient,
    TaskContext,
)

pytestmark = pytest.mark.anyio

SOON = 10.0


@asynccontextmanager
async def runtime(db_path: str, **config: Any) -> AsyncIterator[Runtime]:
    settings: dict[str, Any] = {"retry_backoff": 0.01, "retry_backoff_max": 0.05}
    settings.update(config)
    async with Runtime.open(db_path, config=RuntimeConfig(**settings)) as rt:
        yield rt


def sub(subtask_id: str, *dependencies: str, **fields: Any) -> dict[str, Any]:
    fields.setdefault("task_type", subtask_id)
    return {"id": subtask_id, "dependencies": list(dependencies), **fields}


async def started(rt: Runtime | OrchestrationClient, *subtasks: dict[str, Any], **kw: Any) -> str:
    plan_id = await rt.create_execution_plan({"subtasks": list(subtasks)}, **kw)
    assert await rt.mark_plan_execution_started(plan_id)
    return plan_id


async def complete(
    rt: Runtime | OrchestrationClient, kind: str, result: Mapping[str, object]
) -> str:
    got = await rt.claim_task(f"w-{kind}", [kind], wait=SOON, start=True)
    assert got is not None, kind
    await rt.complete_task(got.lease, result)
    return got.task.id


async def task_of(rt: Runtime | OrchestrationClient, plan_id: str, subtask_id: str) -> str:
    for state in await rt.get_plan_subtasks(plan_id):
        if state.subtask_id == subtask_id:
            assert state.task_id is not None
            return state.task_id
    raise AssertionError(subtask_id)


async def test_a_handler_reads_what_its_dependencies_returned(db_path: str) -> None:
    async with runtime(db_path) as rt:
        registry = AgentRegistry()

        async def fetch(context: TaskContext) -> Mapping[str, object]:
            return {"rows": [1, 2, 3] if context.payload["part"] == 1 else [4, 5]}

        async def merge(context: TaskContext) -> Mapping[str, object]:
            inputs = await context.dependency_results()
            first = await context.dependency_result("part1")
            assert first.result == {"rows": [1, 2, 3]}
            rows = [row for dep in inputs.values() for row in (dep.result or {})["rows"]]
            return {"total": sum(rows), "from": sorted(inputs)}

        registry.register("fetch", fetch)
        registry.register("merge", merge)
        plan_id = await started(
            rt,
            sub("part1", task_type="fetch", payload={"part": 1}),
            sub("part2", task_type="fetch", payload={"part": 2}),
            sub("merge", "part1", "part2"),
        )
        async with AgentRunner(rt, registry, claim_wait=0.2):
            plan = await rt.wait_for_plan(plan_id, timeout=SOON)
        assert plan.status is PlanStatus.COMPLETED
        merged = await rt.get_task(await task_of(rt, plan_id, "merge"))
        assert merged is not None
        assert merged.result == {"total": 15, "from": ["part1", "part2"]}


async def test_an_always_run_step_reads_how_each_dependency_ended(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(
            rt,
            sub("ok"),
            sub("bad"),
            sub("never", "bad"),  # skipped
            sub("report", "ok", "bad", "never", always_run=True),
            failure_policy="continue",
        )
        ok_task = await complete(rt, "ok", {"n": 1})
        got = await rt.claim_task("w", ["bad"], wait=SOON, start=True)
        assert got is not None
        await rt.fail_task(got.lease, "no disk", retryable=False)
        report = await rt.claim_task("w", ["report"], wait=SOON)
        assert report is not None
        page = await rt.get_dependency_results(report.task.id)
        assert isinstance(page, DependencyResults)
        assert (page.plan_id, page.subtask_id, page.next_after) == (plan_id, "report", None)
        found = {d.subtask_id: d for d in page.dependencies}
        assert list(found) == ["bad", "never", "ok"]  # by subtask id
        assert (found["ok"].status, found["ok"].task_id, found["ok"].result) == (
            SubtaskStatus.COMPLETED,
            ok_task,
            {"n": 1},
        )
        assert found["ok"].error is None
        assert (found["bad"].status, found["bad"].result) == (SubtaskStatus.FAILED, None)
        assert found["bad"].error == "no disk"
        assert found["never"].status is SubtaskStatus.SKIPPED
        assert found["never"].error is not None
        assert "'bad' did not complete" in found["never"].error
        assert page.results == {"bad": None, "never": None, "ok": {"n": 1}}


async def test_many_dependencies_come_in_pages(db_path: str) -> None:
    width = 250
    async with runtime(db_path) as rt:
        parts = [sub(f"p{i:03}", task_type="part") for i in range(width)]
        plan_id = await started(rt, *parts, sub("sum", *(p["id"] for p in parts)))
        for _ in range(width):
            got = await rt.claim_task("w", ["part"], wait=SOON, start=True)
            assert got is not None
            await rt.complete_task(got.lease, {"i": int(str(got.task.subtask_id)[1:])})
        summing = await rt.claim_task("w", ["sum"], wait=SOON)
        assert summing is not None
        pages: list[DependencyResults] = []
        after: str | None = None
        while True:
            page = await rt.get_dependency_results(summing.task.id, after=after)
            pages.append(page)
            if page.next_after is None:
                break
            after = page.next_after
        assert [len(p.dependencies) for p in pages] == [100, 100, 50]
        assert pages[0].next_after == "p099"
        seen = [d.subtask_id for p in pages for d in p.dependencies]
        assert seen == [f"p{i:03}" for i in range(width)]
        context = TaskContext(rt, summing, "w")
        everything = await context.dependency_results()
        assert {k: (v.result or {})["i"] for k, v in everything.items()} == {
            f"p{i:03}": i for i in range(width)
        }
        small = await rt.get_dependency_results(summing.task.id, limit=7, after="p240")
        assert [d.subtask_id for d in small.dependencies] == [f"p{i}" for i in range(241, 248)]
        assert small.next_after == "p247"
        chosen = await rt.get_dependency_results(summing.task.id, ["p007", "p003", "p007"])
        assert [d.subtask_id for d in chosen.dependencies] == ["p003", "p007"]
        assert plan_id


async def test_large_results_are_split_over_pages_by_size(db_path: str) -> None:
    # A page holds about max(max_payload_bytes, max_frame_bytes / 2) of results: 40 000
    # bytes here, so one 30 000-byte result a page, however high the limit.
    async with runtime(db_path, max_payload_bytes=40_000, max_frame_bytes=64 * 1024) as rt:
        plan_id = await started(
            rt, sub("a", task_type="big"), sub("b", task_type="big"), sub("c", "a", "b")
        )
        for _ in range(2):
            got = await rt.claim_task("w", ["big"], wait=SOON, start=True)
            assert got is not None
            await rt.complete_task(got.lease, {"blob": str(got.task.subtask_id) * 30_000})
        c = await task_of(rt, plan_id, "c")
        first = await rt.get_dependency_results(c, limit=1000)
        assert [d.subtask_id for d in first.dependencies] == ["a"]
        assert first.next_after == "a"
        second = await rt.get_dependency_results(c, after=first.next_after)
        assert [d.subtask_id for d in second.dependencies] == ["b"]
        assert second.next_after is None
        assert second.dependencies[0].result == {"blob": "b" * 30_000}


async def test_bad_requests_are_refused(db_path: str) -> None:
    async with runtime(db_path) as rt:
        plan_id = await started(rt, sub("a"), sub("b", "a"))
        b = await task_of(rt, plan_id, "b")
        loose = await rt.create_task("loose")
        with pytest.raises(NotFoundError):
            await rt.get_dependency_results("no-such-task")
        cases: list[tuple[dict[str, Any], str, str]] = [
            ({"task_id": loose}, "task_id", "is not a subtask of a plan"),
            ({"task_id": b, "subtask_ids": ["zz"]}, "subtask_ids[0]", "is not a dependency"),
            ({"task_id": b, "subtask_ids": "a"}, "subtask_ids", "must be a list"),
            ({"task_id": b, "limit": 0}, "limit", ""),
            ({"task_id": b, "limit": 1001}, "limit", ""),
            ({"task_id": ""}, "task_id", ""),
        ]
        for arguments, field, said in cases:
            with pytest.raises(InvalidInputError) as refused:
                await rt.get_dependency_results(**arguments)
            assert refused.value.field == field, arguments
            assert said in refused.value.reason
        # A root has no dependencies: an empty page, not an error.
        root = await rt.get_dependency_results(await task_of(rt, plan_id, "a"))
        assert (root.dependencies, root.next_after) == ((), None)


async def test_dependency_results_through_the_owners_socket(
    db_path: str, anyio_backend: str
) -> None:
    async with (
        owner(db_path, anyio_backend),
        OrchestrationClient(db_path=db_path, source_agent="planner") as client,
    ):
        assert client.remote
        plan_id = await started(client, sub("a"), sub("b", "a"))
        await complete(client, "a", {"answer": 42})
        b = await client.claim_task("w", ["b"], wait=SOON)
        assert b is not None
        page = await client.get_dependency_results(b.task.id)
        assert isinstance(page, DependencyResults)
        assert page.results == {"a": {"answer": 42}}
        assert page.dependencies[0].status is SubtaskStatus.COMPLETED
        with pytest.raises(InvalidInputError) as refused:
            await client.get_dependency_results(b.task.id, ["nope"])
        assert refused.value.field == "subtask_ids[0]"

        def sync_read() -> DependencyResults:
            with SyncOrchestrationClient(db_path=db_path) as sync:
                return sync.get_dependency_results(b.task.id, ["a"])

        assert (await anyio.to_thread.run_sync(sync_read)).results == {"a": {"answer": 42}}
        assert plan_id
