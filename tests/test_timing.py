"""Delayed tasks and expiries (docs/TIMING.md): on real SQLite files, both backends.

A delayed task (``run_at`` / ``delay``) is not handed out before its time and is handed to
a parked claim when it comes due, woken by the TaskManager's alarm; a wall clock stepped
meanwhile changes nothing; it never holds up the tasks of its queue that are ready; only
the first of many are held in memory; it survives SIGKILL. An expiring task
(``expires_at`` / ``expires_in``) is never handed out after its expiry and ends
``cancelled``, reason ``expired``, with an event.

Timing bounds: :data:`LATE` is how late after its time a task may be handed out or
expired on a loaded 2-core machine (one alarm wake-up, a batch, a commit); :data:`EARLY`
is the allowance for the test and the runtime reading the monotonic clock apart.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import msgspec
import pytest
from reliability._remote import eventually, owner

from hive_orchestration import (
    ConfigError,
    Event,
    InvalidInputError,
    OrchestrationClient,
    RateLimit,
    Runtime,
    RuntimeConfig,
    TaskStatus,
)
from hive_orchestration.actors.task_manager import TaskManager
from hive_orchestration.api import embedded as embedded_module

pytestmark = pytest.mark.anyio

LATE = 0.75
EARLY = 0.01
DELAY = 0.5
SOON = 10.0


class SteppedClock:
    """The machine's wall clock plus an offset the test moves."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


