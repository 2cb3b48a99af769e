"""Claims taken in the database: on PostgreSQL a node's claims lock their rows with
``SELECT ... FOR UPDATE SKIP LOCKED`` in the claiming write's own transaction
(storage/pg/queues.py ``lock_ready``, actors/task_manager/claims.py ``lock_claims``), so a
row another transaction holds is passed over, never waited for, and two nodes claiming
from one queue never pick the same task nor conflict.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

psycopg = pytest.importorskip("psycopg")

from hive_orchestration import (  # noqa: E402
    HiveError,
    Runtime,
    RuntimeConfig,
    StorageError,
    TaskStatus,
)
from hive_orchestration.actors.task_manager import TaskManager  # noqa: E402
from hive_orchestration.messages.storage import DatabaseClock  # noqa: E402
from hive_orchestration.storage.pg.sql import PostgresSql  # noqa: E402
from hive_orchestration.storage.port import StoreError  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


async def test_a_claim_passes_over_the_rows_another_transaction_holds(pg_url: str) -> None:
    async with Runtime.open(pg_url) as rt:
        ids = [await rt.create_task("job", priority=9 - i) for i in range(4)]
        with psycopg.connect(pg_url) as other:
            # Another node's transaction holds the two best tasks (its claim in flight).
            other.execute("SELECT id FROM tasks WHERE id = ANY(%s) FOR UPDATE", (ids[:2],))
            with anyio.fail_after(5):  # a claim that waited for those rows would hang here
                claim = await rt.claim_task("w1", "job")
            assert claim is not None
            assert claim.task.id == ids[2]  # the best of the rest, in the queue's order
            other.rollback()
        # Let go of, the rows are the best again.
        with anyio.fail_after(5):
            again = await rt.claim_tasks("w2", "job", limit=5, wait=3)
        assert [c.task.id for c in again] == [ids[0], ids[1], ids[3]]


async def test_two_nodes_claiming_one_queue_never_conflict(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two nodes' workers claim the same queue's tasks at once: every task is handed out
    once and no write conflicts (a conflict reads the batch's tasks again: _refresh)."""
    conflicts: list[int] = []
    refresh = TaskManager._refresh

    async def counted(self: TaskManager, task_ids: Any) -> None:
        conflicts.append(len(task_ids))
        await refresh(self, task_ids)

    monkeypatch.setattr(TaskManager, "_refresh", counted)
    count = 300
    async with Runtime.open(pg_url) as one:
        created = await one.create_tasks([{"task_type": "job"}] * count)
        async with Runtime.open(pg_url) as two:  # opening, it reads the same heads
            await race(one, two, created)
    assert conflicts == []


async def race(one: Runtime, two: Runtime, created: list[str]) -> None:
    """Three workers on each node claim batches of 8 until every task was taken."""
    taken: dict[str, str] = {}

    async def work(rt: Runtime, worker: str) -> None:
        while len(taken) < len(created):
            claims = await rt.claim_tasks(worker, "job", limit=8, start=True, wait=0.5)
            for claim in claims:
                assert claim.task.id not in taken, "handed out twice"
                taken[claim.task.id] = worker
                await rt.complete_task(claim.lease, {})

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for n in range(3):
                tg.start_soon(work, one, f"one-{n}")
                tg.start_soon(work, two, f"two-{n}")
    assert set(taken) == set(created)
    assert {worker[:3] for worker in taken.values()} == {"one", "two"}  # both took some


@pytest.fixture
def no_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    """The TaskManagers read their heads again only at start-up (no safety sweep): what
    reaches them from other nodes comes by notification alone."""
    init = TaskManager.__init__

    def without_sweep(self: TaskManager, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **{**kwargs, "sweep_interval": 3600.0})

    monkeypatch.setattr(TaskManager, "__init__", without_sweep)


@pytest.mark.usefixtures("no_sweep")
async def test_a_claim_waiting_on_one_node_is_woken_by_tasks_queued_on_another(
    pg_url: str,
) -> None:
    async with Runtime.open(pg_url) as one, Runtime.open(pg_url) as two:
        claimed: list[Any] = []

        async def claim() -> None:
            claimed.append(await one.claim_task("w1", "job", wait=30))

        for round_ in range(3):  # a queue new to the first node, then one it knows
            claimed.clear()
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(claim)
                    task_id = await two.create_task("job", priority=round_)
            assert claimed[0] is not None
            assert claimed[0].task.id == task_id
            await one.complete_task(claimed[0].lease, {})


