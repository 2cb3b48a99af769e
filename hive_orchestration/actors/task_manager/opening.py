"""Opening: the claimed tasks and the heads loaded, and, on open, the claims of a process
that died recovered.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import msgspec

from ...errors import StorageError
from ...messages.leader import RecoverClaims
from ...messages.storage import (
    DatabaseClock,
    FenceLeader,
    FetchTasks,
    LastTaskId,
    LoadLeaseHashes,
    LoadQueueHeads,
    LoadRuns,
    LoadTasks,
    StoreFences,
    Write,
    WriteOp,
)
from ...messages.tasks import Run, RunStatus
from . import control
from .machine import LIVE
from .ready import Bound, QueueId, ReadyQueue, bound_of
from .state import _HOLDING, _RUN_OPEN, A, R, _Batch

if TYPE_CHECKING:
    from .actor import TaskManager

log = logging.getLogger("hive_orchestration.tasks")


#: Statuses loaded whole at start-up: the claimed tasks (queued ones are read by head).
_CLAIMED = (A.value, R.value)


_RECOVERED = "the runtime stopped while a worker held the task"


async def started(tm: TaskManager) -> None:
    # The claimed tasks, whole, and the head of each ready queue: not the backlog
    # behind the heads, nor the blocked subtasks, which are read when asked for.
    tasks = list(await tm._storage.ask(LoadTasks(_CLAIMED)))
    runs = list(await tm._storage.ask(LoadRuns(_CLAIMED)))
    heads = await tm._storage.ask(LoadQueueHeads(None, tm._head))
    tm._fenced = await tm._storage.ask(StoreFences())
    if tm._fenced:
        # Before any backoff is read back or set (leases.backoff_until, backoff_end).
        sent = tm._monotonic()
        clock = await tm._storage.ask(DatabaseClock())
        if clock is not None:
            tm._read_database_clock(clock, sent, tm._monotonic())
        tm._versions = dict(heads.versions)
        if tasks:  # read again with their versions, as one row each
            stored = await tm._storage.ask(FetchTasks(tuple(t.id for t in tasks)))
            tasks = list(stored.tasks)
            tm._versions.update(stored.versions)
        tm._next_sweep = tm._monotonic() + tm._sweep_interval
    bounds: dict[QueueId, Bound] = {}
    for head, queued in heads.heads:
        tasks += queued
        if len(queued) >= tm._head:
            bounds[(head.task_type, head.requires, head.concurrency_key)] = bound_of(queued[-1])
    runs += heads.runs
    await control.load_revoked(tm)
    tm._tasks = {task.id: task for task in tasks}
    tm._keys = {t.idempotency_key: t.id for t in tasks if t.idempotency_key is not None}
    for run in runs:
        tm._remember_run(run)
    tm._ready = ReadyQueue(tm._type_limits, bounds, tm._revoked)
    # A crash's restart keeps the claims, so their secrets must still be proved; on
    # open, recovery ends them all.
    hashes = {} if tm._recover else await tm._storage.ask(LoadLeaseHashes(LIVE))
    if not tm._frame.started:
        watermark = await tm._storage.ask(LastTaskId())
        now = tm._read_clocks()
        tm._frame.start(tm._wall, tm._mono, watermark)
    now = tm._read_clocks()
    if tm._recover:
        await tm._recover_claims(now)
        if tm._on_recovered is not None:
            tm._on_recovered()  # a later restart must not requeue live claims
    else:
        # Restarted after a crash: the claims stand. Heartbeats are kept in memory
        # only, so each lease restarts whole (its own length: a longer ``extend`` was
        # a heartbeat's) rather than expire on a stale time, or on a wall clock that
        # was stepped since it was stored.
        for run in list(tm._runs.values()):
            if run.status in _RUN_OPEN and run.lease_seconds is not None:
                renewed = now + timedelta(seconds=run.lease_seconds)
                tm._runs[run.id] = msgspec.structs.replace(run, lease_expires_at=renewed)
    await tm._load_starts()
    tm._reindex(hashes)
    await tm._load_timers(fail=True)
    tm._arm()
    log.info(
        "task manager: %d task(s) in memory (%d queue(s) with a backlog in storage),"
        " %d run(s), %d claimed",
        len(tm._tasks),
        len(tm._ready.bounds()),
        len(tm._runs),
        len(tm._held),
    )


async def recover_claims(tm: TaskManager, now: datetime, dead: RecoverClaims | None = None) -> int:
    """On open: the previous process died, and with it every worker it ran, so each
    assigned or running task goes back to the queue; its open runs end as lost.
    ``dead``: the leader's duty instead, those claims of dead nodes only, in a write
    fenced by its epoch (messages/leader.py); or, ``lease_expired``, those of live nodes
    whose lease expired by the database's clock, ended as their owner's expiry would
    (leases.settle_due: the run lost, reason ``lease_expired``)."""
    work = _Batch()
    only = None if dead is None else await take_dead(tm, dead)
    expired = dead is not None and dead.lease_expired
    for task in list(tm._tasks.values()):
        if task.status not in _HOLDING or (only is not None and task.id not in only):
            continue
        tm._touch(task.id, work)
        lost: Run | None = None
        error = _RECOVERED
        for run_id in tm._runs_of.get(task.id, ()):
            run = tm._runs[run_id]
            if run.status in _RUN_OPEN:
                if expired:
                    error = _expired(run)
                lost = tm._close_run(run, RunStatus.LOST, work, now, error=error)
        reason = "lease_expired" if expired else "recovered"
        tm._requeue(task, lost, reason, error, work, now, retry_after=0.0)
    if work.ops:
        fence: list[WriteOp] = [] if dead is None else [FenceLeader(dead.epoch)]
        reply = await tm._storage.request(Write(tuple(fence + tm._fences(work) + work.ops)))
        try:
            await reply.wait()  # a failure fails the start-up; the next start recovers again
        except StorageError:
            if not tm._fenced:
                raise
            # Another node recovered (or changed) them first: they are storage's.
            for task_id in work.undo:
                tm._drop(task_id)
            tm._reindex()
            log.warning("%d task(s) to recover were changed by another node", len(work.undo))
            return 0
        else:
            tm._bump(work)
            if not expired:
                log.warning("recovered %d task(s) held when the runtime stopped", len(work.undo))
    tm._shed()
    return len(work.undo)


def _expired(run: Run) -> str:
    """The error of a run whose lease the leader ended (the owner's words for its own
    lease expiry, and who ended it)."""
    return (
        f"lease expired: worker {run.worker_id!r} sent no heartbeat for {run.lease_seconds:g}s"
        " (ended by the leader, by the database's clock: its node did not act on it)"
    )


async def take_dead(tm: TaskManager, dead: RecoverClaims) -> set[str]:
    """The leader's duty: read the dead nodes' claims, and hold those unchanged since
    the leader read them (so still a dead node's) to be recovered."""
    stored = await tm._storage.ask(FetchTasks(tuple(c.task_id for c in dead.claims)))
    found = {task.id: task for task in stored.tasks}
    taken: set[str] = set()
    for claim in dead.claims:
        task = found.get(claim.task_id)
        if task is None or task.status not in _HOLDING or task.id in tm._held:
            continue
        if stored.versions.get(task.id) != claim.version:
            continue
        tm._drop(task.id)  # a stale copy memory held
        tm._tasks[task.id] = task
        tm._versions[task.id] = claim.version
        taken.add(task.id)
    for run in stored.runs:
        if run.task_id in taken:
            tm._remember_run(run)
    tm._reindex()
    return taken
