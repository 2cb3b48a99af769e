"""The Scheduler actor: the one owner of the periodic schedules.

Every schedule is in memory (they are few: one per kind of recurring job, not one per
task) and in the ``schedules`` table. A schedule's *slots* are the instants its cron
expression (in its time zone) or its fixed interval names (:mod:`hive_orchestration._slots`);
each slot fires at most once, by creating one task from the schedule's template.

Tasks are the TaskManager's: a slot's task is created by a :class:`CreateTasks` message to
it, like anyone's, and the message carries the slot (:class:`ScheduleSlot`). The
TaskManager writes the task, the schedule's advance to that slot and the
``schedule.fired`` event in ONE transaction, so a crash (SIGKILL included) at any moment
leaves the slot either fired and recorded, or neither: it can never fire twice, nor be
lost. The task's idempotency key, ``schedule:<schedule id>:<slot>``, held while the task
lives, guards the case where this actor does not learn the outcome (the ask failed after
the write may have landed): it reads the schedules back before it fires anything again
(a slot that did fire is then past), and a repeated ask meanwhile creates nothing.

Catch-up. When this actor looks (at start-up, and when its alarm wakes it), the slots
that passed since the schedule's last fired slot are *due*. Only the latest of them can
fire; the earlier ones are passed over, counted in the event (``missed``). If the latest
is more than ``grace`` seconds late, it was missed too: ``catch_up="once"`` (default)
fires it anyway (``catch_up: true`` in the event), ``catch_up="skip"`` fires nothing and
writes ``schedule.skipped``. That covers a runtime that was down, a paused schedule
(resuming sets ``not_before`` to now: what passed while paused never fires), a commit that
failed (retried after ``retry_after`` seconds), and a wall clock stepped forward.

Clocks. Slots are wall-clock instants by nature, and the alarm runs on the monotonic
clock, which no one steps: the alarm is aimed at the next slot's wall time as the
difference from the wall clock now, and never further than ``clock_check`` seconds
ahead, so that a wall clock stepped meanwhile is seen within that time (a wake-up that
finds nothing due reads the clock and sleeps again: no storage, no polling). A clock
stepped forward makes the slots it jumps over due at once (the catch-up policy decides);
a clock stepped back fires nothing again (slots are fired by identity, after the last
one fired) and the next slot simply comes later by the step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import anyio
import msgspec

from .._ids import new_id
from .._slots import Slots, floor_of
from ..errors import HiveError, InvalidInputError, NotFoundError, StorageError
from ..messages.events import Event, JsonValue
from ..messages.leader import Leading
from ..messages.schedules import (
    CatchUp,
    CreateSchedule,
    DeleteSchedule,
    GetSchedule,
    ListSchedules,
    PauseSchedule,
    ResumeSchedule,
    Schedule,
    SchedulerMessage,
    SchedulerWake,
)
from ..messages.storage import (
    AppendEvent,
    DeleteScheduleRow,
    LoadSchedules,
    PutSchedule,
    StorageMessage,
    Write,
    WriteOp,
)
from ..messages.tasks import CreateTask, CreateTasks, ScheduleSlot, TaskManagerMessage
from ..runtime import Actor, ActorRef, Alarm, Envelope

__all__ = ["Scheduler", "slot_key"]

log = logging.getLogger("hive_orchestration.scheduler")

#: Seconds between the leader's reads of the schedules (other nodes change them too).
_RELOAD = 1.0
_TICK = timedelta(microseconds=1)
#: Most slots fired in one ask of the TaskManager (one transaction).
_FIRE_CHUNK = 256


def slot_key(schedule_id: str, slot: datetime) -> str:
    """The idempotency key of a slot's task."""
    return f"schedule:{schedule_id}:{slot.astimezone(UTC).isoformat()}"