@pytest.mark.usefixtures("no_sweep")
async def test_a_task_retried_on_one_node_is_claimed_on_another_with_its_runs(
    pg_url: str,
) -> None:
    """The node whose claim locks a task it never held reads it in full with the row
    lock, and its runs when it has any: the next run is numbered after them (a node that
    took it without its runs would number its run 1 again)."""
    config = RuntimeConfig(retry_backoff=0.01, retry_backoff_max=0.01)
    async with (
        Runtime.open(pg_url, config=config) as one,
        Runtime.open(pg_url, config=config) as two,
    ):
        retried = await one.create_task("job", max_retries=3)
        first = await one.claim_task("w1", "job")
        assert first is not None
        await one.fail_task(first.lease, "once", retryable=True)
        # The other node never held it (no sweep: it knows it from the lock alone); a
        # lock of it before its backoff ended says when it ends, and locks again then.
        with anyio.fail_after(10):
            again = await two.claim_task("w2", "job", wait=5)
        assert again is not None
        assert again.task.id == retried
        assert again.lease.attempt == 2
        runs = await two.get_runs(retried)
    assert [run.run_number for run in runs] == [1, 2]


@pytest.mark.usefixtures("no_sweep")
async def test_a_claim_held_back_by_a_key_another_node_holds_is_woken_when_it_ends(
    pg_url: str,
) -> None:
    """A task of a concurrency key ends on one node: the claim parked on another node
    for the key's next task gets it then (the commit's notice names the key's queue),
    not at a sweep."""
    async with Runtime.open(pg_url) as one, Runtime.open(pg_url) as two:
        first = await one.create_task("job", concurrency_key="k", concurrency_limit=1)
        held = await one.claim_task("w1", "job", start=True)
        assert held is not None
        assert held.task.id == first
        second = await one.create_task("job", concurrency_key="k", concurrency_limit=1)
        claimed: list[Any] = []

        async def claim() -> None:
            claimed.append(await two.claim_task("w2", "job", wait=30))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(claim)
                await anyio.sleep(0.5)  # parked on the second node, the key full
                assert claimed == []
                await one.complete_task(held.lease, {})
        assert claimed[0] is not None
        assert claimed[0].task.id == second


async def test_a_commit_that_queues_tasks_sends_one_notice_naming_their_queues(
    pg_url: str,
) -> None:
    async with Runtime.open(pg_url) as rt:
        with psycopg.connect(pg_url, autocommit=True) as listener:
            listener.execute("LISTEN hive_ready")
            specs: list[dict[str, Any]] = [{"task_type": "a"}] * 40 + [{"task_type": "b"}] * 40
            specs += [{"task_type": "c", "requires": ["gpu"], "concurrency_key": "k"}] * 20
            await rt.create_tasks(specs)  # one write, one commit
            await rt.create_task("d", delay=3600)  # delayed: not ready, no notice
            notes = list(listener.notifies(timeout=1.0))
    assert len(notes) == 1
    origin, queues = json.loads(notes[0].payload)
    assert origin
    assert sorted((kind, tuple(needs), key) for kind, needs, key in queues) == [
        ("a", (), None),
        ("b", (), None),
        ("c", ("gpu",), "k"),
    ]


async def test_a_claim_whose_rows_could_not_be_locked_gets_the_error_and_nothing_is_taken(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch's transaction failed before its claims were decided (the server went
    away as the rows were locked): the claims parked in it get the storage error, nothing
    is handed out, and the next claim gets the task."""
    lock_ready = PostgresSql.lock_ready
    failures: list[bool] = [True]

    async def failing(self: PostgresSql, db: Any, lock: Any) -> Any:
        if failures and failures.pop():
            raise StoreError("the server went away", fault="unavailable")
        return await lock_ready(self, db, lock)

    monkeypatch.setattr(PostgresSql, "lock_ready", failing)
    async with Runtime.open(pg_url) as rt:
        task_id = await rt.create_task("job")
        with pytest.raises(StorageError) as caught:
            await rt.claim_task("w1", "job")
        assert caught.value.fault == "unavailable"
        assert (await rt.get_task(task_id)).status == TaskStatus.QUEUED
        assert await rt.get_runs(task_id) == []
        claim = await rt.claim_task("w2", "job")
        assert claim is not None
        assert claim.task.id == task_id
        assert claim.lease.attempt == 1


async def test_a_claims_decision_that_fails_restarts_the_task_manager_alone(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decision on the locked rows is the TaskManager's, made in its own task: if it
    raises, that actor restarts, the storage actor leaves the write out of its batch
    (nothing of it applied, the rows unlocked at the batch's end) and carries on."""
    decide = TaskManager._decide_locked
    failures: list[bool] = [True]

    def failing(self: TaskManager, *args: Any) -> Any:
        if failures and failures.pop():
            raise RuntimeError("a bug in the decision")
        return decide(self, *args)

    monkeypatch.setattr(TaskManager, "_decide_locked", failing)
    async with Runtime.open(pg_url) as rt:
        task_id = await rt.create_task("job")
        with pytest.raises(HiveError):
            await rt.claim_task("w1", "job")
        assert not failures  # the faulty decision ran
        # The storage actor went on: writes are served, and the task was not taken.
        other = await rt.create_task("other")
        assert (await rt.get_task(task_id)).status == TaskStatus.QUEUED
        assert await rt.get_runs(task_id) == []
        claim = await rt.claim_task("w2", "job", wait=5.0)
        assert claim is not None
        assert claim.task.id == task_id
        assert (await rt.get_task(other)).status == TaskStatus.QUEUED
        restarts = (await rt.statistics()).restarts
        assert restarts["storage"] == 0
        assert restarts["tasks"] == 1


