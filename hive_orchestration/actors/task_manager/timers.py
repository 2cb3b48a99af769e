"""Delayed tasks, expiries and rate limits: the TaskManager's side of :mod:`.delays` and
:mod:`.limits`.

Time (delays.py, limits.py; docs/TIMING.md). A delayed task (``run_at``) is queued but
neither in the ready index nor in memory until it comes due; a queued task past its
expiry is cancelled, and never handed out; a rate-limited type or key is held back while
its window is full. The earliest start times and expiries (read from their indexes a
range at a time) and the rate windows are deadlines of the same alarm.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import msgspec

from ...errors import HiveError, InvalidInputError
from ...messages.storage import LoadStarts, LoadTimers, SetTaskState
from ...messages.tasks import CreateTask, Task, TaskStatus
from .state import Q, _Batch

if TYPE_CHECKING:
    from .actor import TaskManager

log = logging.getLogger("hive_orchestration.tasks")


def times(
    tm: TaskManager, message: CreateTask, prefix: str = ""
) -> tuple[datetime | None, datetime | None]:
    """A create's start time and expiry as stored (``None``: none, or a start time
    already past), checked against this batch's clocks."""
    wall, mono = tm._wall, tm._mono
    start: datetime | None = None
    ready = mono
    if message.run_at is not None or message.delay is not None:
        if message.delay is not None:
            given = wall + timedelta(seconds=message.delay)
            ready = mono + message.delay
        else:
            assert message.run_at is not None
            given = message.run_at
            ready = mono + (given - wall).total_seconds()
        if ready > mono:
            start = tm._frame.stored(ready, wall, mono, given)
    expiry: datetime | None = None
    if message.expires_at is not None or message.expires_in is not None:
        name = "expires_in" if message.expires_in is not None else "expires_at"
        if message.expires_in is not None:
            given = wall + timedelta(seconds=message.expires_in)
            ends = mono + message.expires_in
        else:
            assert message.expires_at is not None
            given = message.expires_at
            ends = mono + (given - wall).total_seconds()
        if ends <= ready:
            why = "is not after the task's start time" if start else "is already past"
            raise InvalidInputError(
                prefix + name, f"{why}: the task could never be handed out; give a later one"
            )
        expiry = tm._frame.stored(ends, wall, mono, given)
    return start, expiry


def time_task(tm: TaskManager, task: Task) -> None:
    """The queued ``task``'s start time and expiry, if any, to the timers."""
    if task.run_at is not None:
        deadline = tm._frame.deadline(task.id, task.run_at, task.created_at)
        tm._starts.add(task.id, task.run_at, deadline)
    if task.expires_at is not None:
        deadline = tm._frame.deadline(task.id, task.expires_at, task.created_at)
        tm._expiries.add(task.id, task.expires_at, deadline)


def untime_task(tm: TaskManager, task: Task) -> None:
    if task.run_at is not None:
        tm._starts.discard(task.id)
    if task.expires_at is not None:
        tm._expiries.discard(task.id)


async def load_timers(tm: TaskManager, *, fail: bool = False) -> None:
    """Read the next start times and expiries of the timers that ran low. Between
    batches: the last commit is done, so storage holds exactly what memory left it."""
    for timers in (tm._starts, tm._expiries):
        if not timers.low():
            continue
        try:
            rows = await tm._storage.ask(LoadTimers(timers.column, timers.after(), timers.size))
        except HiveError as exc:
            if fail:
                raise
            log.warning("could not read the queued tasks' %s: %s", timers.column, exc)
            tm._timers_failed = tm._mono
            return
        frame = tm._frame
        timers.take(((i, at, frame.deadline(i, at, made)) for i, at, made in rows), len(rows))
    tm._timers_failed = None