class Scheduler(Actor[SchedulerMessage]):
    max_batch = 64

    def __init__(
        self,
        storage: ActorRef[StorageMessage],
        tasks: ActorRef[TaskManagerMessage],
        *,
        alarm: Alarm[SchedulerMessage] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = anyio.current_time,
        clock_check: float = 60.0,
        retry_after: float = 1.0,
        leads: bool = True,
    ) -> None:
        self._storage = storage
        self._tasks = tasks
        self._alarm = alarm
        self._clock = clock
        self._monotonic = monotonic
        self._clock_check = clock_check
        self._retry_after = retry_after
        # On a database several nodes share (``leads`` False until told otherwise), slots
        # fire on the leader only (messages/leader.py's Leading): memory is read back as
        # the role is taken, and again every _RELOAD seconds while it is held, so that
        # schedules made or changed on other nodes fire here.
        self._leading = leads
        self._reload_at = 0.0
        self._schedules: dict[str, Schedule] = {}
        #: By schedule id; None: its slots cannot be worked out here (see _slots_of).
        self._slots: dict[str, Slots | None] = {}
        #: By schedule id: its next slot after the floor it was worked out from.
        self._next: dict[str, tuple[datetime, datetime | None]] = {}
        #: By schedule id: no slot of it is tried again before this monotonic time.
        self._retry: dict[str, float] = {}
        # A fire whose outcome was not learnt: memory may be behind storage, and nothing
        # fires again until the schedules are read back (a slot's task frees its key as it
        # ends, so the key alone cannot stop a second firing of an ended slot).
        self._stale = False

    async def started(self) -> None:
        await self._load()
        log.info("scheduler: %d schedule(s)", len(self._schedules))
        if self._alarm is not None:
            # What fell due while the runtime was down fires in the first batch.
            self._alarm.set(self._monotonic())

    async def _load(self) -> None:
        schedules = await self._storage.ask(LoadSchedules())
        self._schedules = {schedule.name: schedule for schedule in schedules}
        self._slots = {schedule.id: _slots_of(schedule) for schedule in schedules}
        self._next.clear()

    async def receive_batch(self, batch: Sequence[Envelope[SchedulerMessage]]) -> None:
        for envelope in batch:
            envelope.started = True
            try:
                outcome = await self._handle(envelope.message)
            except HiveError as exc:
                envelope.fail(exc)
            else:
                envelope.resolve(outcome)
        await self._fire_due()
        self._arm()

    async def _handle(self, message: SchedulerMessage) -> object:
        match message:
            case CreateSchedule():
                return await self._create(message)
            case GetSchedule(name=name):
                schedule = self._schedules.get(name)
                return None if schedule is None else self._shown(schedule)
            case ListSchedules():
                return [self._shown(self._schedules[name]) for name in sorted(self._schedules)]
            case PauseSchedule(name=name, source_agent=source):
                return await self._set_paused(name, True, source)
            case ResumeSchedule(name=name, source_agent=source):
                return await self._set_paused(name, False, source)
            case DeleteSchedule(name=name, source_agent=source):
                return await self._delete(name, source)
            case SchedulerWake():
                return None  # what is due fires after the batch
            case Leading(epoch=epoch):
                mono = self._monotonic()
                if epoch is not None and (not self._leading or mono >= self._reload_at):
                    await self._load()
                    self._reload_at = mono + _RELOAD
                self._leading = epoch is not None
                return None
        raise HiveError(f"the scheduler does not handle {type(message).__name__}")

    # -- changes -----------------------------------------------------------------------------

    async def _create(self, message: CreateSchedule) -> Schedule:
        now = self._clock()
        existing = self._schedules.get(message.name)
        if existing is not None and not message.replace:
            raise InvalidInputError(
                "name",
                f"a schedule named {message.name!r} exists: pick another name, delete it"
                " first, or pass replace=True to redefine it",
            )
        if message.start_at is not None:
            start = message.start_at
        elif message.every is not None:
            start = now + timedelta(seconds=message.every)  # the first slot: one interval on
        else:
            start = now
        schedule = Schedule(
            name=message.name,
            id=new_id() if existing is None else existing.id,
            task=message.task,
            cron=message.cron,
            timezone=message.timezone,
            every=message.every,
            start_at=start,
            catch_up=message.catch_up,
            grace=message.grace,
            paused=message.paused,
            # A start in the past anchors an interval's phase; it fires nothing before now.
            not_before=max(start, now),
            last_slot=None if existing is None else existing.last_slot,
            last_task_id=None if existing is None else existing.last_task_id,
            fired=0 if existing is None else existing.fired,
            source_agent=message.source_agent if existing is None else existing.source_agent,
            created_at=now if existing is None else existing.created_at,
            updated_at=now,
        )
        slots = _slots_of(schedule, strict=True)
        data: dict[str, JsonValue] = {
            "task_type": schedule.task.task_type,
            "cron": schedule.cron,
            "timezone": schedule.timezone,
            "every": schedule.every,
            "catch_up": schedule.catch_up.value,
            "paused": schedule.paused,
        }
        kind = "schedule.created" if existing is None else "schedule.updated"
        await self._write(
            [PutSchedule(schedule), _event(kind, schedule, now, message.source_agent, data)]
        )
        self._schedules[schedule.name] = schedule
        self._slots[schedule.id] = slots
        self._next.pop(schedule.id, None)
        self._retry.pop(schedule.id, None)
        return self._shown(schedule)

    async def _set_paused(self, name: str, paused: bool, source: str | None) -> Schedule:
        schedule = self._schedules.get(name)
        if schedule is None:
            raise NotFoundError("schedule", name)
        if schedule.paused is paused:
            return self._shown(schedule)  # already so: nothing to write or publish
        now = self._clock()
        changed = msgspec.structs.replace(schedule, paused=paused, updated_at=now)
        if not paused:
            # What passed while it was paused never fires: slots count from now.
            changed = msgspec.structs.replace(changed, not_before=now)
        kind = "schedule.paused" if paused else "schedule.resumed"
        await self._write([PutSchedule(changed), _event(kind, changed, now, source, {})])
        self._schedules[name] = changed
        self._next.pop(changed.id, None)
        return self._shown(changed)

    async def _delete(self, name: str, source: str | None) -> bool:
        schedule = self._schedules.get(name)
        if schedule is None:
            return False
        now = self._clock()
        data: dict[str, JsonValue] = {"fired": schedule.fired}
        await self._write(
            [
                DeleteScheduleRow(schedule.id),
                _event("schedule.deleted", schedule, now, source, data),
            ]
        )
        del self._schedules[name]
        self._slots.pop(schedule.id, None)
        self._next.pop(schedule.id, None)
        self._retry.pop(schedule.id, None)
        return True

    async def _write(self, ops: list[WriteOp]) -> None:
        """Commit ``ops``; memory changes only after (a StorageError: nothing did)."""
        await self._storage.ask(Write(tuple(ops)))

    # -- firing ------------------------------------------------------------------------------

    async def _reload(self) -> bool:
        """Read the schedules back after a fire whose outcome is unknown; False: not yet."""
        try:
            await self._load()
        except HiveError as reload_error:
            log.warning("could not reload the schedules: %s", reload_error)
            return False
        self._stale = False
        return True

    async def _fire_due(self) -> None:
        if not self._leading:
            return  # another node leads: its scheduler fires
        if self._stale and not await self._reload():
            return  # the retry times stand: the alarm comes back
        now = self._clock()
        mono = self._monotonic()
        fires: list[tuple[Schedule, datetime, CreateTask]] = []
        skips: list[tuple[Schedule, datetime, int]] = []
        for schedule in self._schedules.values():
            slots = self._slots.get(schedule.id)
            if schedule.paused or slots is None or self._retry.get(schedule.id, -math.inf) > mono:
                continue
            upcoming = self._next_slot(schedule)
            if upcoming is None or upcoming > now:
                continue
            try:
                latest, count = slots.due(floor_of(schedule.not_before, schedule.last_slot), now)
            except (ArithmeticError, ValueError) as exc:  # a date out of range: that one only
                log.error("schedule %s: its due slots cannot be worked out: %s", schedule.name, exc)
                continue
            if latest is None:
                continue
            late = (now - latest).total_seconds()
            missed = late > schedule.grace
            if missed and schedule.catch_up is CatchUp.SKIP:
                skips.append((schedule, latest, count))
                continue
            data: dict[str, JsonValue] = {
                "schedule": schedule.name,
                "schedule_id": schedule.id,
                "slot": latest.isoformat(),
                "late": round(late, 6),
                # Fired although past its grace: the catch-up of a missed slot.
                "catch_up": missed,
                # Earlier due slots passed over for this one (they never fire).
                "missed": count - 1,
                "task_type": schedule.task.task_type,
            }
            slot = ScheduleSlot(
                schedule_id=schedule.id,
                name=schedule.name,
                slot=latest,
                data=data,
                source_agent=schedule.source_agent,
            )
            create = msgspec.structs.replace(
                schedule.task,
                idempotency_key=slot_key(schedule.id, latest),
                # Held while the task lives (a repeated ask in that time creates nothing);
                # once it ended, the schedule's last slot is past it. So retention may
                # purge the tasks a schedule made, as any others.
                idempotency_scope="active",
                schedule=slot,
            )
            fires.append((schedule, latest, create))
        if skips:
            await self._skip(skips, now, mono)
        for start in range(0, len(fires), _FIRE_CHUNK):
            await self._fire(fires[start : start + _FIRE_CHUNK], now, mono)

    async def _fire(
        self, fires: list[tuple[Schedule, datetime, CreateTask]], now: datetime, mono: float
    ) -> None:
        try:
            task_ids = await self._tasks.ask(CreateTasks(tuple(create for _, _, create in fires)))
        except HiveError as exc:
            log.warning(
                "could not fire %d schedule slot(s) (%s); trying again in %gs",
                len(fires),
                exc,
                self._retry_after,
            )
            for schedule, _, _ in fires:
                self._retry[schedule.id] = mono + self._retry_after
            if not isinstance(exc, StorageError):
                # The write may have landed: learn what was committed before trying again
                # (a slot that did fire is then past).
                self._stale = True
                await self._reload()
            return
        for (schedule, latest, _), task_id in zip(fires, task_ids, strict=True):
            fired = msgspec.structs.replace(
                schedule,
                last_slot=latest,
                last_task_id=task_id,
                fired=schedule.fired + 1,
                updated_at=now,
            )
            self._schedules[schedule.name] = fired
            self._retry.pop(schedule.id, None)
            log.info("schedule %s fired slot %s: task %s", schedule.name, latest, task_id)

    async def _skip(
        self, skips: list[tuple[Schedule, datetime, int]], now: datetime, mono: float
    ) -> None:
        """catch_up="skip": the missed slots are passed over for good (``not_before``
        moves past them), with a ``schedule.skipped`` event each schedule."""
        ops: list[WriteOp] = []
        changed: list[Schedule] = []
        for schedule, latest, count in skips:
            moved = msgspec.structs.replace(schedule, not_before=latest + _TICK, updated_at=now)
            data: dict[str, JsonValue] = {
                "slot": latest.isoformat(),
                "missed": count,
                "late": round((now - latest).total_seconds(), 6),
                "grace": schedule.grace,
            }
            ops += [PutSchedule(moved), _event("schedule.skipped", moved, now, None, data)]
            changed.append(moved)
        try:
            await self._write(ops)
        except HiveError as exc:
            log.warning("could not record %d skipped slot(s): %s", len(skips), exc)
            for schedule, _, _ in skips:
                self._retry[schedule.id] = mono + self._retry_after
            return
        for moved in changed:
            self._schedules[moved.name] = moved

    # -- reads and the alarm -----------------------------------------------------------------

    def _next_slot(self, schedule: Schedule) -> datetime | None:
        """The first slot after the schedule's floor (its last fired slot, or just
        before ``not_before``), worked out once per floor."""
        slots = self._slots.get(schedule.id)
        if slots is None:
            return None
        floor = floor_of(schedule.not_before, schedule.last_slot)
        known = self._next.get(schedule.id)
        if known is not None and known[0] == floor:
            return known[1]
        try:
            upcoming = slots.next_after(floor)
        except (ArithmeticError, ValueError) as exc:
            # A date out of range (year 9999) stops this schedule, not the scheduler.
            log.error("schedule %s: its next slot cannot be worked out: %s", schedule.name, exc)
            upcoming = None
        self._next[schedule.id] = (floor, upcoming)
        return upcoming

    def _shown(self, schedule: Schedule) -> Schedule:
        upcoming = None if schedule.paused else self._next_slot(schedule)
        return msgspec.structs.replace(schedule, next_slot=upcoming)

    def _arm(self) -> None:
        if self._alarm is None:
            return
        now = self._clock()
        mono = self._monotonic()
        wake: float | None = None
        for schedule in self._schedules.values():
            if schedule.paused:
                continue
            upcoming = self._next_slot(schedule)
            if upcoming is None:
                continue
            delay = max(0.0, (upcoming - now).total_seconds())
            at = mono + min(delay, self._clock_check)
            retry = self._retry.get(schedule.id)
            if retry is not None:
                at = max(at, retry)
            wake = at if wake is None else min(wake, at)
        if wake != self._alarm.at:
            self._alarm.set(wake)


def _slots_of(schedule: Schedule, *, strict: bool = False) -> Slots | None:
    """The schedule's slot arithmetic; None (logged) where it cannot be worked out here,
    such as a cron schedule in a database opened without the ``cron`` extra: it stays,
    and fires nothing, until the extra is installed. ``strict``: raise instead."""
    try:
        return Slots(
            cron=schedule.cron,
            timezone=schedule.timezone,
            every=schedule.every,
            start_at=schedule.start_at,
        )
    except (InvalidInputError, LookupError, ValueError) as exc:
        if strict:
            raise
        log.error("schedule %s cannot fire here: %s", schedule.name, exc)
        return None


def _event(
    kind: str,
    schedule: Schedule,
    now: datetime,
    source: str | None,
    data: dict[str, JsonValue],
) -> AppendEvent:
    data = {"schedule": schedule.name, "schedule_id": schedule.id, **data}
    event = Event(
        type=kind,
        timestamp=now.timestamp(),
        source=source or schedule.source_agent or "scheduler",
        correlation_id=schedule.task.correlation_id,
        data=data,
    )
    return AppendEvent(event, msgspec.json.encode(data))
