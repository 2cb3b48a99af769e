"""A batch's end: its one commit, then the answers (or, after a failed commit, memory put
back and the changes refused), and the answers the plan barrier holds back.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

import anyio

from ...errors import ActorFailedError, HiveError, RuntimeStoppedError, StorageError
from ...messages.storage import AppendEvent, Committed, LockReady, Write
from ...messages.tasks import (
    PLAN_TASK_ENDINGS,
    CancelTask,
    CancelTasks,
    Claim,
    ClaimTask,
    ClaimTasks,
    CompleteTask,
    CompleteTasks,
    CreateRun,
    CreateTask,
    CreateTasks,
    DeleteTask,
    FailTask,
    FailTasks,
    FlushQueue,
    Heartbeat,
    PurgeTasks,
    QueueTasks,
    ReleaseTask,
    ReleaseWorker,
    RestoreTaskType,
    RetryTask,
    RevokeTaskType,
    StartTask,
    TaskManagerMessage,
    Unclaimed,
    UpdateRunStatus,
    UpdateTaskStatus,
)
from ...runtime import Envelope, Reply, Request
from .fencing import _conflict
from .state import CommitOutcomeUnknown, _Batch, _Forward, _Waiter

if TYPE_CHECKING:
    from .actor import TaskManager


#: Requests that change state: after a failed commit they get the storage error.
_WRITES = (
    CreateTask,
    CreateTasks,
    QueueTasks,
    CancelTasks,
    UpdateTaskStatus,
    CancelTask,
    DeleteTask,
    CreateRun,
    UpdateRunStatus,
    ClaimTask,
    ClaimTasks,
    Heartbeat,
    StartTask,
    CompleteTask,
    CompleteTasks,
    FailTask,
    FailTasks,
    ReleaseTask,
    ReleaseWorker,
    RetryTask,
    RevokeTaskType,
    RestoreTaskType,
    FlushQueue,
    PurgeTasks,
)


def _claims(outcome: object) -> tuple[Claim, ...]:
    """The claims in a claim's answer (one claim, or a tuple of them)."""
    if isinstance(outcome, Claim):
        return (outcome,)
    assert isinstance(outcome, tuple)
    return outcome


async def finish(
    tm: TaskManager,
    work: _Batch,
    forwards: list[tuple[Envelope[TaskManagerMessage], Request[object]]],
    now: datetime,
) -> list[Claim] | None:
    """Commit, then answer; returns the claims no one was there to receive, or
    ``None`` for a conflict to decide again (nothing answered, memory read again)."""
    try:
        error = await tm._commit(work, forwards)
    except CommitOutcomeUnknown as exc:
        for envelope, _ in work.answers:  # claims handed out from older batches too
            envelope.fail(ActorFailedError(tm.name, exc))
        raise
    if error is not None and work.may_retry and _conflict(error):
        tm._restore(work, now)
        tm._repark(work)
        tm._conflicted = True
        await tm._refresh(work.fenced)
        if work.keys_claimed:
            # The conflict may be a key another node holds to its limit: none of its
            # tasks is handed out here until the next sweep looks again.
            tm._ready.pause(keys=work.keys_claimed)
            tm._paused_keys |= work.keys_claimed
        await tm._sweep()  # the heads as they are now: what others took is gone
        return None
    if error is not None and work.dispatch is not None:
        # Failed before its claims were handed out (the rows could not be locked):
        # the claims parked in this batch hear the error, as those handed out would.
        for waiter_id in work.parked:
            waiter = tm._waiters.get(waiter_id)
            if waiter is not None:
                tm._unpark(waiter_id)
                waiter.envelope.fail(error)
        work.parked.clear()
    if tm._fenced:
        await tm._forward(forwards)  # held until the write's outcome was known
    short: list[_Waiter] = []
    if error is not None:
        tm._restore(work, now)
        for waiter_id, before in work.grown:
            waiter = tm._waiters.get(waiter_id)
            if waiter is not None:  # still parked for more: not with this batch's
                del waiter.taken[before:]
                tm._unpark(waiter_id)
                short.append(waiter)
    else:
        tm._bump(work)
        tm._shed()
        if work.renewed:
            tm._renewed_from_answer(work)
        if work.lag is not None:
            tm._claimed_from_answer(work)
    barrier = tm._plan_barrier_seq(work) if error is None else 0
    held: list[tuple[Envelope[TaskManagerMessage], object]] = []
    unclaimed: list[Claim] = []
    for envelope, outcome in work.answers:
        if error is not None and isinstance(envelope.message, _WRITES):
            envelope.fail(error)
        elif error is not None:
            # A read answered from state that included the failed changes: read again.
            try:
                again = await tm._handle(envelope.message, _Batch(), now)
            except HiveError as exc:
                envelope.fail(exc)
                continue
            if isinstance(again, _Forward):
                assert envelope.reply is not None
                await tm._storage.forward(again.request, envelope.reply)
            else:
                envelope.resolve(again)
        elif isinstance(outcome, HiveError):
            envelope.fail(outcome)
        elif isinstance(envelope.message, ClaimTask | ClaimTasks) and outcome:
            # Only one worker may hold a task: if the claimer left before taking it,
            # it is handed back now (closed reply) or told back later (Unclaimed).
            claims = _claims(outcome)
            if not envelope.resolve(outcome, Unclaimed(claims)):
                unclaimed += claims
        elif barrier and id(envelope) in work.plan_enders:
            held.append((envelope, outcome))
        else:
            envelope.resolve(outcome)
    if held:
        tm._held_back.append((barrier, held))
    for waiter in short:
        if not waiter.taken:
            waiter.envelope.fail(cast(HiveError, error))
        elif not waiter.envelope.resolve(tuple(waiter.taken), Unclaimed(tuple(waiter.taken))):
            unclaimed += waiter.taken  # those of earlier, committed batches
    return unclaimed


