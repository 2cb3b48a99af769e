"""Several runtimes (nodes) on one PostgreSQL database.

Each open runtime registers as a node (a ``hive_nodes`` row and a session advisory lock
on its own id, held for its life: storage/pg/claim.py). A claimed task records its node
(``tasks.node_id``); a runtime opening the database requeues the claims of dead nodes and
unowned ones only, never another live node's. Clients given the URL find any live node.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

psycopg = pytest.importorskip("psycopg")

from hive_orchestration import (  # noqa: E402
    IllegalTransitionError,
    LeaseLostError,
    OrchestrationClient,
    Runtime,
    TaskStatus,
)

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


def raw(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


async def test_a_second_node_opens_and_leaves_the_first_nodes_claims_alone(pg_url: str) -> None:
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


async def test_the_claims_of_a_dead_node_are_requeued_by_the_next_to_open(pg_url: str) -> None:
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


async def test_a_client_given_the_url_reaches_a_live_node(pg_url: str) -> None:
    async with Runtime.open(pg_url) as first, Runtime.open(pg_url):
        async with OrchestrationClient(db_path=pg_url) as client:
            assert client.remote
            task_id = await client.create_task("remote-made")
        # Committed by the node the client reached, before its answer: any node reads it.
        assert (await first.get_task(task_id)) is not None


# -- several nodes sharing the work ---------------------------------------------------------


async def test_three_nodes_share_the_work_and_hand_out_each_task_once(pg_url: str) -> None:
    total = 1500
    async with (
        Runtime.open(pg_url) as a,
        Runtime.open(pg_url) as b,
        Runtime.open(pg_url) as c,
    ):
        nodes = (a, b, c)
        done: dict[str, int] = {}  # task id -> the node that completed it

        async def create(node: Runtime, n: int) -> None:
            await node.create_tasks([{"task_type": "job", "payload": {"n": i}} for i in range(n)])

        async def work(index: int, node: Runtime, worker: str) -> None:
            while len(done) < total:
                claims = await node.claim_tasks(worker, "job", limit=8, wait=0.2, start=True)
                for claim in claims:
                    finished = await node.complete_task(claim.lease, {"by": worker})
                    assert finished.status == TaskStatus.COMPLETED
                    assert claim.task.id not in done, "handed out twice"
                    done[claim.task.id] = index

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for index, node in enumerate(nodes):
                    for w in range(3):
                        tg.start_soon(work, index, node, f"w{index}-{w}")
                for node in nodes:
                    tg.start_soon(create, node, total // 3)
    assert len(done) == total
    assert len(set(done.values())) == 3, "every node handed out some"
    # The database agrees: each task completed once, by one run, one task.assigned each.
    assert raw(pg_url, "SELECT status, count(*) FROM tasks GROUP BY status") == [
        ("completed", total)
    ]
    assert raw(pg_url, "SELECT count(*), count(DISTINCT task_id) FROM runs") == [(total, total)]
    assert raw(pg_url, "SELECT count(*) FROM events WHERE type = 'task.assigned'") == [(total,)]


async def _race_complete_and_cancel(pg_url: str, a: Runtime, b: Runtime) -> None:
    task_id = await a.create_task("race")
    claim = await a.claim_task("w", "race", start=True)
    assert claim is not None
    outcomes: dict[str, object] = {}

    async def complete() -> None:
        try:
            outcomes["complete"] = await a.complete_task(claim.lease, {"ok": 1})
        except (IllegalTransitionError, LeaseLostError) as exc:
            outcomes["complete"] = exc

    async def cancel() -> None:
        try:
            outcomes["cancel"] = await b.cancel_task(task_id)
        except IllegalTransitionError as exc:
            outcomes["cancel"] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(complete)
        tg.start_soon(cancel)
    won = [k for k, v in outcomes.items() if not isinstance(v, Exception)]
    assert len(won) == 1, outcomes
    [(status,)] = raw(pg_url, "SELECT status FROM tasks WHERE id = %s", (task_id,))
    assert status == ("completed" if won == ["complete"] else "cancelled")
    # Both nodes read the one outcome.
    assert (await a.get_task(task_id)).status == status
    assert (await b.get_task(task_id)).status == status


async def test_a_complete_and_a_cancel_raced_on_two_nodes_have_one_winner(pg_url: str) -> None:
    async with Runtime.open(pg_url) as a, Runtime.open(pg_url) as b:
        for _ in range(10):
            await _race_complete_and_cancel(pg_url, a, b)


async def _race_a_key(a: Runtime, b: Runtime, key: str) -> list[str]:
    ids: list[str] = []

    async def create(node: Runtime) -> None:
        ids.append(await node.create_task("once", idempotency_key=key))

    async with anyio.create_task_group() as tg:
        tg.start_soon(create, a)
        tg.start_soon(create, b)
    return ids


async def test_a_task_finished_on_one_node_and_deleted_on_another_is_gone_on_both(
    pg_url: str,
) -> None:
    # The first node keeps the task it finished in memory (the last 10 000 finished):
    # it answered get_task from there, "completed", after the other node deleted it.
    async with Runtime.open(pg_url) as first, Runtime.open(pg_url) as second:
        task_id = await first.create_task("build")
        claim = await first.claim_task("w1", "build")
        assert claim is not None
        await first.complete_task(claim.lease)
        assert await second.delete_task(task_id)
        assert await second.get_task(task_id) is None
        assert await first.get_task(task_id) is None


async def test_an_idempotency_key_raced_on_two_nodes_gives_one_task(pg_url: str) -> None:
    async with Runtime.open(pg_url) as a, Runtime.open(pg_url) as b:
        for n in range(10):
            first, second = await _race_a_key(a, b, f"k{n}")
            assert first == second
    assert raw(pg_url, "SELECT count(*) FROM tasks") == [(10,)]


async def test_a_claim_waiting_on_one_node_gets_a_task_created_on_another(pg_url: str) -> None:
    async with Runtime.open(pg_url) as a, Runtime.open(pg_url) as b:
        got: list[object] = []

        async def wait() -> None:
            got.append(await a.claim_task("w", "later", wait=30))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.sleep(0.3)  # parked on a first (nothing to wait on that says so)
            task_id = await b.create_task("later")
        [claim] = got
        assert claim is not None
        assert claim.task.id == task_id


async def test_a_concurrency_limit_holds_across_nodes(pg_url: str) -> None:
    total = 12
    async with Runtime.open(pg_url) as a, Runtime.open(pg_url) as b:
        for n in range(total):
            await (a, b)[n % 2].create_task("one", {"n": n}, concurrency_key="k")
        held = 0
        most = 0
        done: list[str] = []

        async def work(node: Runtime, worker: str) -> None:
            nonlocal held, most
            while len(done) < total:
                claim = await node.claim_task(worker, "one", wait=0.5, start=True)
                if claim is None:
                    continue
                held += 1
                most = max(most, held)
                await anyio.sleep(0.2)  # held while the other node tries to claim
                held -= 1
                await node.complete_task(claim.lease)
                done.append(claim.task.id)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for node, name in ((a, "a"), (b, "b")):
                    for w in range(2):
                        tg.start_soon(work, node, f"{name}{w}")
    assert sorted(done) == sorted(r[0] for r in raw(pg_url, "SELECT id FROM tasks"))
    assert most == 1


async def test_a_node_leaves_another_live_nodes_workers_alone(pg_url: str) -> None:
    # A node opening loads the workers it must watch: its own and those of no live node.
    # Another live node's worker heartbeats to that node, never to this one, so watching
    # it here would declare it offline after worker_timeout while it works.
    from hive_orchestration import RuntimeConfig, WorkerStatus

    quick = RuntimeConfig(worker_timeout=0.5)
    async with Runtime.open(pg_url) as first:
        await first.register_worker("busy")
        async with Runtime.open(pg_url, config=quick):
            # Keep "busy" alive on its own node for three times the second's timeout.
            for _ in range(15):
                await first.update_worker_heartbeat("busy")
                await anyio.sleep(0.1)
            worker = await first.get_worker("busy")
            assert worker is not None
            assert worker.status is not WorkerStatus.OFFLINE
            [(status,)] = raw(pg_url, "SELECT status FROM workers WHERE id = 'busy'")
            assert status != "offline"
        assert raw(pg_url, "SELECT count(*) FROM events WHERE type = 'worker.offline'") == [(0,)]


async def test_every_node_reads_the_workers_registered_with_the_others(pg_url: str) -> None:
    # A worker belongs to the node it talks to, which watches it; reading workers on any
    # node shows every node's, so that an orchestrator on one node sees the whole pool.
    from hive_orchestration import WorkerStatus

    async with Runtime.open(pg_url) as first, Runtime.open(pg_url) as second:
        await first.register_worker("coder", role="coder", capabilities=["python"])
        await second.register_worker("tester", role="tester")
        await second.create_task("build", {}, requires="python")
        for node in (first, second):
            assert {w.id for w in await node.get_active_workers()} == {"coder", "tester"}
            assert [w.id for w in await node.get_active_workers(role="coder")] == ["coder"]
            assert {w.id for w in await node.list_workers()} == {"coder", "tester"}
            theirs = await node.get_worker("tester")
            assert theirs is not None
            assert theirs.role == "tester"
            # The python task has a live worker that can take it, on the other node.
            assert await node.get_unroutable_tasks() == []
        await first.unregister_worker("coder")
        assert await second.get_worker("coder") is None
        await second.update_worker_heartbeat("tester", WorkerStatus.OFFLINE)
        assert await first.get_active_workers() == []
        [offline] = await first.list_workers(WorkerStatus.OFFLINE)
        assert offline.id == "tester"


async def test_a_plan_is_driven_by_its_node_while_other_nodes_run_its_subtasks(
    pg_url: str,
) -> None:
    # Every node follows the whole log; a node that saw the end of a plan's task loaded
    # the plan and drove it too (two plan.completed, subtasks settled twice). The plan
    # is its creator's while that node lives; the others only run its tasks.
    from hive_orchestration import PlanStatus

    spec = {
        "subtasks": [
            {"id": "a", "task_type": "job"},
            {"id": "b", "task_type": "job", "dependencies": ["a"]},
            {"id": "c", "task_type": "job", "dependencies": ["a"]},
            {"id": "d", "task_type": "job", "dependencies": ["b", "c"]},
        ]
    }
    async with Runtime.open(pg_url) as a, Runtime.open(pg_url) as b:
        plan_id = await a.create_execution_plan(spec)
        assert await a.mark_plan_execution_started(plan_id) is True
        with anyio.fail_after(60):
            done = 0
            while done < 4:  # every subtask's task runs on node b
                claim = await b.claim_task("w", "job", wait=5, start=True)
                assert claim is not None
                await b.complete_task(claim.lease, {"on": "b"})
                done += 1
            while (await a.get_execution_plan(plan_id)).status is not PlanStatus.COMPLETED:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        [(owner,)] = raw(pg_url, "SELECT node_id FROM execution_plans WHERE id = %s", (plan_id,))
        assert owner is not None  # the creator's, stamped by the database
    completed = raw(
        pg_url,
        "SELECT count(*) FROM events WHERE type = 'plan.completed' AND plan_id = %s",
        (plan_id,),
    )
    assert completed == [(1,)]
    per_subtask = raw(
        pg_url,
        "SELECT subtask_id, count(*) FROM tasks WHERE plan_id = %s GROUP BY subtask_id"
        " ORDER BY subtask_id",
        (plan_id,),
    )
    assert per_subtask == [("a", 1), ("b", 1), ("c", 1), ("d", 1)]


# -- calls about a plan made on a node that does not drive it -------------------------------

_DIAMOND = {
    "subtasks": [
        {"id": "a", "task_type": "job"},
        {"id": "b", "task_type": "job", "dependencies": ["a"]},
        {"id": "c", "task_type": "job", "dependencies": ["a"]},
        {"id": "d", "task_type": "job", "dependencies": ["b", "c"]},
    ]
}


def _plan_events(url: str, plan_id: str) -> list[tuple[int, str]]:
    return [
        (int(seq), str(type_))
        for seq, type_ in raw(
            url,
            "SELECT seq, type FROM events WHERE plan_id = %s AND type LIKE 'plan.%%' ORDER BY seq",
            (plan_id,),
        )
    ]


async def _settled(url: str, plan_id: str) -> None:
    """Until every subtask row of the plan has ended (its driver applied every end)."""
    open_rows = (
        "SELECT (SELECT count(*) FROM plan_execution WHERE plan_id = %s"
        " AND status IN ('pending', 'ready'))"
        " + (SELECT count(*) FROM tasks WHERE plan_id = %s"
        " AND status IN ('blocked', 'queued', 'assigned', 'running'))"
    )
    with anyio.fail_after(30):
        while raw(url, open_rows, (plan_id, plan_id)) != [(0,)]:  # noqa: ASYNC110
            await anyio.sleep(0.02)


async def test_a_plan_cancelled_on_a_node_that_does_not_drive_it_is_cancelled_once(
    pg_url: str,
) -> None:
    # Node a drives the plan (it created it); a client of node b cancels it. The driver
    # must not go on from its memory (queue the next subtasks, or fail the plan when it
    # sees its tasks cancelled), and the caller gets what one node would answer.
    from hive_orchestration import PlanStatus

    async with Runtime.open(pg_url) as a, Runtime.open(pg_url) as b:
        plan_id = await a.create_execution_plan(_DIAMOND)
        assert await a.mark_plan_execution_started(plan_id) is True
        claim = await b.claim_task("w", "job", wait=10, start=True)
        assert claim is not None  # subtask a runs on b
        cancelled = await b.cancel_plan(plan_id, "enough")
        assert cancelled.status is PlanStatus.CANCELLED
        assert cancelled.error == "enough"
        assert cancelled.id == plan_id
        assert cancelled.subtasks  # the whole plan, as stored
        # Cancelled again, on either node: refused, as on one node.
        for node in (a, b):
            with pytest.raises(IllegalTransitionError):
                await node.cancel_plan(plan_id)
        await _settled(pg_url, plan_id)
        for node in (a, b):
            assert await node.get_execution_plan_status(plan_id) == "cancelled"
            assert await node.get_execution_plan_status_cached(plan_id) == "cancelled"
    events = [type_ for _, type_ in _plan_events(pg_url, plan_id)]
    ends = [t for t in events if t in ("plan.completed", "plan.failed", "plan.cancelled")]
    assert ends == ["plan.cancelled"], events
    after = events[events.index("plan.cancelled") :]
    assert "plan.subtask_ready" not in after, events
    assert raw(pg_url, "SELECT status, error FROM execution_plans WHERE id = %s", (plan_id,)) == [
        ("cancelled", "enough")
    ]


async def test_a_plan_started_on_a_node_that_does_not_drive_it_has_one_driver(
    pg_url: str,
) -> None:
    # A draft made on node a, approved and started by clients of node b, run on both.
    from hive_orchestration import PlanStatus

    async with Runtime.open(pg_url) as a, Runtime.open(pg_url) as b:
        plan_id = await a.create_execution_plan(_DIAMOND)
        approved = await b.approve_plan(plan_id)
        assert approved.status is PlanStatus.APPROVED
        assert await a.get_execution_plan_status_cached(plan_id) == "approved"
        assert await b.create_planned_subtasks_from_plan(plan_id) == 4
        assert await b.create_planned_subtasks_from_plan(plan_id) == 0
        assert await b.mark_plan_execution_started(plan_id) is True
        assert await a.mark_plan_execution_started(plan_id) is False
        assert await b.get_execution_plan_status_cached(plan_id) == "executing"
        with anyio.fail_after(60):
            for n in range(4):
                node = (a, b)[n % 2]
                claim = await node.claim_task("w", "job", wait=10, start=True)
                assert claim is not None
                await node.complete_task(claim.lease)
            done = await b.wait_for_plan(plan_id, timeout=30)
        assert done.status is PlanStatus.COMPLETED
        for node in (a, b):
            assert await node.get_execution_plan_status_cached(plan_id) == "completed"
    events = [type_ for _, type_ in _plan_events(pg_url, plan_id)]
    assert events.count("plan.started") == 1, events
    assert events.count("plan.completed") == 1, events
    assert "plan.failed" not in events
    assert raw(pg_url, "SELECT count(*) FROM tasks WHERE plan_id = %s", (plan_id,)) == [(4,)]


async def test_a_cancel_on_another_node_races_the_driver_completing_subtasks(
    pg_url: str,
) -> None:
    # While a worker on the driving node completes subtasks as fast as it can, a client of
    # the other node cancels: one end, and nothing queued after it. The worker holds the
    # plan's last step until the cancel is answered: else, on a loaded machine, it could
    # complete the whole chain before the forwarded cancel reaches the driver (a slow
    # feed), and the cancel would be refused as on one node (the plan has ended), which
    # races nothing. Held there, the cancel races every end before it and the last
    # step's run, and always comes before the plan's end.
    from hive_orchestration import PlanStatus

    steps = 30
    chain = {
        "subtasks": [
            {"id": f"s{i}", "task_type": "step", "dependencies": [f"s{i - 1}"] if i else []}
            for i in range(steps)
        ]
    }
    async with Runtime.open(pg_url) as a, Runtime.open(pg_url) as b:
        for round_ in range(4):
            plan_id = await a.create_execution_plan(chain)
            assert await a.mark_plan_execution_started(plan_id) is True
            stop = anyio.Event()
            answered = anyio.Event()

            async def work(stop: anyio.Event, answered: anyio.Event) -> None:
                while not stop.is_set():
                    claim = await a.claim_task("w", "step", wait=0.2, start=True)
                    if claim is None:
                        continue
                    if claim.task.subtask_id == f"s{steps - 1}":
                        await answered.wait()  # the last step: held until the cancel
                    with contextlib.suppress(IllegalTransitionError, LeaseLostError):
                        await a.complete_task(claim.lease)  # unless cancelled under it

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(work, stop, answered)
                    for _ in range(2 + 3 * round_):
                        await anyio.sleep(0.01)
                    plan = await b.cancel_plan(plan_id)
                    answered.set()
                    assert plan.status is PlanStatus.CANCELLED
                    await _settled(pg_url, plan_id)
                    stop.set()
            events = [type_ for _, type_ in _plan_events(pg_url, plan_id)]
            ends = [t for t in events if t in ("plan.completed", "plan.failed", "plan.cancelled")]
            assert ends == ["plan.cancelled"], events
            assert "plan.subtask_ready" not in events[events.index("plan.cancelled") :], events
            assert raw(pg_url, "SELECT status FROM execution_plans WHERE id = %s", (plan_id,)) == [
                ("cancelled",)
            ]


# -- plans of a dead node -------------------------------------------------------------------

RUNNER = Path(__file__).with_name("_plan_runner.py")


@contextlib.asynccontextmanager
async def _driving_child(url: str, backend: str) -> AsyncIterator[tuple[Process, str]]:
    """A child process whose runtime creates and starts a three-layer plan of ``step``
    subtasks (tests/_plan_runner.py ``started``, 4 roots queued); yields it with the
    plan's id. Killed at the end if still alive."""
    command = [sys.executable, str(RUNNER), backend, url, "started"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVE_ORCHESTRATION_")}
    process = await anyio.open_process(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
    )
    try:
        assert process.stdout is not None
        lines = BufferedByteReceiveStream(process.stdout)
        with anyio.fail_after(60):
            while True:
                line = json.loads(await lines.receive_until(b"\n", 1 << 16))
                if line["event"] == "started":
                    break
        yield process, str(line["plan"])
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()


async def _dies(url: str, process: Process) -> None:
    """SIGKILL the (maybe stopped) child; wait until its node is dead (its lock gone)."""
    from hive_orchestration.storage.pg.claim import alive_sql

    [(node,)] = raw(url, "SELECT id FROM hive_nodes WHERE pid = %s", (process.pid,))
    process.kill()
    await process.wait()
    alive = f"SELECT {alive_sql('id')} FROM hive_nodes WHERE id = %s"
    with anyio.fail_after(30):
        while raw(url, alive, (node,)) == [(True,)]:  # noqa: ASYNC110
            await anyio.sleep(0.02)


async def _run_steps(node: Runtime, plan_id: str) -> None:
    from hive_orchestration import PlanStatus

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:

            async def work() -> None:
                while True:
                    claim = await node.claim_task("w", "step", wait=1, start=True)
                    if claim is not None:
                        await node.complete_task(claim.lease)

            tg.start_soon(work)
            done = await node.wait_for_plan(plan_id)
            tg.cancel_scope.cancel()
    assert done.status is PlanStatus.COMPLETED


async def test_the_leader_adopts_a_dead_nodes_plan_and_drives_it_on(
    pg_url: str, anyio_backend: str
) -> None:
    # The driver is stopped while its plan's roots complete on another node (which leaves
    # the plan to its live driver), then killed: nothing of the plan ends any more, so no
    # node would take it by itself. The leader (b, once the child is dead) finds the dead
    # node's executing plan and tells its PlanExecutor AdoptPlans, with nobody asking.
    from hive_orchestration import PlanStatus
    from hive_orchestration.messages.plans import AdoptPlans

    async with (
        _driving_child(pg_url, anyio_backend) as (child, plan_id),
        Runtime.open(pg_url) as b,
    ):
        child.send_signal(signal.SIGSTOP)
        for _ in range(4):
            claim = await b.claim_task("w", "step", wait=10, start=True)
            assert claim is not None
            assert claim.task.subtask_id is not None
            assert claim.task.subtask_id.startswith("r")
            await b.complete_task(claim.lease)
        [(b_node,)] = raw(pg_url, "SELECT id FROM hive_nodes WHERE pid = %s", (os.getpid(),))
        await _dies(pg_url, child)
        # The leader's poll (0.5 s) and its grace (1 s) with a wide margin for the load.
        with anyio.fail_after(30):
            while raw(pg_url, "SELECT node_id FROM execution_plans") != [(b_node,)]:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        assert await b._plans.ask(AdoptPlans()) == 0  # b's own already
        await _run_steps(b, plan_id)
        assert await b.get_execution_plan_status_cached(plan_id) == PlanStatus.COMPLETED
    assert [t for _, t in _plan_events(pg_url, plan_id)].count("plan.completed") == 1


async def test_a_call_forwarded_to_a_driver_that_dies_unanswered_is_answered_by_another(
    pg_url: str, anyio_backend: str
) -> None:
    # Node b forwards a cancel to the live driver, which is stopped: no answer. The driver
    # is killed; b sends the call again, takes the plan (a dead node's) and answers it.
    from hive_orchestration import PlanStatus

    async with (
        _driving_child(pg_url, anyio_backend) as (child, plan_id),
        Runtime.open(pg_url) as b,
    ):
        child.send_signal(signal.SIGSTOP)
        answers: list[object] = []

        async def cancel() -> None:
            answers.append(await b.cancel_plan(plan_id, "driver gone"))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel)
                while raw(  # noqa: ASYNC110 - the call in the log, unanswered
                    pg_url, "SELECT count(*) FROM events WHERE type = 'plan.call'"
                ) == [(0,)]:
                    await anyio.sleep(0.02)
                assert not answers
                await _dies(pg_url, child)
        [plan] = answers
        assert isinstance(plan, type(await b.get_execution_plan(plan_id)))
        assert plan.status is PlanStatus.CANCELLED
        assert plan.error == "driver gone"
        await _settled(pg_url, plan_id)
    events = [t for _, t in _plan_events(pg_url, plan_id)]
    assert [t for t in events if t in ("plan.completed", "plan.failed", "plan.cancelled")] == [
        "plan.cancelled"
    ], events
    assert events.count("plan.call_answered") == 1, events


