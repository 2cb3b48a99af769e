"""Parked claims, and handing out the ready tasks to them.

Claims. A worker's ``claim_task`` is parked until the end of its batch, then handed the
best ready task of its types (priority, then age) from the :class:`ReadyQueue`; with
``wait`` it stays parked, first come first served, until a task arrives, and no one
polls. A claim opens a run with a lease; its token (task, run, attempt, and a secret drawn
for the claim) must come with every later call, and a token whose claim is over, or whose
secret is not its claim's, gets :class:`LeaseLostError`. The ids are in every read of
the runs; the secret is in the claim's answer only, and this actor keeps its SHA-256 (in
memory with the claim's deadlines, and in the run's row, so that a restart after a crash
keeps the claims provable). An ``Unclaimed`` give-back must carry it too. Leases,
run timeouts, retry backoffs and claim waits are deadlines kept by this actor; one
:class:`~hive_orchestration.runtime.Alarm` wakes it at the earliest, and every batch
first settles what is due. A claim whose asker left before the answer (deadline,
cancellation) is handed back at once, so no task is held by a worker that never got it.

On a store several nodes share (PostgreSQL), the handing out waits for the batch's
commit (:func:`dispatch_later`): the write carries the queues its parked claims take from
(:func:`lock_claims`), the storage actor locks their best ready rows in the write's own
transaction (``FOR UPDATE SKIP LOCKED``: rows another node's transaction holds are
passed over) and answers them to this actor, which decides the handing out on those rows
(:func:`decide_locked`, :func:`take_locked`) in its own task and answers the write's ops,
which the storage actor commits with the rest of its batch. Two nodes' claims never
take one task, so they never conflict. Other nodes' commits that queue tasks wake the
parked claims here (:func:`ready_elsewhere`, by ``NOTIFY``), and so does the end of a
retry backoff another node set, which no write marks: a lock says when it comes, by the
database's clock, and the alarm wakes the claims then (:func:`backoffs_end`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import msgspec

from ..._ids import new_id, new_secret
from ...errors import IllegalTransitionError
from ...messages.storage import (
    LockedHeads,
    LockReady,
    PutRun,
    QueueHead,
    SetRunState,
    WriteOp,
)
from ...messages.tasks import (
    Claim,
    ClaimTask,
    ClaimTasks,
    Lease,
    ReadyElsewhere,
    Run,
    RunStatus,
    Task,
    TaskManagerMessage,
)
from ...runtime import Envelope
from .leases import _hash, _proves
from .machine import _run_data
from .ready import Bound, QueueId, bound_of
from .state import A, R, _Batch, _Due, _Lag, _Waiter

if TYPE_CHECKING:
    from .actor import TaskManager


def park(
    tm: TaskManager,
    envelope: Envelope[TaskManagerMessage],
    claim: ClaimTask | ClaimTasks,
    work: _Batch,
    now: datetime,
) -> None:
    tm._next_waiter += 1
    waiter_id = tm._next_waiter
    deadline = tm._mono + claim.wait if claim.wait > 0 else None
    tm._waiters[waiter_id] = _Waiter(envelope, claim, deadline)
    if deadline is not None:
        tm._waits.set(waiter_id, deadline)
    work.parked.append(waiter_id)


def dispatch(tm: TaskManager, work: _Batch, now: datetime, *, refilled: bool = True) -> None:
    """Hand ready tasks to parked claims, oldest claim first.

    Only the claims parked in this batch can find something if nothing became ready
    since the last dispatch; claims that do not wait are answered now either way,
    unless a drained head starved them: they stay parked for its next tasks, read
    once the batch is committed (not when that read just failed: ``refilled``).
    """
    if tm._ready.changed:
        candidates = list(tm._waiters)
        tm._ready.changed = False
    else:
        candidates = work.parked
    # The task types a claim found nothing of (and no head starved for) in this pass:
    # handing out only takes tasks and slots away, so a later claim of the same types
    # would find nothing too, and is not looked up again (with many claims parked on
    # one type, each task used to be looked for once per claim). A task handed back
    # is ready again: then every claim looks again.
    empty: set[tuple[str, ...] | None] = set()
    for waiter_id in candidates:
        waiter = tm._waiters.get(waiter_id)
        if waiter is None:
            continue
        reply = waiter.envelope.reply
        if reply is not None and reply.done:  # the claimer stopped waiting
            tm._unpark(waiter_id, work)
            for claim in waiter.taken:  # committed, never received: hand them back
                tm._release_unclaimed(claim, work, now)
                empty.clear()
            continue
        request = waiter.claim
        if request.task_types in empty:
            task_id, starved = None, False
        else:
            task_id = tm._pop(request.task_types, work, now)
            starved = task_id is None and tm._ready.starved
            if task_id is None and not starved:
                empty.add(request.task_types)
        if task_id is None:
            if starved and refilled:
                work.starved = True
                continue
            if waiter.deadline is None or waiter.taken:
                tm._unpark(waiter_id, work)
                work.answers.append((waiter.envelope, waiter.nothing))
            continue
        if isinstance(request, ClaimTask):
            tm._unpark(waiter_id, work)
            work.answers.append((waiter.envelope, tm._assign(task_id, request, work, now)))
            continue
        work.grown.append((waiter_id, len(waiter.taken)))
        claims = waiter.taken
        claims.append(tm._assign(task_id, request, work, now))
        while len(claims) < request.limit:
            task_id = tm._pop(request.task_types, work, now)
            if task_id is None:
                break
            claims.append(tm._assign(task_id, request, work, now))
        if len(claims) < request.limit and tm._ready.starved and refilled:
            # A head ran dry mid-claim: the rest once its next tasks are read.
            work.starved = True
            continue
        tm._unpark(waiter_id, work)
        work.answers.append((waiter.envelope, tuple(claims)))


def dispatch_later(tm: TaskManager, work: _Batch, now: datetime, *, refilled: bool = True) -> None:
    """Hand ready tasks to parked claims: now (one owner), or on a store several nodes
    share at the batch's commit, once the rows they may take are locked in its
    transaction (:func:`lock_claims`)."""
    if tm._fenced:
        work.dispatch = (now, refilled)
    else:
        dispatch(tm, work, now, refilled=refilled)


def ready_elsewhere(tm: TaskManager, notice: ReadyElsewhere) -> None:
    """Other nodes made tasks of ``notice.queues`` ready: the claims parked here are
    looked at again, and lock those queues' rows (a queue memory holds nothing of is
    locked too); ``None``: every queue's head is read again first (a sweep)."""
    if notice.queues is None:
        tm._next_sweep = 0.0
    else:
        tm._woken.update(notice.queues)
        # A key held back here after a conflict (another node held it to its limit) is
        # looked at again when another node's commit names its queue: a task of it
        # ended there, or one was queued. Held still, the next claim's fence says so.
        keys = {queue[2] for queue in notice.queues if queue[2] is not None}
        keys &= tm._paused_keys
        if keys:
            tm._ready.resume(keys=keys)
            tm._paused_keys -= keys
    tm._ready.changed = True