@pytest.mark.usefixtures("no_sweep")
async def test_a_claim_parked_on_another_node_gets_a_retried_task_when_its_backoff_ends(
    pg_url: str,
) -> None:
    """No write marks the end of a retry backoff: a node whose parked claim locked the
    queue while the task was in its backoff learns from that lock when the task comes
    due (the database's clock) and locks again then, not at its next sweep (off here)."""
    config = RuntimeConfig(retry_backoff=2.0, retry_backoff_max=2.0)
    async with (
        Runtime.open(pg_url, config=config) as one,
        Runtime.open(pg_url, config=config) as two,
    ):
        retried = await one.create_task("job", max_retries=3)
        first = await one.claim_task("w1", "job")
        assert first is not None
        claimed: list[Any] = []

        async def claim() -> None:
            claimed.append(await two.claim_task("w2", "job", wait=30))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as group:
                group.start_soon(claim)
                await anyio.sleep(0.3)  # parked on the second node: nothing to take
                assert claimed == []
                failed_at = anyio.current_time()
                await one.fail_task(first.lease, "once", retryable=True)
                backing_off = await one.get_task(retried)
        took = anyio.current_time() - failed_at
    assert backing_off.status is TaskStatus.QUEUED
    assert backing_off.available_at is not None
    backoff = (backing_off.available_at - backing_off.updated_at).total_seconds()
    assert backoff >= 1.0  # half fixed, half random: between 1 and 2 s
    again = claimed[0]
    assert again is not None
    assert again.task.id == retried
    assert again.lease.attempt == 2
    # At the end of the backoff, not an hour later (the sweep) nor before it.
    assert backoff - 0.1 <= took <= backoff + 0.5


@pytest.mark.usefixtures("no_sweep")
async def test_a_claim_parked_on_another_node_gets_a_delayed_task_when_it_comes_due(
    pg_url: str,
) -> None:
    """A delayed task is queued by a write when it comes due (its node's timer), which
    announces it: a claim parked on another node gets it then."""
    async with Runtime.open(pg_url) as one, Runtime.open(pg_url) as two:
        claimed: list[Any] = []

        async def claim() -> None:
            claimed.append(await two.claim_task("w2", "later", wait=30))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as group:
                group.start_soon(claim)
                await anyio.sleep(0.3)
                created_at = anyio.current_time()
                delayed = await one.create_task("later", delay=1.5)
        took = anyio.current_time() - created_at
    assert claimed[0] is not None
    assert claimed[0].task.id == delayed
    assert 1.4 <= took <= 2.0