async def test_a_call_waiting_for_another_nodes_answer_fails_when_its_node_stops(
    pg_url: str, anyio_backend: str
) -> None:
    # The caller's node stops while its call waits for the driver (stopped): the caller is
    # told at once, not left waiting for its deadline.
    from hive_orchestration import RuntimeStoppedError
    from hive_orchestration.messages.plans import CancelPlan

    async with _driving_child(pg_url, anyio_backend) as (child, plan_id):
        child.send_signal(signal.SIGSTOP)
        async with Runtime.open(pg_url) as b:
            reply = await b._plans.request(CancelPlan(plan_id=plan_id))
            with anyio.fail_after(30):
                while raw(  # noqa: ASYNC110 - the call is in the log
                    pg_url, "SELECT count(*) FROM events WHERE type = 'plan.call'"
                ) == [(0,)]:
                    await anyio.sleep(0.02)
        with anyio.fail_after(10), pytest.raises(RuntimeStoppedError):
            await reply.wait()


async def test_a_dead_drivers_plan_is_taken_at_a_task_end_once_the_trust_in_it_lapses(
    pg_url: str, anyio_backend: str
) -> None:
    # A node trusts for a moment (progress.ELSEWHERE_FOR) that another live node drives a
    # plan, so as not to ask the database at each of its task ends. The driver dies: a
    # task end seen after that moment takes the plan, as before the trust.
    from hive_orchestration.actors.plan_executor import progress

    async with (
        _driving_child(pg_url, anyio_backend) as (child, plan_id),
        Runtime.open(pg_url) as b,
    ):
        child.send_signal(signal.SIGSTOP)
        claims = [await b.claim_task("w", "step", wait=10, start=True) for _ in range(4)]
        first, *others = claims
        assert first is not None
        await b.complete_task(first.lease)  # the plan is the (live) child's: trusted
        await _dies(pg_url, child)
        await anyio.sleep(progress.ELSEWHERE_FOR)  # the trust lapses: the rule itself
        for claim in others:
            assert claim is not None
            await b.complete_task(claim.lease)
        await _run_steps(b, plan_id)  # b took it: the next layers are queued
    assert [t for _, t in _plan_events(pg_url, plan_id)].count("plan.completed") == 1
