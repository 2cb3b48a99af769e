"""The heads of the ready queues: reading their next tasks, and the tasks memory does not
hold, from storage, and letting go of what storage keeps.

The backlog stays in SQLite. A ready queue is the queued tasks of one task type,
requirement list and concurrency key; memory holds its best ``ready_head`` tasks (the
:class:`ReadyQueue` knows where each head ends, its *bound*) and reads the next ones,
through the partial index ``idx_tasks_ready``, when fewer than half are left: one storage
read before a batch, for every queue that ran low, so claims are answered from memory and
wait for storage only when a head ran dry (a claim that would otherwise get a worse task,
or none, while better ones are in storage waits for that read, made right after the
batch's commit). A read is sent between batches, with no commit of this actor in flight,
and the TaskManager is the only writer of tasks; storage serves it in one read
transaction, on a reader of its own (SQLite) or between its commits, at some point
before the answer comes: it shows the state memory was built on, plus some of the
batches since, and what those batches did is recorded against the read and reconciled
as it is taken in (:func:`take_refill`), so a task created or changed meanwhile cannot
be missed or held twice. A task queued after its queue's bound (created, requeued or released by its
plan) is written and left to storage once committed; a head that grew past twice its
size (better tasks than its bound) lets go of its worst. A task memory does not hold (the
backlog, blocked subtasks, long-finished tasks) is read with its runs when a change is
asked for, in one read per batch, and changes exactly as it would in memory. Opening
loads the claimed tasks and the heads, not the backlog, so its time and memory do not
grow with it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import anyio.lowlevel

from ...errors import HiveError
from ...messages.storage import FetchTasks, LoadQueueHeads, QueueHead
from ...messages.tasks import Run, Task
from .ready import Bound, QueueId, bound_of, queue_of
from .state import B, Q, _Batch, _Refill

if TYPE_CHECKING:
    from .actor import TaskManager

log = logging.getLogger("hive_orchestration.tasks")

#: Tasks of a read taken in per step of the event loop: a head of 1 024 in one go held
#: the loop 3 to 6 ms (and 13 under load), which every other task waited out.
TAKE_SLICE = 256


def _after(bound: Bound) -> tuple[int, datetime, str]:
    """A bound as storage resumes after it: (priority, created_at, id)."""
    return (-bound.neg_priority, bound.created_at, bound.task_id)


async def send_refill(tm: TaskManager, queues: set[QueueId]) -> _Refill | None:
    """Ask storage for the next tasks of ``queues`` after what memory holds of each,
    in one read; not waited for here."""
    tm._ready.wanted.clear()
    bounds = tm._ready.bounds()
    heads = tuple(QueueHead(q[0], q[1], q[2], _after(bounds[q])) for q in queues if q in bounds)
    if not heads:
        return None
    try:
        reply = await tm._storage.request(LoadQueueHeads(heads, tm._head))
    except HiveError as exc:
        log.warning("could not read the next tasks of %d queue(s): %s", len(heads), exc)
        return None
    return _Refill(reply, {(h.task_type, h.requires, h.concurrency_key) for h in heads})


async def refill_now(tm: TaskManager) -> bool:
    """For claims a drained head starved: take the read in flight, then read what is
    still wanted, and wait for it. Whether the heads could be read."""
    if tm._refilling is not None:
        if not await tm._take_refill(tm._refilling):
            return False
        if not tm._ready.wanted:
            return True  # what the claims waited for came with it
    refill = await tm._send_refill(tm._ready.low(tm._low))
    if refill is None:
        return not tm._ready.wanted
    tm._refilling = refill
    return await tm._take_refill(refill)


async def take_refill(tm: TaskManager, refill: _Refill) -> bool:
    """Add what ``refill`` read. The read was served at some point between its
    sending and now, while batches went on: a task changed since it was sent is known
    better by memory (skipped), and a task memory left to storage since (queued after
    its bound) is added from memory's copy if the new bound takes it in, so none is
    missed nor held twice. A queue trimmed since, or a batch that failed since, voids
    the read (its tasks come again with the next one), and so does a task of the read
    changed since whose state memory does not know: the queue is read again."""
    tm._refilling = None
    try:
        loaded = await refill.reply.wait()
    except HiveError as exc:
        # Claims go on with what is held; the heads are read again after a batch.
        log.warning("could not read the next tasks of %d queue(s): %s", len(refill.queues), exc)
        return False
    if refill.void:
        return True
    runs: dict[str, list[Run]] = {}
    for run in loaded.runs:
        runs.setdefault(run.task_id, []).append(run)
    queues: list[QueueId] = []
    taken = 0
    for head, tasks in loaded.heads:
        queue = (head.task_type, head.requires, head.concurrency_key)
        if queue in refill.stale or any(
            task.id in refill.touched and task.id not in tm._tasks and task.id not in refill.spilled
            for task in tasks
        ):
            # Trimmed since, or holding a task changed since whose state memory
            # does not know (deleted, or looked at and left as it was): read again.
            tm._ready.wanted.add(queue)
            continue
        queues.append(queue)
        bound = bound_of(tasks[-1]) if len(tasks) >= tm._head else None
        tm._ready.set_bound(queue, bound)
        for task in tasks:
            if task.id not in tm._tasks and task.id not in refill.touched:
                if task.id in loaded.versions:
                    tm._versions[task.id] = loaded.versions[task.id]
                tm._take_in(task, runs.get(task.id, ()))
                taken += 1
                if taken % TAKE_SLICE == 0:
                    # Let the loop run. Nothing else touches this actor's state, and no
                    # cancellation lands here: a read is never taken in half-way.
                    await anyio.lowlevel.cancel_shielded_checkpoint()
        for task, task_runs in list(refill.spilled.values()):
            if (
                queue_of(task) == queue
                and task.id not in tm._tasks
                and (bound is None or bound_of(task)[:3] <= bound[:3])
            ):
                tm._take_in(task, task_runs)
    tm._ready.extended(queues)
    return True


def take_in(tm: TaskManager, task: Task, runs: Sequence[Run]) -> None:
    """Hold a queued task read back from storage, with its runs."""
    tm._tasks[task.id] = task
    for run in runs:
        tm._remember_run(run)
    key = task.idempotency_key
    if key is not None:
        tm._keys.setdefault(key, task.id)
    tm._index(None, task)


def shed(tm: TaskManager) -> None:
    """After a commit: let go of what the batch left to storage, and of the worst
    tasks of heads that grew past twice their size (new tasks better than their
    bound); all of it is committed, and read back when its turn comes."""
    refill = tm._refilling
    for task_id in tm._spill:
        task = tm._tasks.get(task_id)
        if task is not None and task.status is Q and not tm._ready.holds(task_id):
            if refill is not None and queue_of(task) in refill.queues:
                # The read in flight may have been served before this commit.
                runs = [tm._runs[r] for r in tm._runs_of.get(task_id, ())]
                refill.spilled[task_id] = (task, runs)
            tm._drop(task_id)
        elif task is None or task.status is B:
            tm._drop(task_id)
    tm._spill.clear()
    for queue in tm._ready.over(2 * tm._head):
        if refill is not None and queue in refill.queues:
            refill.stale.add(queue)  # it read after the old bound: tasks would be lost
        for task_id in tm._ready.trim(queue, tm._head):
            tm._drop(task_id)


async def fetch(tm: TaskManager, task_ids: Sequence[str], work: _Batch) -> dict[str, Task]:
    """The tasks among ``task_ids`` that exist, from memory or else from storage
    (with their runs, which memory then holds: every run of a task in memory is in
    memory). One read for all of those not in memory; what is read is committed
    state, the batch has not changed it (it would be in memory)."""
    found: dict[str, Task] = {}
    missing: list[str] = []
    for task_id in task_ids:
        if task_id in work.deleted:
            continue
        task = tm._tasks.get(task_id)
        if task is not None:
            found[task_id] = task
        else:
            missing.append(task_id)
    if missing:
        stored = await tm._storage.ask(FetchTasks(tuple(missing)))
        for task in stored.tasks:
            if task.id not in found:
                found[task.id] = task
                if task.id in stored.versions:
                    tm._versions[task.id] = stored.versions[task.id]
                # Undo forgets the runs if the batch fails; a commit leaves the task
                # in memory only if the batch changed it (_shed).
                tm._touch(task.id, work)
                tm._spill.add(task.id)
        for run in stored.runs:
            if run.task_id in work.undo and run.id not in tm._runs:
                tm._remember_run(run)
    return found