def timers_due(tm: TaskManager) -> list[float]:
    """When the timers want the next batch: their first deadlines, or at once when
    they have to read from storage (a second after a failed read)."""
    if tm._starts.low() or tm._expiries.low():
        failed = tm._timers_failed
        return [tm._mono if failed is None else failed + 1.0]
    times = []
    for timers in (tm._starts, tm._expiries):
        first = timers.first()
        if first is not None:
            times.append(first)
    return times


async def settle_timers(tm: TaskManager, work: _Batch, now: datetime) -> None:
    """Expire the queued tasks whose expiry is past; queue the delayed tasks that
    came due (they join the ready index and their queue's head)."""
    await tm._load_timers()
    mono = tm._mono
    expired: list[str] = []
    while (task_id := tm._expiries.pop_due(mono)) is not None:
        expired.append(task_id)
    due: list[str] = []
    while (task_id := tm._starts.pop_due(mono)) is not None:
        due.append(task_id)
    if not expired and not due:
        return
    try:
        found = await tm._fetch(expired + due, work)
    except HiveError as exc:
        log.warning("could not read %d timed task(s): %s", len(expired) + len(due), exc)
        tm._starts.clear()  # read again, and these with them
        tm._expiries.clear()
        return
    for task_id in expired:
        task = tm._tasks.get(task_id, found.get(task_id))
        if task is not None and task.status is Q and task.expires_at is not None:
            tm._expire(task, work, now)
    for task_id in due:
        task = tm._tasks.get(task_id, found.get(task_id))
        if task is not None and task.status is Q and task.run_at is not None:
            tm._touch(task_id, work)
            updated = msgspec.structs.replace(task, run_at=None, updated_at=now)
            tm._tasks[task_id] = updated
            tm._index(task, updated)
            work.ops.append(SetTaskState(updated))


def expire(tm: TaskManager, task: Task, work: _Batch, now: datetime) -> None:
    """The queued ``task``'s expiry passed: it ends cancelled, reason ``expired``."""
    assert task.expires_at is not None
    at = task.expires_at.isoformat()
    tm._transition(
        task,
        TaskStatus.CANCELLED,
        work,
        now,
        None,
        {"error": f"expired: not handed out by {at}"},
        {"reason": "expired", "expires_at": at},
    )


def pop_ready(
    tm: TaskManager, task_types: Sequence[str] | None, work: _Batch, now: datetime
) -> str | None:
    """The ready queue's next task for a claim, never one past its expiry (those end
    here, should their timer not have come up yet)."""
    while (task_id := tm._ready.pop(task_types)) is not None:
        task = tm._tasks[task_id]
        if task.expires_at is None:
            return task_id
        deadline = tm._expiries.deadline(task_id)
        if deadline is None:
            deadline = tm._frame.deadline(task_id, task.expires_at, task.created_at)
        if deadline > tm._mono:
            return task_id
        tm._expire(task, work, now)
    return None


async def load_starts(tm: TaskManager) -> None:
    """At start-up: the rate limits' windows, from the claims of the last ``per``
    seconds (each a deadline from now, at most ``per`` away: see limits.py)."""
    if not tm._limits:
        return
    types, keys = tm._limits.limited()
    since = tm._wall - timedelta(seconds=tm._limits.longest())
    rows = await tm._storage.ask(LoadStarts(types, keys, since))
    by_type: dict[str, list[float]] = {}
    by_key: dict[str, list[float]] = {}
    for task_type, key, started in rows:
        ago = max((tm._wall - started).total_seconds(), 0.0)
        at = tm._mono - ago
        by_type.setdefault(task_type, []).append(at)
        if key is not None:
            by_key.setdefault(key, []).append(at)
    tm._limits.load(by_type, by_key, tm._mono)


def count_start(tm: TaskManager, task: Task) -> None:
    """``task`` was claimed: a full window holds its type or key back."""
    type_full, key_full = tm._limits.started(task, tm._mono)
    if type_full or key_full:
        tm._ready.pause(
            (task.task_type,) if type_full else (),
            (task.concurrency_key,) if key_full and task.concurrency_key else (),
        )