async def test_a_lock_takes_what_is_due_by_the_databases_clock_and_says_when_the_rest_is(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task is due when its ``available_at`` is past by the server's clock; a lock that
    took fewer rows than it asked says in how many seconds the queue's next task still
    backing off comes due, and one that took as many as it asked says nothing (and pays
    nothing for it). (A node whose wall clock is far ahead: the tests below.)"""
    answers: list[Any] = []
    lock_ready = PostgresSql.lock_ready

    async def recording(self: PostgresSql, db: Any, lock: Any) -> Any:
        locked = await lock_ready(self, db, lock)
        answers.append(locked)
        return locked

    monkeypatch.setattr(PostgresSql, "lock_ready", recording)

    async with Runtime.open(pg_url) as one, Runtime.open(pg_url) as two:
        due = await one.create_task("job", priority=1)
        backing_off = await one.create_task("job", priority=2)  # the better of the two
        with psycopg.connect(pg_url, autocommit=True) as conn:
            for task_id, span in ((due, "-1 second"), (backing_off, "30 seconds")):
                conn.execute(
                    "UPDATE tasks SET available_at = now() + %s::interval,"
                    " version = version + 1 WHERE id = %s",
                    (span, task_id),
                )
        answers.clear()
        with anyio.fail_after(10):
            claims = await two.claim_tasks("w2", "job", limit=5, wait=5)
        assert [claim.task.id for claim in claims] == [due]
        said = [seconds for locked in answers if locked for _, seconds in locked.due_in]
        assert said
        assert 25.0 < said[-1] <= 30.0
        # A lock that takes as many rows as it asks for says nothing of the rest.
        more = [await one.create_task("job") for _ in range(2)]
        answers.clear()
        with anyio.fail_after(10):
            [claim] = await two.claim_tasks("w3", "job", limit=1, wait=5)
        assert claim.task.id == more[0]
        assert answers
        assert all(not locked.due_in for locked in answers if locked)


async def test_a_node_far_ahead_does_not_take_a_task_it_read_still_backing_off(
    pg_url: str,
) -> None:
    """The second node (an hour ahead) opens after the backoff was written, so its first
    read of the queue holds the task, past its backoff by the node's own wall clock: a
    backoff read from storage ends by the database's clock only, so the node does not
    lock it (only the backoffs a node decided itself end on its own clock)."""

    def ahead() -> datetime:
        return datetime.now(UTC) + timedelta(hours=1)

    async with Runtime.open(pg_url) as one:
        due = await one.create_task("job", priority=1)
        backing_off = await one.create_task("job", priority=2)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            for task_id, span in ((due, "-1 second"), (backing_off, "30 seconds")):
                conn.execute(
                    "UPDATE tasks SET available_at = now() + %s::interval,"
                    " version = version + 1 WHERE id = %s",
                    (span, task_id),
                )
        async with Runtime.open(pg_url, wall_clock=ahead) as two:
            with anyio.fail_after(10):
                claims = await two.claim_tasks("w2", "job", limit=5, wait=1)
            assert [claim.task.id for claim in claims] == [due]


async def test_a_node_far_ahead_does_not_take_a_task_its_sweep_read_still_backing_off(
    pg_url: str,
) -> None:
    """The same, with the node running and its claim parked: the first node retries the
    task with a 30 s backoff, and the second node (an hour ahead) reads it at its next
    sweep (every second), holds it as ready by its own wall clock, and must still leave
    it to the database's clock. Before, it took the task at that sweep."""

    def ahead() -> datetime:
        return datetime.now(UTC) + timedelta(hours=1)

    async with Runtime.open(pg_url) as one, Runtime.open(pg_url, wall_clock=ahead) as two:
        task_id = await one.create_task("job", max_retries=3)
        claim = await one.claim_task("w1", "job")
        assert claim is not None
        assert claim.task.id == task_id
        await one.fail_task(claim.lease, "again", retry_after=30.0)
        with anyio.fail_after(10):
            # Two sweeps at least (one a second) while it waits.
            assert await two.claim_tasks("w2", "job", limit=5, wait=2.5) == []
        task = await two.get_task(task_id)
        assert task is not None
        assert task.status is TaskStatus.QUEUED


async def test_a_node_far_ahead_ends_the_backoffs_it_set_on_its_own_clock(pg_url: str) -> None:
    """A backoff a node decided itself still ends on that node's monotonic clock,
    whatever the database's clock says of the wall time stored: the node, an hour ahead
    of the server, stores an end of backoff an hour in the server's future, and still
    hands the task out once the backoff it set is over (LockReady.ready)."""

    def ahead() -> datetime:
        return datetime.now(UTC) + timedelta(hours=1)

    async with Runtime.open(pg_url, wall_clock=ahead) as node:
        task_id = await node.create_task("job", max_retries=3)
        claim = await node.claim_task("w1", "job")
        assert claim is not None
        failed_at = anyio.current_time()
        await node.fail_task(claim.lease, "again", retry_after=1.0)
        with anyio.fail_after(15):
            again = await node.claim_task("w2", "job", wait=10)
        assert again is not None
        assert again.task.id == task_id
        assert again.lease.attempt == 2
        assert anyio.current_time() - failed_at >= 1.0 - 0.01  # not before it ended


def _due_in(pg_url: str, task_id: str) -> float:
    """In how many seconds by the server's clock the task's stored backoff ends."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM available_at - now())::float8 FROM tasks WHERE id = %s",
            (task_id,),
        ).fetchone()
    assert row is not None
    assert row[0] is not None
    return float(row[0])


@pytest.mark.parametrize("offset", [1, -1], ids=["ahead", "behind"])
async def test_a_node_far_ahead_stores_the_end_of_its_backoff_by_the_databases_clock(
    pg_url: str, offset: int
) -> None:
    """A node an hour ahead retries a task with a 1 s backoff. The end stored was its own
    wall time (an hour in the server's future), read by every other node, and by itself
    once it let go of the task, by the server's clock: the other node's parked claim got
    it an hour late. An hour behind, the other node took it at once (0.01-0.18 s after
    the failure). It is now stored by the database's clock (its time as the node
    reckons it, plus the span), so the other node gets it once the backoff ends; and the
    node shows the very value stored."""

    def skewed() -> datetime:
        return datetime.now(UTC) + timedelta(hours=offset)

    async with (
        Runtime.open(pg_url, wall_clock=skewed) as fast,
        Runtime.open(pg_url) as other,
    ):
        task_id = await fast.create_task("job", max_retries=3)
        claim = await fast.claim_task("w1", "job")
        assert claim is not None
        failed_at = anyio.current_time()
        await fast.fail_task(claim.lease, "again", retry_after=1.0)
        assert 0.5 < _due_in(pg_url, task_id) <= 1.0
        shown = await fast.get_task(task_id)
        assert shown is not None
        with psycopg.connect(pg_url, autocommit=True) as conn:
            stored = conn.execute(
                "SELECT available_at FROM tasks WHERE id = %s", (task_id,)
            ).fetchone()
        assert stored == (shown.available_at,)
        with anyio.fail_after(15):
            again = await other.claim_task("w2", "job", wait=10)
        assert again is not None
        assert again.task.id == task_id
        assert again.lease.attempt == 2
        assert anyio.current_time() - failed_at >= 1.0 - 0.05  # not before it ended


async def test_a_backoff_is_stored_to_end_no_sooner_nor_later_for_slow_clock_readings(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node reckons the database's clock from its readings of it, the lock's
    ``now()`` among them (its transaction's start). Reckoned from when the answer came,
    it was behind by the time the answer took: a retry's end was stored that much early,
    and another node (or this one reopened) took the task early (CI: 66 ms, under load).
    Reckoned from when the node asked, it is never behind; a lock slow to begin (its
    reading late after the ask) does not put it ahead either, as the start-up's reading
    was closer. Here each lock begins 0.5 s after it is asked for and is answered 0.2 s
    after it began."""
    lock_ready = PostgresSql.lock_ready

    async def slow(self: PostgresSql, db: Any, lock: Any) -> Any:
        await anyio.sleep(0.5)
        locked = await lock_ready(self, db, lock)
        await anyio.sleep(0.2)
        return locked

    monkeypatch.setattr(PostgresSql, "lock_ready", slow)
    async with Runtime.open(pg_url) as rt:
        task_id = await rt.create_task("job", max_retries=3)
        claim = await rt.claim_task("w1", "job")
        assert claim is not None
        with psycopg.connect(pg_url, autocommit=True) as conn:
            ((before,),) = conn.execute("SELECT clock_timestamp()").fetchall()
            await rt.fail_task(claim.lease, "again", retry_after=1.0)
            ((after, stored),) = conn.execute(
                "SELECT clock_timestamp(), available_at FROM tasks WHERE id = %s", (task_id,)
            ).fetchall()
    span = timedelta(seconds=1.0)
    assert stored >= before + span  # before: 0.2 s early
    # Reckoned from the lock's ask it is 0.5 s late; from the start-up's, by as long as
    # that reading took to be made (milliseconds).
    assert stored <= after + span + timedelta(seconds=0.25)


@pytest.mark.parametrize("offset", [1, -1], ids=["ahead", "behind"])
async def test_a_node_far_ahead_reopened_gets_its_own_retry_when_its_backoff_ends(
    pg_url: str, offset: int
) -> None:
    """The node an hour ahead lets go of its retry (it closes: a restart, as a
    TaskManager's restart, a spill or a dropped lock let go of it too) and opens again:
    what it reads back ends by the server's clock, which said an hour late; now the
    backoff it set. A node an hour behind gets it on time too (what it reads back is by
    the database's clock, not its own)."""

    def ahead() -> datetime:
        return datetime.now(UTC) + timedelta(hours=offset)

    async with Runtime.open(pg_url, wall_clock=ahead) as fast:
        task_id = await fast.create_task("job", max_retries=3)
        claim = await fast.claim_task("w1", "job")
        assert claim is not None
        failed_at = anyio.current_time()
        await fast.fail_task(claim.lease, "again", retry_after=2.0)
    async with Runtime.open(pg_url, wall_clock=ahead) as fast:
        with anyio.fail_after(15):
            again = await fast.claim_task("w2", "job", wait=10)
        assert again is not None
        assert again.task.id == task_id
        assert anyio.current_time() - failed_at >= 2.0 - 0.05


@pytest.mark.usefixtures("no_sweep")
async def test_backoff_alarms_are_one_per_queue_and_a_task_taken_elsewhere_is_handed_out_once(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forty queues each with two tasks backing off (failed in one fail_tasks on the
    first node): the second node's parked claims keep one backoff deadline per queue,
    never more; both nodes claim as the backoffs end, and each task is handed out once, whether
    the node that set its backoff or the other takes it. A deadline of a task the other
    node took already wakes a lock that finds nothing, once: then it is spent, and a
    claim parked afterwards locks nothing more while it waits."""
    types = [f"q{n:02d}" for n in range(40)]
    managers: list[TaskManager] = []
    peak: list[int] = []
    wake = TaskManager._wake_backoffs

    def recording(self: TaskManager) -> None:
        if self not in managers:
            managers.append(self)
        peak.append(len(self._backoff_ends))
        wake(self)

    monkeypatch.setattr(TaskManager, "_wake_backoffs", recording)
    locks: list[int] = []
    lock_ready = PostgresSql.lock_ready

    async def counted(self: PostgresSql, db: Any, lock: Any) -> Any:
        locks.append(len(lock.heads))
        return await lock_ready(self, db, lock)

    monkeypatch.setattr(PostgresSql, "lock_ready", counted)
    config = RuntimeConfig(retry_backoff=1.0, retry_backoff_max=1.5)
    async with (
        Runtime.open(pg_url, config=config) as one,
        Runtime.open(pg_url, config=config) as two,
    ):
        ids = await one.create_tasks([{"task_type": t, "max_retries": 3} for t in types * 2])
        claims = await one.claim_tasks("w1", types, limit=len(ids))
        assert len(claims) == len(ids)
        got: dict[str, list[str]] = {}

        async def claimer(rt: Runtime, name: str, until: float) -> None:
            while anyio.current_time() < until and sum(map(len, got.values())) < len(ids):
                for claim in await rt.claim_tasks(name, types, limit=len(ids), wait=0.3):
                    got.setdefault(claim.task.id, []).append(name)
                    assert claim.lease.attempt == 2

        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                end = anyio.current_time() + 10
                group.start_soon(claimer, two, "w2", end)
                await anyio.sleep(0.3)  # parked on the second node: nothing due
                outcomes = await one.fail_tasks(
                    [{"lease": c.lease, "error": "again"} for c in claims]
                )
                assert all(o.refused is None for o in outcomes)
                group.start_soon(claimer, one, "w1", end)
        assert sorted(got) == sorted(ids)
        assert all(len(names) == 1 for names in got.values()), got
        assert 0 < max(peak) <= len(types)  # one per queue, not one per task
        # A spent deadline is dropped at its node's next batch, and a claim parked now
        # locks nothing more while it waits: no alarm is left to wake it for tasks that
        # are taken.
        locks.clear()
        with anyio.fail_after(10):
            assert await two.claim_tasks("w3", types, limit=5, wait=2.0) == []
            assert await one.claim_tasks("w4", types, limit=5, wait=0.1) == []
        assert len(locks) <= 2, locks
        assert [len(manager._backoff_ends) for manager in managers] == [0, 0]


def _back_off(url: str, task_id: str, ends: str, *, attempts: str = "attempts") -> None:
    """Set ``task_id``'s backoff to end at ``ends`` (SQL, by the database's clock) behind
    the runtime's back, as another node's retry stores it."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            f"UPDATE tasks SET available_at = {ends}, attempts = {attempts},"
            " version = version + 1 WHERE id = %s",
            (task_id,),
        )


