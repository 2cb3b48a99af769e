"""What memory holds of tasks and runs: a batch's undo record and putting memory back
after a failed commit, the ready index kept in step with each change, and letting go
of tasks whose state is committed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING

from ...messages.tasks import Run, Task
from ...runtime import Deadlines
from .ready import ReadyQueue
from .state import _HOLDING, _RUN_OPEN, B, Q, _Batch, _Due, _Undo

if TYPE_CHECKING:
    from .actor import TaskManager

log = logging.getLogger("hive_orchestration.tasks")


def touch(tm: TaskManager, task_id: str, work: _Batch) -> None:
    """Remember a task's memory state before the batch first changes it."""
    refill = tm._refilling
    if refill is not None:
        refill.touched.add(task_id)  # the read in flight may hold an older copy
        refill.spilled.pop(task_id, None)
    if task_id not in work.undo:
        run_ids = tm._runs_of.get(task_id)
        runs = due = None
        if run_ids:
            runs = {run_id: tm._runs[run_id] for run_id in run_ids}
            due = {r: tm._due[r] for r in run_ids if r in tm._due} or None
        work.undo[task_id] = _Undo(
            task=tm._tasks.get(task_id),
            finished=task_id in tm._finished,
            run_ids=run_ids,
            runs=runs,
            due=due,
            ready_at=tm._ready_at.get(task_id),
            own_backoff=task_id in tm._own_backoffs,
        )


def set_key(tm: TaskManager, key: str, task_id: str | None, work: _Batch) -> None:
    work.keys.setdefault(key, tm._keys.get(key))
    if task_id is None:
        tm._keys.pop(key, None)
    else:
        tm._keys[key] = task_id


def restore(tm: TaskManager, work: _Batch, now: datetime) -> None:
    """After a failed commit: put memory back exactly as it was before the batch."""
    tm._spill.clear()  # what the batch left to storage is memory's again
    if tm._refilling is not None:
        # It may skip tasks the failed batch touched but did not change: read again.
        tm._refilling.void = True
    for task_id, undo in work.undo.items():
        for run_id in tm._runs_of.pop(task_id, ()):
            tm._runs.pop(run_id, None)
            tm._due.pop(run_id, None)
        if undo.run_ids is not None:
            tm._runs_of[task_id] = undo.run_ids
        if undo.runs is not None:
            tm._runs.update(undo.runs)
        if undo.due is not None:
            tm._due.update(undo.due)
        if undo.ready_at is None:
            tm._ready_at.pop(task_id, None)
        else:
            tm._ready_at[task_id] = undo.ready_at
        if undo.own_backoff:
            tm._own_backoffs.add(task_id)
        else:
            tm._own_backoffs.discard(task_id)
        if undo.task is None:
            tm._tasks.pop(task_id, None)
        else:
            tm._tasks[task_id] = undo.task
        if undo.finished:
            tm._finished[task_id] = None
        else:
            tm._finished.pop(task_id, None)
    for key, owner in work.keys.items():
        if owner is None:
            tm._keys.pop(key, None)
        else:
            tm._keys[key] = owner
    if work.revoked is not None:
        tm._revoked.clear()
        tm._revoked.update(work.revoked)
    # They may hold times of tasks the batch made or changed: read again from storage.
    tm._starts.clear()
    tm._expiries.clear()
    tm._reindex()
    log.warning("commit failed; %d task(s) restored in memory", len(work.undo))


def reindex(tm: TaskManager, hashes: Mapping[str, bytes] | None = None) -> None:
    """Rebuild what is derived from tasks and runs: the ready queue, the claims and
    their deadlines. O(tasks in memory): at start-up (with the stored ``hashes`` of the
    claims' secrets) and after a failed commit only."""
    tm._ready = ReadyQueue(tm._type_limits, tm._ready.bounds(), tm._revoked)
    tm._ready.pause(tm._limits.full_types, tm._limits.full_keys)
    tm._ready.pause(keys=tm._paused_keys)
    tm._held = {}
    tm._deadlines = Deadlines()
    for task in tm._tasks.values():
        tm._index(None, task)
    due: dict[str, _Due] = {}
    for run in tm._runs.values():
        owner = tm._tasks.get(run.task_id)
        if (
            run.status in _RUN_OPEN
            and run.lease_expires_at is not None
            and owner is not None
            and owner.status in _HOLDING
        ):
            tm._held[owner.id] = run.id
            # Kept from before a failed commit; at start-up, from the stored times.
            kept = tm._due.get(run.id)
            if kept is None:
                kept = tm._due_from_wall(run, owner, (hashes or {}).get(run.id))
            due[run.id] = kept
            tm._deadlines.set(run.id, due[run.id].next()[0])
    tm._due = due


def index(tm: TaskManager, old: Task | None, new: Task | None) -> None:
    """Keep the ready queue in step with a task's change from ``old`` to ``new``."""
    if old is not None:
        if old.status is Q:
            tm._ready.discard(old.id)
            tm._ready_at.pop(old.id, None)
            tm._own_backoffs.discard(old.id)
            if old.run_at is not None or old.expires_at is not None:  # most have neither
                tm._untime(old)
        elif old.status in _HOLDING:
            tm._ready.unhold(old)
    if new is not None:
        if new.status is Q:
            if new.run_at is not None or new.expires_at is not None:
                tm._time(new)
            if new.run_at is not None:
                tm._spill.add(new.id)  # storage's until due: memory keeps its time
            elif not tm._ready.add(new, tm._mono, tm._backoff_end(new)):
                tm._spill.add(new.id)  # after its queue's head: storage's
        elif new.status in _HOLDING:
            tm._ready.hold(new)
        elif new.status is B:
            tm._spill.add(new.id)  # read back when its plan queues it


def remember_run(tm: TaskManager, run: Run) -> None:
    if run.id not in tm._runs:
        # A tuple, replaced whole: the collector untracks a tuple of strings, while a
        # list per task (10 000 recent tasks) kept it running full passes.
        tm._runs_of[run.task_id] = (*tm._runs_of.get(run.task_id, ()), run.id)
    tm._runs[run.id] = run


def drop(tm: TaskManager, task_id: str) -> None:
    """Forget a task memory does not need (its committed state is in storage)."""
    task = tm._tasks.pop(task_id, None)
    key = None if task is None else task.idempotency_key
    if key is not None and tm._keys.get(key) == task_id:
        del tm._keys[key]  # answered by storage from now on
    tm._ready_at.pop(task_id, None)
    tm._own_backoffs.discard(task_id)
    tm._versions.pop(task_id, None)  # read again with the task
    for run_id in tm._runs_of.pop(task_id, ()):
        tm._runs.pop(run_id, None)


def evict(tm: TaskManager) -> None:
    """Keep at most ``recent`` finished tasks in memory (their state is committed)."""
    while len(tm._finished) > tm._recent_limit:
        task_id, _ = tm._finished.popitem(last=False)
        task = tm._tasks.pop(task_id, None)
        key = None if task is None else task.idempotency_key
        if key is not None and tm._keys.get(key) == task_id:
            # The task still owns its key, now answered by storage (it is committed).
            del tm._keys[key]
        for run_id in tm._runs_of.pop(task_id, ()):
            tm._runs.pop(run_id, None)