def _wanted(tm: TaskManager, work: _Batch) -> tuple[set[QueueId], int]:
    """The queues the claims a dispatch would look at may take from, and how many
    tasks they want in all (as dispatch picks them: every parked claim once something
    became ready, else those parked in this batch)."""
    candidates = list(tm._waiters) if tm._ready.changed else work.parked
    queues: set[QueueId] = set()
    wanted = 0
    for waiter_id in candidates:
        waiter = tm._waiters.get(waiter_id)
        if waiter is None:
            continue
        reply = waiter.envelope.reply
        if reply is not None and reply.done:
            continue
        request = waiter.claim
        wanted += 1 if isinstance(request, ClaimTask) else request.limit - len(waiter.taken)
        queues |= tm._ready.queues_for(request.task_types, tm._woken)
    return queues, wanted


def lock_claims(tm: TaskManager, work: _Batch) -> LockReady | None:
    """On a fenced store, the claims of a batch whose dispatch waits for its commit
    (:func:`dispatch_later`): the rows to lock in the write's transaction, and the
    decision to make once they are (:func:`decide_locked`, in this actor's task, while
    the storage actor holds the transaction: answers.py). None: handed out now,
    from memory (nothing to lock: no claim waits, or no queue it takes from)."""
    if work.dispatch is None:
        return None
    now, refilled = work.dispatch
    queues, wanted = _wanted(tm, work)
    if not queues or wanted <= 0:
        work.dispatch = None
        dispatch(tm, work, now, refilled=refilled)
        return None
    limit = min(wanted, tm._head)
    heads = tuple(QueueHead(q[0], q[1], q[2]) for q in sorted(queues, key=_queue_order))
    # The backoffs this node decided end on its monotonic clock, which no step of a
    # clock moves: those held as ready are locked whatever their stored end says (by
    # the database's clock as this node reckoned it, a few milliseconds off at most). A
    # backoff read from storage (set by another node, or by this one before it let go
    # of the task) ends by the database's clock only: memory holds it by its reckoning
    # of that clock (leases.backoff_end), which may be off (the server's clock stepped
    # since this node read it; early, it would take the task early).
    # The tasks held at a known version come back as their keys only (not read in full).
    ready: list[str] = []
    known: dict[str, int] = {}
    own = tm._own_backoffs
    for queue in queues:
        for task_id in tm._ready.members(queue):
            task = tm._tasks.get(task_id)
            version = tm._versions.get(task_id)
            if task is None or version is None:
                continue
            known[task_id] = version
            if task.available_at is not None and task_id in own:
                ready.append(task_id)
    return LockReady(heads, limit, tuple(ready), known)


