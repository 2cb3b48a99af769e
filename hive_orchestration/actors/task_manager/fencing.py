"""Several nodes on one store (PostgreSQL): fenced writes, what a conflict does (memory
read again, the batch decided again), and the sweep of the heads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ...errors import HiveError, StorageError
from ...messages.storage import (
    DeleteTaskRow,
    FenceTask,
    FetchTasks,
    LeaseClock,
    LoadQueueHeads,
    PutRun,
    PutTask,
    SetRunState,
    SetTaskState,
    WriteOp,
)
from ...messages.tasks import Run, Task
from .ready import Bound, QueueId, bound_of, queue_of
from .state import _HOLDING, _RUN_OPEN, Q, _Batch

if TYPE_CHECKING:
    from .actor import TaskManager

log = logging.getLogger("hive_orchestration.tasks")


#: How many times a batch is decided on a fenced store before a conflict is its answer.
_ATTEMPTS = 32


def _conflict(error: HiveError) -> bool:
    """Whether a failed write may be decided again: another node changed a task it
    fenced, took an idempotency key it created, or a lock it waited on chose it as a
    deadlock's victim (a constraint's refusal has no fault of its own)."""
    return isinstance(error, StorageError) and error.fault in (None, "locked")


def fences(tm: TaskManager, work: _Batch) -> list[WriteOp]:
    """On a fenced store: a :class:`FenceTask` for each existing task the batch
    changes (its row or a run of it), with the version memory read it at (-1, which
    no row has, for a task whose version memory does not know: a conflict that
    reads it); first, when it writes a run with a lease, the :class:`LeaseClock` its
    leases were set from (the batch's wall time)."""
    if not tm._fenced:
        return []
    created: set[str] = set()
    changed: set[str] = set()
    last: dict[str, Task] = {}
    leased = False
    for op in work.ops:
        match op:
            case PutTask(task=task):
                created.add(task.id)
            case SetTaskState(task=task):
                changed.add(task.id)
                last[task.id] = task
            case DeleteTaskRow(task_id=task_id):
                changed.add(task_id)
                last.pop(task_id, None)
            case PutRun(run=run) | SetRunState(run=run):
                changed.add(run.task_id)
                # (an open run's: the database keeps no deadline for an ended one)
                leased = leased or (run.status in _RUN_OPEN and run.lease_expires_at is not None)
    work.fenced = sorted(changed - created)
    fences: list[WriteOp] = []
    if leased:
        # The wall time this batch set its leases from: the database keeps each lease's
        # deadline by its own clock (its now plus the span set), which the leader reaps by.
        fences.append(LeaseClock(tm._wall))
    taken: dict[str, int] = {}  # key -> this batch's claims of it so far
    for task_id in work.fenced:
        version = tm._versions.get(task_id, -1)
        now_state = last.get(task_id)
        before = work.undo.get(task_id)
        was = None if before is None or before.task is None else before.task.status
        key = None if now_state is None else now_state.concurrency_key
        if now_state is None or key is None or now_state.status not in _HOLDING or was in _HOLDING:
            fences.append(FenceTask(task_id, version))
            continue
        # A new claim of a task with a concurrency key: the limit holds across nodes.
        room = (now_state.concurrency_limit or 1) - taken.get(key, 0)
        taken[key] = taken.get(key, 0) + 1
        work.keys_claimed.add(key)
        fences.append(FenceTask(task_id, version, key, room))
    return fences


def bump(tm: TaskManager, work: _Batch) -> None:
    """After a fenced batch committed: the versions its fences moved to."""
    if not tm._fenced:
        return
    for op in work.ops:
        if isinstance(op, PutTask):
            tm._versions[op.task.id] = 0
    for task_id in work.fenced:
        tm._versions[task_id] = tm._versions.get(task_id, -1) + 1
    for op in work.ops:
        if isinstance(op, DeleteTaskRow):
            tm._versions.pop(op.task_id, None)


def repark(tm: TaskManager, work: _Batch) -> None:
    """After a conflict: the claims the batch answered wait again as they did before
    it; those it parked are parked again when it is decided again."""
    arrived = set(work.parked)
    for waiter_id, waiter in work.unparked:
        if waiter_id not in arrived:
            tm._waiters[waiter_id] = waiter
            if waiter.deadline is not None:
                tm._waits.set(waiter_id, waiter.deadline)
    for waiter_id in arrived:
        tm._waiters.pop(waiter_id, None)
        tm._waits.discard(waiter_id)
    for waiter_id, before in work.grown:
        grown = tm._waiters.get(waiter_id)
        if grown is not None:
            del grown.taken[before:]


async def refresh(tm: TaskManager, task_ids: Sequence[str]) -> None:
    """After a conflict (memory already put back as before the batch): read the
    batch's tasks again. A claim of this node that is still its own is kept (its
    row, runs and version as they are now); every other task leaves memory, to be
    read again when it is asked for (it may have been claimed, changed or deleted by
    another node). A key the batch raced another node for is read again anyway
    (_look_up_keys)."""
    if not task_ids:
        return
    try:
        stored = await tm._storage.ask(FetchTasks(tuple(task_ids)))
    except HiveError as exc:
        log.warning("could not read %d task(s) after a conflict: %s", len(task_ids), exc)
        for task_id in task_ids:
            if task_id not in tm._held:
                tm._drop(task_id)
                tm._finished.pop(task_id, None)
        tm._reindex()
        return
    found = {task.id: task for task in stored.tasks}
    runs: dict[str, list[Run]] = {}
    for run in stored.runs:
        runs.setdefault(run.task_id, []).append(run)
    for task_id in task_ids:
        task = found.get(task_id)
        held = tm._held.get(task_id)
        if (
            task is not None
            and held is not None
            and task.status in _HOLDING
            and any(r.id == held and r.status in _RUN_OPEN for r in runs.get(task_id, ()))
        ):
            for run_id in tm._runs_of.pop(task_id, ()):
                tm._runs.pop(run_id, None)
            for run in runs[task_id]:
                tm._remember_run(run)
            tm._tasks[task_id] = task
            tm._versions[task_id] = stored.versions[task_id]
            continue
        tm._drop(task_id)
        tm._finished.pop(task_id, None)
        if task is not None:
            # Kept though the task left memory: a path that reads it again without
            # its version (a listing's QueryTasks: flush_queue, purges) fences by
            # this one, which only passes if the task has not changed since, so the
            # state it read then is this version's.
            tm._versions[task_id] = stored.versions[task_id]
    tm._reindex()


async def sweep(tm: TaskManager) -> None:
    """On a fenced store: read every queue's head again from its best, taking in the
    tasks memory does not hold (queued by other nodes, or left to storage), so that
    no task waits for the node that queued it; every sweep_interval, and after a
    head ran dry. Memory is reconciled with the read by version: a queued task it
    holds at another version is taken as read, and one the read should show but does
    not (claimed, cancelled or deleted elsewhere) is let go of. A claim of this node's
    is left to its fence (its next write)."""
    tm._next_sweep = tm._monotonic() + tm._sweep_interval
    if tm._paused_keys and not tm._conflicted:
        tm._ready.resume(keys=tm._paused_keys)
        tm._paused_keys = set()
    tm._conflicted = False
    try:
        loaded = await tm._storage.ask(LoadQueueHeads(None, tm._head))
    except HiveError as exc:
        log.warning("could not read the ready queues: %s", exc)
        return
    if tm._refilling is not None:
        tm._refilling.void = True  # this read has it all
    runs: dict[str, list[Run]] = {}
    for run in loaded.runs:
        runs.setdefault(run.task_id, []).append(run)
    read: dict[QueueId, Bound | None] = {}
    ids: set[str] = set()
    for head, tasks in loaded.heads:
        queue = (head.task_type, head.requires, head.concurrency_key)
        read[queue] = bound_of(tasks[-1]) if len(tasks) >= tm._head else None
        ids.update(task.id for task in tasks)
    # What memory holds as queued and ready that the read does not show (within what
    # it covers) is no longer so: claimed, changed or deleted by another node.
    stale = [
        task.id
        for task in tm._tasks.values()
        if task.status is Q
        and task.run_at is None
        and task.id not in ids
        and tm._ready.holds(task.id)
        and (
            queue_of(task) not in read
            or (bound := read[queue_of(task)]) is None
            or bound_of(task)[:3] <= bound[:3]
        )
    ]
    for task_id in stale:
        tm._drop(task_id)
    if stale:
        tm._reindex()
    versions = tm._versions
    for head, tasks in loaded.heads:
        queue = (head.task_type, head.requires, head.concurrency_key)
        tm._ready.set_bound(queue, read[queue])
        for task in tasks:
            task_id = task.id
            version = loaded.versions[task_id]
            known = tm._tasks.get(task_id)
            if known is not None:
                if versions.get(task_id) == version or task_id in tm._held:
                    continue  # as read; or a claim of this node's, which its fence decides
                # Memory holds it at another version: changed since by another node (its
                # claim ended and requeued it, a retry, a backoff set by SQL), which
                # memory would show, and hand out by, until its next write here (a
                # conflict). Taken as read, as a lock of its row takes it.
                tm._index(known, None)
                tm._drop(task_id)
                tm._finished.pop(task_id, None)
            versions[task_id] = version
            tm._take_in(task, runs.get(task_id, ()))
    tm._ready.extended(list(read))
