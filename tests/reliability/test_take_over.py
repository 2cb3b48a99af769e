"""``RuntimeConfig.take_over``: a client of another process's runtime takes the database
over when that runtime goes away (issue 20, item 3), with real owner processes killed
with SIGKILL or stopped, on both backends.

What is promised: a call in flight when the owner went away gets OutcomeUnknownError
(killed) or RuntimeStoppedError (stopped); a call made after runs on the next owner;
``events(after=)`` streams and callbacks go on from their last event with no gap and no
duplicate; plain subscriptions end as without take-over; recovery runs when the file is
opened again; of several clients racing, exactly one owns the file and the others
connect to it.
"""

from __future__ import annotations

import os
from contextlib import AsyncExitStack
from typing import Any, Literal

import anyio
import pytest

from hive_orchestration import (
    ConnectionLostError,
    Event,
    LeaseLostError,
    OrchestrationClient,
    OutcomeUnknownError,
    RuntimeConfig,
    RuntimeStoppedError,
    SyncOrchestrationClient,
    TaskStatus,
)

from ._audit import audit_tasks, read_log
from ._remote import DEADLINE, child, eventually, owner

pytestmark = pytest.mark.anyio

TAKE_OVER = RuntimeConfig(take_over=True)


async def test_a_client_takes_the_database_over_when_its_owner_is_killed(
    db_path: str, anyio_backend: str
) -> None:
    async with (
        owner(db_path, anyio_backend) as process,
        OrchestrationClient(db_path=db_path, config=TAKE_OVER, source_agent="app") as client,
    ):
        assert client.remote
        first = await client.create_task("job", {"n": 0})
        held = await client.claim_task("w-old", ["job"])  # the old owner's claim
        assert held is not None
        seen: list[Event] = []
        handle = await client.on_event("app.*", seen.append)
        before = await client.publish("app.tick", {"n": 0})
        parked: list[BaseException] = []

        async def wait_for_work() -> None:
            try:
                await client.claim_task("w-parked", ["nothing-yet"], wait=30)
            except ConnectionLostError as exc:
                parked.append(exc)

        async with (
            client.events(after=0, pattern="app.*") as stream,
            client.subscribe("app.*") as live,
        ):
            assert (await stream.receive()).seq == before.seq
            async with anyio.create_task_group() as group:
                group.start_soon(wait_for_work)
                await eventually(lambda: _parked(client))
                process.kill()
            # Made once the client saw the owner go (its parked claim failed): it waits for
            # the take-over, then runs here.
            second = await client.create_task("job", {"n": 1})
            assert not client.remote
            assert (await client.server_status()).pid == os.getpid()
            # In flight when the owner died: its outcome is unknown, as without take-over.
            assert len(parked) == 1
            assert isinstance(parked[0], OutcomeUnknownError)
            # A plain subscription has no replay: it ends, as without take-over.
            with pytest.raises(ConnectionLostError):
                await live.receive()
            after = [await client.publish("app.tick", {"n": n}) for n in (1, 2)]
            # The stream goes on from its last event, on this runtime: no gap, no duplicate.
            got = [await stream.receive() for _ in after]
            assert [event.seq for event in got] == [event.seq for event in after]
        await eventually(lambda: _has(seen, 3))
        assert [event.seq for event in seen] == [before.seq, *(event.seq for event in after)]
        assert handle.active
        assert handle.errors == 0
        # Recovery ran: the old owner's claim went back to the queue, its lease is dead.
        with pytest.raises(LeaseLostError):
            await client.complete_task(held.lease)
        task = await client.get_task(first)
        assert task is not None
        assert task.status is TaskStatus.QUEUED
        assert (await client.get_task(second)) is not None
        _, _, _, problems = await audit_tasks(client, await read_log(client))
        assert problems == []


async def _parked(client: OrchestrationClient) -> bool:
    """Whether the owner runs a call of this client besides this one (a parked claim)."""
    status = await client.server_status()
    return any(connection.calls_in_flight >= 2 for connection in status.connections)


async def _has(seen: list[Event], count: int) -> bool:
    return len(seen) >= count