def _queue_order(queue: QueueId) -> tuple[str, tuple[str, ...], str]:
    return (queue[0], queue[1], queue[2] or "")


def decide_locked(
    tm: TaskManager, work: _Batch, loaded: LockedHeads | None, limit: int, sent: float
) -> tuple[WriteOp, ...]:
    """The write's ops, once the ready rows its claims may take are locked: memory
    takes what was locked as the heads of those queues (:func:`take_locked`), the
    parked claims are handed out from it, then the batch's fences and ops. ``sent``:
    the monotonic clock before the lock was asked for (the lock's reading of the
    database's clock was made after it)."""
    assert work.dispatch is not None
    now, refilled = work.dispatch
    work.dispatch = None
    if loaded is not None:
        if loaded.now is not None:
            tm._read_database_clock(loaded.now, sent, tm._monotonic())
        take_locked(tm, work, loaded, limit)
        tm._woken.difference_update(
            (h.task_type, h.requires, h.concurrency_key) for h, _ in loaded.heads
        )
        backoffs_end(tm, loaded)
    dispatch(tm, work, now, refilled=refilled)
    return tuple(tm._fences(work) + work.ops) if work.ops else ()


def backoffs_end(tm: TaskManager, loaded: LockedHeads) -> None:
    """When the queues the lock took too few rows of have a task coming out of its
    retry backoff (by the database's clock): no write marks that moment, nor wakes this
    node then (the node that set the backoff hands it out at its end to its own claims
    only), so the claims parked here lock those queues again then
    (:func:`wake_backoffs`), not at the next sweep. One deadline per queue, the
    earliest, on the monotonic clock: a span measured by one clock, the database's, so
    this node's own wall clock plays no part."""
    if not loaded.due_in:
        return
    mono = tm._monotonic()
    for head, seconds in loaded.due_in:
        queue = (head.task_type, head.requires, head.concurrency_key)
        at = mono + max(seconds, 0.0)
        held = tm._backoff_ends.get(queue)
        if held is None or at < held:
            tm._backoff_ends.set(queue, at)


def wake_backoffs(tm: TaskManager) -> None:
    """The queues whose task came out of its backoff (:func:`backoffs_end`): the claims
    parked here look again, and lock their rows, as at another node's notice."""
    mono = tm._mono
    while (queue := tm._backoff_ends.pop_due(mono)) is not None:
        tm._woken.add(queue)
        tm._ready.changed = True