@pytest.mark.parametrize("skew", [timedelta(hours=1), -timedelta(hours=1)], ids=["ahead", "behind"])
async def test_queue_depths_turns_the_end_of_a_backoff_into_the_nodes_clock(
    pg_url: str, skew: timedelta
) -> None:
    """``queue_depths`` says since when a queue's longest-waiting task has been
    claimable, by the node's wall clock, as the times the node stores of its own; the
    end of a retry backoff is stored by the database's clock, and is turned into the
    node's. Before, the two were compared as they were stored: a node an hour ahead
    said its retry had been claimable since its failure (the metrics' age ran from
    there), a node an hour behind said in an hour and 30 s (age 0 meanwhile)."""

    def skewed() -> datetime:
        return datetime.now(UTC) + skew

    async with Runtime.open(pg_url, wall_clock=skewed) as node:
        await node.create_task("job", max_retries=3)
        claim = await node.claim_task("w1", "job")
        assert claim is not None
        await node.fail_task(claim.lease, "again", retry_after=30.0)
        count, since = (await node.queue_depths())["job"]
        assert count == 1
        assert 29.0 < (since - skewed()).total_seconds() <= 30.0


async def test_the_sweep_takes_a_queued_task_memory_holds_at_another_version_as_read(
    pg_url: str,
) -> None:
    """A queued task a node holds, changed since by another node (its claim, then a
    retry) or by SQL (the end of its backoff), with its version moved: the node's sweep
    (every second) takes it as read, so that it shows and hands out what is stored.
    Before, the sweep took in only tasks memory did not hold: the node showed its old
    state (no attempt; a backoff 30 s long) until its own next write of the task."""

    async def shown(task_id: str) -> tuple[datetime | None, int]:
        task = await one.get_task(task_id)
        assert task is not None
        return task.available_at, task.attempts

    async with Runtime.open(pg_url) as one:
        retried, elsewhere = [await one.create_task("job", max_retries=3) for _ in range(2)]
        claim = await one.claim_task("w1", "job")
        assert claim is not None
        assert claim.task.id == retried
        await one.fail_task(claim.lease, "again", retry_after=30.0)
        async with Runtime.open(pg_url) as two:
            taken = await two.claim_task("w2", "job")  # one holds it, queued
            assert taken is not None
            assert taken.task.id == elsewhere
            await two.fail_task(taken.lease, "again", retry_after=30.0)
        _back_off(pg_url, retried, "now()")  # its backoff ends now, by SQL
        with psycopg.connect(pg_url) as conn:
            rows = conn.execute(
                "SELECT id, available_at, attempts FROM tasks WHERE id = ANY(%s)",
                ([retried, elsewhere],),
            ).fetchall()
        stored = {task_id: (at, attempts) for task_id, at, attempts in rows}
        assert [stored[t][1] for t in (retried, elsewhere)] == [1, 1]
        wanted = [stored[retried], stored[elsewhere]]
        with anyio.fail_after(5):  # a sweep a second, at a batch (each read is one)
            while True:
                if [await shown(t) for t in (retried, elsewhere)] == wanted:
                    break
                await anyio.sleep(0.05)
        assert [run.worker_id for run in await one.get_runs(elsewhere)] == ["w2"]
        again = await one.claim_task("w1", "job")  # out of its backoff, as stored
        assert again is not None
        assert again.task.id == retried


