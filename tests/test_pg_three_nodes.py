"""Three real nodes on one PostgreSQL database share thousands of tasks, plans included.

Three ``hive-orchestration serve --db URL`` processes serve one database; socket clients
(workers) connect to each node's own socket, claim tasks in batches, start and complete
them. Plain tasks and the subtasks of layered plans are created through every node; half
the plans are started through a node that does not drive them (the call is forwarded to
the driver: actors/plan_executor/calls.py). Checked: no task handed out twice, none lost
(each completed once, by one run, one ``task.assigned``), every plan completed once, and
the subtasks of one plan ran on several nodes while one node drove it.

The default variant has 1,000 tasks; ``-m slow`` runs the issue's 10,000.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

psycopg = pytest.importorskip("psycopg")

from hive_orchestration import (  # noqa: E402
    Claim,
    IllegalTransitionError,
    LeaseLostError,
    OrchestrationClient,
    PlanStatus,
    RequestTimeoutError,
    StorageError,
    TaskStatus,
)
from hive_orchestration.remote.client import RemoteRuntime  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

NODES = 3
WORKERS_PER_NODE = 4
TASK_TYPE = "job"
CHUNK = 250  # tasks per create_tasks call
#: Far above any stall of a loaded 2-core machine: this test is about tasks handed out
#: once, not about expired leases (a task whose lease expires is handed out again).
LEASE = 600.0


def raw(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def layered_plan(width: int, depth: int) -> dict[str, object]:
    """``depth`` layers of ``width`` subtasks, each on two of the layer before: wide
    enough that a layer's subtasks are claimed by workers of several nodes at once."""
    subtasks: list[dict[str, object]] = []
    for layer in range(depth):
        for i in range(width):
            needs = [] if layer == 0 else [f"l{layer - 1}-{i}", f"l{layer - 1}-{(i + 1) % width}"]
            subtasks.append({"id": f"l{layer}-{i}", "task_type": TASK_TYPE, "dependencies": needs})
    return {"title": "layers", "subtasks": subtasks}


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:]


@contextlib.asynccontextmanager
async def serving(url: str, backend: str, logs: list[Path]) -> AsyncIterator[list[str]]:
    """A ``serve`` process on ``url`` per log file, started together; yields their socket
    addresses. SIGTERM at the end, which each must answer by exiting 0."""
    command = [sys.executable, "-m", "hive_orchestration", "serve", "--db", url]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVE_ORCHESTRATION_")}
    processes: list[Process] = []
    try:
        for log in logs:
            with log.open("wb") as err:
                processes.append(
                    await anyio.open_process(
                        [*command, "--backend", backend],
                        stdout=subprocess.PIPE,
                        stderr=err,
                        env=env,
                    )
                )
        addresses = []
        for process, log in zip(processes, logs, strict=True):
            assert process.stdout is not None
            lines = BufferedByteReceiveStream(process.stdout)
            with anyio.fail_after(60):
                try:
                    ready = json.loads(await lines.receive_until(b"\n", 1 << 16))
                except anyio.IncompleteRead:
                    pytest.fail(f"a node did not start: {_tail(log)}")
            addresses.append(str(ready["addresses"][0]))
        yield addresses
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process, log in zip(processes, logs, strict=True):
            with anyio.fail_after(60):
                assert await process.wait() == 0, _tail(log)
    finally:
        with anyio.CancelScope(shield=True):
            for process in processes:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                await process.aclose()


@contextlib.asynccontextmanager
async def connected(address: str, name: str) -> AsyncIterator[OrchestrationClient]:
    """A client of the node serving ``address`` (not just any node of the database: the
    client ``OrchestrationClient(db_path=URL)`` gives is bound to one live node)."""
    async with RemoteRuntime.connect(address, name=name, silence=60.0) as remote:
        yield OrchestrationClient._bound(remote, source_agent=name, correlation_id=None)


