"""Delayed tasks and expiries: the TaskManager's timers for queued tasks (docs/TIMING.md).

A delayed task (``run_at``) is stored queued but stays out of the ready index and out of
memory's heads until its start time: memory holds only its id and deadline. An expiring
task (``expires_at``) ends ``cancelled`` with the reason ``expired`` at that time if it
is still queued. Both are kept by a :class:`Timers`: the earliest entries of one stored
time, read a range at a time from its partial index (``idx_tasks_delayed``,
``idx_tasks_expiring``), like the heads of the ready queues, so that a million delayed
tasks cost memory only for the ``size`` that come first. Entries after its *bound* are
storage's only; it reads the next ones when fewer than half are left. The TaskManager's
one alarm wakes it at the first deadline, so no one polls.

Clocks. Each deadline runs on the monotonic clock. A stored time is the wall time of that
deadline in the *frame* read when the runtime's TaskManager first started (its wall and
monotonic clocks read together, kept across its restarts), so that the process turns it
back into exactly the same deadline whenever it reads it again, whatever the wall clock
did meanwhile. When the wall clock has not been stepped since the start (the usual
case) the frame and the wall clock agree and the time given (``run_at``) is stored as
given. A time stored by an earlier process (a task whose id is not greater than the
greatest at the start, or not one of ours: this process's ids are made greater, see
``_ids.advance_past``)
is turned into a deadline by the wall clock at the start, and never later than the span
that was set, counted from the start (``at - created_at``): a clock stepped back while
the runtime was down cannot stretch a delay, and one stepped forward ends it at once
(there is no monotonic clock across a restart), as for every other stored deadline.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Literal

from ..._ids import advance_past, is_new_id
from ...runtime import Deadlines

__all__ = ["Frame", "Timers"]

#: A step of the wall clock smaller than this is taken for none (the two clocks are
#: read one after the other, and a datetime keeps microseconds).
_STEP = 1e-3


class Frame:
    """The wall and monotonic clocks read together, once, when the runtime's TaskManager
    first starts (a restart of the actor keeps it: the process and its monotonic clock go
    on), and the greatest task id then (``None``: there was no task)."""

    __slots__ = ("mono", "started", "wall", "watermark")

    def __init__(self) -> None:
        self.wall = datetime.fromtimestamp(0).astimezone()
        self.mono = 0.0
        self.watermark: str | None = None
        self.started = False

    def start(self, wall: datetime, mono: float, watermark: str | None) -> None:
        """Read once: later calls change nothing."""
        if self.started:
            return
        self.wall, self.mono, self.watermark = wall, mono, watermark
        if watermark is not None:
            advance_past(watermark)  # every task made from now on has a greater id
        self.started = True

    def deadline(self, task_id: str, at: datetime, created_at: datetime) -> float:
        """The stored time ``at`` of the task ``task_id``, created at ``created_at``, as
        a deadline."""
        deadline = self.mono + (at - self.wall).total_seconds()
        if not is_new_id(task_id) or (self.watermark is not None and task_id <= self.watermark):
            # Set by an earlier process, on a clock that may have been stepped since:
            # never more than the span that was set, from the start.
            deadline = min(deadline, self.mono + max((at - created_at).total_seconds(), 0.0))
        return deadline

    def stored(self, deadline: float, wall: datetime, mono: float, given: datetime) -> datetime:
        """The time to store for ``deadline``, set at ``wall``/``mono`` (a batch's clocks)
        meaning ``given``: ``given`` itself unless the wall clock was stepped since the
        start, else the deadline's time in the frame (what :meth:`deadline` reads back)."""
        step = (wall - self.wall).total_seconds() - (mono - self.mono)
        if abs(step) < _STEP:
            return given
        try:
            return self.wall + timedelta(seconds=deadline - self.mono)
        except OverflowError:  # a time near the year 9999: the step does not matter there
            return given


class Timers:
    """The earliest ``size`` (at most twice that) queued tasks by one stored time, each
    with its monotonic deadline; the others are read from storage as these run out."""

    def __init__(self, column: Literal["run_at", "expires_at"], size: int) -> None:
        self.column: Literal["run_at", "expires_at"] = column
        self._size = max(1, size)
        self._deadlines: Deadlines[str] = Deadlines()
        self._keys: dict[str, tuple[datetime, str]] = {}  # task id -> (time, task id)
        #: Entries after it are in storage only (``None``: memory holds them all).
        self.bound: tuple[datetime, str] | None = None
        #: ``False`` until read from the first (at start-up, and after a failed commit,
        #: which may have left entries of tasks the batch did not make): adds are ignored.
        self.loaded = False

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._keys

    def add(self, task_id: str, at: datetime, deadline: float) -> None:
        """The queued task ``task_id`` has the time ``at`` (its ``deadline``)."""
        if not self.loaded:
            return  # the read from the first brings it
        key = (at, task_id)
        if self.bound is not None and key > self.bound:
            self.discard(task_id)  # storage's: read when its turn comes
            return
        self._keys[task_id] = key
        self._deadlines.set(task_id, deadline)
        if len(self._keys) > 2 * self._size:
            self._trim()

    def discard(self, task_id: str) -> None:
        """``task_id`` is no longer queued with this time."""
        if self._keys.pop(task_id, None) is not None:
            self._deadlines.discard(task_id)

    def deadline(self, task_id: str) -> float | None:
        return self._deadlines.get(task_id)

    def first(self) -> float | None:
        """The earliest deadline held."""
        first = self._deadlines.first()
        return None if first is None else first[0]

    def pop_due(self, now: float) -> str | None:
        """Remove and return a task whose deadline is at or before ``now``."""
        task_id = self._deadlines.pop_due(now)
        if task_id is not None:
            del self._keys[task_id]
        return task_id

    def low(self) -> bool:
        """Whether to read (more) from storage before the next batch."""
        least = max(1, self._size // 2)
        return not self.loaded or (self.bound is not None and len(self._keys) < least)

    def after(self) -> tuple[datetime, str] | None:
        """Where the next read starts (``None``: from the first)."""
        return self.bound if self.loaded else None

    def take(self, rows: Iterable[tuple[str, datetime, float]], count: int) -> None:
        """Add what a read of at most ``size`` rows after :meth:`after` brought (task id,
        time, deadline); ``count`` rows came. Storage holds no entry it lacks before them:
        the read was made between batches."""
        if not self.loaded:
            self.clear()
            self.loaded = True
        last: tuple[datetime, str] | None = None
        for task_id, at, deadline in rows:
            self._keys[task_id] = last = (at, task_id)
            self._deadlines.set(task_id, deadline)
        self.bound = last if count >= self._size else None

    def clear(self) -> None:
        """Forget everything: read again from the first before the next batch."""
        self._deadlines = Deadlines()
        self._keys = {}
        self.bound = None
        self.loaded = False

    @property
    def size(self) -> int:
        return self._size

    def _trim(self) -> None:
        """Keep the first ``size`` entries; the others are storage's (committed, or
        committed with the batch that added them, before the next read)."""
        keys = sorted(self._keys.values())
        self.bound = keys[self._size - 1]
        for _, task_id in keys[self._size :]:
            self.discard(task_id)
