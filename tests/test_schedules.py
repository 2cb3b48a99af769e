"""Periodic schedules (docs/SCHEDULES.md): the template, catch-up, pause/resume/delete, the
events, the clocks, daylight saving, bad input, the sync client.

The wall clock is the runtime's ``wall_clock`` (real time plus an offset the test steps),
and ``schedule_clock_check`` is short, so a step is seen at once. A batch of the Scheduler
answers its messages, then fires what is due: so two reads in a row (:func:`settle`) see
everything the first one's batch fired, with no sleep.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import msgspec
import pytest

from hive_orchestration import (
    CatchUp,
    Event,
    InvalidInputError,
    NotFoundError,
    OrchestrationClient,
    Runtime,
    RuntimeConfig,
    Schedule,
    ScheduleFiredEvent,
    SyncOrchestrationClient,
    _slots,
)
from hive_orchestration._slots import Slots
from hive_orchestration.errors import RequestTimeoutError
from hive_orchestration.messages.storage import SetScheduleSlot
from hive_orchestration.messages.tasks import CreateTasks
from hive_orchestration.runtime import ActorRef
from hive_orchestration.storage import grouping

#: Generous: only turns a hang into a failure.
DEADLINE = 30.0
CONFIG = RuntimeConfig(schedule_clock_check=0.05)


class WallClock:
    """Real time plus an offset that the test steps (forward or back)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def step(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


async def fired(client: OrchestrationClient, count: int, name: str | None = None) -> list[Event]:
    """The first ``count`` schedule.fired events (of ``name``), from the log then live."""
    found: list[Event] = []
    with anyio.fail_after(DEADLINE):
        async with client.events(after=0, pattern="schedule.fired") as stream:
            async for event in stream:
                if name is None or event.data["schedule"] == name:
                    found.append(event)
                    if len(found) == count:
                        return found
    raise AssertionError("the stream ended")


async def settle(client: OrchestrationClient, name: str) -> Schedule:
    """The schedule once the Scheduler has fired what was due when this was called."""
    await client.get_schedule(name)  # its batch fires what is due, after answering
    schedule = await client.get_schedule(name)
    assert schedule is not None
    return schedule


async def events_of(client: OrchestrationClient, pattern: str) -> list[Event]:
    return await client.read_events(after=0, pattern=pattern)


# -- firing --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_an_interval_schedule_creates_its_tasks_from_the_template(db_path: str) -> None:
    async with Runtime.open(db_path, config=CONFIG) as runtime:
        client = runtime.client(source_agent="planner", correlation_id="nightly")
        schedule = await client.create_schedule(
            "sweep",
            0.2,
            "cleanup",
            {"dir": "/tmp"},
            priority=7,
            requires=("disk",),
            tags=("ops",),
            max_retries=1,
            timeout=30.0,
            title="Sweep the disk",
        )
        assert (schedule.every, schedule.cron, schedule.fired, schedule.paused) == (
            0.2,
            None,
            0,
            False,
        )
        assert schedule.next_slot == schedule.start_at  # the first slot: one interval on
        assert schedule.source_agent == "planner"
        events = await fired(client, 3)
        slots = []
        for event in events:
            data = ScheduleFiredEvent.from_event(event)
            assert (data.schedule, data.schedule_id) == ("sweep", schedule.id)
            task = await client.get_task(data.task_id)
            assert task is not None
            assert (task.task_type, task.payload, task.priority, task.requires) == (
                "cleanup",
                {"dir": "/tmp"},
                7,
                ("disk",),
            )
            assert (task.tags, task.max_retries, task.timeout, task.title) == (
                ("ops",),
                1,
                30.0,
                "Sweep the disk",
            )
            assert (task.source_agent, task.correlation_id) == ("planner", "nightly")
            assert task.idempotency_key == f"schedule:{schedule.id}:{data.slot.isoformat()}"
            assert event.task_id == task.id
            assert event.correlation_id == "nightly"
            # The task and the event are one commit: task.created comes just before.
            created = await client.read_events(after=event.seq - 2, pattern="task.created")
            assert created[0].task_id == task.id
            assert created[0].seq == event.seq - 1
            slots.append((data.slot, data.missed))
        # Slots are start_at + k * every; a slot passed over (a busy machine) is counted
        # in the next one's ``missed``, so none is lost without a word.
        steps = [round((slot - schedule.start_at) / timedelta(seconds=0.2), 6) for slot, _ in slots]
        assert steps[0] == slots[0][1]
        for (_, missed), before, after in zip(slots[1:], steps, steps[1:], strict=False):
            assert after == before + missed + 1
        now = await settle(client, "sweep")
        assert now.fired >= 3
        assert now.last_slot is not None
        assert now.last_slot >= slots[-1][0]
        assert now.next_slot == now.last_slot + timedelta(seconds=0.2)


@pytest.mark.anyio
async def test_a_slots_task_unclaimed_past_the_templates_expires_in_ends_cancelled_expired(
    db_path: str,
) -> None:
    """With its workers down, a periodic job's tasks would pile up, one per slot;
    ``expires_in`` ends each one cancelled (reason ``expired``) that long after it was
    created (when its slot fired, not when the schedule was)."""
    # The real wall clock: a stepped one would store expires_at in the TaskManager's
    # start-time frame (docs/TIMING.md, "Clocks"), not as created_at + expires_in.
    async with Runtime.open(db_path, config=CONFIG) as runtime:
        client = runtime.client()
        schedule = await client.create_schedule("offer", 0.5, "o", expires_in=0.2)
        assert schedule.task.expires_in == 0.2
        (fire,) = await fired(client, 1, "offer")
        await client.pause_schedule("offer")
        with anyio.fail_after(DEADLINE):
            async with client.events(after=0, pattern="task.cancelled") as stream:
                async for event in stream:
                    if event.task_id == fire.data["task_id"]:
                        break
        assert event.data["reason"] == "expired"
        task = await client.get_task(str(fire.data["task_id"]))
        assert task is not None
        assert task.status == "cancelled"
        assert task.error is not None
        assert task.error.startswith("expired")
        assert task.expires_at is not None
        # From the task's creation at its slot (0.5 s or more after the schedule's).
        assert task.expires_at - task.created_at == timedelta(seconds=0.2)
        assert task.created_at >= schedule.start_at
    async with Runtime.open(db_path, config=CONFIG) as runtime:
        reread = await runtime.get_schedule("offer")
        assert reread is not None
        assert reread.task.expires_in == 0.2  # the template keeps it across a reopen


@pytest.mark.anyio
async def test_a_slots_task_frees_its_key_as_it_ends_so_retention_takes_it(
    db_path: str,
) -> None:
    """A scheduled job's tasks would pile up for ever if their slot keys were held for
    ever (retention keeps keyed tasks); the key is held while the task lives, which is
    all the Scheduler needs (a fired slot is past), so a purge and delete_on_success take
    them like any others, and the schedule does not fire that slot again."""
    wall = WallClock()
    config = msgspec.structs.replace(CONFIG, delete_on_success=("mail",))
    async with Runtime.open(db_path, config=config, wall_clock=wall) as runtime:
        await runtime.create_schedule("sweep", 0.2, "cleanup", {})
        await runtime.create_schedule("digest", 0.2, "mail", {})
        (sweep,) = await fired(runtime.client(), 1, "sweep")
        (digest,) = await fired(runtime.client(), 1, "digest")
        await runtime.pause_schedule("sweep")
        await runtime.pause_schedule("digest")
        for task_type in ("cleanup", "mail"):
            claim = await runtime.claim_task("w1", task_type, start=True)
            assert claim is not None
            assert claim.task.idempotency_scope == "active"
            await runtime.complete_task(claim.lease)
        assert await runtime.get_task(str(digest.task_id)) is None  # deleted on success
        wall.step(3600)
        assert await runtime.purge_tasks(1800, task_type="cleanup") >= 1
        assert await runtime.get_task(str(sweep.task_id)) is None
        fired_before = (await settle(runtime.client(), "sweep")).fired
        assert (await settle(runtime.client(), "sweep")).fired == fired_before


@pytest.mark.anyio
async def test_a_cron_schedule_fires_on_its_whole_seconds_in_its_time_zone(
    db_path: str,
) -> None:
    async with Runtime.open(db_path, config=CONFIG) as runtime:
        client = runtime.client()
        schedule = await client.create_schedule(
            "every-second", "* * * * * *", "tick", timezone="America/New_York"
        )
        assert schedule.timezone == "America/New_York"
        assert schedule.next_slot is not None
        assert schedule.next_slot.microsecond == 0
        events = await fired(client, 2)
        slots = [ScheduleFiredEvent.from_event(event).slot for event in events]
        assert all(slot.microsecond == 0 for slot in slots)
        assert slots[1] > slots[0]


@pytest.mark.anyio
async def test_pause_resume_and_delete_each_publish_an_event_and_pausing_stops_firing(
    db_path: str,
) -> None:
    clock = WallClock()
    async with Runtime.open(db_path, config=CONFIG, wall_clock=clock) as runtime:
        client = runtime.client(source_agent="ops")
        schedule = await client.create_schedule("hourly", 60.0, "report", grace=30.0)
        clock.step(61)
        assert (await settle(client, "hourly")).fired == 1
        paused = await client.pause_schedule("hourly")
        assert paused.paused
        assert paused.next_slot is None
        assert (await client.pause_schedule("hourly")).paused  # again: no change, no event
        clock.step(600)  # ten slots pass while it is paused
        assert (await settle(client, "hourly")).fired == 1
        resumed = await client.resume_schedule("hourly")
        assert not resumed.paused
        assert resumed.next_slot is not None
        assert resumed.next_slot > clock() - timedelta(seconds=1)
        # What passed while it was paused never fires, not even once.
        assert (await settle(client, "hourly")).fired == 1
        clock.step(61)
        after = await settle(client, "hourly")
        assert after.fired == 2
        (event,) = [e for e in await fired(client, 2) if e.task_id == after.last_task_id]
        assert ScheduleFiredEvent.from_event(event).missed == 0
        assert await client.delete_schedule("hourly")
        assert not await client.delete_schedule("hourly")
        assert await client.get_schedule("hourly") is None
        assert await client.list_schedules() == []
        with pytest.raises(NotFoundError):
            await client.pause_schedule("hourly")
        # Its tasks stay.
        assert await client.get_task(after.last_task_id or "") is not None
        changes = await events_of(client, "schedule.*")
        kinds = [e.type for e in changes if e.type != "schedule.fired"]
        assert kinds == [
            "schedule.created",
            "schedule.paused",
            "schedule.resumed",
            "schedule.deleted",
        ]
        assert all(e.source == "ops" and e.data["schedule_id"] == schedule.id for e in changes)


@pytest.mark.anyio
async def test_slots_missed_while_down_fire_once_or_are_skipped(db_path: str) -> None:
    clock = WallClock()
    async with Runtime.open(db_path, config=CONFIG, wall_clock=clock) as runtime:
        client = runtime.client()
        once = await client.create_schedule("once", 60.0, "a", grace=20.0)
        skip = await client.create_schedule("skip", 60.0, "b", grace=20.0, catch_up="skip")
        assert (once.catch_up, skip.catch_up) == (CatchUp.ONCE, CatchUp.SKIP)
    # Down for ten slots and 40 s: the latest slot is 40 s late, past its 20 s grace.
    clock.step(640)
    async with Runtime.open(db_path, config=CONFIG, wall_clock=clock) as runtime:
        client = runtime.client()
        (event,) = await fired(client, 1)
        data = ScheduleFiredEvent.from_event(event)
        assert data.schedule == "once"
        assert data.slot == once.start_at + timedelta(seconds=540)  # the latest of ten
        assert (data.catch_up, data.missed) == (True, 9)
        assert 39 < data.late < 40 + DEADLINE
        skipped = await settle(client, "skip")
        assert skipped.fired == 0
        (record,) = await events_of(client, "schedule.skipped")
        assert record.data["schedule"] == "skip"
        assert record.data["missed"] == 10
        assert await client.list_tasks(task_type="b") == []
        # The next slot of each fires on time.
        clock.step(25)
        for name, fired_before in (("once", 1), ("skip", 0)):
            schedule = await settle(client, name)
            assert schedule.fired == fired_before + 1, name
        late = [ScheduleFiredEvent.from_event(e) for e in await fired(client, 3)]
        assert [(e.catch_up, e.missed) for e in late[1:]] == [(False, 0), (False, 0)]


@pytest.mark.anyio
async def test_a_clock_stepped_back_fires_nothing_twice_and_one_stepped_forward_catches_up(
    db_path: str,
) -> None:
    clock = WallClock()
    async with Runtime.open(db_path, config=CONFIG, wall_clock=clock) as runtime:
        client = runtime.client()
        schedule = await client.create_schedule("minutely", 60.0, "m", grace=20.0)
        clock.step(61)
        first = await settle(client, "minutely")
        assert first.fired == 1
        assert first.last_slot == schedule.start_at
        clock.step(-300)  # back five minutes: the slot fired stays fired
        back = await settle(client, "minutely")
        assert (back.fired, back.last_slot) == (1, schedule.start_at)
        assert back.next_slot == schedule.start_at + timedelta(seconds=60)
        clock.step(300 + 60)  # forward again, to the next slot
        assert (await settle(client, "minutely")).fired == 2
        clock.step(3600 + 30)  # an hour at once: one catch-up (30 s late), the rest counted
        stepped = await settle(client, "minutely")
        assert stepped.fired == 3
        data = ScheduleFiredEvent.from_event((await fired(client, 3))[-1])
        assert data.catch_up
        assert data.missed == 59
        tasks = await client.list_tasks(task_type="m")
        assert len(tasks) == 3
        assert len({task.idempotency_key for task in tasks}) == 3


@pytest.mark.anyio
async def test_replace_redefines_a_schedule_and_keeps_what_it_fired(db_path: str) -> None:
    clock = WallClock()
    async with Runtime.open(db_path, config=CONFIG, wall_clock=clock) as runtime:
        client = runtime.client()
        first = await client.create_schedule("r", 60.0, "old")
        clock.step(61)
        assert (await settle(client, "r")).fired == 1
        with pytest.raises(InvalidInputError) as info:
            await client.create_schedule("r", 30.0, "new")
        assert info.value.field == "name"
        redefined = await client.create_schedule("r", 30.0, "new", replace=True)
        assert (redefined.id, redefined.fired, redefined.task.task_type) == (first.id, 1, "new")
        assert redefined.last_slot == first.start_at
        (updated,) = await events_of(client, "schedule.updated")
        assert updated.data["every"] == 30.0
    async with Runtime.open(db_path, config=CONFIG, wall_clock=clock) as runtime:
        (kept,) = await runtime.client().list_schedules()
        assert (kept.id, kept.fired, kept.every, kept.last_slot) == (
            first.id,
            1,
            30.0,
            first.start_at,
        )


@pytest.mark.anyio
async def test_a_slot_whose_commit_failed_fires_once_when_storage_works_again(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first write that advances a schedule fails (as a full disk would): the task
    # written with it is rolled back too, and the Scheduler tries the slot again.
    original = grouping.schedule_statement
    failed: list[SetScheduleSlot] = []

    def flaky(op: Any) -> tuple[str, tuple[object, ...]]:
        if isinstance(op, SetScheduleSlot) and not failed:
            failed.append(op)
            return ("INSERT INTO no_such_table VALUES (1)", ())
        return original(op)

    monkeypatch.setattr(grouping, "schedule_statement", flaky)
    clock = WallClock()
    async with Runtime.open(db_path, config=CONFIG, wall_clock=clock) as runtime:
        client = runtime.client()
        schedule = await client.create_schedule("flaky", 60.0, "f")
        clock.step(61)
        (event,) = await fired(client, 1)
        data = ScheduleFiredEvent.from_event(event)
        assert failed  # the first try failed...
        assert data.slot == failed[0].slot == schedule.start_at  # ...and the slot fired after
        assert data.missed == 0
        tasks = await client.list_tasks(task_type="f")
        assert [task.id for task in tasks] == [data.task_id]
        assert (await settle(client, "flaky")).fired == 1


@pytest.mark.anyio
async def test_a_slot_whose_fire_outcome_was_lost_fires_once_after_its_task_ended(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The TaskManager commits the slot's task and the schedule's advance, but the
    # Scheduler's ask fails after that (its reply lost past a deadline): the Scheduler does
    # not know the slot fired. The task then ends, freeing its idempotency key (scope
    # "active"), so the key cannot stop a second task: only reading the schedules back can.
    original = ActorRef.ask
    ended = anyio.Event()
    failed = anyio.Event()
    failed_at: list[float] = []

    async def lose_the_first_reply(
        self: ActorRef[Any],
        message: Any,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the wrapped ask's own
    ) -> Any:
        reply = await original(self, message, timeout=timeout)
        if isinstance(message, CreateTasks) and not failed.is_set():
            # Held until the task has ended, so the Scheduler learns of the failure only
            # when the key no longer guards the slot.
            await ended.wait()
            failed_at.append(anyio.current_time())
            failed.set()
            raise RequestTimeoutError(self.name, type(message).__name__, 5.0)
        return reply

    monkeypatch.setattr(ActorRef, "ask", lose_the_first_reply)
    clock = WallClock()
    async with Runtime.open(db_path, config=CONFIG, wall_clock=clock) as runtime:
        client = runtime.client()
        schedule = await client.create_schedule("lost", 60.0, "l")
        clock.step(61)
        (event,) = await fired(client, 1, "lost")
        claim = await runtime.claim_task("w1", "l", start=True)
        assert claim is not None
        assert claim.task.id == event.data["task_id"]
        await runtime.complete_task(claim.lease)
        ended.set()
        with anyio.fail_after(DEADLINE):
            await failed.wait()
        # The Scheduler holds a failed slot back for its retry_after (1 s by default) from
        # before the ask; past that, a Scheduler that had not read the schedules back would
        # fire the slot again in the batch that settle() wakes (its next slot is 60 s on).
        await anyio.sleep_until(failed_at[0] + 1.0)
        settled = await settle(client, "lost")
        assert (settled.fired, settled.last_slot) == (1, schedule.start_at)
        assert settled.last_task_id == event.data["task_id"]
        assert [task.id for task in await client.list_tasks(task_type="l")] == [
            event.data["task_id"]
        ]
        assert len(await events_of(client, "schedule.fired")) == 1


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_bad_input_is_refused_naming_the_field_and_nothing_is_written(
    db_path: str,
) -> None:
    async with Runtime.open(db_path, config=CONFIG) as runtime:
        client = runtime.client()
        cases: list[tuple[object, dict[str, object], str]] = [
            (None, {}, "when"),  # neither a cron expression nor an interval
            (True, {}, "when"),  # a bool is no number of seconds
            ("61 * * * *", {}, "when"),
            ("0 0 30 2 *", {}, "when"),  # never (February 30th)
            ("", {}, "when"),
            ("* * * * *", {"timezone": "Mars/Olympus"}, "timezone"),
            ("* * * * *", {"timezone": "x" * 5000}, "timezone"),
            (60.0, {"timezone": "Europe/Paris"}, "timezone"),
            (0.01, {}, "when"),
            (float("nan"), {}, "when"),
            (60.0, {"grace": -1.0}, "grace"),
            (60.0, {"grace": 0.5}, "grace"),  # every slot would be late
            (60.0, {"catch_up": "all"}, "catch_up"),
            (60.0, {"priority": -1}, "priority"),
            (60.0, {"payload": {"x": {1, 2}}}, "payload.x"),
            (60.0, {"start_at": datetime(2030, 1, 1)}, "start_at"),  # naive
            (60.0, {"expires_in": 0.0}, "expires_in"),
            (60.0, {"expires_in": -1.0}, "expires_in"),
            (60.0, {"expires_in": float("nan")}, "expires_in"),
            (60.0, {"expires_in": "soon"}, "expires_in"),
            (60.0, {"name": ""}, "name"),
        ]
        for when, arguments, field in cases:
            name = arguments.pop("name", "s")
            with pytest.raises(InvalidInputError) as info:
                await client.create_schedule(name, when, "t", **arguments)  # type: ignore[arg-type]
            assert info.value.field == field, (when, arguments, info.value)
        assert await client.list_schedules() == []
        assert await events_of(client, "schedule.*") == []


@pytest.mark.anyio
async def test_a_cron_schedule_without_the_extra_says_which_extra_to_install(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _slots._cronsim.cache_clear()
    monkeypatch.setitem(sys.modules, "cronsim", None)  # import cronsim: ImportError
    try:
        async with Runtime.open(db_path, config=CONFIG) as runtime:
            client = runtime.client()
            with pytest.raises(InvalidInputError) as info:
                await client.create_schedule("c", "0 3 * * *", "t")
            assert info.value.field == "when"
            assert "hive-orchestration[cron]" in info.value.reason
            # Interval schedules need no extra.
            assert (await client.create_schedule("i", 60.0, "t")).every == 60.0
    finally:
        monkeypatch.undo()
        _slots._cronsim.cache_clear()


# -- the sync client -----------------------------------------------------------------------


def test_the_sync_client_manages_schedules(db_path: str) -> None:
    with SyncOrchestrationClient(db_path=db_path, source_agent="cron-app") as client:
        created = client.create_schedule("nightly", "0 3 * * *", "backup", timezone="UTC")
        assert created.next_slot is not None
        assert created.next_slot.hour == 3
        assert [s.name for s in client.list_schedules()] == ["nightly"]
        assert client.pause_schedule("nightly").paused
        assert not client.resume_schedule("nightly").paused
        got = client.get_schedule("nightly")
        assert got is not None
        assert got.source_agent == "cron-app"
        assert client.delete_schedule("nightly")


# -- the slot arithmetic -------------------------------------------------------------------

PARIS = ZoneInfo("Europe/Paris")


def _paris(*args: int, fold: int = 0) -> datetime:
    return datetime(*args, tzinfo=PARIS, fold=fold).astimezone(UTC)


def _walk(slots: Slots, start: datetime, count: int) -> Iterator[datetime]:
    at = start
    for _ in range(count):
        upcoming = slots.next_after(at)
        assert upcoming is not None
        yield upcoming
        at = upcoming


def _cron(expression: str, zone: str = "Europe/Paris") -> Slots:
    return Slots(cron=expression, timezone=zone, every=None, start_at=datetime.now(UTC))


def test_a_fixed_time_skipped_by_spring_daylight_saving_fires_just_after_the_gap() -> None:
    # 2026-03-29 in Paris: 02:00 jumps to 03:00; 02:30 does not exist that day.
    slots = list(_walk(_cron("30 2 * * *"), _paris(2026, 3, 27, 12, 0), 3))
    assert slots == [
        _paris(2026, 3, 28, 2, 30),
        _paris(2026, 3, 29, 3, 0),
        _paris(2026, 3, 30, 2, 30),
    ]


def test_a_fixed_time_repeated_by_autumn_daylight_saving_fires_once() -> None:
    # 2026-10-25 in Paris: 03:00 goes back to 02:00; 02:30 happens twice, fires once.
    slots = list(_walk(_cron("30 2 * * *"), _paris(2026, 10, 24, 12, 0), 2))
    assert slots == [_paris(2026, 10, 25, 2, 30), _paris(2026, 10, 26, 2, 30)]
    # Asked from inside the repeated hour (after its first 02:30): the next day's.
    inside = _paris(2026, 10, 25, 2, 10, fold=1)
    assert _cron("30 2 * * *").next_after(inside) == _paris(2026, 10, 26, 2, 30)


def test_a_wildcard_hour_follows_elapsed_time_across_daylight_saving() -> None:
    autumn = list(_walk(_cron("0 * * * *"), _paris(2026, 10, 25, 1, 30), 3))
    # 02:00 twice (summer, then winter time), an hour apart, then 03:00.
    assert [b - a for a, b in itertools.pairwise(autumn)] == [timedelta(hours=1)] * 2
    assert autumn[0] == _paris(2026, 10, 25, 2, 0)
    spring = list(_walk(_cron("0 * * * *"), _paris(2026, 3, 29, 0, 30), 2))
    assert spring == [_paris(2026, 3, 29, 1, 0), _paris(2026, 3, 29, 3, 0)]  # no 02:00


def test_interval_slots_are_exact_and_due_counts_what_passed() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    slots = Slots(cron=None, timezone="UTC", every=0.1, start_at=start)
    walked = list(_walk(slots, start - timedelta(microseconds=1), 1000))
    assert walked[0] == start
    assert walked[-1] == start + timedelta(seconds=99.9)  # no drift over 1000 steps
    latest, count = slots.due(start, start + timedelta(seconds=1.05))
    assert (latest, count) == (start + timedelta(seconds=1), 10)
    assert slots.due(start, start) == (None, 0)


def test_a_long_downtime_of_a_frequent_cron_finds_the_latest_slot_quickly() -> None:
    slots = _cron("* * * * *", "UTC")
    after = datetime(2026, 1, 1, tzinfo=UTC)
    now = after + timedelta(days=30, seconds=30)
    latest, count = slots.due(after, now)
    assert latest == after + timedelta(days=30)
    assert count == 1000  # counted up to 1000, then "at least"