async def shown(job: Callable[..., Awaitable[None]], *args: Any) -> None:
    """Run ``job``, printing its error first: the clients' sessions it is raised through
    nest it deeper than a traceback shows."""
    try:
        await job(*args)
    except Exception:
        traceback.print_exc()
        raise


@pytest.mark.parametrize(
    ("total", "plans", "width", "depth"),
    [
        pytest.param(1_000, 10, 5, 4, id="1k"),
        pytest.param(
            10_000, 50, 8, 5, id="10k", marks=[pytest.mark.slow, pytest.mark.timeout(1200)]
        ),
    ],
)
async def test_three_nodes_share_many_tasks_and_plans_each_handed_out_once(
    pg_url: str,
    anyio_backend: str,
    tmp_path: Path,
    total: int,
    plans: int,
    width: int,
    depth: int,
) -> None:
    per_plan = width * depth
    plain = total - plans * per_plan
    assert plain > 0
    spec = layered_plan(width, depth)
    # task id -> the node whose worker completed it; claims, to find a task handed twice
    done: dict[str, int] = {}
    handed: list[str] = []
    # Calls refused with a StorageError: under contention a node's batch may conflict
    # with other nodes' writes more times than the TaskManager decides it again (it
    # then answers the conflict, "N of N tasks row(s) to update are missing": nothing
    # of it applied), which a worker meets as an error and retries; and calls not
    # answered within the node's ask_timeout (30 s) on a loaded machine.
    refused: list[str] = []
    plan_ids: list[str] = []

    async with contextlib.AsyncExitStack() as stack:
        logs = [tmp_path / f"node{n}.log" for n in range(NODES)]
        addresses = await stack.enter_async_context(serving(pg_url, anyio_backend, logs))
        assert len(set(addresses)) == NODES, addresses
        admins = [
            await stack.enter_async_context(connected(address, f"admin{n}"))
            for n, address in enumerate(addresses)
        ]

        async def finish(node: int, client: OrchestrationClient, claim: Claim) -> None:
            for attempt in range(100):
                try:
                    await client.complete_task(claim.lease, {"by": node})
                    break
                except StorageError as exc:
                    refused.append(str(exc))  # nothing of it applied: complete again
                except RequestTimeoutError as exc:
                    refused.append(str(exc))  # it may have landed: ask again
                except (IllegalTransitionError, LeaseLostError):
                    if attempt == 0 or not refused:
                        raise
                    # An earlier try that timed out had landed.
                    task = await client.get_task(claim.task.id)
                    assert task.status is TaskStatus.COMPLETED, task
                    break
            assert claim.task.id not in done, f"{claim.task.id} handed out twice"
            done[claim.task.id] = node

        async def work(node: int, client: OrchestrationClient, worker: str) -> None:
            while len(done) < total:
                try:
                    claims = await client.claim_tasks(
                        worker, TASK_TYPE, limit=8, start=True, wait=0.5, lease=LEASE
                    )
                except StorageError as exc:
                    refused.append(str(exc))  # nothing of it applied: claim again
                    continue
                handed.extend(claim.task.id for claim in claims)
                # Completed together, as a worker with slots does.
                async with anyio.create_task_group() as running:
                    for claim in claims:
                        running.start_soon(finish, node, client, claim)

        async def produce(node: int) -> None:
            client = admins[node]
            mine = range(node, plain, NODES)  # every third task
            numbers = list(mine)
            for first in range(0, len(numbers), CHUNK):
                chunk = numbers[first : first + CHUNK]
                await client.create_tasks(
                    [{"task_type": TASK_TYPE, "payload": {"n": n}} for n in chunk]
                )

        async def plan(number: int) -> None:
            creator = admins[number % NODES]
            plan_id = await creator.create_execution_plan(spec)
            plan_ids.append(plan_id)
            # Half of them started through another node: forwarded to the creator.
            starter = admins[(number + number % 2) % NODES]
            assert await starter.mark_plan_execution_started(plan_id) is True

        workers = [
            (node, await stack.enter_async_context(connected(address, name)), name)
            for node, address in enumerate(addresses)
            for name in (f"w{node}-{w}" for w in range(WORKERS_PER_NODE))
        ]
        with anyio.fail_after(900 if total > 1_000 else 240):
            async with anyio.create_task_group() as tg:
                for node, client, name in workers:
                    tg.start_soon(shown, work, node, client, name)
                for node in range(NODES):
                    tg.start_soon(shown, produce, node)
                for number in range(plans):
                    tg.start_soon(shown, plan, number)
            ended = [await admins[n % NODES].wait_for_plan(p) for n, p in enumerate(plan_ids)]

    print(f"{len(refused)} call(s) refused (conflicts, timeouts) and retried: {refused[:3]}")
    # None handed out twice, none lost.
    assert len(handed) == len(set(handed)) == total
    assert len(done) == total
    assert raw(pg_url, "SELECT status, count(*) FROM tasks GROUP BY status") == [
        ("completed", total)
    ]
    assert raw(pg_url, "SELECT count(*), count(DISTINCT task_id) FROM runs") == [(total, total)]
    assert raw(pg_url, "SELECT count(*) FROM events WHERE type = 'task.assigned'") == [(total,)]
    assert len(set(done.values())) == NODES, "every node handed some out"
    # Every plan completed, once, every subtask by one task.
    assert [p.status for p in ended] == [PlanStatus.COMPLETED] * plans
    finished = raw(
        pg_url,
        "SELECT type, count(*), count(DISTINCT plan_id) FROM events"
        " WHERE type IN ('plan.completed', 'plan.failed', 'plan.cancelled') GROUP BY type",
    )
    assert finished == [("plan.completed", plans, plans)]
    assert raw(
        pg_url,
        "SELECT count(*), count(DISTINCT (plan_id, subtask_id)) FROM tasks"
        " WHERE plan_id IS NOT NULL",
    ) == [(plans * per_plan, plans * per_plan)]
    # The starts made through another node were forwarded and applied once each (a call
    # re-sent while its answer was on its way is answered again, with the same answer).
    forwarded = raw(
        pg_url,
        "SELECT count(DISTINCT data::jsonb->>'call_id') FROM events WHERE type = 'plan.call'",
    )
    answered = raw(
        pg_url,
        "SELECT count(DISTINCT data::jsonb->>'call_id'), count(DISTINCT data) FROM events"
        " WHERE type = 'plan.call_answered'",
    )
    assert answered == [(forwarded[0][0], forwarded[0][0])]
    assert raw(
        pg_url,
        "SELECT count(*), count(DISTINCT plan_id) FROM events WHERE type = 'plan.started'",
    ) == [(plans, plans)]
    assert forwarded[0][0] >= plans // 3  # number % 2 == 1 starts elsewhere
    # Each plan was driven by one node, its subtasks run by workers of several.
    by_plan: dict[str, set[int]] = {p: set() for p in plan_ids}
    for task_id, plan_id in raw(pg_url, "SELECT id, plan_id FROM tasks WHERE plan_id IS NOT NULL"):
        by_plan[plan_id].add(done[task_id])
    assert len(set().union(*by_plan.values())) > 1, "plans' subtasks ran on one node only"
    if total > 1_000:
        # One plan's subtasks on several nodes: at 1,000 tasks the run is short enough that
        # the driver's own workers (who see its queued subtasks first, the other nodes a
        # sweep later) took every subtask of each plan once in CI.
        spread = sum(len(nodes) > 1 for nodes in by_plan.values())
        assert spread > 0, by_plan
    drivers = raw(
        pg_url, "SELECT count(DISTINCT node_id) FROM execution_plans WHERE node_id IS NOT NULL"
    )
    assert drivers == [(NODES,)]  # each node created (and drove) some