def _clock_read_off(monkeypatch: pytest.MonkeyPatch, by: timedelta) -> None:
    """The node's reading of the database's clock at start-up is ``by`` off (the
    server's clock stepped the other way since the node read it)."""
    query_queues = PostgresSql.query_queues

    async def read_off(self: PostgresSql, db: Any, message: Any) -> Any:
        answer = await query_queues(self, db, message)
        if isinstance(message, DatabaseClock):
            return answer + by
        return answer

    monkeypatch.setattr(PostgresSql, "query_queues", read_off)


async def test_a_node_far_ahead_does_not_take_a_backoff_it_read_beyond_the_rows_it_locked(
    pg_url: str,
) -> None:
    """A claim wanting more tasks than ``ready_queue_head``: the lock takes that many
    rows of a queue, and memory may hold more (tasks this node created since its read).
    A task memory holds beyond the last locked row is handed out unlocked, checked by
    its version only: one still backing off by the database's clock, held as ready by
    the node's own wall clock (an hour ahead), was handed out at once. (Memory holds a
    backoff read back by its reckoning of the database's clock now; where that is off,
    the lock's reading decides: the tests below.)"""

    def ahead() -> datetime:
        return datetime.now(UTC) + timedelta(hours=1)

    config = RuntimeConfig(ready_queue_head=2)
    async with Runtime.open(pg_url, config=config) as one:
        backing_off = await one.create_task("job", priority=1)
        _back_off(pg_url, backing_off, "now() + interval '3 seconds'")
    async with Runtime.open(pg_url, config=config, wall_clock=ahead) as two:
        # Its read held the whole queue (one task): the tasks it creates join it.
        first = await two.create_task("job", priority=5)
        second = await two.create_task("job", priority=5)
        with anyio.fail_after(10):
            claims = await two.claim_tasks("w2", "job", limit=5)
        names = {first: "first", second: "second", backing_off: "backing off"}
        assert [names[claim.task.id] for claim in claims] == ["first", "second"]
        task = await two.get_task(backing_off)
        assert task is not None
        assert task.status is TaskStatus.QUEUED
        # Not lost: it is taken once due by the database's clock.
        with psycopg.connect(pg_url, autocommit=True) as conn:
            due = conn.execute(
                "SELECT available_at FROM tasks WHERE id = %s", (backing_off,)
            ).fetchone()
            with anyio.fail_after(20):
                again = await two.claim_task("w2", "job", wait=15)
            assert again is not None
            assert again.task.id == backing_off
            assert due is not None
            late = conn.execute("SELECT now() >= %s", due).fetchone()
        assert late == (True,)  # not before it was due by the database's clock


