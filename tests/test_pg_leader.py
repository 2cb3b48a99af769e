"""One leader at a time among the nodes of a PostgreSQL database, and the duties a dead
node leaves behind, done while the other nodes run (storage/pg/leader.py).

The role is a session advisory lock; taking it bumps ``hive_leader.epoch``, and every duty
is fenced by that epoch. A dead node (its node lock free) leaves claims, which the leader
requeues as recovery on open does, and workers, which it declares offline as a missed
heartbeat does. A node is killed for real (SIGKILL of a child process under load) in the
last tests; the others make a node dead by naming, in its rows, a node id whose lock no
session holds (what a killed node's rows look like).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import msgspec
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

psycopg = pytest.importorskip("psycopg")

from hive_orchestration import (  # noqa: E402
    LeaseLostError,
    RetentionPolicy,
    Runtime,
    RuntimeConfig,
    StorageError,
    TaskStatus,
    WorkerStatus,
)
from hive_orchestration.actors.task_manager.leases import _WRITTEN_SLACK  # noqa: E402
from hive_orchestration.messages.leader import DeadClaim, RecoverClaims  # noqa: E402
from hive_orchestration.messages.tasks import TERMINAL, PurgeTasks  # noqa: E402
from hive_orchestration.messages.workers import WorkersLost  # noqa: E402
from hive_orchestration.storage.pg import leader as pg_leader  # noqa: E402
from hive_orchestration.storage.pg.claim import (  # noqa: E402
    DatabaseClaim,
    alive_sql,
    node_key,
    node_lock_sql,
)
from hive_orchestration.storage.pg.leader import LEADER_KEY, REAP_GRACE_SECONDS  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

NODE = Path(__file__).with_name("_pg_node.py")
#: Generous bound on what waits for the cluster (a loaded 2-core machine): a hang fails.
PATIENCE = 30.0


def raw(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description is not None else []


def leader(url: str) -> tuple[int, str | None]:
    [(epoch, node)] = raw(url, "SELECT epoch, node_id FROM hive_leader")
    return int(epoch), node


def holders(url: str) -> int:
    """Sessions holding the leader's lock (pg_locks shows a bigint key as two halves)."""
    key = LEADER_KEY & 0xFFFFFFFF_FFFFFFFF
    [(count,)] = raw(
        url,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND classid::bigint = %s AND objid::bigint = %s AND objsubid = 1",
        (key >> 32, key & 0xFFFFFFFF),
    )
    return int(count)


def nodes(url: str) -> set[str]:
    return {row[0] for row in raw(url, "SELECT id FROM hive_nodes")}


async def until(check: Callable[[], bool], what: str, within: float = PATIENCE) -> float:
    """Wait for ``check`` (polled every 50 ms: it reads the database); the seconds it
    took. ``what`` names the wait for the reader of a failure."""
    start = time.monotonic()
    try:
        with anyio.fail_after(within):
            while not check():  # noqa: ASYNC110 - polls the database
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not within {within:g}s: {what}") from None
    return time.monotonic() - start


def dead_node() -> str:
    """The id of a node no session holds the lock of: one that died."""
    return uuid.uuid4().hex


def events(url: str, event_type: str) -> list[tuple[str | None, dict[str, Any]]]:
    rows = raw(
        url,
        "SELECT task_id, worker_id, data FROM events WHERE type = %s ORDER BY seq",
        (event_type,),
    )
    return [(task or worker, json.loads(data)) for task, worker, data in rows]