def track(monkeypatch: pytest.MonkeyPatch) -> list[TaskManager]:
    made: list[TaskManager] = []

    def build(*args: Any, **kwargs: Any) -> TaskManager:
        made.append(TaskManager(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(embedded_module, "TaskManager", build)
    return made


@asynccontextmanager
async def runtime(db_path: str, **config: Any) -> AsyncIterator[Runtime]:
    async with Runtime.open(db_path, config=RuntimeConfig(**config)) as rt:
        yield rt


async def events_of(rt: Runtime, task_id: str) -> list[Event]:
    return [e for e in await rt.read_events(0, limit=1000) if e.task_id == task_id]


# -- delayed tasks ------------------------------------------------------------------------


async def test_a_delayed_task_is_handed_to_a_waiting_claim_when_due_not_before(
    db_path: str,
) -> None:
    async with runtime(db_path) as rt:
        start = anyio.current_time()
        task_id = await rt.create_task("job", {}, delay=DELAY)
        task = await rt.get_task(task_id)
        assert task is not None
        assert task.status is TaskStatus.QUEUED
        assert task.run_at is not None
        assert await rt.claim_task("w", "job") is None  # not yet
        # Parked, not polling: the alarm wakes the TaskManager when the task is due.
        claim = await rt.claim_task("w", "job", wait=SOON)
        took = anyio.current_time() - start
        assert claim is not None
        assert claim.task.id == task_id
        assert DELAY - EARLY <= took <= DELAY + LATE
        created = [e for e in await events_of(rt, task_id) if e.type == "task.created"]
        assert created[0].data["run_at"] == task.run_at.isoformat()


async def test_run_at_is_a_time_and_a_past_one_is_ready_at_once(db_path: str) -> None:
    async with runtime(db_path) as rt:
        at = datetime.now(UTC) + timedelta(seconds=DELAY)
        later = await rt.create_task("job", {}, run_at=at)
        past = await rt.create_task("job", {}, run_at=datetime.now(UTC) - timedelta(hours=1))
        stored = await rt.get_task(later)
        assert stored is not None
        assert stored.run_at == at
        first = await rt.claim_task("w", "job")
        assert first is not None
        assert first.task.id == past
        assert first.task.run_at is None
        claim = await rt.claim_task("w", "job", wait=SOON)
        assert claim is not None
        assert claim.task.id == later
        assert datetime.now(UTC) >= at - timedelta(seconds=EARLY)
        assert claim.task.run_at is None  # cleared when it came due


async def test_a_delayed_task_does_not_hold_up_the_ready_tasks_of_its_queue(
    db_path: str,
) -> None:
    async with runtime(db_path, ready_queue_head=2) as rt:
        delayed = [await rt.create_task("job", {}, priority=9, delay=60) for _ in range(5)]
        ready = [await rt.create_task("job", {"n": n}) for n in range(5)]
        got = [c.task.id for c in await rt.claim_tasks("w", "job", limit=10)]
        assert got == ready
        assert {t.id for t in await rt.get_tasks_by_status("queued")} == set(delayed)


async def test_a_stepped_wall_clock_neither_hands_out_a_delayed_task_early_nor_late(
    db_path: str,
) -> None:
    clock = SteppedClock()
    async with Runtime.open(db_path, wall_clock=clock) as rt:
        start = anyio.current_time()
        task_id = await rt.create_task("job", {}, delay=DELAY)
        clock.offset += timedelta(hours=1)  # forward: the task must not come due now
        assert await rt.claim_task("w", "job", wait=DELAY / 5) is None
        clock.offset -= timedelta(hours=2)  # back: nor an hour late
        claim = await rt.claim_task("w", "job", wait=SOON)
        took = anyio.current_time() - start
        assert claim is not None
        assert claim.task.id == task_id
        assert DELAY - EARLY <= took <= DELAY + LATE


async def test_start_times_read_back_from_storage_ignore_a_step_of_the_wall_clock(
    db_path: str,
) -> None:
    """With a head of 1, memory holds at most 2 start times: the others are read back
    from storage after the wall clock was stepped an hour forward, and still come due
    on the monotonic clock, not at once."""
    clock = SteppedClock()
    config = RuntimeConfig(ready_queue_head=1)
    async with Runtime.open(db_path, config=config, wall_clock=clock) as rt:
        start = anyio.current_time()
        delays = [DELAY + n * 0.1 for n in range(6)]
        ids = [await rt.create_task("job", {}, delay=d) for d in delays]
        clock.offset += timedelta(hours=1)
        for _ in ids:
            claim = await rt.claim_task("w", "job", wait=SOON)
            assert claim is not None
            took = anyio.current_time() - start
            assert took >= delays[ids.index(claim.task.id)] - EARLY
        assert anyio.current_time() - start <= delays[-1] + LATE


async def test_a_clock_stepped_back_while_down_does_not_stretch_a_delay(db_path: str) -> None:
    """A stored start time becomes a deadline once, at the open: never further than the
    delay that was set (here an hour's step back would have made it an hour late)."""
    async with runtime(db_path) as rt:
        task_id = await rt.create_task("job", {}, delay=DELAY)
    clock = SteppedClock()
    clock.offset -= timedelta(hours=1)
    async with Runtime.open(db_path, wall_clock=clock) as rt:
        start = anyio.current_time()
        claim = await rt.claim_task("w", "job", wait=SOON)
        assert claim is not None
        assert claim.task.id == task_id
        assert anyio.current_time() - start <= DELAY + LATE


async def test_only_the_first_delayed_tasks_are_in_memory_and_none_comes_early(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a head of 2, memory holds at most 4 start times; the others are read from
    ``idx_tasks_delayed`` as they are needed, across a restart too."""
    managers = track(monkeypatch)
    now = datetime.now(UTC)
    # 2 s, not DELAY: on a loaded machine (PostgreSQL's run under CI's load) creating the
    # 30 took over 0.5 s once, and tasks already due are rightly taken into memory.
    times = [now + timedelta(seconds=2.0 + (n % 7) * 0.1) for n in range(30)]
    async with runtime(db_path, ready_queue_head=2) as rt:
        ids = await rt.create_tasks(
            [{"task_type": "job", "payload": {"n": n}, "run_at": times[n]} for n in range(30)]
        )
        assert len(managers[-1]._starts) <= 4
        # Those not due yet are not in memory (all 30, unless the create took 2 s).
        later = datetime.now(UTC) + timedelta(seconds=0.05)
        waiting = [task_id for task_id, at in zip(ids, times, strict=True) if at > later]
        assert waiting, "the create took past every start time: nothing was checked"
        assert not any(task_id in managers[-1]._tasks for task_id in waiting)
    async with runtime(db_path, ready_queue_head=2) as rt:
        assert len(managers[-1]._starts) <= 4
        got: list[str] = []
        while len(got) < 30:
            claim = await rt.claim_task("w", "job", wait=SOON)
            assert claim is not None
            assert datetime.now(UTC) >= times[ids.index(claim.task.id)] - timedelta(seconds=EARLY)
            got.append(claim.task.id)
            assert len(managers[-1]._starts) <= 4
        assert sorted(got) == sorted(ids)


async def test_bad_times_are_refused_naming_the_field(db_path: str) -> None:
    async with runtime(db_path) as rt:
        now = datetime.now(UTC)
        cases: list[tuple[dict[str, Any], str]] = [
            ({"run_at": now, "delay": 1}, "delay"),
            ({"run_at": datetime(2030, 1, 1)}, "run_at"),
            ({"delay": -1}, "delay"),
            ({"delay": float("nan")}, "delay"),
            ({"expires_in": 0}, "expires_in"),
            ({"expires_at": now, "expires_in": 5}, "expires_in"),
            ({"expires_at": now - timedelta(seconds=1)}, "expires_at"),
            ({"delay": 10, "expires_in": 5}, "expires_in"),
            (
                {"run_at": now + timedelta(hours=2), "expires_at": now + timedelta(hours=1)},
                "expires_at",
            ),
        ]
        for arguments, field in cases:
            with pytest.raises(InvalidInputError) as bad:
                await rt.create_task("job", {}, **arguments)
            assert bad.value.field == field, arguments
        with pytest.raises(InvalidInputError) as bad:
            await rt.create_tasks(
                [{"task_type": "job"}, {"task_type": "job", "delay": 5, "expires_in": 1}]
            )
        assert bad.value.field == "tasks[1].expires_in"
        assert await rt.get_tasks_by_status("queued") == []  # all or nothing


# -- expiry --------------------------------------------------------------------------------


async def test_an_unclaimed_task_expires_on_time_with_an_event(db_path: str) -> None:
    async with runtime(db_path) as rt:
        async with rt.subscribe("task.cancelled") as events:
            start = anyio.current_time()
            task_id = await rt.create_task("job", {}, expires_in=DELAY)
            kept = await rt.create_task("job", {})
            with anyio.fail_after(SOON):
                async for event in events:
                    if event.task_id == task_id:
                        break
        took = anyio.current_time() - start
        assert DELAY - EARLY <= took <= DELAY + LATE
        assert event.data["reason"] == "expired"
        task = await rt.get_task(task_id)
        assert task is not None
        assert task.status is TaskStatus.CANCELLED
        assert task.error is not None
        assert task.error.startswith("expired")
        claim = await rt.claim_task("w", "job")
        assert claim is not None
        assert claim.task.id == kept


async def test_a_task_past_its_expiry_is_never_handed_out(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More tasks expire at once than memory holds timers for (a head of 2): a claim in
    the batch that finds them due must still get none of them."""
    managers = track(monkeypatch)
    async with runtime(db_path, ready_queue_head=2) as rt:
        ids = await rt.create_tasks(
            [{"task_type": "job", "payload": {"n": n}, "expires_in": DELAY} for n in range(12)]
        )
        assert len(managers[-1]._expiries) <= 4
        await anyio.sleep(DELAY + EARLY)  # past the expiry: the condition is time itself
        assert await rt.claim_tasks("w", "job", limit=20) == []
        for task_id in ids:
            task = await rt.get_task(task_id)
            assert task is not None
            assert task.status is TaskStatus.CANCELLED, task


async def test_a_claimed_task_does_not_expire_but_a_requeued_one_does(db_path: str) -> None:
    async with runtime(db_path, retry_backoff=0.01, retry_backoff_max=0.02) as rt:
        task_id = await rt.create_task("job", {}, expires_in=DELAY)
        claim = await rt.claim_task("w", "job", start=True)
        assert claim is not None
        await anyio.sleep(DELAY + EARLY)
        task = await rt.get_task(task_id)
        assert task is not None
        assert task.status is TaskStatus.RUNNING
        await rt.fail_task(claim.lease, "boom")  # queued again, past its expiry
        assert await rt.claim_task("w", "job", wait=0.2) is None
        task = await rt.get_task(task_id)
        assert task is not None
        assert task.status is TaskStatus.CANCELLED


# -- durability and the socket ------------------------------------------------------------


async def test_delays_and_expiries_survive_sigkill_and_work_through_the_socket(
    db_path: str, anyio_backend: str
) -> None:
    async with (
        owner(db_path, anyio_backend) as served,
        OrchestrationClient(db_path=db_path) as client,
    ):
        # The delayed task is due 2 * DELAY after the owner took its create: no sooner
        # than ``earliest``, read before the call (a loaded machine may take a while
        # to answer it, so ``at``, read after, can be later than its due time).
        earliest = datetime.now(UTC) + timedelta(seconds=2 * DELAY)
        delayed = await client.create_task("job", {}, delay=2 * DELAY)
        at = datetime.now(UTC) + timedelta(seconds=2 * DELAY)
        [timed] = await client.create_tasks([{"task_type": "job", "run_at": at.isoformat()}])
        expiring = await client.create_task("other", {}, expires_at=at)
        stored = await client.get_task(timed)
        assert stored is not None
        assert stored.run_at == at
        assert await client.claim_task("w", "job") is None
        served.kill()
        await served.process.wait()
    async with runtime(db_path) as rt:
        start = anyio.current_time()
        got = set()
        while len(got) < 2:
            claim = await rt.claim_task("w", "job", wait=SOON)
            assert claim is not None
            # Each at its due time, not at once after the restart.
            due = earliest if claim.task.id == delayed else at
            assert datetime.now(UTC) >= due - timedelta(seconds=EARLY)
            got.add(claim.task.id)
        assert got == {delayed, timed}
        assert anyio.current_time() - start <= 2 * DELAY + LATE

        async def expired() -> bool:
            task = await rt.get_task(expiring)
            return task is not None and task.status is TaskStatus.CANCELLED

        await eventually(expired, within=SOON)
        assert await rt.claim_task("w", "other") is None


# -- rate limits ---------------------------------------------------------------------------

PER = 0.6


async def test_a_rate_limited_type_hands_out_n_per_interval_and_a_claim_waits(
    db_path: str,
) -> None:
    limits = {"email": RateLimit(starts=2, per=PER)}
    async with runtime(db_path, rate_limits=limits) as rt:
        await rt.create_tasks([{"task_type": "email", "payload": {"n": n}} for n in range(5)])
        other = await rt.create_task("build", {})
        start = anyio.current_time()
        first = await rt.claim_tasks("w", ["email", "build"], limit=10)
        # Two emails, and the build task: the limit holds the type back, not the claim.
        assert sorted(c.task.task_type for c in first) == ["build", "email", "email"]
        assert other in {c.task.id for c in first}
        assert await rt.claim_task("w", "email") is None
        # A parked claim is woken when the oldest start leaves the window.
        third = await rt.claim_task("w", "email", wait=SOON)
        took = anyio.current_time() - start
        assert third is not None
        assert PER - EARLY <= took <= PER + LATE
        fourth = await rt.claim_task("w", "email", wait=SOON)
        assert fourth is not None
        assert anyio.current_time() - start <= PER + LATE  # the second start freed too
        assert await rt.claim_task("w", "email") is None  # 2 in the last PER again


async def test_a_rate_limited_key_counts_the_claims_of_every_type_with_that_key(
    db_path: str,
) -> None:
    limits = {"api": RateLimit(starts=1, per=PER)}
    async with runtime(db_path, key_rate_limits=limits) as rt:
        a = await rt.create_task("fetch", {}, concurrency_key="api", concurrency_limit=10)
        b = await rt.create_task("push", {}, concurrency_key="api", concurrency_limit=10)
        free = await rt.create_task("fetch", {})
        got = {c.task.id for c in await rt.claim_tasks("w", ["fetch", "push"], limit=10)}
        assert len(got & {a, b}) == 1
        assert free in got
        start = anyio.current_time()
        later = await rt.claim_task("w", ["fetch", "push"], wait=SOON)
        assert later is not None
        assert later.task.id in {a, b} - got
        assert anyio.current_time() - start <= PER + LATE


async def test_the_rate_window_survives_sigkill(db_path: str, anyio_backend: str) -> None:
    """Two claims just before a SIGKILL fill the window: after the restart, the third
    still waits for the window, not a fresh one."""
    window = 4.0  # longer than a restart on a loaded machine, with room to spare
    config = {"rate_limits": {"email": {"starts": 2, "per": window}}}
    async with (
        owner(db_path, anyio_backend, **config) as served,
        OrchestrationClient(db_path=db_path) as client,
    ):
        await client.create_tasks([{"task_type": "email"} for _ in range(3)])
        start = anyio.current_time()
        assert len(await client.claim_tasks("w", "email", limit=3)) == 2
        served.kill()
        await served.process.wait()
    async with runtime(db_path, rate_limits={"email": RateLimit(starts=2, per=window)}) as rt:
        # The two claims were requeued by the recovery; the window still holds them.
        claim = await rt.claim_task("w", "email", wait=SOON)
        assert claim is not None
        assert anyio.current_time() - start >= window - EARLY


def test_rate_limits_are_checked_as_config() -> None:
    assert RuntimeConfig.from_mapping(
        {"rate_limits": {"email": {"starts": 5, "per": 1.5}}}
    ).rate_limits == {"email": RateLimit(5, 1.5)}
    for bad in ({"starts": 0, "per": 1}, {"starts": 1, "per": 0}, {"starts": 1}):
        with pytest.raises(ConfigError) as error:
            RuntimeConfig.from_mapping({"key_rate_limits": {"api": bad}})
        assert "key_rate_limits" in str(error.value)


def test_a_delayed_tasks_queue_wait_counts_from_its_start_time() -> None:
    from hive_orchestration.observe.metrics import Metrics

    metrics = Metrics(None)  # type: ignore[arg-type]  # folded by hand: no source read
    run_at = datetime.fromtimestamp(1100.0, UTC).isoformat()
    for event in (
        Event(
            seq=1,
            type="task.created",
            timestamp=1000.0,
            source="t",
            task_id="d",
            data={"task_type": "job", "run_at": run_at},
        ),
        Event(
            seq=2,
            type="task.assigned",
            timestamp=1102.0,
            source="t",
            task_id="d",
            data={"task_type": "job", "status": "assigned", "previous": "queued"},
        ),
    ):
        metrics.observe(event)
    assert metrics.queue_wait["job"].sum == 2.0  # not the 100 s it was delayed


def test_ids_made_after_advance_past_are_greater_whatever_the_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What tells a task of an earlier process (whose clock was ahead) from this one's."""
    from hive_orchestration import _ids
    from hive_orchestration._ids import advance_past, new_id

    monkeypatch.setattr(_ids, "_last", _ids._last)  # the other tests' ids stay of today
    ahead = "fffffff0-0000-7000-8000-000000000000"  # an id from a clock far ahead
    advance_past(ahead)
    made = [new_id() for _ in range(3)]
    assert made == sorted(made)
    assert made[0] > ahead
    advance_past("not an id")  # ignored
    assert new_id() > made[-1]


async def test_times_travel_as_iso_8601_text_in_json_requests(db_path: str) -> None:
    from hive_orchestration.api.wire import call_json

    async with runtime(db_path) as rt:
        at = datetime.now(UTC) + timedelta(hours=1)
        request = {"task_type": "job", "run_at": at.isoformat(), "expires_in": 7200}
        raw = await call_json(
            rt.client(), msgspec.json.encode({"op": "create_task", "args": request})
        )
        task = await rt.get_task(msgspec.json.decode(raw))
        assert task is not None
        assert task.run_at == at
        assert task.expires_at is not None
        far = datetime(9999, 12, 31, tzinfo=UTC)
        assert await rt.create_task("job", {}, run_at=far)  # no overflow anywhere
