"""Periodic schedules, as messages to the Scheduler (docs/SCHEDULES.md).

Every argument is checked here, at the boundary, so that a bad one is an
:class:`InvalidInputError` naming it and nothing is sent, let alone written. The task
template goes through ``create_task``'s own checks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime

from ..._slots import check_cron, check_timezone
from ..._validate import (
    MIN_LEASE,
    YEAR,
    check_bool,
    check_choice,
    check_identifier,
    check_seconds,
)
from ...errors import InvalidInputError
from ...messages.schedules import (
    CatchUp,
    CreateSchedule,
    DeleteSchedule,
    GetSchedule,
    ListSchedules,
    PauseSchedule,
    ResumeSchedule,
    Schedule,
    SchedulerMessage,
)
from ...runtime import ActorRef
from .caller import Caller
from .task_base import _when
from .tasks import TaskOps

__all__ = ["ScheduleOps"]

#: The shortest grace: a slot fired within it of its time is on time.
MIN_GRACE = 1.0
#: The longest schedule name.
_NAME_LIMIT = 200


class ScheduleOps(Caller):
    """Mixed into :class:`Runtime` and the client beside :class:`TaskOps`; needs
    ``_schedules`` (the Scheduler)."""

    _schedules: ActorRef[SchedulerMessage]

    def _check_open(self) -> None:  # pragma: no cover - provided by Runtime
        raise NotImplementedError

    async def create_schedule(
        self,
        name: str,
        when: str | float,
        task_type: str,
        payload: Mapping[str, object] | None = None,
        *,
        timezone: str = "UTC",
        start_at: datetime | None = None,
        catch_up: CatchUp | str = CatchUp.ONCE,
        grace: float = 60.0,
        paused: bool = False,
        replace: bool = False,
        title: str | None = None,
        description: str | None = None,
        priority: int = 1,
        workflow: Mapping[str, object] | None = None,
        tags: Iterable[str] | None = (),
        max_retries: int = 3,
        correlation_id: str | None = None,
        source_agent: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - each task's run timeout
        expires_in: float | None = None,
        concurrency_key: str | None = None,
        concurrency_limit: int | None = None,
        requires: str | Iterable[str] | None = (),
    ) -> Schedule:
        """Create a durable named schedule that creates a task at each of its slots.

        ``when`` is a cron expression (a string: 5 fields, or 6 with seconds first; read
        in ``timezone``, an IANA name; needs the ``cron`` extra) or a fixed interval (a
        number of seconds: slots are ``start_at + k * interval``, ``start_at``
        defaulting to one interval from now). The task is
        ``create_task(task_type, payload, ...)`` with the other arguments, each slot's
        own idempotency key added; ``expires_in`` (seconds) ends each task cancelled
        (reason ``expired``) if it is still queued that long after it was created, so
        slots whose workers are down do not pile up. ``catch_up`` says what a slot more
        than ``grace`` seconds late does: ``"once"`` (default) fires the latest missed
        slot once, ``"skip"`` fires none. A name already taken is refused unless ``replace``, which
        redefines the schedule and keeps what it fired. Durable when this returns.
        """
        self._check_open()
        assert isinstance(self, TaskOps)
        name = check_identifier(name, "name", max_length=_NAME_LIMIT)
        timezone = check_timezone(timezone)
        cron: str | None = None
        interval: float | None = None
        if isinstance(when, str):
            cron = check_cron(when, timezone, "when")
        elif isinstance(when, int | float) and not isinstance(when, bool):
            interval = check_seconds(when, "when", minimum=MIN_LEASE, maximum=YEAR)
            if timezone != "UTC":
                raise InvalidInputError(
                    "timezone",
                    "applies to cron schedules only: an interval is elapsed time, the same"
                    " in every time zone",
                )
        else:
            raise InvalidInputError(
                "when",
                "must be a cron expression (a string such as '0 3 * * *') or an interval"
                f" in seconds (a number), got {type(when).__name__}",
            )
        task = self._create_message(
            task_type,
            payload,
            title=title,
            description=description,
            priority=priority,
            workflow=workflow,
            tags=tags,
            max_retries=max_retries,
            correlation_id=correlation_id,
            source_agent=source_agent,
            timeout=timeout,
            # Counted from each task's creation (its slot's firing), not from now.
            expires_in=expires_in,
            concurrency_key=concurrency_key,
            concurrency_limit=concurrency_limit,
            requires=requires,
        )
        message = CreateSchedule(
            name=name,
            task=task,
            cron=cron,
            timezone=timezone,
            every=interval,
            start_at=_when(start_at, "start_at"),
            catch_up=check_choice(catch_up, CatchUp, "catch_up"),
            # At least a second: a slot is always fired a little after its time (a wake-up,
            # a commit), and a tighter grace would count every slot as missed.
            grace=check_seconds(grace, "grace", minimum=MIN_GRACE, maximum=YEAR),
            paused=check_bool(paused, "paused"),
            source_agent=task.source_agent,
            replace=check_bool(replace, "replace"),
        )
        return await self._schedules.ask(message)

    async def get_schedule(self, name: str) -> Schedule | None:
        """The schedule of that name (with its ``next_slot``), or None."""
        self._check_open()
        return await self._schedules.ask(GetSchedule(check_identifier(name, "name")))

    async def list_schedules(self) -> list[Schedule]:
        """Every schedule, by name."""
        self._check_open()
        return await self._schedules.ask(ListSchedules())

    async def pause_schedule(self, name: str, *, source_agent: str | None = None) -> Schedule:
        """Stop firing (no-op if paused); :class:`NotFoundError` for an unknown name."""
        self._check_open()
        return await self._schedules.ask(
            PauseSchedule(name=check_identifier(name, "name"), source_agent=self._who(source_agent))
        )

    async def resume_schedule(self, name: str, *, source_agent: str | None = None) -> Schedule:
        """Fire again from the next slot: slots that passed while paused never fire."""
        self._check_open()
        return await self._schedules.ask(
            ResumeSchedule(
                name=check_identifier(name, "name"), source_agent=self._who(source_agent)
            )
        )

    async def delete_schedule(self, name: str, *, source_agent: str | None = None) -> bool:
        """Delete it (tasks it created stay); False if there was none of that name."""
        self._check_open()
        return await self._schedules.ask(
            DeleteSchedule(
                name=check_identifier(name, "name"), source_agent=self._who(source_agent)
            )
        )

    def _who(self, source_agent: str | None) -> str | None:
        agent = self._agent(source_agent)
        return None if agent is None else check_identifier(agent, "source_agent")