def take_locked(tm: TaskManager, work: _Batch, loaded: LockedHeads, limit: int) -> None:
    """Memory's heads as the locked rows say. Each queue's locked rows are the best
    ready rows no other node's transaction holds; a ready task memory holds ranked
    among them but not locked is another node's to take now (or no longer ready):
    memory lets go of it (a sweep reads it again if it is left queued, and a lock from
    the queue's top finds it). One beyond them still backing off by the database's
    clock is held until its end by that clock. A task this batch already changed is
    memory's to decide; a locked task memory does not hold, or holds at another
    version, is taken in as read; a locked row is out of its backoff, whatever memory
    reckoned. With fewer than ``limit`` rows, every free ready task of the queue is now
    held: nothing more is in storage for it (until the next sweep or a wake-up), so
    claims are not held back for it."""
    read = {task.id: task for task in loaded.tasks}
    runs: dict[str, list[Run]] = {}
    for run in loaded.runs:
        runs.setdefault(run.task_id, []).append(run)
    dropped = False
    for head, keys in loaded.heads:
        queue = (head.task_type, head.requires, head.concurrency_key)
        locked = {key[0] for key in keys}
        waiting: Bound | None = None  # the furthest task kept below, still backing off
        last = None
        if len(keys) >= limit:
            task_id, _, priority, created_at = keys[-1]
            last = Bound(-priority, created_at.timestamp(), task_id, created_at)
        # The entries' first three fields are their tasks' bounds' (claim order), read
        # without making a Bound of each task held.
        for entry in tm._ready.member_entries(queue):
            task_id = entry.task_id
            task = tm._tasks.get(task_id)
            if task is None or task_id in locked or task_id in work.undo:
                continue
            # Beyond what was locked: left as it is, and handed out unlocked (its fence
            # checks its version) if claims want more than the lock took; but a backoff
            # read from storage ends by the database's clock, which the lock's answer
            # reads (``now``), and memory held it ready by its reckoning of that clock,
            # which may be off (the server's clock stepped since this node read it): such
            # a task still backing off by the lock's reading is not handed out. One long
            # past its stored backoff (a retried task read back: no write clears the
            # time until a claim does) keeps its place.
            if last is not None and entry[:3] > last[:3]:
                if (
                    task.available_at is None
                    or task_id in tm._own_backoffs
                    or (loaded.now is not None and task.available_at <= loaded.now)
                ):
                    continue
                if loaded.now is not None:
                    # Still backing off: kept, held until its end by that clock as this
                    # lock read it (backoff_end, once out of the index). Let go of, it
                    # sat in storage inside the bound set below (from a task held
                    # further out), which no refill reads: once due, worse tasks beyond
                    # the next lock's rows were handed out before it, until a sweep.
                    tm._index(task, None)
                    tm._index(None, task)
                    if waiting is None or entry[:3] > waiting[:3]:
                        waiting = bound_of(task)
                    continue
            tm._index(task, None)
            tm._drop(task_id)
            dropped = True
        if last is None:
            tm._ready.set_bound(queue, None)
        else:
            # Its other tasks are in storage, after the last row locked (or after what
            # memory holds beyond it): they are locked when claims come for them.
            bound = last
            held = tm._ready.bounds().get(queue)
            if held is not None and held[:3] > bound[:3]:
                bound = held
            furthest = max(tm._ready.member_entries(queue), default=None)
            if furthest is not None and furthest[:3] > bound[:3]:
                held_task = tm._tasks.get(furthest.task_id)
                if held_task is not None:
                    bound = bound_of(held_task)
            if waiting is not None and waiting[:3] > bound[:3]:
                bound = waiting
            tm._ready.set_bound(queue, bound)
        for task_id, version, _, _ in keys:
            if task_id in work.undo or task_id in tm._held:
                continue  # this batch's, or a claim of this node's: its fence decides
            known = tm._tasks.get(task_id)
            if known is not None and tm._versions.get(task_id) == version:
                at = tm._ready_at.get(task_id)
                if at is not None and at > tm._mono and task_id not in tm._own_backoffs:
                    # Locked, so out of its backoff by the database's clock, which ends
                    # a backoff read back; memory held it longer (its reckoning of that
                    # clock was off: the server's clock stepped since it was read).
                    tm._index(known, None)
                    tm._ready_at[task_id] = tm._mono
                    tm._index(None, known)
                continue
            task = read.get(task_id)
            if task is None:
                continue  # not read in full: memory held it at this version when asked
            if known is not None:
                tm._index(known, None)
                tm._drop(task_id)
                tm._finished.pop(task_id, None)
            tm._versions[task_id] = version
            if task.available_at is not None:
                tm._ready_at[task_id] = tm._mono  # locked: out of its backoff (above)
            tm._take_in(task, runs.get(task_id, ()))
        tm._ready.extended([queue])
    if dropped:
        tm._ready.changed = True