@pytest.mark.sqlite_only(
    "one owner per database: on PostgreSQL several runtimes open one database as nodes,"
    " and a client opens a node of its own when none serves (tests/test_pg_nodes.py)"
)
async def test_clients_racing_to_take_over_agree_on_one_owner_each_time(
    db_path: str, anyio_backend: str
) -> None:
    async with owner(db_path, anyio_backend) as process, AsyncExitStack() as stack:
        racers = [
            await stack.enter_async_context(child("take_over", anyio_backend, db_path, f"r{n}"))
            for n in range(3)
        ]
        for racer in racers:
            assert (await racer.expect("open"))["remote"] is True
            assert (await racer.expect("created"))["owner"] == process.pid
        # The owner is killed: the lock lets one racer open the file, the others connect.
        process.kill()
        owners = {await _next_owner(racer, gone={process.pid}) for racer in racers}
        assert len(owners) == 1
        (winner_pid,) = owners
        (winner,) = [racer for racer in racers if racer.pid == winner_pid]
        assert winner.lines[-1]["remote"] is False
        assert all(racer.lines[-1]["remote"] for racer in racers if racer is not winner)
        async with OrchestrationClient(db_path=db_path) as client:
            status = await client.server_status()
        assert status.pid == winner_pid
        connected = {connection.pid for connection in status.connections}
        assert {racer.pid for racer in racers if racer is not winner} <= connected
        # The winner's app closes: its runtime stops, and the two left race again.
        assert await winner.finish() == 0
        left = [racer for racer in racers if racer is not winner]
        owners = {await _next_owner(racer, gone={process.pid, winner_pid}) for racer in left}
        assert len(owners) == 1
        assert owners <= {racer.pid for racer in left}
        for racer in left:
            assert await racer.finish() == 0
    lines = [line for racer in racers for line in racer.lines]
    # A call in flight when its owner went away: outcome unknown (killed), or refused
    # by the owner that stopped; nothing else failed.
    errors = {line["error"] for line in lines if line["op"] == "unknown"}
    assert errors <= {"OutcomeUnknownError", "RuntimeStoppedError"}, lines
    created = {line["key"]: line["task"] for line in lines if line["op"] == "created"}
    unknown = {line["key"] for line in lines if line["op"] == "unknown"}
    async with OrchestrationClient(db_path=db_path) as client:
        for key, task_id in created.items():
            assert await client.get_task(task_id) is not None, f"acknowledged {key} lost"
        for key in unknown:  # reconciled by key: one task each, whatever happened
            created[key] = await client.create_task("job", {"key": key}, idempotency_key=key)
        _, tasks, _, problems = await audit_tasks(client, await read_log(client))
    assert problems == []
    assert set(tasks) == set(created.values())
    assert len(tasks) == len(created)


async def _next_owner(racer: Any, *, gone: set[int]) -> int:
    """Read ``racer``'s lines until one was answered by an owner not in ``gone``."""
    with anyio.fail_after(DEADLINE):
        while True:
            line = await racer.expect("created")
            if line["owner"] is not None and line["owner"] not in gone:
                return int(line["owner"])


@pytest.mark.sqlite_only(
    "one owner per database: on PostgreSQL several runtimes open one database as nodes,"
    " and a client opens a node of its own when none serves (tests/test_pg_nodes.py)"
)
async def test_an_owner_that_stops_is_taken_over_and_a_sync_client_goes_on(
    db_path: str, anyio_backend: str
) -> None:
    backend: Literal["asyncio", "trio"] = "trio" if anyio_backend == "trio" else "asyncio"
    async with (
        owner(db_path, anyio_backend) as process,
        OrchestrationClient(db_path=db_path, config=TAKE_OVER) as waiter,
    ):
        parked: list[BaseException] = []

        async def wait_for_work() -> None:
            try:
                await waiter.claim_task("w-parked", ["nothing-yet"], wait=30)
            except RuntimeStoppedError as exc:
                parked.append(exc)

        def use() -> tuple[list[str | None], list[str], bool, bool]:
            with SyncOrchestrationClient(
                db_path=db_path, config=TAKE_OVER, backend=backend
            ) as client:
                made = [client.create_task("job", {"n": 0})]
                before = client.remote
                with client.events(after=0, pattern="task.created") as stream:
                    got = [stream.get(timeout=DEADLINE)]
                    # The owner stops cleanly: it says goodbye, and this client goes on.
                    assert anyio.from_thread.run(process.stop) == 0
                    made.append(client.create_task("job", {"n": 1}))
                    got.append(stream.get(timeout=DEADLINE))
                return (
                    [event.task_id if event else None for event in got],
                    made,
                    before,
                    client.remote,
                )

        async with anyio.create_task_group() as group:
            group.start_soon(wait_for_work)
            await eventually(lambda: _parked(waiter))
            seen, made, before, after = await anyio.to_thread.run_sync(use)
        assert before
        assert seen == made  # the stream went on from its last event: no gap, no duplicate
        # The claim parked at the owner as it stopped is refused by it, and went back.
        assert len(parked) == 1
        # One of this process's two clients owns the file now; the other reached it.
        assert {after, waiter.remote} == {True, False}
        assert len(await waiter.get_queued_tasks()) == 2