def plan_barrier_seq(tm: TaskManager, work: _Batch) -> int:
    """The seq of the batch's last event that ends a plan's task, if the plan executor
    has not applied it yet (else 0). It is an event the plan executor's feed is sure
    to bring (a plan's task ending), so the barrier is always lifted."""
    if not work.plan_enders or not work.seqs:
        return 0
    barrier = 0
    seqs = iter(work.seqs)
    for op in work.ops:
        if isinstance(op, AppendEvent):
            seq = next(seqs)
            if op.event.plan_id is not None and op.event.type in PLAN_TASK_ENDINGS:
                barrier = seq
    return barrier if barrier > tm._plans_settled else 0


def release_held_back(tm: TaskManager, settled: int | None) -> None:
    """Answer what was held back for plan events up to ``settled`` (None: all)."""
    if settled is not None:
        tm._plans_settled = max(tm._plans_settled, settled)
    queue = tm._held_back
    while queue and (settled is None or queue[0][0] <= settled):
        for envelope, outcome in queue.popleft()[1]:
            envelope.resolve(outcome)


async def commit(
    tm: TaskManager,
    work: _Batch,
    forwards: list[tuple[Envelope[TaskManagerMessage], Request[object]]],
) -> HiveError | None:
    """Write the batch's changes, then queue the forwarded reads behind them (on a
    fenced store, once the write's outcome is known: :meth:`_finish`)."""
    lock = tm._lock_claims(work)
    reply: Reply[Committed] | None
    if lock is not None:
        # The claims are handed out from the rows the write's transaction locks
        # (claims.py): the storage actor answers them, this actor decides the ops.
        # Before the lock's transaction begins: its now() is read after this.
        sent = tm._monotonic()
        reply = await tm._storage.request(Write((), lock=lock))
        await _decide_locked(tm, work, lock, reply, sent)
    else:
        ops = tm._fences(work) + work.ops if work.ops else []
        # While the storage actor is idle its batch runs in this task (request_now):
        # neither it nor this actor is woken for the commit.
        reply = await tm._storage.request_now(Write(tuple(ops))) if ops else None
    if not tm._fenced:
        await tm._forward(forwards)
    if reply is None:
        return None
    try:
        # No deadline: the storage actor's batch is shielded and always ends, within
        # busy_timeout plus one commit. Giving up earlier would let memory and the
        # database part ways: the write could land after memory was put back.
        work.seqs = (reply.take() if reply.done else await reply.wait()).seqs
    except StorageError as exc:
        return exc  # rolled back whole: nothing of the batch was applied
    except HiveError as exc:
        # The storage actor crashed or stopped mid-batch: the write may or may not be
        # on disk. Only the database knows, so this actor restarts and reloads it.
        raise CommitOutcomeUnknown(
            f"storage did not say whether a batch was committed ({exc}); the task"
            " manager restarts from the database"
        ) from exc
    return None


async def _decide_locked(
    tm: TaskManager, work: _Batch, lock: LockReady, reply: Reply[Committed], sent: float
) -> None:
    """Answer the locked rows of ``lock`` with the write's ops, in this actor's task.

    The storage actor holds its transaction open until ``lock.decided`` is answered, so
    it is answered on every way out: with the ops, or failed (this actor stopped, or
    its decision raised), which leaves this write out of the batch and the rest goes
    on. The write may also end without locking (its batch failed first): then
    ``reply`` is answered and there is nothing to decide."""
    try:
        if not lock.locked.done and not reply.done:
            async with anyio.create_task_group() as first:

                async def settle(slot: Reply[Any]) -> None:
                    await slot.settled()
                    first.cancel_scope.cancel()

                first.start_soon(settle, lock.locked)
                first.start_soon(settle, reply)
        if lock.locked.done:
            loaded = await lock.locked.wait()
            lock.decided.resolve(tm._decide_locked(work, loaded, lock.limit, sent))
    finally:
        lock.decided.fail(RuntimeStoppedError("the task manager did not decide its claims"))


async def forward(
    tm: TaskManager, forwards: list[tuple[Envelope[TaskManagerMessage], Request[object]]]
) -> None:
    for envelope, request in forwards:
        assert envelope.reply is not None
        await tm._storage.forward(request, envelope.reply)
