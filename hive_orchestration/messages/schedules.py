"""Periodic schedules: the public model, and the messages the Scheduler answers.

A *schedule* is a durable, named rule that creates a task from a template at each of its
*slots*: the times of a cron expression in a time zone, or of a fixed interval. The
Scheduler actor (:mod:`hive_orchestration.actors.scheduler`) owns them; the tasks it
creates go through the TaskManager, like anyone's. docs/SCHEDULES.md describes them.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import TypeAlias

import msgspec

from ..runtime import Request
from .leader import Leading
from .tasks import CreateTask

__all__ = [
    "CatchUp",
    "CreateSchedule",
    "DeleteSchedule",
    "GetSchedule",
    "ListSchedules",
    "PauseSchedule",
    "ResumeSchedule",
    "Schedule",
    "SchedulerMessage",
    "SchedulerWake",
]


class CatchUp(enum.StrEnum):
    """What happens to the slots that passed while nothing could fire them (the runtime
    was down, the clock stepped forward, the commit failed): ``once`` fires the latest of
    them once (the others are counted in its event), ``skip`` fires none."""

    ONCE = "once"
    SKIP = "skip"


class Schedule(msgspec.Struct, frozen=True, kw_only=True):
    """A periodic schedule, as stored and shown."""

    name: str
    #: Drawn at creation: a schedule deleted and created again under its name is another.
    id: str
    #: The task each slot creates (``task_type``, ``payload``, ``priority``, ``requires``...).
    task: CreateTask
    #: A cron expression (5 fields, or 6 with seconds first) in ``timezone``; or None.
    cron: str | None = None
    #: The IANA time zone the cron expression is read in (``Europe/Paris``).
    timezone: str = "UTC"
    #: A fixed interval in seconds, when there is no cron expression: slots are
    #: ``start_at + k * every``.
    every: float | None = None
    #: Interval slots count from here; cron slots come at or after it.
    start_at: datetime
    catch_up: CatchUp = CatchUp.ONCE
    #: How late (seconds, at least 1) a slot may fire and still count as on time; a
    #: later one was missed, and ``catch_up`` decides.
    grace: float = 60.0
    paused: bool = False
    #: No slot before this fires: the creation (or ``start_at``), or the last resume.
    not_before: datetime
    #: The latest slot fired (its task created), and that task.
    last_slot: datetime | None = None
    last_task_id: str | None = None
    #: How many slots have fired.
    fired: int = 0
    #: The next slot to fire, as the Scheduler knows it when asked (None: paused).
    next_slot: datetime | None = None
    #: Who created it (and, for an agent token, who may change it).
    source_agent: str | None = None
    created_at: datetime
    updated_at: datetime


class CreateSchedule(Request[Schedule], frozen=True, kw_only=True):
    """Create a schedule (every field checked at the boundary); the Scheduler stamps its
    id and times. ``replace``: a schedule of that name is redefined instead, keeping its
    id and what it fired, so no slot it fired fires again."""

    name: str
    task: CreateTask
    cron: str | None = None
    timezone: str = "UTC"
    every: float | None = None
    #: None: now (interval slots then start one interval from now).
    start_at: datetime | None = None
    catch_up: CatchUp = CatchUp.ONCE
    grace: float = 60.0
    paused: bool = False
    source_agent: str | None = None
    replace: bool = False


class GetSchedule(Request["Schedule | None"], frozen=True):
    name: str


class ListSchedules(Request[list[Schedule]], frozen=True):
    """Every schedule, by name."""


class PauseSchedule(Request[Schedule], frozen=True, kw_only=True):
    name: str
    source_agent: str | None = None


class ResumeSchedule(Request[Schedule], frozen=True, kw_only=True):
    """Resume: slots that passed while it was paused do not fire."""

    name: str
    source_agent: str | None = None


class DeleteSchedule(Request[bool], frozen=True, kw_only=True):
    name: str
    source_agent: str | None = None


class SchedulerWake(msgspec.Struct, frozen=True):
    """The Scheduler's alarm: a slot is due, or it is time to look at the clock again."""


SchedulerMessage: TypeAlias = (
    CreateSchedule
    | GetSchedule
    | ListSchedules
    | PauseSchedule
    | ResumeSchedule
    | DeleteSchedule
    | SchedulerWake
    | Leading
)
