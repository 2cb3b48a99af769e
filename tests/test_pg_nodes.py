"""Several runtimes (nodes) on one PostgreSQL database.

Each open runtime registers as a node (a ``hive_nodes`` row and a session advisory lock
on its own id, held for its life: storage/pg/claim.py). A claimed task records its node
(``tasks.node_id``); a runtime opening the database requeues the claims of dead nodes and
unowned ones only, never another live node's. Clients given the URL find any live node.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

psycopg = pytest.importorskip("psycopg")

from hive_orchestration import (  # noqa: E402
    OrchestrationClient,
    Runtime,
    StorageError,
    TaskStatus,
)
from hive_orchestration.storage.pg import claim as pg_claim  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


def raw(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.fixture
def shared() -> Iterator[None]:
    """Several nodes admitted on one database (the store's private switch)."""
    before = pg_claim._SHARED
    pg_claim._SHARED = True
    try:
        yield
    finally:
        pg_claim._SHARED = before


async def test_one_runtime_owns_a_database_while_nodes_are_switched_off(pg_url: str) -> None:
    assert not pg_claim._SHARED
    async with Runtime.open(pg_url):
        with pytest.raises(StorageError) as caught:
            async with Runtime.open(pg_url):
                pass
        assert caught.value.fault == "in_use"


async def test_a_second_node_opens_and_leaves_the_first_nodes_claims_alone(
    pg_url: str, shared: None
) -> None:
    async with Runtime.open(pg_url) as first:
        task_id = await first.create_task("build")
        claim = await first.claim_task("w1", "build", start=True)
        assert claim is not None
        assert claim.task.id == task_id
        [(node,)] = raw(pg_url, "SELECT node_id FROM tasks WHERE id = %s", (task_id,))
        assert node is not None
        async with Runtime.open(pg_url):
            # Both nodes are registered and alive; the claim is still the first node's.
            assert len(raw(pg_url, "SELECT id FROM hive_nodes")) == 2
            assert raw(pg_url, "SELECT status, node_id FROM tasks WHERE id = %s", (task_id,)) == [
                ("running", node)
            ]
        done = await first.complete_task(claim.lease, {"ok": True})
        assert done.status == TaskStatus.COMPLETED
    assert raw(pg_url, "SELECT status, node_id FROM tasks") == [("completed", None)]


async def test_the_claims_of_a_dead_node_are_requeued_by_the_next_to_open(
    pg_url: str, shared: None
) -> None:
    async with Runtime.open(pg_url) as first:
        task_id = await first.create_task("build")
        assert await first.claim_task("w1", "build") is not None
    # The first node is gone (its lock with it), its claim left in the table.
    assert raw(pg_url, "SELECT status FROM tasks") == [("assigned",)]
    async with Runtime.open(pg_url) as second, Runtime.open(pg_url) as third:
        assert (await second.get_task(task_id)).status == TaskStatus.QUEUED
        claim = await third.claim_task("w2", "build", wait=10)
        assert claim is not None
        assert claim.task.id == task_id
        assert [r.status for r in await third.get_runs(task_id)] == ["lost", "assigned"]


async def test_a_client_given_the_url_reaches_a_live_node(pg_url: str, shared: None) -> None:
    async with Runtime.open(pg_url) as first, Runtime.open(pg_url):
        async with OrchestrationClient(db_path=pg_url) as client:
            assert client.remote
            task_id = await client.create_task("remote-made")
        # Committed by the node the client reached, before its answer: any node reads it.
        assert (await first.get_task(task_id)) is not None