def unpark(tm: TaskManager, waiter_id: int, work: _Batch | None = None) -> None:
    waiter = tm._waiters.pop(waiter_id)
    tm._waits.discard(waiter_id)
    if work is not None:
        work.unparked.append((waiter_id, waiter))  # parked again if the batch conflicts


def assign(
    tm: TaskManager, task_id: str, claim: ClaimTask | ClaimTasks, work: _Batch, now: datetime
) -> Claim:
    task = tm._tasks[task_id]
    tm._touch(task_id, work)
    expires = now + timedelta(seconds=claim.lease)
    # A claim that starts its task (claim_tasks(start=True)) opens its run running: the
    # row a put of the assigned run and then its start would leave (the write keeps a
    # row's last state only), without a second run and op.
    run = Run(
        id=new_id(),
        task_id=task_id,
        worker_id=claim.worker_id,
        run_number=len(tm._runs_of.get(task_id, ())) + 1,
        status=RunStatus.RUNNING if claim.start else RunStatus.ASSIGNED,
        started_at=now,
        lease_seconds=claim.lease,
        lease_expires_at=expires,
    )
    tm._remember_run(run)
    timeout = None if task.timeout is None else tm._mono + task.timeout
    # The secret goes to the claimer, in the answer, and nowhere else: memory and the
    # database keep its hash.
    secret = new_secret()
    lease_hash = _hash(secret)
    lease = tm._mono + claim.lease  # written with the claim's run
    # Both run from the claim's answer: later by the batch's lag, known once committed.
    lag = work.lag
    if lag is None:
        lag = work.lag = _Lag()
    tm._due[run.id] = _Due(lease, timeout, lease_hash, lease, lag)
    work.ops.append(PutRun(run, lease_hash))
    updated = tm._transition(
        task,
        A,
        work,
        now,
        claim.worker_id,
        {"assigned_worker": claim.worker_id, "available_at": None},
        {"run_id": run.id, "attempt": run.run_number},
    )
    tm._held[task_id] = run.id
    if tm._limits:
        tm._count_start(updated)
    if claim.start:  # as start_run, its run already running
        updated = tm._transition(updated, R, work, now, claim.worker_id, {}, _run_data(run))
    # The earlier of the two (_Due.next, its shift still 0), without a call a claim.
    tm._deadlines.set(run.id, timeout if timeout is not None and timeout <= lease else lease)
    return Claim(updated, Lease(task_id, run.id, run.run_number, secret), expires)


def start_run(tm: TaskManager, task: Task, run: Run, work: _Batch, now: datetime) -> Task:
    """The claimed ``task`` (assigned) starts running on its ``run``."""
    if task.status is not A:
        raise IllegalTransitionError("task", task.id, task.status.value, R.value)
    if task.id not in work.undo or tm._refilling is not None:  # see machine.transition
        tm._touch(task.id, work)
    started = msgspec.structs.replace(run, status=RunStatus.RUNNING)
    tm._runs[run.id] = started
    work.ops.append(SetRunState(started))
    return tm._transition(task, R, work, now, run.worker_id, {}, _run_data(run))


def release_unclaimed(tm: TaskManager, claim: Claim, work: _Batch, now: datetime) -> None:
    task = tm._tasks.get(claim.lease.task_id)
    if task is None or tm._held.get(task.id) != claim.lease.run_id:
        return
    if not _proves(claim.lease, tm._due[claim.lease.run_id].lease_hash):
        return  # not the claim that was answered: it frees no one's task
    run = tm._runs[claim.lease.run_id]
    note = "the claimer stopped waiting before it received the task"
    tm._close_run(run, RunStatus.RELEASED, work, now, error=note)
    tm._requeue(task, run, "unclaimed", None, work, now, count=False)