async def test_a_retried_task_long_due_beyond_the_rows_locked_keeps_its_turn(
    pg_url: str,
) -> None:
    """A task read from storage keeps the end of its last retry backoff (no write clears
    it until a claim does), long past. Beyond the rows a lock took (a claim wanting more
    than ``ready_queue_head``), it is due by the database's clock as by any other, and
    keeps its place in claim order: it was let go of as if still backing off, and a
    worse task memory held behind it was handed out in its place."""
    config = RuntimeConfig(ready_queue_head=2)
    async with Runtime.open(pg_url, config=config) as one:
        retried = await one.create_task("job", priority=3)
        _back_off(pg_url, retried, "now() - interval '1 hour'", attempts="1")
    async with Runtime.open(pg_url, config=config) as two:
        # Its read held the whole queue (one task): the tasks it creates join it.
        first = await two.create_task("job", priority=5)
        second = await two.create_task("job", priority=5)
        worse = await two.create_task("job", priority=1)
        with anyio.fail_after(10):
            claims = await two.claim_tasks("w2", "job", limit=5)
        names = {first: "first", second: "second", retried: "retried", worse: "worse"}
        assert [names[claim.task.id] for claim in claims] == [
            "first",
            "second",
            "retried",
            "worse",
        ]


@pytest.mark.usefixtures("no_sweep")
async def test_a_backoff_let_go_beyond_the_rows_locked_is_not_passed_over_once_due(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim wanting more than ``ready_queue_head`` locks that many rows; memory holds
    more beyond them. A task there still backing off by the database's clock, which
    memory held as past it (its reading of that clock was an hour ahead: the server's
    clock stepped back since the node read it at start-up), was let go of, while the
    queue's bound was set from a task held further out: the task sat in storage inside
    the bound, which no refill reads, and once due a worse task held beyond the next
    lock's rows was handed out before it (until a sweep read it: off here). Memory now
    keeps it, held until its end by the database's clock as the lock read it."""
    _clock_read_off(monkeypatch, timedelta(hours=1))
    config = RuntimeConfig(ready_queue_head=2)
    async with Runtime.open(pg_url, config=config) as one:
        backing_off = await one.create_task("job", priority=5)
        _back_off(pg_url, backing_off, "now() + interval '3 seconds'")
    async with Runtime.open(pg_url, config=config) as two:
        # Its read held the whole queue (one task): the tasks it creates join it.
        best = [await two.create_task("job", priority=9) for _ in range(2)]
        worst = await two.create_task("job", priority=1)
        with anyio.fail_after(10):
            claims = await two.claim_tasks("w2", "job", limit=3)
        assert [claim.task.id for claim in claims] == [*best, worst]
        with psycopg.connect(pg_url, autocommit=True) as conn:
            await until_due(conn, backoff=backing_off)
        better = [await two.create_task("job", priority=9) for _ in range(2)]
        await two.create_task("job", priority=1)  # worse than the bound: storage's
        with anyio.fail_after(10):
            claims = await two.claim_tasks("w2", "job", limit=3)
        assert [claim.task.id for claim in claims] == [*better, backing_off]


async def test_a_row_the_lock_takes_is_out_of_its_backoff_whatever_memory_reckoned(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node's reading of the database's clock at start-up is an hour behind (the
    server's clock stepped forward since), so it holds a backoff it reads back an hour
    too long. Once the task is due by the server's clock, a claim's lock takes its row:
    memory still held it as backing off and handed out only the worse task."""
    _clock_read_off(monkeypatch, -timedelta(hours=1))
    async with Runtime.open(pg_url) as one:
        retried = await one.create_task("job", priority=5)
        worse = await one.create_task("job", priority=1)
        _back_off(pg_url, retried, "now() + interval '1 second'")
    async with Runtime.open(pg_url) as two:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            await until_due(conn, backoff=retried)
        with anyio.fail_after(10):
            claims = await two.claim_tasks("w2", "job", limit=2)
        assert [claim.task.id for claim in claims] == [retried, worse]


async def until_due(conn: Any, *, backoff: str) -> None:
    """Until the task's backoff is over by the database's clock, 50 ms past it (a node's
    reckoning of that clock is never behind it: leases.read_database_clock)."""
    with anyio.fail_after(15):
        while True:
            row = conn.execute(
                "SELECT available_at + interval '50 milliseconds' <= now() FROM tasks"
                " WHERE id = %s",
                (backoff,),
            ).fetchone()
            if row == (True,):
                return
            await anyio.sleep(0.1)
