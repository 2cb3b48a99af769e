"""The planning queue on a PostgreSQL database several nodes share.

A request queued on one node is claimed from any node, handed out once however many
nodes claim at once, and a cancel, a failure or the plan that answers it, on any node,
ends it for all: the database is the queue, each change of a request is a write fenced by
the status it was read in (actors/plan_executor/planning.py).
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

psycopg = pytest.importorskip("psycopg")

from hive_orchestration import (  # noqa: E402
    IllegalTransitionError,
    PlanningStatus,
    Runtime,
)

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


def raw(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def events(url: str, request_id: str) -> list[str]:
    rows = raw(url, "SELECT type FROM events WHERE correlation_id = %s ORDER BY seq", (request_id,))
    return [str(kind) for (kind,) in rows]


async def test_a_request_queued_on_one_node_is_claimed_on_another_once(pg_url: str) -> None:
    async with Runtime.open(pg_url) as first, Runtime.open(pg_url) as second:
        low = await first.queue_planning_request("later", priority=10)
        high = await first.queue_planning_request("first", priority=90)
        # The other node hands out the best one, then the next; then none is left on
        # either node.
        taken = await second.claim_planning_request("planner-b")
        assert taken is not None
        assert taken.id == high.id
        assert taken.status is PlanningStatus.ASSIGNED
        again = await first.claim_planning_request("planner-a")
        assert again is not None
        assert again.id == low.id
        assert await first.claim_planning_request("planner-a") is None
        assert await second.claim_planning_request("planner-b") is None
        stored = await first.get_planning_request(high.id)
        assert stored is not None
        assert stored.assigned_agent == "planner-b"
    assert events(pg_url, high.id) == ["planning.requested", "planning.assigned"]


async def test_nodes_claiming_at_once_hand_each_request_out_once(pg_url: str) -> None:
    async with Runtime.open(pg_url) as first, Runtime.open(pg_url) as second:
        queued = [await first.queue_planning_request(f"r{i}") for i in range(20)]
        queued += [await second.queue_planning_request(f"s{i}") for i in range(20)]
        got: list[tuple[str, str]] = []
        # Every planner's first claim races all the others' (8 claims at once, 4 on each
        # node, 40 requests): one planner may not drain the queue before the rest start.
        first_round, raced = anyio.Event(), 0

        async def planner(runtime: Runtime, name: str) -> None:
            nonlocal raced
            while (request := await runtime.claim_planning_request(name)) is not None:
                got.append((request.id, name))
                if not first_round.is_set():
                    raced += 1
                    if raced == 8:
                        first_round.set()
                    await first_round.wait()

        async with anyio.create_task_group() as group:
            for index in range(4):
                group.start_soon(planner, first, f"a{index}")
                group.start_soon(planner, second, f"b{index}")
        ids = [request_id for request_id, _ in got]
        assert sorted(ids) == sorted(request.id for request in queued)  # each once
        assert {name[0] for _, name in got} == {"a", "b"}
        rows = dict(raw(pg_url, "SELECT id, assigned_agent FROM planning_queue"))
        assert rows == dict(got)
    for request in queued:
        assert events(pg_url, request.id) == ["planning.requested", "planning.assigned"]


async def test_a_request_cancelled_on_one_node_is_not_handed_out_by_another(
    pg_url: str,
) -> None:
    async with Runtime.open(pg_url) as first, Runtime.open(pg_url) as second:
        request = await first.queue_planning_request("withdrawn")
        cancelled = await second.cancel_planning_request(request.id, "not needed")
        assert cancelled.status is PlanningStatus.CANCELLED
        assert await first.claim_planning_request("planner") is None
        # Ended on one node, it cannot be ended again on the other.
        with pytest.raises(IllegalTransitionError):
            await first.cancel_planning_request(request.id)
        # Claimed on one node, cancelled on the other: the claim's holder fails it no more.
        held = await first.queue_planning_request("held")
        claimed = await first.claim_planning_request("planner")
        assert claimed is not None
        assert claimed.id == held.id
        await second.cancel_planning_request(held.id, "changed my mind")
        with pytest.raises(IllegalTransitionError):
            await first.fail_planning_request(held.id, "could not plan it")
    assert events(pg_url, request.id) == ["planning.requested", "planning.cancelled"]
    assert events(pg_url, held.id) == [
        "planning.requested",
        "planning.assigned",
        "planning.cancelled",
    ]


async def test_a_plan_made_on_another_node_answers_the_request(pg_url: str) -> None:
    async with Runtime.open(pg_url) as first, Runtime.open(pg_url) as second:
        request = await first.queue_planning_request("ship it")
        claimed = await second.claim_planning_request("planner")
        assert claimed is not None
        plan_id = await first.create_execution_plan(
            {"subtasks": [{"id": "build", "task_type": "build"}]},
            planning_task_id=claimed.id,
        )
        stored = await second.get_planning_request(request.id)
        assert stored is not None
        assert stored.status is PlanningStatus.PLANNED
        # Planned, it is no longer open on the node that claimed it.
        with pytest.raises(IllegalTransitionError):
            await second.fail_planning_request(request.id, "too late")
        assert await first.get_execution_plan(plan_id) is not None
    assert events(pg_url, request.id) == [
        "planning.requested",
        "planning.assigned",
        "planning.planned",
    ]
