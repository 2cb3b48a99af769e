"""The WorkerRegistry through the public Runtime API: registration (idempotent, with
incarnations), heartbeats, liveness expiry that requeues a dead worker's tasks, capability
routing, events and bad input. Real SQLite files, both backends."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import anyio
import pytest
from _held import hold_in_batch, stall_commits
from _timing import loop_time, loop_wall_clock

from hive_orchestration import (
    Event,
    InvalidInputError,
    LeaseLostError,
    RunStatus,
    Runtime,
    RuntimeConfig,
    TaskStatus,
    WorkerStatus,
)
from hive_orchestration.actors.worker_registry import WorkerRegistry
from hive_orchestration.messages.workers import GetWorker, RegistryWake

pytestmark = pytest.mark.anyio

SOON = 10.0
#: How late after ``worker_timeout`` the runtime may act on a silent worker (the
#: TaskManager batch that requeues its task and hands it to a waiting claim, read from the
#: time it stamps): the registry's alarm, one registry batch and its commit, then at most
#: one TaskManager batch (measured: a few ms on an idle 2-core machine; 0.77 s once, with
#: the suite on both cores and a browser test beside it). The margin is for a loaded one;
#: a registry that waited three times the timeout (1 s) would be 2 s late here.
LATE = 0.75
#: Then the commit and the answer, on a loaded machine.
DELIVERY = 1.0
#: "Never early" allowance: the test and the runtime read the monotonic clock apart.
EARLY = 0.01


@asynccontextmanager
async def runtime(
    db_path: str, *, wall_clock: Callable[[], datetime] | None = None, **config: Any
) -> AsyncIterator[Runtime]:
    settings: dict[str, Any] = {"retry_backoff": 0.01, "retry_backoff_max": 0.05}
    settings.update(config)
    async with Runtime.open(db_path, config=RuntimeConfig(**settings), wall_clock=wall_clock) as rt:
        yield rt


async def worker_events(rt: Runtime, worker_id: str) -> list[Event]:
    events = await rt.read_events(0, limit=10_000)
    return [e for e in events if e.type.startswith("worker.") and e.worker_id == worker_id]


async def wait_until(predicate: Any) -> None:
    """Poll public state until ``predicate`` holds (a test may poll; the runtime never does)."""
    with anyio.fail_after(SOON):
        while True:
            if await predicate():
                return
            await anyio.sleep(0.02)


async def test_register_and_get_a_worker(db_path: str) -> None:
    async with runtime(db_path) as rt:
        assert await rt.get_worker("w1") is None
        worker = await rt.register_worker(
            "w1", "deployer", ["docker", "python"], {"host": "box-1", "slots": 4}
        )
        assert worker.id == worker.worker_id == "w1"
        assert (worker.role, worker.status) == ("deployer", WorkerStatus.ACTIVE)
        assert worker.capabilities == ("docker", "python")
        assert worker.metadata == {"host": "box-1", "slots": 4}
        assert isinstance(worker.last_heartbeat, datetime)
        assert worker.last_heartbeat.tzinfo is not None
        assert await rt.get_worker("w1") == worker
        (event,) = await worker_events(rt, "w1")
        assert event.type == "worker.registered"
        assert event.data["role"] == "deployer"


async def test_registering_again_updates_the_worker_and_starts_a_new_incarnation(
    db_path: str,
) -> None:
    async with runtime(db_path) as rt:
        first = await rt.register_worker("w1", "planner", ["plan"], {"v": 1})
        second = await rt.register_worker("w1", "reviewer", ["review"], {"v": 2})
        assert second.id == "w1"
        assert (second.role, second.capabilities, second.metadata) == (
            "reviewer",
            ("review",),
            {"v": 2},
        )
        assert second.registered_at == first.registered_at
        assert second.incarnation != first.incarnation
        assert [w.id for w in await rt.get_active_workers()] == ["w1"]
        events = await worker_events(rt, "w1")
        assert [e.data["again"] for e in events] == [False, True]


async def test_active_workers_by_role_newest_heartbeat_first(db_path: str) -> None:
    async with runtime(db_path) as rt:
        for worker_id, role in (("a", "deployer"), ("b", "planner"), ("c", "deployer")):
            await rt.register_worker(worker_id, role)
        assert await rt.update_worker_heartbeat("a")
        assert [w.id for w in await rt.get_active_workers()] == ["a", "c", "b"]
        assert [w.id for w in await rt.get_active_workers("deployer")] == ["a", "c"]
        assert await rt.get_active_workers("nobody") == []


async def test_heartbeats_report_existence_and_status_changes(db_path: str) -> None:
    async with runtime(db_path) as rt:
        assert await rt.update_worker_heartbeat("ghost") is False
        await rt.register_worker("w1")
        assert await rt.update_worker_heartbeat("w1") is True
        assert await rt.update_worker_heartbeat("w1", "busy") is True
        worker = await rt.get_worker("w1")
        assert worker is not None
        assert worker.status is WorkerStatus.BUSY
        types = [e.type for e in await worker_events(rt, "w1")]
        # Plain heartbeats publish nothing by default; a status change does.
        assert types == ["worker.registered", "worker.status_changed"]


async def test_heartbeat_events_can_be_switched_on(db_path: str) -> None:
    async with runtime(db_path, publish_heartbeats=True) as rt:
        await rt.register_worker("w1")
        await rt.update_worker_heartbeat("w1")
        types = [e.type for e in await worker_events(rt, "w1")]
        assert types == ["worker.registered", "worker.heartbeat"]


async def test_a_worker_that_stops_heartbeating_goes_offline_and_its_tasks_go_back(
    db_path: str,
) -> None:
    """Declared offline ``worker_timeout`` after its last sign of life (its last call), never
    before and at most LATE after; its task is claimable at once, an attempt counted (the
    configured 60 s retry backoff does not apply to a lost run)."""
    timeout = 1.0
    async with runtime(
        db_path,
        wall_clock=loop_wall_clock,
        worker_timeout=timeout,
        retry_backoff=60.0,
        retry_backoff_max=60.0,
    ) as rt:
        await rt.register_worker("dying")
        task_id = await rt.create_task("job")
        claim = await rt.claim_task("dying", lease=60)  # the lease alone would hold a minute
        assert claim is not None
        sent = anyio.current_time()
        await rt.start_task(claim.lease)  # its last sign of life
        acked = anyio.current_time()
        # Another worker (not registered: it needs no heartbeat) waits for the task.
        again = await rt.claim_task("healthy", wait=SOON)
        got = anyio.current_time()
        assert again is not None
        assert again.task.id == task_id
        acted = loop_time(again.task.updated_at)  # the batch that requeued and handed it
        assert acted - (sent + timeout) >= -EARLY, acted - (sent + timeout)
        assert acted - (acked + timeout) <= LATE, acted - (acked + timeout)
        assert got - acted <= DELIVERY, got - acted
        assert again.task.attempts == 1
        worker = await rt.get_worker("dying")
        assert worker is not None
        assert worker.status is WorkerStatus.OFFLINE
        assert await rt.get_active_workers() == []
        lost, _ = await rt.get_runs(task_id)
        assert lost.status is RunStatus.LOST
        assert lost.error is not None
        assert "no heartbeat" in lost.error
        with pytest.raises(LeaseLostError):
            await rt.complete_task(claim.lease)
        await rt.complete_task(again.lease, {"ok": True})
        types = [e.type for e in await worker_events(rt, "dying")]
        assert types == ["worker.registered", "worker.offline"]
        retrying = [e for e in await rt.read_events(0, limit=1000) if e.type == "task.retrying"]
        assert [(e.data["reason"], e.data["attempts"], e.data["retry_in"]) for e in retrying] == [
            ("worker_lost", 1, 0)
        ]


async def test_heartbeats_keep_a_worker_alive(db_path: str) -> None:
    async with runtime(db_path, worker_timeout=0.3) as rt:
        await rt.register_worker("w1")
        for _ in range(8):  # 0.8 s, well past the timeout
            await anyio.sleep(0.1)
            assert await rt.update_worker_heartbeat("w1")
        worker = await rt.get_worker("w1")
        assert worker is not None
        assert worker.status is WorkerStatus.ACTIVE


async def test_working_keeps_a_worker_alive_without_registry_heartbeats(db_path: str) -> None:
    """Claims and lease calls are signs of life: a worker busy with tasks for longer than
    worker_timeout, which never calls update_worker_heartbeat, keeps its claims."""
    async with runtime(db_path, worker_timeout=0.3) as rt:
        await rt.register_worker("busy", capabilities=["job"])
        for _ in range(4):
            await rt.create_task("job")
        done = 0
        start = anyio.current_time()
        while anyio.current_time() - start < 1.0:  # over three timeouts
            claim = await rt.claim_task("busy", lease=60)
            assert claim is not None
            await rt.start_task(claim.lease)
            for _ in range(2):
                await anyio.sleep(0.1)
                await rt.heartbeat(claim.lease)  # a lease heartbeat, not the registry's
            await rt.complete_task(claim.lease)  # raises LeaseLostError if released
            done += 1
            await rt.create_task("job")
        worker = await rt.get_worker("busy")
        assert worker is not None
        assert worker.status is WorkerStatus.ACTIVE
        assert done >= 3
        types = [e.type for e in await worker_events(rt, "busy")]
        assert "worker.offline" not in types


@pytest.mark.parametrize("sign", ["heartbeat", "work"])
async def test_a_sign_of_life_queued_before_the_deadline_keeps_the_worker_alive(
    db_path: str, monkeypatch: pytest.MonkeyPatch, sign: str
) -> None:
    """A heartbeat (or work: the TaskManager's WorkersSeen) sent before the worker's
    deadline counts, even when the registry, busy, takes it from its mailbox only after the
    deadline, in the batch that settles it: the worker is not declared offline (no
    ``worker.offline``, its claim not released), and it is still watched afterwards. Here the
    registry is held in a batch (a read of ``hold``) from before the deadline to after it,
    while the sign of life waits in its mailbox."""
    timeout = 1.0
    gate = hold_in_batch(monkeypatch, WorkerRegistry, GetWorker("hold")).gate
    async with runtime(db_path, worker_timeout=timeout) as rt, anyio.create_task_group() as tg:
        await rt.register_worker("w1")
        await rt.create_task("job")
        claim = await rt.claim_task("w1", "job", lease=60)  # the lease alone would hold
        assert claim is not None
        registered = anyio.current_time()  # the deadline is at most a timeout from here
        tg.start_soon(rt.get_worker, "hold")
        await anyio.wait_all_tasks_blocked()  # the registry holds
        if sign == "heartbeat":
            tg.start_soon(rt.update_worker_heartbeat, "w1")
            await anyio.wait_all_tasks_blocked()  # queued in the registry's mailbox
        else:
            assert await rt.claim_task("w1", "job") is None  # told: WorkersSeen, queued
        assert anyio.current_time() < registered + timeout, "sent too late for the test"
        await anyio.sleep(registered + timeout + 0.3 - anyio.current_time())
        gate.set()  # the deadline has passed: the next batch settles it, sign of life too
        worker = await rt.get_worker("w1")
        assert worker is not None
        assert worker.status is WorkerStatus.ACTIVE
        types = [e.type for e in await worker_events(rt, "w1")]
        assert types == ["worker.registered"]
        await rt.complete_task(claim.lease)  # LeaseLostError had its claim been released
        # Still watched: silent from here, it is declared offline a timeout later.
        renewed = anyio.current_time()

        async def offline() -> bool:
            worker = await rt.get_worker("w1")
            return worker is not None and worker.status is WorkerStatus.OFFLINE

        await wait_until(offline)
        assert anyio.current_time() - renewed < timeout + SOON / 2
        types = [e.type for e in await worker_events(rt, "w1")]
        assert types == ["worker.registered", "worker.offline"]


@pytest.mark.parametrize(
    ("sign", "room"),
    # (WorkersSeen is best effort: with the registry's mailbox full, it is not sent.)
    [("heartbeat", "queued"), ("heartbeat", "waiting for room"), ("work", "queued")],
)
async def test_a_sign_of_life_queued_behind_more_than_a_batch_keeps_the_worker_alive(
    db_path: str, monkeypatch: pytest.MonkeyPatch, sign: str, room: str
) -> None:
    """As above, with more than a batch (``max_batch`` messages) sent before the sign of
    life: the batch that finds the deadline due does not hold it, yet it was sent in time
    and counts, queued in the mailbox or, the mailbox full, its sender waiting for room.
    A silent worker beside it is declared offline by that very batch, flood or not."""
    timeout = 1.0
    flood = WorkerRegistry.max_batch + 100
    # Room for the flood and the sign of life, or for the flood alone.
    size = flood + 1 if room == "queued" else flood
    held = hold_in_batch(monkeypatch, WorkerRegistry, GetWorker("hold"))
    gate, batches = held.gate, held.batches
    async with (
        runtime(db_path, worker_timeout=timeout, mailbox_size=size) as rt,
        anyio.create_task_group() as tg,
    ):
        await rt.register_worker("w1")
        await rt.register_worker("silent")
        await rt.create_task("job")
        claim = await rt.claim_task("w1", "job", lease=60)  # the lease alone would hold
        assert claim is not None
        registered = anyio.current_time()  # both deadlines are at most a timeout from here
        tg.start_soon(rt.get_worker, "hold")
        await anyio.wait_all_tasks_blocked()  # the registry holds
        for _ in range(flood):  # what a busy registry has before it (each a no-op)
            assert rt._workers.try_tell(RegistryWake())
        if sign == "heartbeat":
            tg.start_soon(rt.update_worker_heartbeat, "w1")
        else:
            tg.start_soon(rt.claim_task, "w1", "job")  # None; told: WorkersSeen
        await anyio.wait_all_tasks_blocked()  # sent: behind the flood
        waiting = rt._workers.statistics().tasks_waiting_send
        assert waiting == (0 if room == "queued" else 1)
        assert anyio.current_time() < registered + timeout, "sent too late for the test"
        await anyio.sleep(registered + timeout + 0.3 - anyio.current_time())
        gate.set()  # both deadlines have passed: the next batch settles them
        worker = await rt.get_worker("w1")
        assert worker is not None
        assert worker.status is WorkerStatus.ACTIVE
        assert [e.type for e in await worker_events(rt, "w1")] == ["worker.registered"]
        await rt.complete_task(claim.lease)  # LeaseLostError had its claim been released
        # The first batch after the gate was full, the sign of life behind it; that batch
        # declared the silent worker offline.
        assert batches[0] == WorkerRegistry.max_batch
        silent = await rt.get_worker("silent")
        assert silent is not None
        assert silent.status is WorkerStatus.OFFLINE
        offline = [e for e in await worker_events(rt, "silent") if e.type == "worker.offline"]
        assert len(offline) == 1


async def test_a_worker_that_heartbeats_a_third_of_the_timeout_after_a_slow_answer_stays(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's time runs from the answer to its heartbeat, not from the start of the
    batch that handled it: the worker sends its next heartbeat a while after that answer
    (the agent runner: a third of ``worker_timeout``), and a commit held up (a slow fsync,
    a database backend waiting for a CPU) is the registry's delay, not the worker's. Here
    the heartbeat's commit is held 0.9 of the timeout, and the next heartbeat is sent a
    third of the timeout after its answer: the worker is never declared offline (counted
    from the batch's start, its deadline passed before that heartbeat was sent)."""
    timeout = 1.0
    stall = 0.9
    stalled = stall_commits(monkeypatch, stall)
    async with runtime(db_path, worker_timeout=timeout) as rt:
        await rt.register_worker("w1")
        stalled.on = True
        sent = anyio.current_time()
        assert await rt.update_worker_heartbeat("w1")
        answered = anyio.current_time()
        stalled.on = False
        assert answered - sent >= stall - EARLY
        await anyio.sleep(timeout / 3)  # as the runner does, from the answer
        assert anyio.current_time() < answered + timeout, "sent too late for the test"
        assert await rt.update_worker_heartbeat("w1")
        worker = await rt.get_worker("w1")
        assert worker is not None
        assert worker.status is WorkerStatus.ACTIVE
        assert [e.type for e in await worker_events(rt, "w1")] == ["worker.registered"]


async def test_an_offline_worker_that_claims_is_active_again(db_path: str) -> None:
    async with runtime(db_path, worker_timeout=0.2) as rt:
        await rt.register_worker("w1")

        async def offline() -> bool:
            worker = await rt.get_worker("w1")
            return worker is not None and worker.status is WorkerStatus.OFFLINE

        await wait_until(offline)
        assert await rt.claim_task("w1", "job") is None  # nothing to take, but alive
        worker = await rt.get_worker("w1")
        assert worker is not None
        assert worker.status is WorkerStatus.ACTIVE
        types = [e.type for e in await worker_events(rt, "w1")]
        assert types == ["worker.registered", "worker.offline", "worker.status_changed"]


async def test_an_offline_worker_that_heartbeats_is_active_again(db_path: str) -> None:
    async with runtime(db_path, worker_timeout=0.2) as rt:
        await rt.register_worker("w1")

        async def offline() -> bool:
            worker = await rt.get_worker("w1")
            return worker is not None and worker.status is WorkerStatus.OFFLINE

        await wait_until(offline)
        assert await rt.update_worker_heartbeat("w1")
        assert [w.id for w in await rt.get_active_workers()] == ["w1"]
        last = (await worker_events(rt, "w1"))[-1]
        assert last.type == "worker.status_changed"
        assert (last.data["previous"], last.data["status"]) == ("offline", "active")


async def test_a_worker_registering_again_does_not_inherit_its_old_claims(
    db_path: str,
) -> None:
    async with runtime(db_path) as rt:
        await rt.register_worker("w1")
        task_id = await rt.create_task("job")
        old = await rt.claim_task("w1", lease=60)
        assert old is not None
        await rt.register_worker("w1")  # the worker restarted
        with pytest.raises(LeaseLostError):
            await rt.heartbeat(old.lease)
        new = await rt.claim_task("w1", wait=SOON)  # after the retry backoff
        assert new is not None
        assert new.task.id == task_id
        assert new.lease.attempt == 2
        await rt.complete_task(new.lease)


async def test_unregistering_a_worker_releases_what_it_held(db_path: str) -> None:
    async with runtime(db_path) as rt:
        assert await rt.unregister_worker("ghost") is False
        await rt.register_worker("w1")
        task_id = await rt.create_task("job")
        claim = await rt.claim_task("w1", lease=60)
        assert claim is not None
        assert await rt.unregister_worker("w1") is True
        assert await rt.get_worker("w1") is None

        async def requeued() -> bool:
            task = await rt.get_task(task_id)
            return task is not None and task.status is TaskStatus.QUEUED

        await wait_until(requeued)
        types = [e.type for e in await worker_events(rt, "w1")]
        assert types == ["worker.registered", "worker.unregistered"]


async def test_workers_survive_a_reopen_and_must_heartbeat_again(db_path: str) -> None:
    async with runtime(db_path) as rt:
        saved = await rt.register_worker("w1", "deployer", ["docker"], {"a": [1, 2]})
    async with runtime(db_path, worker_timeout=0.3) as rt:
        assert await rt.get_worker("w1") == saved

        async def offline() -> bool:
            worker = await rt.get_worker("w1")
            return worker is not None and worker.status is WorkerStatus.OFFLINE

        await wait_until(offline)


# -- capability routing ------------------------------------------------------------------------


async def test_a_registered_worker_gets_only_tasks_it_can_take(db_path: str) -> None:
    async with runtime(db_path) as rt:
        await rt.register_worker("docker-box", capabilities=["docker", "deploy"])
        await rt.register_worker("py-box", capabilities=["python"])
        build = await rt.create_task("build", requires=["python"], priority=9)
        deploy = await rt.create_task("deploy", priority=5)
        ship = await rt.create_task("ship", requires=["docker", "deploy"], priority=1)
        both = await rt.create_task("mixed", requires=["docker", "python"], priority=9)
        got = []
        while (claim := await rt.claim_task("docker-box")) is not None:
            got.append(claim.task.id)
        assert got == [deploy, ship]
        claim = await rt.claim_task("py-box")
        assert claim is not None
        assert claim.task.id == build
        assert await rt.claim_task("py-box") is None
        # Nobody has both docker and python: that task is visibly stuck.
        assert [t.id for t in await rt.get_unroutable_tasks()] == [both]
        await rt.register_worker("full-box", capabilities=["docker", "python"])
        assert await rt.get_unroutable_tasks() == []
        claim = await rt.claim_task("full-box")
        assert claim is not None
        assert claim.task.id == both


async def test_unroutable_tasks_ignore_offline_workers(db_path: str) -> None:
    async with runtime(db_path) as rt:
        await rt.register_worker("gpu-box", capabilities=["gpu"])
        task_id = await rt.create_task("train", requires=["gpu"])
        assert await rt.get_unroutable_tasks() == []
        await rt.update_worker_heartbeat("gpu-box", "offline")
        assert [t.id for t in await rt.get_unroutable_tasks()] == [task_id]


async def test_a_worker_waiting_for_its_capability_is_woken(db_path: str) -> None:
    async with runtime(db_path) as rt:
        await rt.register_worker("gpu-box", capabilities=["gpu"])
        got: list[str] = []

        async def worker() -> None:
            claim = await rt.claim_task("gpu-box", wait=SOON)
            assert claim is not None
            got.append(claim.task.id)

        async with anyio.create_task_group() as tg:
            tg.start_soon(worker)
            await anyio.sleep(0.05)
            await rt.create_task("train")  # no gpu requirement, type not in its capabilities
            wanted = await rt.create_task("train", requires=["gpu"])
        assert got == [wanted]


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "field"),
    [
        (("",), {}, "worker_id"),
        ((3,), {}, "worker_id"),
        (("w1",), {"role": ""}, "role"),
        (("w1",), {"capabilities": "docker"}, "capabilities"),
        (("w1",), {"capabilities": ["ok", ""]}, "capabilities[1]"),
        (("w1",), {"capabilities": [f"c{n}" for n in range(257)]}, "capabilities"),
        (("w1",), {"metadata": {"x": math.nan}}, "metadata.x"),
        (("w1",), {"metadata": {"x": object()}}, "metadata.x"),
        (("w1",), {"metadata": ["not", "a", "dict"]}, "metadata"),
    ],
)
async def test_bad_registrations_are_refused(
    db_path: str, args: tuple[Any, ...], kwargs: dict[str, Any], field: str
) -> None:
    async with runtime(db_path) as rt:
        with pytest.raises(InvalidInputError) as caught:
            await rt.register_worker(*args, **kwargs)
        assert caught.value.field == field
        assert await rt.get_active_workers() == []


async def test_bad_heartbeats_are_refused(db_path: str) -> None:
    async with runtime(db_path) as rt:
        await rt.register_worker("w1")
        for args, field in ((("w1", "sleeping"), "status"), (("",), "worker_id")):
            with pytest.raises(InvalidInputError) as caught:
                await rt.update_worker_heartbeat(*args)
            assert caught.value.field == field
        with pytest.raises(InvalidInputError) as caught:
            await rt.create_task("job", requires=["docker", ""])
        assert caught.value.field == "requires[1]"
        worker = await rt.get_worker("w1")
        assert worker is not None
        assert worker.status is WorkerStatus.ACTIVE