class Held:
    """A runtime (node) open in a task of its own, closed when :meth:`close` is called,
    whatever the other nodes of the test do meanwhile."""

    def __init__(self, config: RuntimeConfig | None = None) -> None:
        self.closing = anyio.Event()
        self.closed = anyio.Event()
        self.config = config

    async def run(self, url: str, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            async with Runtime.open(url, config=self.config) as runtime:
                task_status.started(runtime)
                await self.closing.wait()
        finally:
            self.closed.set()

    async def close(self) -> None:
        self.closing.set()
        await self.closed.wait()


async def test_one_node_leads_and_the_role_moves_when_it_closes(pg_url: str) -> None:
    async with anyio.create_task_group() as group:
        first, second = Held(), Held()
        await group.start(first.run, pg_url)
        [a] = nodes(pg_url)
        await until(lambda: leader(pg_url)[1] == a, "the first node leads")
        epoch = leader(pg_url)[0]
        await group.start(second.run, pg_url)
        [b] = nodes(pg_url) - {a}
        # The second node tries for the role every poll (0.5 s) while the first holds it:
        # after several of its tries, nothing has moved. (A check that nothing happens
        # needs a span: 1.5 s, three of its polls.)
        await anyio.sleep(1.5)
        assert leader(pg_url) == (epoch, a)
        assert holders(pg_url) == 1
        # The leader's node closes (letting the role go at once): the running node takes
        # the role at its next poll, with the epoch moved on.
        await first.close()
        await until(lambda: leader(pg_url)[1] == b, "the second node leads", within=10.0)
        assert leader(pg_url) == (epoch + 1, b)
        assert holders(pg_url) == 1
        await second.close()
    # No node: no one holds the role; the table says who led last.
    assert holders(pg_url) == 0
    assert leader(pg_url) == (epoch + 1, b)


async def _open_leader_first(pg_url: str) -> None:
    """After the first node opened: wait until it leads (the claims a test makes on the
    second node, whose memory holds them, are then never the leader's own)."""
    [a] = nodes(pg_url)
    await until(lambda: leader(pg_url)[1] == a, "the first node leads")


async def test_the_claims_of_a_dead_node_are_requeued_while_the_nodes_run(pg_url: str) -> None:
    async with Runtime.open(pg_url) as a:
        await _open_leader_first(pg_url)
        async with Runtime.open(pg_url) as b:
            retried = await b.create_task("job")
            exhausted = await b.create_task("job", max_retries=0)
            kept = await b.create_task("job")
            claims = [await b.claim_task("w1", "job", start=True) for _ in range(3)]
            assert all(claim is not None for claim in claims)
            assert {c.task.id for c in claims if c is not None} == {retried, exhausted, kept}
            # Two of the claims are a dead node's (its lock free, as after a SIGKILL); the
            # third stays with b, alive.
            dead = dead_node()
            raw(
                pg_url,
                "UPDATE tasks SET node_id = %s WHERE id = ANY(%s)",
                (dead, [retried, exhausted]),
            )

            def settled() -> bool:
                rows = raw(
                    pg_url,
                    "SELECT id, status FROM tasks WHERE id = ANY(%s)",
                    ([retried, exhausted],),
                )
                return all(status not in ("assigned", "running") for _, status in rows)

            # Within the lease bound (the default lease, 30 s), with neither node reopened.
            took = await until(settled, "the dead node's claims requeued")
            assert took < 30.0
            assert (await a.get_task(retried)).status is TaskStatus.QUEUED
            assert (await a.get_task(exhausted)).status is TaskStatus.FAILED  # the dead letter
            assert (await a.get_task(kept)).status is TaskStatus.RUNNING  # a live node's claim
            for task_id in (retried, exhausted):
                assert [run.status for run in await a.get_runs(task_id)] == ["lost"]
            # The same events as recovery on open: one attempt counted, reason "recovered".
            retrying = [data for task, data in events(pg_url, "task.retrying") if task == retried]
            assert [(d["reason"], d["attempts"]) for d in retrying] == [("recovered", 1)]
            failed = [data for task, data in events(pg_url, "task.failed") if task == exhausted]
            assert [d["reason"] for d in failed] == ["recovered"]
            assert not [t for t, _ in events(pg_url, "task.retrying") if t == kept]
            # The requeued task is handed out again, once.
            again = await a.claim_task("w2", "job", wait=10)
            assert again is not None
            assert again.task.id == retried


async def test_the_workers_of_a_dead_node_are_declared_offline(pg_url: str) -> None:
    async with Runtime.open(pg_url) as a:
        await _open_leader_first(pg_url)
        async with Runtime.open(pg_url) as b:
            await b.register_worker("w-dead", role="builder")
            await b.register_worker("w-live", role="builder")
            dead = dead_node()
            # Written as that node writes (a trigger names the writer's node in the row).
            with psycopg.connect(pg_url, autocommit=True) as conn:
                conn.execute("SELECT set_config('hive.node', %s, false)", (dead,))
                conn.execute("UPDATE workers SET status = status WHERE id = 'w-dead'")

            def offline() -> bool:
                [(status,)] = raw(pg_url, "SELECT status FROM workers WHERE id = 'w-dead'")
                return bool(status == "offline")

            # Long before its worker_timeout (30 s): no node heard its heartbeats.
            await until(offline, "the dead node's worker declared offline", within=20.0)
            [(worker, data)] = events(pg_url, "worker.offline")
            assert worker == "w-dead"
            assert data["node_id"] == dead
            assert data["status"] == WorkerStatus.OFFLINE.value
            [(status,)] = raw(pg_url, "SELECT status FROM workers WHERE id = 'w-live'")
            assert status != "offline"
            del a


async def test_a_stale_leaders_duties_change_nothing(pg_url: str) -> None:
    async with Runtime.open(pg_url) as a:
        await _open_leader_first(pg_url)
        async with Runtime.open(pg_url) as b:
            task_id = await b.create_task("job")
            claim = await b.claim_task("w1", "job", start=True)
            assert claim is not None
            worker = await b.register_worker("w1")
            [(version, holder)] = raw(
                pg_url, "SELECT version, node_id FROM tasks WHERE id = %s", (task_id,)
            )
            epoch, _ = leader(pg_url)
            before = raw(pg_url, "SELECT * FROM tasks WHERE id = %s", (task_id,))
            runs = raw(pg_url, "SELECT * FROM runs WHERE task_id = %s", (task_id,))
            workers = raw(pg_url, "SELECT * FROM workers")
            # A leader whose term ended (the role moved on while it did not notice) hands
            # its duties out with its old epoch: each write is refused whole. (Asked of
            # the node that holds neither the claim nor the worker in memory, whose
            # actors would do them: only the fence stops them.)
            stale = epoch - 1
            duty = RecoverClaims(epoch=stale, claims=(DeadClaim(task_id, version, holder),))
            assert await a._tasks.ask(duty) == 0
            lost = WorkersLost(epoch=stale, workers=(worker,), dead_nodes=(holder,))
            assert await a._workers.ask(lost) == 0
            assert raw(pg_url, "SELECT * FROM tasks WHERE id = %s", (task_id,)) == before
            assert raw(pg_url, "SELECT * FROM runs WHERE task_id = %s", (task_id,)) == runs
            assert raw(pg_url, "SELECT * FROM workers") == workers
            events_before = raw(pg_url, "SELECT count(*) FROM events")
            assert raw(pg_url, "SELECT count(*) FROM events") == events_before
            # The same duties under the leader's epoch do change the rows (what the fence
            # stopped): the claim is requeued, the worker declared offline.
            assert await a._tasks.ask(RecoverClaims(epoch=epoch, claims=duty.claims)) == 1
            assert (await a.get_task(task_id)).status is TaskStatus.QUEUED
            lost = WorkersLost(epoch=epoch, workers=(worker,), dead_nodes=(holder,))
            assert await a._workers.ask(lost) == 1
            [(status,)] = raw(pg_url, "SELECT status FROM workers WHERE id = 'w1'")
            assert status == "offline"


async def _tick_worker(runtime: Runtime, name: str) -> None:
    """Completes each slot's task at once: its idempotency key is free again right away
    (what let a second node fire the same slot before schedules fired on the leader)."""
    while True:
        claim = await runtime.claim_task(name, "tick", wait=0.2)
        if claim is not None:
            await runtime.complete_task(claim.lease, {})


def _fired(url: str, name: str = "often") -> list[str]:
    """The slot of each schedule.fired event of schedule ``name`` (by its task's key)."""
    rows = raw(
        url,
        "SELECT t.idempotency_key FROM events e JOIN tasks t ON t.id = e.task_id"
        " JOIN schedules s ON t.idempotency_key LIKE 'schedule:' || s.id || ':%%'"
        " WHERE e.type = 'schedule.fired' AND s.name = %s ORDER BY e.seq",
        (name,),
    )
    return [row[0] for row in rows]


async def test_a_schedule_fires_each_slot_once_on_the_leader_and_on_after_it_closes(
    pg_url: str,
) -> None:
    async with anyio.create_task_group() as group:
        first, second = Held(), Held()
        a = await group.start(first.run, pg_url)
        [node_a] = nodes(pg_url)
        await until(lambda: leader(pg_url)[1] == node_a, "the first node leads")
        await a.create_schedule("often", 0.5, "tick")
        # The second node opens knowing the schedule (before, each node fired each slot).
        b = await group.start(second.run, pg_url)
        async with anyio.create_task_group() as workers:
            workers.start_soon(_tick_worker, a, "wa")
            workers.start_soon(_tick_worker, b, "wb")
            # Made on the node that does not lead: the leader learns of it and fires it.
            await b.create_schedule("elsewhere", 0.5, "tick")
            await until(lambda: len(_fired(pg_url)) >= 6, "slots fired")
            await until(lambda: len(_fired(pg_url, "elsewhere")) >= 2, "the other's fired")
            workers.cancel_scope.cancel()
        # The leader closes: the other node takes the role and the schedule fires on.
        before = len(_fired(pg_url))
        await first.close()
        async with anyio.create_task_group() as workers:
            workers.start_soon(_tick_worker, b, "wb")
            await until(lambda: len(_fired(pg_url)) >= before + 4, "slots fired on")
            workers.cancel_scope.cancel()
        await second.close()
    # Each slot fired once: one schedule.fired and one task per slot, whatever the node.
    for name in ("often", "elsewhere"):
        fired = _fired(pg_url, name)
        assert len(fired) == len(set(fired)), sorted(fired)
    keys = raw(
        pg_url,
        "SELECT idempotency_key, count(*) FROM tasks WHERE task_type = 'tick'"
        " GROUP BY idempotency_key HAVING count(*) > 1",
    )
    assert keys == []
    [(count,)] = raw(pg_url, "SELECT count(*) FROM tasks WHERE task_type = 'tick'")
    assert count == len(_fired(pg_url)) + len(_fired(pg_url, "elsewhere"))


# -- leases by the database's clock: a live node that does not act -----------------------


def live_nodes(url: str) -> set[str]:
    """The nodes whose lock a session holds (alive, whether or not they act)."""
    return {row[0] for row in raw(url, f"SELECT id FROM hive_nodes WHERE {alive_sql('id')}")}


def _held(url: str, task_id: str) -> bool:
    [(status,)] = raw(url, "SELECT status FROM tasks WHERE id = %s", (task_id,))
    return status in ("assigned", "running")


async def test_a_lease_expired_duty_ends_the_claim_as_its_owners_expiry_would(
    pg_url: str,
) -> None:
    async with Runtime.open(pg_url) as a:
        await _open_leader_first(pg_url)
        async with Runtime.open(pg_url) as b:
            task_id = await b.create_task("job", max_retries=0)
            claim = await b.claim_task("w1", "job", lease=30.0, start=True)
            assert claim is not None
            [(version, holder)] = raw(
                pg_url, "SELECT version, node_id FROM tasks WHERE id = %s", (task_id,)
            )
            epoch, _ = leader(pg_url)
            duty = RecoverClaims(
                epoch=epoch - 1, claims=(DeadClaim(task_id, version, holder),), lease_expired=True
            )
            before = raw(pg_url, "SELECT * FROM tasks WHERE id = %s", (task_id,))
            # Under a stale epoch: refused whole.
            assert await a._tasks.ask(duty) == 0
            assert raw(pg_url, "SELECT * FROM tasks WHERE id = %s", (task_id,)) == before
            # Under the leader's: the claim (of a live node, b) ends as b's own lease
            # expiry would end it: the run lost, and with no retry left the dead letter.
            duty = msgspec.structs.replace(duty, epoch=epoch)
            assert await a._tasks.ask(duty) == 1
            assert (await a.get_task(task_id)).status is TaskStatus.FAILED
            [run] = await a.get_runs(task_id)
            assert run.status.value == "lost"
            assert run.error is not None
            assert run.error.startswith("lease expired: worker 'w1' sent no heartbeat for 30s")
            [(_, failed)] = [e for e in events(pg_url, "task.failed") if e[0] == task_id]
            assert failed["reason"] == "lease_expired"
            # The node that held it (its memory still does) finds the claim lost: its
            # write conflicts, and its worker hears what a lost claim says.
            with pytest.raises(LeaseLostError):
                await b.complete_task(claim.lease, {})
            with pytest.raises(LeaseLostError):
                await b.heartbeat(claim.lease)
            assert len([e for e in events(pg_url, "task.failed") if e[0] == task_id]) == 1
            assert [r.status.value for r in await a.get_runs(task_id)] == ["lost"]


async def test_a_live_nodes_renewed_lease_is_never_reaped(pg_url: str) -> None:
    # A bare heartbeat stays in memory while it moves the lease less than this from the
    # row's deadline: the leader's grace after that deadline must cover it.
    assert _WRITTEN_SLACK < REAP_GRACE_SECONDS
    async with Runtime.open(pg_url) as a:
        await _open_leader_first(pg_url)

        def behind() -> datetime:
            # The node's wall clock is an hour behind the database's: the times it
            # stores (lease_expires_at) are an hour "past", which no deadline reads.
            return datetime.now(UTC) - timedelta(hours=1)

        async with Runtime.open(pg_url, wall_clock=behind) as b:
            task_id = await b.create_task("job")
            lease = 5.0
            claim = await b.claim_task("w1", "job", lease=lease, start=True)
            assert claim is not None
            # Renewed by bare heartbeats, each longer after the last than the leader's
            # grace, and on past the claim's first deadline and that grace: the
            # database's deadline moves with each, to its own now plus the lease. The
            # check comes once that span is over, not a whole pause after it (the last
            # pause used to end 2 s past it, spent on both loops).
            every = REAP_GRACE_SECONDS + 1.5
            ends = time.monotonic() + lease + REAP_GRACE_SECONDS + 1.5
            while (left := ends - time.monotonic()) > 0:
                await b.heartbeat(claim.lease)
                await anyio.sleep(min(every, left))
            assert _held(pg_url, task_id)
            # Renewed often (a node writes one of them at most every half second): as
            # long again, the lease is still not ended.
            ends = time.monotonic() + lease + REAP_GRACE_SECONDS + 1.0
            while time.monotonic() < ends:
                await b.heartbeat(claim.lease)
                await anyio.sleep(0.05)
            assert _held(pg_url, task_id)
            assert not [e for e in events(pg_url, "task.retrying") if e[0] == task_id]
            await b.complete_task(claim.lease, {})
            assert (await a.get_task(task_id)).status is TaskStatus.COMPLETED


def _stopped(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP): its state in /proc is T."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0] == "T"


async def test_a_stopped_nodes_expired_lease_is_requeued_by_the_leader(
    pg_url: str, anyio_backend: str, tmp_path: Path
) -> None:
    lease = 3.0
    async with Runtime.open(pg_url) as a:
        await _open_leader_first(pg_url)
        task_id = await a.create_task("job", max_retries=3)
        # A node whose one worker claims the task, then stops the whole process (SIGSTOP):
        # its sessions and locks stay, so it lives; nothing of it acts.
        stuck = await _start(
            pg_url, anyio_backend, tmp_path, "stuck", lease, workers=1, work=0.5, stop=True
        )
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(stuck.read)
                await until(
                    lambda: bool(stuck.claimed) and _stopped(stuck.process.pid),
                    "the node stopped, holding a claim",
                )
                assert stuck.claimed == [task_id]
                assert _held(pg_url, task_id)
                # The leader ends the lease by the database's clock, once it passed (and
                # its grace), though the node lives.
                await until(lambda: not _held(pg_url, task_id), "the lease requeued")
                assert stuck.id in live_nodes(pg_url)
                assert (await a.get_task(task_id)).status is TaskStatus.QUEUED
                [run] = await a.get_runs(task_id)
                assert run.status.value == "lost"
                # Not before its deadline and the leader's grace (one machine's clock:
                # the node stamped the start, the leader the end).
                assert run.started_at is not None
                assert run.completed_at is not None
                held_for = (run.completed_at - run.started_at).total_seconds()
                assert held_for >= lease + REAP_GRACE_SECONDS, held_for
                retrying = [d for t, d in events(pg_url, "task.retrying") if t == task_id]
                assert [(d["reason"], d["attempts"]) for d in retrying] == [("lease_expired", 1)]
                # Handed out again, on the live node, and completed there.
                again = await a.claim_task("w2", "job", wait=10)
                assert again is not None
                assert again.task.id == task_id
                await a.complete_task(again.lease, {"by": "w2"})
                # The stopped node wakes: its own lease expiry finds the claim gone (its
                # write conflicts: nothing is logged twice), and its worker's completion
                # is refused as a lost claim's is.
                os.kill(stuck.process.pid, signal.SIGCONT)
                await until(lambda: bool(stuck.lost), "the woken node's completion refused")
                assert stuck.lost == [task_id]
                assert stuck.errors == ["LeaseLostError"]
                assert not stuck.done
                group.cancel_scope.cancel()
        finally:
            await _stop(stuck)
        assert (await a.get_task(task_id)).status is TaskStatus.COMPLETED
        assert [r.status.value for r in await a.get_runs(task_id)] == ["lost", "completed"]
        assert len([t for t, _ in events(pg_url, "task.retrying") if t == task_id]) == 1
        assert len([t for t, _ in events(pg_url, "task.completed") if t == task_id]) == 1


async def test_a_stopped_nodes_workers_are_declared_offline_by_the_leader(
    pg_url: str, anyio_backend: str, tmp_path: Path
) -> None:
    """A node that does not act (SIGSTOP) keeps its lock, so it is not dead, and nobody
    hears its workers: the leader declares them offline once the node has not polled for
    the worker liveness bound (by the database's clock), as a missed heartbeat would; their
    claims go back to the queue within the lease bound. Woken, the node does not declare
    them offline a second time: they are live again as they call, as after any missed
    heartbeat."""
    # The least bound there is (STUCK_FLOOR_SECONDS), and a lease a second longer: each
    # second of them is waited out three times over, on both loops.
    timeout, lease = 2.0, 3.0
    config = RuntimeConfig(worker_timeout=timeout)
    async with Runtime.open(pg_url, config=config) as a:
        await _open_leader_first(pg_url)
        task_id = await a.create_task("job", max_retries=3)
        stuck = await _start(
            pg_url,
            anyio_backend,
            tmp_path,
            "stuck",
            lease,
            workers=1,
            stop=True,
            register=True,
            worker_timeout=timeout,
        )
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(stuck.read)
                await until(
                    lambda: bool(stuck.claimed) and _stopped(stuck.process.pid),
                    "the node stopped, holding a claim",
                )
                stopped_at = time.monotonic()
                assert stuck.claimed == [task_id]
                # Its worker at work, and one that only registered.
                mine = {f"{stuck.process.pid}-w0", f"{stuck.process.pid}-idle"}

                def statuses() -> dict[str, str]:
                    rows = raw(pg_url, "SELECT id, status FROM workers")
                    return {str(w): str(status) for w, status in rows if w in mine}

                assert set(statuses()) == mine
                assert "offline" not in statuses().values()
                await until(
                    lambda: set(statuses().values()) == {"offline"},
                    "the stopped node's workers declared offline",
                    within=timeout + 10.0,
                )
                took = time.monotonic() - stopped_at
                # Not before the liveness bound (the node polled until it stopped), and
                # within it and a few of the leader's polls.
                assert timeout - 0.5 <= took <= timeout + 3.0, took
                assert stuck.id in live_nodes(pg_url)  # alive all along: not a dead node's
                offline = [(w, d) for w, d in events(pg_url, "worker.offline") if w in mine]
                assert sorted(w for w, _ in offline) == sorted(mine)
                assert {d["node_id"] for _, d in offline} == {stuck.id}
                # Its claim: requeued by the lease bound (the leader's reaper).
                await until(lambda: not _held(pg_url, task_id), "the claim requeued")
                assert time.monotonic() - stopped_at <= lease + REAP_GRACE_SECONDS + 3.0
                again = await a.claim_task("w-live", "job", wait=10)
                assert again is not None
                assert again.task.id == task_id
                await a.complete_task(again.lease, {})
                # Woken: its own deadlines for them have long passed, but it finds them
                # declared offline and does not log it again; each is live again (written,
                # on this node) at its next call; the claim it held is lost.
                os.kill(stuck.process.pid, signal.SIGCONT)
                await until(lambda: bool(stuck.lost), "the woken node's completion refused")
                assert stuck.errors == ["LeaseLostError"]
                await until(lambda: "offline" not in statuses().values(), "its workers live again")
                await anyio.sleep(timeout + 1.0)  # its own deadlines would have come up
                assert "offline" not in statuses().values()
                rows = raw(pg_url, "SELECT id, node_id FROM workers")
                assert {node for worker, node in rows if worker in mine} == {stuck.id}
                offline = [(w, d) for w, d in events(pg_url, "worker.offline") if w in mine]
                assert sorted(w for w, _ in offline) == sorted(mine)  # once each, as before
                back = [w for w, _ in events(pg_url, "worker.status_changed") if w in mine]
                assert sorted(back) == sorted(mine)
                group.cancel_scope.cancel()
        finally:
            await _stop(stuck)
        assert len([t for t, _ in events(pg_url, "task.retrying") if t == task_id]) == 1


async def test_a_pause_within_the_stopped_nodes_own_worker_timeout_declares_nothing(
    pg_url: str, anyio_backend: str, tmp_path: Path
) -> None:
    """The liveness bound of a node's workers is that node's ``worker_timeout``, not the
    leader's: a node with a longer one (30 s) that does not act for longer than the
    leader's (2 s, the least there is) but well within its own is not stuck. Its workers
    stay live (no ``worker.offline``), and, woken, it keeps its workers' claims: its worker
    completes the task it held, which is handed out once."""
    leader_timeout, own_timeout, lease = 2.0, 30.0, 30.0  # 2 s: STUCK_FLOOR_SECONDS
    async with Runtime.open(pg_url, config=RuntimeConfig(worker_timeout=leader_timeout)) as a:
        await _open_leader_first(pg_url)
        task_id = await a.create_task("job", max_retries=3)
        paused = await _start(
            pg_url,
            anyio_backend,
            tmp_path,
            "paused",
            lease,
            workers=1,
            stop=True,
            register=True,
            worker_timeout=own_timeout,
        )
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(paused.read)
                await until(
                    lambda: bool(paused.claimed) and _stopped(paused.process.pid),
                    "the node stopped, holding a claim",
                )
                mine = {f"{paused.process.pid}-w0", f"{paused.process.pid}-idle"}

                def statuses() -> dict[str, str]:
                    rows = raw(pg_url, "SELECT id, status FROM workers")
                    return {str(w): str(status) for w, status in rows if w in mine}

                assert set(statuses()) == mine
                # Past the leader's bound and a few of its polls; far within the node's.
                await anyio.sleep(leader_timeout + 4.0)
                assert "offline" not in statuses().values()
                assert [w for w, _ in events(pg_url, "worker.offline") if w in mine] == []
                os.kill(paused.process.pid, signal.SIGCONT)
                await until(lambda: bool(paused.done or paused.lost), "the woken node's work")
                assert (paused.done, paused.lost) == ([task_id], [])
                group.cancel_scope.cancel()
        finally:
            await _stop(paused)
        assert "offline" not in statuses().values()
        assert [w for w, _ in events(pg_url, "worker.offline") if w in mine] == []
        assert [t for t, _ in events(pg_url, "task.assigned") if t == task_id] == [task_id]
        assert [t for t, _ in events(pg_url, "task.retrying") if t == task_id] == []


async def test_a_node_whose_thread_pool_is_full_is_not_taken_for_stuck(
    pg_url: str, anyio_backend: str, tmp_path: Path
) -> None:
    """A node whose app fills anyio's default thread limiter (its own ``to_thread``
    calls: sync code, a web framework's sync handlers) for longer than the worker
    liveness bound is busy, not stuck: its event loop hears its workers' heartbeats, and
    its poll for the leader's role, which is the sign of life the leader reads, does not
    wait for the app's threads. Its worker, heartbeating every 0.2 s, is never declared
    offline."""
    timeout = 3.0
    async with Runtime.open(pg_url, config=RuntimeConfig(worker_timeout=timeout)) as a:
        await _open_leader_first(pg_url)
        busy = await _start(
            pg_url,
            anyio_backend,
            tmp_path,
            "busy",
            30.0,
            workers=0,
            register=True,
            worker_timeout=timeout,
            busy=timeout + 5.0,
        )
        try:
            mine = f"{busy.process.pid}-idle"

            def status() -> str | None:
                rows = raw(pg_url, "SELECT status FROM workers WHERE id = %s", (mine,))
                return str(rows[0][0]) if rows else None

            await until(lambda: status() is not None, "its worker registered")
            await anyio.sleep(timeout + 4.0)  # its threads busy all along
            assert status() != "offline"
            assert [w for w, _ in events(pg_url, "worker.offline") if w == mine] == []
            assert busy.id in live_nodes(pg_url)
            assert await a.get_worker(mine) is not None
        finally:
            await _stop(busy)


@contextlib.contextmanager
def _own_role(url: str) -> Iterator[tuple[str, str]]:
    """A login role of its own (not a superuser, so a connection limit holds it) with
    every right a node needs on the database at ``url`` (already migrated), and ``url``
    as that role; dropped afterwards, its sessions ended."""
    role = f"hive_node_{uuid.uuid4().hex[:12]}"
    raw(url, f'CREATE ROLE "{role}" LOGIN')
    try:
        for grant in (
            f'GRANT ALL ON SCHEMA public TO "{role}"',
            f'GRANT ALL ON ALL TABLES IN SCHEMA public TO "{role}"',
            f'GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO "{role}"',
        ):
            raw(url, grant)
        parts = urlsplit(url)
        netloc = f"{role}@{parts.hostname}:{parts.port}"
        yield role, urlunsplit(parts._replace(netloc=netloc))
    finally:
        raw(
            url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
            (role,),
        )
        raw(url, f'DROP OWNED BY "{role}"')
        raw(url, f'DROP ROLE "{role}"')


def _sessions(url: str, role: str, application: str = "%") -> int:
    [(count,)] = raw(
        url,
        "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND application_name LIKE %s",
        (role, application),
    )
    return int(count)


async def test_a_live_node_that_cannot_open_its_poll_connection_is_not_taken_for_stuck(
    pg_url: str, anyio_backend: str, tmp_path: Path
) -> None:
    """A live node whose poll connection cannot be made (its role's connection limit
    reached: ``too many connections``) has no poll session for the leader to read; its
    event loop runs and hears its worker, heartbeating every 0.2 s. The leader must not
    declare that worker offline (it did, again and again, each time the node wrote it
    live). The node's sign of life is then a statement every poll on its own session
    (the one holding its node lock), by the database's clock. Once the node stops for
    real (SIGSTOP), that sign stops too, and its worker is declared offline within the
    liveness bound."""
    timeout = 2.0  # the least bound there is (STUCK_FLOOR_SECONDS)
    config = RuntimeConfig(worker_timeout=timeout)
    async with Runtime.open(pg_url, config=config):
        await _open_leader_first(pg_url)
        with _own_role(pg_url) as (role, url):
            node = await _start(
                url,
                anyio_backend,
                tmp_path,
                "unpolled",
                30.0,
                workers=0,
                register=True,
                worker_timeout=timeout,
            )
            try:
                mine = f"{node.process.pid}-idle"

                def status() -> str | None:
                    rows = raw(pg_url, "SELECT status FROM workers WHERE id = %s", (mine,))
                    return str(rows[0][0]) if rows else None

                def offline_events() -> list[str | None]:
                    return [w for w, _ in events(pg_url, "worker.offline") if w == mine]

                polls = "hive-orchestration:leader%"
                await until(lambda: status() == "active", "its worker registered")
                await until(lambda: _sessions(pg_url, role, polls) == 1, "its poll session")
                # No connection more for the role, then its poll session ended: the node
                # tries to connect again at each poll, and is refused.
                held = _sessions(pg_url, role)
                raw(pg_url, f'ALTER ROLE "{role}" CONNECTION LIMIT {held - 1}')
                raw(
                    pg_url,
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE usename = %s AND application_name LIKE %s",
                    (role, polls),
                )
                await until(lambda: _sessions(pg_url, role, polls) == 0, "its poll session gone")
                began = time.monotonic()
                while time.monotonic() - began < timeout + 2.0:
                    assert _sessions(pg_url, role, polls) == 0  # refused all along
                    await anyio.sleep(0.25)
                assert offline_events() == []
                assert status() == "active"
                assert node.id in live_nodes(pg_url)
                # Stopped for real: no sign of life at all, declared offline in the bound.
                os.kill(node.process.pid, signal.SIGSTOP)
                await until(lambda: _stopped(node.process.pid), "the node stopped")
                stopped_at = time.monotonic()
                await until(
                    lambda: status() == "offline",
                    "the stopped node's worker declared offline",
                    within=timeout + 10.0,
                )
                took = time.monotonic() - stopped_at
                assert took <= timeout + 3.0, took
                assert len(offline_events()) == 1
                os.kill(node.process.pid, signal.SIGCONT)
            finally:
                await _stop(node)


async def test_a_node_whose_poll_lock_a_stray_session_holds_is_not_taken_for_stuck(
    pg_url: str,
) -> None:
    """A node whose poll lock is held by another session (a lost session of its own the
    server has not ended yet, say) polls on a session of its own without it: the leader
    reads the holder's session, which only ages. The node's own session is then its sign
    of life, and its worker, heartbeating, is never declared offline."""
    timeout = 2.0
    config = RuntimeConfig(worker_timeout=timeout)
    async with Runtime.open(pg_url, config=config):
        await _open_leader_first(pg_url)
        [a_id] = nodes(pg_url)
        async with Runtime.open(pg_url, config=config) as b:
            [b_id] = nodes(pg_url) - {a_id}
            await b.register_worker("w-b", role="watcher")
            key = node_key(b_id) & 0xFFFFFFFF_FFFFFFFF
            halves = (key >> 32, key & 0xFFFFFFFF)
            held = (
                "SELECT l.pid FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted"
                " AND l.objsubid = 2 AND l.classid::bigint = %s AND l.objid::bigint = %s"
            )
            await until(lambda: bool(raw(pg_url, held, halves)), "its poll lock")

            async def beat() -> None:
                while True:
                    await b.update_worker_heartbeat("w-b")
                    await anyio.sleep(0.2)

            with psycopg.connect(pg_url, autocommit=True) as stray:
                async with anyio.create_task_group() as group:
                    group.start_soon(beat)
                    [(pid,)] = raw(pg_url, held, halves)
                    raw(pg_url, "SELECT pg_terminate_backend(%s)", (pid,))
                    # Queued before the node's next poll connects (0.5 s later): the stray
                    # session gets the lock as the ended session lets it go.
                    int4 = tuple(h - (1 << 32) if h >= 1 << 31 else h for h in halves)
                    stray.execute("SET statement_timeout = '10s'")
                    await anyio.to_thread.run_sync(
                        lambda: stray.execute("SELECT pg_advisory_lock(%s, %s)", int4)
                    )
                    stray_pid = stray.info.backend_pid
                    began = time.monotonic()
                    while time.monotonic() - began < timeout + 2.0:
                        assert raw(pg_url, held, halves) == [(stray_pid,)]
                        await anyio.sleep(0.25)
                    group.cancel_scope.cancel()
            assert [w for w, _ in events(pg_url, "worker.offline") if w == "w-b"] == []
            worker = await b.get_worker("w-b")
            assert worker is not None
            assert worker.status is not WorkerStatus.OFFLINE


async def test_a_stopped_leader_loses_the_role_and_its_duties_are_done(
    pg_url: str, anyio_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The leader's process stops (SIGSTOP) holding a claim: its session keeps the role,
    # so nobody would reap leases, recover dead nodes or fire schedules. Another node
    # ends the session once it sat idle for STALE_SECONDS and takes the role.
    monkeypatch.setattr(pg_leader, "STALE_SECONDS", 2.0)  # this process's nodes only
    lease = 2.0
    stuck = await _start(pg_url, anyio_backend, tmp_path, "stuck", lease, workers=1, stop=True)
    try:
        await until(lambda: leader(pg_url)[1] == stuck.id, "the first node leads")
        stale_epoch = leader(pg_url)[0]
        async with Runtime.open(pg_url) as a, anyio.create_task_group() as group:
            [a_id] = nodes(pg_url) - {stuck.id}
            group.start_soon(stuck.read)
            task_id = await a.create_task("job", max_retries=3)
            await until(
                lambda: bool(stuck.claimed) and _stopped(stuck.process.pid),
                "the leader stopped, holding a claim",
            )
            assert leader(pg_url)[1] == stuck.id  # the role stays with the stopped node...
            took = await until(lambda: leader(pg_url)[1] == a_id, "the role taken")
            assert took >= 2.0 - 0.5  # ...for as long as its session may sit idle
            assert leader(pg_url)[0] > stale_epoch
            assert holders(pg_url) == 1
            assert stuck.id in live_nodes(pg_url)  # its node lock: ended was the role's only
            # The new leader does the duties: the stopped node's expired lease is ended.
            await until(lambda: not _held(pg_url, task_id), "the lease requeued")
            again = await a.claim_task("w2", "job", wait=10)
            assert again is not None
            assert again.task.id == task_id
            await a.complete_task(again.lease, {})
            # Woken, the old leader finds its session gone and does not take the role
            # back; its worker's completion is refused as a lost claim's.
            os.kill(stuck.process.pid, signal.SIGCONT)
            await until(lambda: bool(stuck.lost), "the woken node's completion refused")
            assert stuck.errors == ["LeaseLostError"]
            await anyio.sleep(1.5)  # three of its polls
            assert leader(pg_url)[1] == a_id
            assert holders(pg_url) == 1
            group.cancel_scope.cancel()
    finally:
        await _stop(stuck)
    assert [r.status.value for r in await _runs(pg_url, task_id)] == ["lost", "completed"]


async def _runs(url: str, task_id: str) -> list[Any]:
    async with Runtime.open(url) as rt:
        return await rt.get_runs(task_id)


# -- retention: the leader's passes only -------------------------------------------------


async def _finished(runtime: Runtime, task_type: str) -> str:
    """A task of ``task_type`` claimed, started and completed."""
    task_id = await runtime.create_task(task_type, max_retries=0)
    claim = await runtime.claim_task("w1", task_type, start=True)
    assert claim is not None
    assert claim.task.id == task_id
    await runtime.complete_task(claim.lease, {})
    return task_id


def _exists(url: str, task_id: str) -> bool:
    return bool(raw(url, "SELECT 1 FROM tasks WHERE id = %s", (task_id,)))


async def test_the_retention_policy_runs_on_the_leader_only_and_on_the_next_one(
    pg_url: str,
) -> None:
    policy = RetentionPolicy(finished_max_age=1.0, events_max_count=1, interval=1.0)
    async with anyio.create_task_group() as group:
        # The leader has no policy; the other node has one, which is not its to run.
        first, second = Held(), Held(RuntimeConfig(retention=policy))
        a = await group.start(first.run, pg_url)
        [node_a] = nodes(pg_url)
        await until(lambda: leader(pg_url)[1] == node_a, "the first node leads")
        b = await group.start(second.run, pg_url)
        old = await _finished(b, "build")
        # Three of its intervals past the task's age: no pass of the node that does not
        # lead purged or trimmed anything (before, each node ran its own passes).
        await anyio.sleep(3.5)
        assert _exists(pg_url, old)
        assert events(pg_url, "retention.purged") == []
        assert events(pg_url, "retention.trimmed") == []
        # A user's purge still works on any node (it is not a duty).
        mine = await _finished(b, "ship")
        assert await b.purge_tasks(0.0, task_type="ship") == 1
        assert not _exists(pg_url, mine)
        assert _exists(pg_url, old)
        # The leader closes: the other node takes the role, and its policy runs there.
        await first.close()
        await until(lambda: leader(pg_url)[1] != node_a, "the second node leads")
        await until(lambda: not _exists(pg_url, old), "the new leader's pass purged")
        await until(lambda: bool(events(pg_url, "retention.trimmed")), "and trimmed")
        await second.close()
        del a


async def test_a_stale_leaders_retention_pass_changes_nothing(pg_url: str) -> None:
    async with Runtime.open(pg_url) as a:
        await _open_leader_first(pg_url)
        old = await _finished(a, "build")
        epoch, _ = leader(pg_url)
        stale = epoch - 1
        purge = PurgeTasks(
            older_than=0.0,
            statuses=tuple(sorted(s.value for s in TERMINAL)),
            source_agent="retention",
            reason="retention policy",
        )
        count = raw(pg_url, "SELECT count(*), max(seq) FROM events")
        # A pass under an epoch that is no longer the leader's: each chunk's write is
        # refused whole, by the leader's fence.
        with pytest.raises(StorageError):
            await a._purge(msgspec.structs.replace(purge, epoch=stale))
        with pytest.raises(StorageError):
            await a._trim(None, 1, None, 1000, "retention", epoch=stale)
        assert _exists(pg_url, old)
        assert raw(pg_url, "SELECT count(*), max(seq) FROM events") == count
        # The same passes under the leader's epoch do delete (what the fence stopped).
        assert await a._trim(None, 1, None, 1000, "retention", epoch=epoch) > 0
        assert events(pg_url, "retention.trimmed")
        assert await a._purge(msgspec.structs.replace(purge, epoch=epoch)) == 1
        assert not _exists(pg_url, old)


# -- real nodes, killed under load -------------------------------------------------------


class Node:
    """A child process that is one node with its workers (tests/_pg_node.py)."""

    def __init__(self, process: Process, stderr: Path) -> None:
        self.process = process
        self.stderr = stderr
        assert process.stdout is not None
        self.stream = BufferedByteReceiveStream(process.stdout)
        self.done: list[str] = []
        self.lost: list[str] = []
        self.errors: list[str] = []  # the error class of each lost claim
        self.claimed: list[str] = []
        self.id = ""

    async def read(self) -> None:
        """Collect its acknowledged completions until its output ends."""
        while True:
            try:
                line = (await self.stream.receive_until(b"\n", 65536)).decode()
            except (anyio.EndOfStream, anyio.IncompleteRead):
                return
            kind, task_id, *error = line.split()
            if kind == "claimed":
                self.claimed.append(task_id)
            elif kind == "done":
                self.done.append(task_id)
            else:
                self.lost.append(task_id)
                self.errors += error

    def why(self) -> str:
        return self.stderr.read_text(errors="replace")[-4000:]


async def _start(
    url: str,
    backend: str,
    folder: Path,
    name: str,
    lease: float,
    hold: int = 0,
    *,
    workers: int = 4,
    work: float = 0.05,
    stop: bool = False,
    register: bool = False,
    worker_timeout: float | None = None,
    busy: float = 0.0,
) -> Node:
    stderr = folder / f"{name}.err"
    args = [backend, url, str(workers), str(lease), str(work), str(hold), str(int(stop))]
    args.append(str(int(register)))
    args.append("-" if worker_timeout is None else str(worker_timeout))
    args.append(str(busy))
    with stderr.open("wb") as err:
        process = await anyio.open_process(
            [sys.executable, str(NODE), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    node = Node(process, stderr)
    with anyio.fail_after(PATIENCE):
        line = await node.stream.receive_until(b"\n", 65536)
    assert line == b"ready", node.why()
    [(node.id,)] = raw(url, "SELECT id FROM hive_nodes WHERE pid = %s", (process.pid,))
    return node


async def _stop(node: Node) -> None:
    with anyio.CancelScope(shield=True):
        if node.process.returncode is None:
            node.process.kill()
        await node.process.wait()
        await node.process.aclose()


async def _kill_a_node_under_load(
    pg_url: str, backend: str, tmp: Path, *, leader_dies: bool
) -> None:
    lease = 20.0  # the lease bound the dead node's claims must be requeued within
    count = 300
    # The victim also holds one claim it never ends: its four workers' claims may all be
    # committing their completions when the kill lands (one group commit), leaving none
    # to requeue (seen in CI).
    first = await _start(pg_url, backend, tmp, "first", lease, hold=int(leader_dies))
    children = [first]
    try:
        await until(lambda: leader(pg_url)[1] == first.id, "the first node leads")
        second = await _start(pg_url, backend, tmp, "second", lease, hold=int(not leader_dies))
        children.append(second)
        epoch = leader(pg_url)[0]
        victim, survivor = (first, second) if leader_dies else (second, first)
        async with Runtime.open(pg_url) as producer, anyio.create_task_group() as group:
            for child in children:
                group.start_soon(child.read)
            ids: list[str] = []
            for start in range(0, count, 100):
                batch = [{"task_type": "job", "max_retries": 5} for _ in range(start, start + 100)]
                ids += await producer.create_tasks(batch)

            def holding() -> int:
                [(n,)] = raw(
                    pg_url,
                    "SELECT count(*) FROM tasks WHERE node_id = %s"
                    " AND status IN ('assigned', 'running')",
                    (victim.id,),
                )
                return int(n)

            # Under load: both nodes have completed some, and the victim holds claims.
            await until(
                lambda: len(victim.done) >= 20 and len(survivor.done) >= 20 and holding() > 0,
                "both nodes at work, the victim holding claims",
            )
            os.kill(victim.process.pid, signal.SIGKILL)
            killed = time.monotonic()
            assert await victim.process.wait() == -signal.SIGKILL
            acknowledged = set(victim.done)
            # Its claims go back to the queue while the others run, within the lease.
            await until(lambda: holding() == 0, "the dead node's claims requeued", lease)
            requeued_in = time.monotonic() - killed
            assert requeued_in < lease, requeued_in

            def finished() -> bool:
                [(n,)] = raw(pg_url, "SELECT count(*) FROM tasks WHERE status = 'completed'")
                return int(n) == count

            await until(finished, "every task completed", 60.0)
            if leader_dies:
                await until(lambda: leader(pg_url)[1] != victim.id, "the role moves on")
                new_epoch, holder = leader(pg_url)
                assert new_epoch > epoch
                assert holder in nodes(pg_url)
                assert holder != victim.id
            else:
                assert leader(pg_url) == (epoch, first.id)
            group.cancel_scope.cancel()
        # Nothing acknowledged was lost: every completion a worker was told of holds.
        statuses = dict(raw(pg_url, "SELECT id, status FROM tasks"))
        assert all(statuses[t] == "completed" for t in acknowledged | set(survivor.done))
        assert set(statuses) == set(ids)
        # None handed out twice at once: one completed run per task, and every other run
        # of a task is one the dead node held (ended lost); no claim was lost by the live.
        runs = raw(pg_url, "SELECT task_id, status FROM runs ORDER BY task_id")
        completed = [t for t, status in runs if status == "completed"]
        assert sorted(completed) == sorted(ids)
        assert {status for _, status in runs} <= {"completed", "lost"}
        lost = [t for t, status in runs if status == "lost"]
        assert lost, "the victim held claims when it was killed"
        assert not set(lost) & acknowledged
        assert not survivor.lost, survivor.lost
        assert len(acknowledged) + len(survivor.done) <= count
    finally:
        for child in children:
            await _stop(child)


async def test_a_node_killed_under_load_has_its_claims_requeued(
    pg_url: str, anyio_backend: str, tmp_path: Path
) -> None:
    await _kill_a_node_under_load(pg_url, anyio_backend, tmp_path, leader_dies=False)


async def test_the_leader_killed_under_load_hands_on_its_role_and_its_claims(
    pg_url: str, anyio_backend: str, tmp_path: Path
) -> None:
    await _kill_a_node_under_load(pg_url, anyio_backend, tmp_path, leader_dies=True)


async def test_a_node_whose_own_session_the_server_ended_takes_its_lock_again(
    pg_url: str,
) -> None:
    """The server ends a live node's own session (the claim's, holding its node lock:
    ``pg_terminate_backend``, a pooler's or an admin's) while its write connection lives
    on. The node took its lock again only as a write connection reconnected, so its
    lock stayed free for good: the leader took it for dead and recovered its claims
    while its workers ran them. Its poll now finds its session lost (a statement on it
    at each poll) and takes its lock again within a poll or two."""
    async with Runtime.open(pg_url):
        await _open_leader_first(pg_url)
        [a_id] = nodes(pg_url)
        async with Runtime.open(pg_url) as b:
            [b_id] = nodes(pg_url) - {a_id}
            key = f"'{b_id}'"  # a hex id, as the node's rows hold it

            def held() -> bool:
                return bool(raw(pg_url, f"SELECT {alive_sql(key)}")[0][0])

            assert held()
            owner = f"SELECT l.pid FROM pg_locks l WHERE {node_lock_sql(key, 'l')}"
            [(pid,)] = raw(pg_url, owner)
            raw(pg_url, "SELECT pg_terminate_backend(%s)", (pid,))
            await until(lambda: raw(pg_url, owner) != [(pid,)], "its session ended")
            await until(held, "the node's lock taken again", within=10.0)
            assert raw(pg_url, owner) != [(pid,)]
            assert await b.create_task("job")  # its write connection serves on


def _poll_idle(url: str, node_id: str) -> float | None:
    """For how long the node's poll session (holding its poll lock, objsubid 2) has sat
    idle by the server's clock: 0 while it runs a statement; None with no such session."""
    key = node_key(node_id) & 0xFFFFFFFF_FFFFFFFF
    rows = raw(
        url,
        "SELECT CASE WHEN a.state LIKE 'idle%%'"
        " THEN extract(epoch FROM now() - a.state_change)::float8 ELSE 0 END"
        " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
        " AND l.classid::bigint = %s AND l.objid::bigint = %s",
        (key >> 32, key & 0xFFFFFFFF),
    )
    return None if not rows else float(rows[0][0])


@contextlib.asynccontextmanager
async def _node_lock_taken(url: str, node_id: str) -> AsyncIterator[Any]:
    """A stray session (the connection yielded) takes the node's lock as the server ends
    the node's own session, and holds it until the block ends: what a half-open session
    of the node's own the server has not ended does."""
    key = f"'{node_id}'"  # a hex id, as the node's rows hold it
    owner = f"SELECT l.pid FROM pg_locks l WHERE {node_lock_sql(key, 'l')}"
    [(pid,)] = raw(url, owner)
    with psycopg.connect(url, autocommit=True) as stray:
        async with anyio.create_task_group() as group:
            # Queued behind the node's own session before that is ended: the stray
            # session gets the lock as it goes.
            group.start_soon(
                anyio.to_thread.run_sync,
                lambda: stray.execute("SELECT pg_advisory_lock(%s)", (node_key(node_id),)),
            )
            await until(
                lambda: bool(
                    raw(
                        url,
                        "SELECT 1 FROM pg_stat_activity WHERE pid = %s"
                        " AND wait_event_type = 'Lock'",
                        (stray.info.backend_pid,),
                    )
                ),
                "the stray session waits for the lock",
            )
            raw(url, "SELECT pg_terminate_backend(%s)", (pid,))
        await until(
            lambda: raw(url, owner) == [(stray.info.backend_pid,)],
            "the stray session holds the node's lock",
        )
        yield stray


async def test_a_stray_session_holding_a_nodes_lock_stalls_neither_its_poll_nor_its_writes(
    pg_url: str,
) -> None:
    """The node's own session is ended and another session takes its node lock (one the
    server has not ended, as a half-open session of the node's own would, holding it for
    hours). Taking the lock again waited for it without a bound, in the poll's thread:
    the node stopped polling (its poll session only aged, the leader's duties stopped)
    for as long as the other session held the lock. It now waits a bounded time at each
    poll, polls on, and writes nothing meanwhile (it does not hold its lock: the other
    nodes may take it for dead); once the lock is free it takes it and writes again."""
    async with Runtime.open(pg_url):
        await _open_leader_first(pg_url)
        [a_id] = nodes(pg_url)
        async with Runtime.open(pg_url) as b:
            [b_id] = nodes(pg_url) - {a_id}
            await until(lambda: _poll_idle(pg_url, b_id) is not None, "its poll lock")
            key = f"'{b_id}'"
            owner = f"SELECT l.pid FROM pg_locks l WHERE {node_lock_sql(key, 'l')}"
            async with _node_lock_taken(pg_url, b_id) as stray:
                # The node finds its session lost at its next poll (0.5 s), and its lock
                # taken: from then on it writes nothing.
                refused = 0
                with anyio.fail_after(PATIENCE):
                    while True:
                        try:
                            await b.create_task("job")
                        except StorageError:
                            break
                        idle = _poll_idle(pg_url, b_id)
                        assert idle is not None
                        assert idle < pg_leader.STUCK_FLOOR_SECONDS, idle  # it polls on
                        await anyio.sleep(0.05)
                began = time.monotonic()
                while time.monotonic() - began < 5.0:
                    idle = _poll_idle(pg_url, b_id)
                    assert idle is not None
                    assert idle < pg_leader.STUCK_FLOOR_SECONDS, idle
                    with pytest.raises(StorageError) as caught:
                        await b.create_task("job")
                    assert caught.value.fault == "unavailable"
                    assert "does not hold its lock" in str(caught.value)
                    # Not the advice for a server out of reach: the server answers.
                    assert "server is down" not in str(caught.value)
                    refused += 1
                    await anyio.sleep(0.25)
                assert raw(pg_url, owner) == [(stray.info.backend_pid,)]
            # The stray session is gone: the node takes its lock at a poll, writes again.
            # The node holds the lock at the server a moment before its writes know it (its
            # poll's thread writes its node row after the lock, then clears the flag the
            # writes check): until then it still refuses, in the same words. CI at load ~10
            # wrote in that moment.
            await until(lambda: len(raw(pg_url, owner)) == 1, "the node's lock taken again")
            assert raw(pg_url, f"SELECT {alive_sql(key)}") == [(True,)]
            refusals: list[str] = []
            with anyio.fail_after(PATIENCE):
                while True:
                    try:
                        task_id = await b.create_task("job")
                        break
                    except StorageError as exc:
                        refusals.append(str(exc))
                        await anyio.sleep(0.05)
            assert all("does not hold its lock" in refusal for refusal in refusals), refusals
            assert (await b.get_task(task_id)) is not None
            assert refused > 0


async def test_a_leader_that_lost_its_node_lock_lets_the_role_go(pg_url: str) -> None:
    """The leader's own session is ended and a stray session takes its node lock, so it
    writes nothing (each duty it took on was refused) while its poll session polls on:
    no other node could take the role, and every node's duties waited for its lock
    (a dead node's claims were never requeued). It now lets the role go at its next
    poll: the other node leads and requeues them."""
    async with Runtime.open(pg_url) as a:
        await _open_leader_first(pg_url)
        [a_id] = nodes(pg_url)
        async with Runtime.open(pg_url):
            # A claim of a dead node (as after a SIGKILL), which only a leader requeues.
            task_id = await a.create_task("job")
            assert await a.claim_task("w1", "job", start=True) is not None
            raw(pg_url, "UPDATE tasks SET node_id = %s WHERE id = %s", (dead_node(), task_id))
            async with _node_lock_taken(pg_url, a_id):
                [b_id] = nodes(pg_url) - {a_id}
                await until(lambda: leader(pg_url)[1] == b_id, "the other node leads")
                await until(
                    lambda: (
                        raw(pg_url, "SELECT status FROM tasks WHERE id = %s", (task_id,))
                        == [("queued",)]
                    ),
                    "the dead node's claim requeued",
                )


async def test_a_session_of_its_own_the_server_kept_is_ended_as_the_node_takes_its_lock_again(
    pg_url: str,
) -> None:
    """The client gave its own session up for lost while the server keeps it (half-open
    TCP: the server's keepalive may take hours), still holding the node's lock. The node
    ends that session of its own and takes its lock again at once, instead of waiting
    for the server to notice."""
    claim = DatabaseClaim(pg_url)
    await anyio.to_thread.run_sync(claim.acquire)
    try:
        kept = claim._conn
        assert kept is not None
        kept_pid = kept.info.backend_pid
        # The client's view of a lost session: its connection is closed; the server's
        # session lives on (the test holds it), with the lock.
        lost = psycopg.connect(pg_url, autocommit=True)
        lost.close()
        claim._conn = lost
        key = f"'{claim.node_id}'"
        owner = f"SELECT l.pid FROM pg_locks l WHERE {node_lock_sql(key, 'l')}"
        assert raw(pg_url, owner) == [(kept_pid,)]
        answers: list[bool] = []
        # A thread of its own, waited for a bounded time: a touch that waits for the lock
        # without a bound cannot be cancelled.
        toucher = threading.Thread(target=lambda: answers.append(claim.touch()), daemon=True)
        toucher.start()
        await anyio.to_thread.run_sync(toucher.join, 5.0)
        assert answers == [False]  # its session was lost, and its lock is taken again
        [(pid,)] = raw(pg_url, owner)
        assert pid != kept_pid
        claim.check()  # it writes again
        with anyio.fail_after(5):
            assert await anyio.to_thread.run_sync(claim.touch) is True
        await until(
            lambda: not raw(pg_url, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (kept_pid,)),
            "the kept session ended",
        )
    finally:
        kept.close()
        claim.release()
