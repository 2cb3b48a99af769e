"""Leases: the proof of a claim (its token's secret), heartbeats, and the deadlines of
claims, backoffs and claim waits, kept on one alarm (the claims: :mod:`.claims`).

Two clocks. Every deadline runs on ``monotonic`` (the event loop's clock, the alarm's
too), which no one steps; the wall clock (``clock``) only stamps what is stored and
shown (``lease_expires_at``, ``available_at``, ``started_at``, event times). A stored
wall time is turned into a deadline once, when it is loaded (at start-up): what remains
of it by the wall clock then, at least nothing and at most the span that was set, so
that a clock stepped while the runtime was down can neither stretch nor revive it.

A third on a store several nodes share (PostgreSQL): the database's, which every node's
claims read a retry backoff due by. The end of a backoff is stored (and held in memory,
so shown) by it: the database's time as this node reckons it, from its last reading of
that clock and its own monotonic clock since (:func:`read_database_clock`), plus the
span. Written as a plain value, it is what memory holds, and a node whose wall clock is
far from the server's neither holds back its retries nor sees another node's end early.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from itertools import chain
from typing import TYPE_CHECKING

import msgspec

from ...errors import LeaseLostError
from ...messages.storage import SetRunState
from ...messages.tasks import (
    CompleteTask,
    CompleteTasks,
    FailTask,
    FailTasks,
    Heartbeat,
    Lease,
    ReleaseTask,
    Run,
    RunStatus,
    StartTask,
    Task,
    TaskManagerMessage,
    TaskStatus,
)
from ...runtime import Envelope
from .machine import _run_data
from .state import _Batch, _Due

if TYPE_CHECKING:
    from .actor import TaskManager


_NOT_THE_CLAIMER = (
    "this lease's secret does not match the claim's: only the worker that claimed the task"
    " can act on it, with the lease its claim returned, passed on as it came (a lease"
    " rebuilt from get_runs has no secret)"
)


#: On a store several nodes share: how far a bare heartbeat may move a lease from the
#: deadline its row records and stay in memory (a renewal more often than this writes at
#: most once per this span). Less than the leader's grace after a stored deadline
#: (storage/pg/leader.py, REAP_GRACE_SECONDS: 2 s), so that the leader never ends a lease
#: its node renewed.
_WRITTEN_SLACK = 0.5


#: Requests a worker makes with its lease token: each is a sign of that worker's life,
#: and renews its claim's lease for as long as it waits to be handled (renewals_waiting).
LEASED = (Heartbeat, StartTask, CompleteTask, FailTask, ReleaseTask)
#: Batch calls of leased requests: each item its own sign of life.
LEASED_BATCHES = (CompleteTasks, FailTasks)


def _hash(secret: str) -> bytes:
    # SHA-256 with no salt or KDF: the secret is 128 random bits, not a password, so
    # there is no table worth precomputing and no search to slow down.
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def _proves(lease: Lease, lease_hash: bytes | None) -> bool:
    """Whether ``lease`` carries the secret whose hash is ``lease_hash``, compared in
    constant time (hashes are compared, not secrets, so even a leaky compare would tell
    a guesser about nothing but the hash of its own guess)."""
    return lease_hash is not None and hmac.compare_digest(_hash(lease.secret), lease_hash)


def _lost(lease: Lease, reason: str, status: TaskStatus | str) -> LeaseLostError:
    return LeaseLostError(lease.task_id, lease.run_id, lease.attempt, str(status), reason)


def read_clocks(tm: TaskManager) -> datetime:
    """Read both clocks for a batch (or the start-up); returns the wall time, ``now``."""
    tm._wall = tm._clock()
    tm._mono = tm._monotonic()
    return tm._wall


def from_wall(tm: TaskManager, at: datetime, longest: float) -> float:
    """The stored wall time ``at`` as a monotonic deadline: what remains of it by the
    wall clock now, at least nothing and at most ``longest`` (the span that was set),
    so that a wall clock stepped since it was set can neither stretch it nor end it
    late. Exact for a time set in this batch (``now`` plus a span)."""
    remaining = (at - tm._wall).total_seconds()
    return tm._mono + min(max(remaining, 0.0), max(longest, 0.0))


def due_from_wall(tm: TaskManager, run: Run, task: Task, lease_hash: bytes | None) -> _Due:
    """A claimed run's deadlines, from its stored times (at start-up): its lease, set
    whole when it was loaded, and what remains of its timeout."""
    assert run.lease_expires_at is not None
    timeout = None
    if task.timeout is not None and run.started_at is not None:
        ends = run.started_at + timedelta(seconds=task.timeout)
        timeout = tm._from_wall(ends, task.timeout)
    lease = tm._from_wall(run.lease_expires_at, run.lease_seconds or 0.0)
    return _Due(lease, timeout, lease_hash)


def read_database_clock(tm: TaskManager, at: datetime, sent: float, received: float) -> None:
    """The database's clock read ``at`` at some moment between this node's monotonic
    readings ``sent`` (before it asked: at start-up, then at each lock of ready rows,
    which answers its ``now()``) and ``received`` (once the answer came). Kept as the
    database's time at monotonic 0: its time at any moment of this node follows without
    the node's wall clock, which a step moves.

    Reckoned from ``sent``, so never behind the database's clock: a backoff's end is
    stored by this reckoning, and one behind would store it early by as much (an answer
    that took 84 ms under load made another node, or this one reopened, take the task
    that early). Ahead by the time from the ask to the reading at most; a reading that
    agrees with the one held (the epoch held lies between this reading's two bounds)
    keeps the one held, the closer of the two, so that a lock that waited long to begin
    does not set every backoff after it that much later. One that does not agree (the
    server's clock stepped, or drifted past a reading's bounds) replaces it; a step or
    drift forward smaller than the latest reading's round trip may leave the one held
    behind by that much at most."""
    latest = at - timedelta(seconds=sent)
    held = tm._db_epoch
    if held is None or not at - timedelta(seconds=received) <= held <= latest:
        tm._db_epoch = latest


def database_time(tm: TaskManager, epoch: datetime) -> datetime:
    """The database's time at this batch's moment (``_mono``), from ``epoch``."""
    return epoch + timedelta(seconds=tm._mono)


def backoff_until(tm: TaskManager, delay: float) -> datetime:
    """The end of a retry backoff of ``delay`` seconds set in this batch, as stored and
    held: this node's wall time plus the span, on a store of one owner; on a store
    several nodes share, the database's time plus the span (every node reads it due by
    that clock; this node's own wall clock may be an hour off it). This node ends the
    backoff on its monotonic clock either way (``_ready_at``, set by the retry)."""
    epoch = tm._db_epoch
    start = tm._wall if epoch is None else database_time(tm, epoch)
    return start + timedelta(seconds=delay)


def backoff_end(tm: TaskManager, task: Task) -> float | None:
    """When the queued ``task``'s backoff ends (``None``: it has none)."""
    if task.available_at is None:
        return None
    at = tm._ready_at.get(task.id)
    if at is None:
        epoch = tm._db_epoch
        if epoch is not None:
            # Read from a database several nodes share, where it is stored by the
            # database's clock (backoff_until): what remains of it by that clock. The
            # claims' lock takes it only once it is due by that clock anyway.
            remaining = (task.available_at - database_time(tm, epoch)).total_seconds()
            at = tm._ready_at[task.id] = tm._mono + max(remaining, 0.0)
            return at
        # Loaded at start-up, or indexed again after a change in this batch (updated_at
        # is now); a retry sets its own end (machine.requeue).
        whole = (task.available_at - task.updated_at).total_seconds()
        at = tm._ready_at[task.id] = tm._from_wall(task.available_at, whole)
    return at


def settle_due(
    tm: TaskManager,
    work: _Batch,
    now: datetime,
    batch: Sequence[Envelope[TaskManagerMessage]] = (),
) -> None:
    """End the leases and runs whose time is up, release backoffs, close claim waits.

    A lease whose claim has a request of its worker in ``batch`` or still waiting behind
    it (:meth:`~hive_orchestration.runtime.Actor.waiting`) is spared: see
    :func:`renewals_waiting`."""
    mono = tm._mono
    deadlines = tm._deadlines
    lapsed: list[str] | None = None  # leases due, in the order their deadlines came up
    while (run_id := deadlines.pop_due(mono)) is not None:
        run = tm._runs[run_id]  # an entry is dropped when its claim ends
        due, is_timeout = tm._due[run_id].next()
        if due > mono:  # renewed since: look again then
            deadlines.set(run_id, due)
        elif is_timeout:
            task = tm._tasks[run.task_id]
            error = f"run {run.run_number} exceeded the task's timeout of {task.timeout:g}s"
            tm._close_run(run, RunStatus.TIMED_OUT, work, now, error=error)
            tm._requeue(task, run, "timed_out", error, work, now)
        elif lapsed is None:
            lapsed = [run_id]
        else:
            lapsed.append(run_id)
    if lapsed is not None:
        spared = renewals_waiting(tm, lapsed, batch)
        for run_id in lapsed:
            run = tm._runs[run_id]
            if run_id in spared:
                # Watched again from here; the request's handling moves the lease, and
                # this entry, coming up early, is pushed back to it (or, were the request
                # refused after all, ends the lease then).
                deadlines.set(run_id, mono + (run.lease_seconds or 0.0))
                continue
            task = tm._tasks[run.task_id]
            error = (
                f"lease expired: worker {run.worker_id!r} sent no heartbeat"
                f" for {run.lease_seconds:g}s"
            )
            tm._close_run(run, RunStatus.LOST, work, now, error=error)
            tm._requeue(task, run, "lease_expired", error, work, now, retry_after=0.0)
    tm._ready.promote(mono)
    if tm._limits:
        tm._ready.resume(*tm._limits.freed(mono))
    while (waiter_id := tm._waits.pop_due(mono)) is not None:
        waiter = tm._waiters.pop(waiter_id)
        work.unparked.append((waiter_id, waiter))
        work.answers.append((waiter.envelope, waiter.nothing))


def renewals_waiting(
    tm: TaskManager, lapsed: list[str], batch: Sequence[Envelope[TaskManagerMessage]]
) -> set[str]:
    """Of the runs ``lapsed`` (their lease due), those whose worker sent a request with
    the claim's lease (a heartbeat, a start, a completion, a failure, a release) that is
    in ``batch`` or still waiting behind it: queued in the mailbox, or its sender waiting
    for room. Each was sent before this batch looked at the deadlines, so it renewed the
    lease in time however late the TaskManager, busy (a commit held up by a slow disk or
    a database backend waiting for a CPU), takes it; as the WorkerRegistry counts a
    heartbeat. Only a request that proves the claim (its run, attempt and secret) counts:
    a stale or forged one spares nothing. Looking costs a pass over the batch and the
    mailbox, only in a batch that finds a lease due; the other way, handling the batch's
    requests before its deadlines, would still lose a renewal queued behind a full batch.
    """
    wanted = set(lapsed)
    found: set[str] = set()
    messages = chain((envelope.message for envelope in batch), tm.waiting())
    for message in messages:  # no await: the mailbox must not change meanwhile
        if isinstance(message, LEASED):
            leases: Iterable[Lease] = (message.lease,)
        elif isinstance(message, LEASED_BATCHES):
            leases = [item.lease for item in message.items]
        else:
            continue
        for lease in leases:
            run_id = lease.run_id
            if run_id not in wanted or run_id in found:
                continue
            run = tm._runs[run_id]
            if (
                run.task_id == lease.task_id
                and run.run_number == lease.attempt
                and _proves(lease, tm._due[run_id].lease_hash)
            ):
                found.add(run_id)
        if len(found) == len(wanted):
            break  # every one found: the rest need not be read
    return found


def arm(tm: TaskManager) -> None:
    """Set the alarm to the earliest deadline (only when it changed: setting it wakes
    the alarm's task)."""
    if tm._alarm is None:
        return
    times = []
    for first in (tm._deadlines.first(), tm._waits.first()):
        if first is not None:
            times.append(first[0])
    delayed = tm._ready.next_delayed()
    if delayed is not None:
        times.append(delayed)
    times += tm._timers_due()
    frees = tm._limits.next_free()
    if frees is not None:
        times.append(frees)
    if tm._fenced and tm._waiters:
        times.append(tm._next_sweep)  # tasks queued by other nodes, for the waiters
        backoff = tm._backoff_ends.first()  # and the end of a backoff another node set
        if backoff is not None:
            times.append(backoff[0])
    wake = min(times) if times else None
    if wake != tm._alarm.at:
        tm._alarm.set(wake)


def holding(tm: TaskManager, lease: Lease, work: _Batch) -> tuple[Task, Run]:
    """The task and run ``lease`` holds, or :class:`LeaseLostError` saying why not."""
    task = tm._tasks.get(lease.task_id)
    run_id = tm._held.get(lease.task_id)
    if task is not None and run_id == lease.run_id and lease.task_id not in work.deleted:
        held = tm._runs[run_id]
        if held.run_number == lease.attempt:
            if _proves(lease, tm._due[run_id].lease_hash):
                return task, held
            # The ids and attempt are in every read of the runs; the secret is not.
            raise _lost(lease, _NOT_THE_CLAIMER, task.status)
    run = tm._runs.get(lease.run_id)
    if lease.task_id in work.deleted:
        raise _lost(lease, "the task was deleted", "deleted")
    if task is None:
        raise _lost(lease, "the task finished or was deleted", "unknown")
    if run is None or run.task_id != lease.task_id:
        raise _lost(lease, "this token's run is not a run of the task", task.status)
    if run.run_number != lease.attempt:
        raise _lost(lease, f"the run is attempt {run.run_number}", task.status)
    why = f"its run ended as {run.status.value}"
    if run.error:
        why += f" ({run.error})"
    if run_id is not None:
        why += f"; run {run_id} holds the task now"
    raise _lost(lease, why, task.status)


def heartbeat(tm: TaskManager, message: Heartbeat, work: _Batch, now: datetime) -> datetime:
    task, run = tm._holding(message.lease, work)
    assert run.lease_seconds is not None
    assert run.lease_expires_at is not None
    span = message.extend or run.lease_seconds
    expires = now + timedelta(seconds=span)  # shown; the deadline is on the monotonic clock
    changes: dict[str, object] = {"lease_expires_at": expires}
    if message.progress is not None:
        changes["progress"] = message.progress
    if message.phase is not None:
        changes["phase"] = message.phase
    # Progress is durable and published; a bare heartbeat only moves the lease, which
    # lives as long as this process, so it is kept in memory; but on a store several
    # nodes share it is written too (no event) once it moves the lease more than
    # _WRITTEN_SLACK from the deadline its row records, for the database keeps the
    # lease's deadline by its own clock and the leader ends a lease that passed it (by
    # its grace, more than the slack: a renewed lease is never ended so).
    lease = tm._mono + span
    before = tm._due[run.id]
    durable = len(changes) > 1 or (
        tm._fenced and (before.written is None or abs(lease - before.written) > _WRITTEN_SLACK)
    )
    if durable:
        tm._touch(task.id, work)
    renewed = msgspec.structs.replace(run, **changes)
    tm._runs[run.id] = renewed
    written = lease if durable else before.written
    # The renewed lease runs from this batch's answer (renewed_from_answer); the timeout,
    # from the claim's, fixed now (its batch was answered before the worker could renew).
    timeout = before.timeout_from_answer()
    tm._due[run.id] = _Due(lease, timeout, before.lease_hash, written)
    due = tm._due[run.id].next()[0]
    # Moved earlier only: a later deadline is found when the entry comes up (one
    # entry per claim either way), so that a heartbeat costs no sift.
    entry = tm._deadlines.get(run.id)
    if entry is None or due < entry:
        tm._deadlines.set(run.id, due)
    if work.renewed is None:
        work.renewed = [(run.id, span)]
    else:
        work.renewed.append((run.id, span))
    if durable:
        work.ops.append(SetRunState(renewed))
    if len(changes) > 1:
        data = _run_data(run)
        if message.progress is not None:
            data["progress"] = message.progress
        if message.phase is not None:
            data["phase"] = message.phase
        work.ops.append(tm._event("task.progress", task, now, run.worker_id, data))
    return expires


def renewed_from_answer(tm: TaskManager, work: _Batch) -> None:
    """Once the batch is committed, before its answers: the leases its heartbeats
    renewed run from now. A worker renews a while after the answer to its last renewal
    (the agent runner: a third of the lease), so a commit held up (a slow fsync, a
    database backend waiting for a CPU) is the runtime's delay, not the worker's:
    counted from the start of the batch, a 1 s lease whose renewal's commit took 0.7 s
    or more ended before the worker's next renewal was due to be sent. The deadline
    entry, coming up early, is pushed back to the lease (settle_due). The stored
    ``lease_expires_at`` stays as set (shown; a deadline loaded from it at the next
    start-up is at most the span from then). A claim's lease and timeout run from its
    answer too (:func:`claimed_from_answer`)."""
    answered = tm._monotonic()
    if work.renewed is None or answered <= tm._mono:
        return
    dues = tm._due
    for run_id, span in work.renewed:
        due = dues.get(run_id)  # None: the claim ended later in the batch
        if due is not None:  # (a renewed one's: no shift; not _replace, twice the time)
            dues[run_id] = _Due(answered + span, due.timeout, due.lease_hash, due.written)


def claimed_from_answer(tm: TaskManager, work: _Batch) -> None:
    """Once the batch is committed, before its answers: the claims it handed out run
    from now. Their leases and timeouts were set from the batch's clock reading; the
    worker gets the task only with the answer, and renews from there (the agent runner: a
    third of the lease after it) or works: counted from the batch, a 1 s lease or
    timeout whose claim's commit took 0.7 s or more ended before that renewal was sent,
    or a third into the work. One write for the batch: its claims' deadlines share its
    lag (:class:`_Lag`, ``_Due.shift``), which :meth:`_Due.next` adds; a renewal fixes
    the timeout so (heartbeat). Per claim it costs a field and a test (~1 200
    instructions, callgrind; claims.assign saves more), where a pass moving each
    claim's deadlines after the commit cost 3 400-4 800, ~0.5-0.7% of a task's.
    A deadline entry, coming up early, is pushed back (settle_due); the stored
    ``started_at`` and ``lease_expires_at`` stay as set. A claim taken in a batch whose
    claim waits on for more (a head ran dry mid-claim) and answered in its follow-up
    runs from the end of the batch that took it, that follow-up's time earlier: never
    later than its answer."""
    lag = work.lag
    assert lag is not None
    lag.by = max(tm._monotonic() - tm._mono, 0.0)
