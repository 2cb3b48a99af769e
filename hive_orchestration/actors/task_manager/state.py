"""What the TaskManager keeps beside its tasks and runs, and what one batch changes: the
types its modules share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

import msgspec

from ...errors import HiveError
from ...messages.storage import QueueHeads, WriteOp
from ...messages.tasks import (
    Claim,
    ClaimTask,
    ClaimTasks,
    RevokedTaskType,
    Run,
    RunStatus,
    Task,
    TaskManagerMessage,
    TaskStatus,
)
from ...runtime import Envelope, Reply, Request
from .ready import QueueId

Q, A, R, B = TaskStatus.QUEUED, TaskStatus.ASSIGNED, TaskStatus.RUNNING, TaskStatus.BLOCKED


#: A task in these statuses holds its concurrency slots.
_HOLDING = frozenset({A, R})
_RUN_OPEN = frozenset({RunStatus.ASSIGNED, RunStatus.RUNNING})


class CommitOutcomeUnknown(RuntimeError):
    """A commit whose outcome is unknown: the actor crashes on purpose and reloads."""


@dataclass(frozen=True, slots=True)
class _Forward:
    """Answer this request from storage (queued behind the batch's write)."""

    request: Request[object]


class _Undo(msgspec.Struct, frozen=True, gc=False):
    """A task's memory state before a batch first changed it.

    One per task a batch changes, alive until its commit: untracked by the cycle
    collector (data only, as the records of messages/task_models.py), and without
    empty dicts for a task with no runs (most of them: created, or claimed the first
    time), since every object the collector knows of, tracked or not, counts towards
    its next pass."""

    task: Task | None
    finished: bool
    run_ids: tuple[str, ...] | None
    runs: dict[str, Run] | None = None  # its runs (None: it had none)
    due: dict[str, _Due] | None = None  # its claimed run's deadlines (None: none)
    ready_at: float | None = None  # the end of its backoff
    own_backoff: bool = False  # a backoff this node decided (TaskManager._own_backoffs)


@dataclass(slots=True)
class _Refill:
    """A read of the next tasks of ``queues``, in flight while batches go on, and what
    those batches did that the read may not show."""

    reply: Reply[QueueHeads]
    queues: set[QueueId]
    touched: set[str] = field(default_factory=set)  # tasks changed since it was sent
    # Tasks of its queues memory let go of since (queued after their bound), with runs.
    spilled: dict[str, tuple[Task, list[Run]]] = field(default_factory=dict)
    stale: set[QueueId] = field(default_factory=set)  # trimmed since: their answer is void
    void: bool = False  # a batch failed since: the whole answer is void


class _Lag(msgspec.Struct, gc=False):
    """How long after its clock reading a batch was answered (its commit's time, mostly):
    set once the batch is committed, before its answers, and shared by the deadlines of
    the claims it handed out (:attr:`_Due.shift`), which so run from the claim's answer
    for one write a batch, none a claim (leases.claimed_from_answer). Mutable, and
    untracked by the cycle collector, as the tuples holding it then are."""

    by: float = 0.0


class _Due(NamedTuple):
    """A claimed run's deadlines, on the monotonic clock, and the hash of its lease's
    secret: kept here since it lives exactly as long (set at the claim, dropped when the
    claim ends, put back after a failed commit), and never on the :class:`Run`, which
    reads return."""

    lease: float
    timeout: float | None
    lease_hash: bytes | None  # None (a row from before lease secrets): nothing proves it
    # On a store several nodes share: the lease deadline its row last recorded (None: not
    # known, so the next heartbeat writes it), which the database's own deadline of the
    # lease is (leases.heartbeat).
    written: float | None = None
    # A claim's, until its first renewal: its batch's lag, by which ``lease`` and
    # ``timeout`` (set from the batch's clock reading) are later, running from the answer.
    shift: _Lag | None = None

    def next(self) -> tuple[float, bool]:
        """The earliest, and whether it is the timeout."""
        shift = self.shift
        by = 0.0 if shift is None else shift.by
        if self.timeout is not None and self.timeout <= self.lease:
            return self.timeout + by, True
        return self.lease + by, False

    def timeout_from_answer(self) -> float | None:
        """The timeout, on the monotonic clock (a claim's counted from its answer)."""
        shift = self.shift
        if shift is None or self.timeout is None:
            return self.timeout
        return self.timeout + shift.by


@dataclass(slots=True)
class _Waiter:
    """A parked claim: answered by the first dispatch that finds it a task (up to
    ``limit`` of them for a :class:`ClaimTasks`), or at its deadline (``None`` for a claim
    that does not wait)."""

    envelope: Envelope[TaskManagerMessage]
    claim: ClaimTask | ClaimTasks
    deadline: float | None
    # A ClaimTasks's claims so far, committed, when a drained head left it short: it
    # stays parked for the rest, which the head's next tasks bring (see _dispatch).
    taken: list[Claim] = field(default_factory=list)

    @property
    def nothing(self) -> tuple[Claim, ...] | None:
        """The answer when no (more) task came."""
        return tuple(self.taken) if isinstance(self.claim, ClaimTasks) else None


@dataclass(slots=True)
class _Batch:
    """What one batch changes: the writes, how to undo them in memory, what it deleted,
    and the answers to give once the writes are committed."""

    ops: list[WriteOp] = field(default_factory=list)
    undo: dict[str, _Undo] = field(default_factory=dict)
    keys: dict[str, str | None] = field(default_factory=dict)  # key -> owner before the batch
    # Keys of the batch's creates that memory did not hold, as storage answered before the
    # batch (key -> task id; absent: no task has it), or why storage could not answer.
    stored_keys: dict[str, str] = field(default_factory=dict)
    key_errors: dict[str, HiveError] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    answers: list[tuple[Envelope[TaskManagerMessage], object]] = field(default_factory=list)
    # The leases this batch's heartbeats renewed, with their spans: each runs from the
    # answer, after the commit (leases.renewed_from_answer). None: none (most batches;
    # no list made for them).
    renewed: list[tuple[str, float]] | None = None
    # The lag its claims' deadlines share (leases.claimed_from_answer). None: no claim.
    lag: _Lag | None = None
    parked: list[int] = field(default_factory=list)  # waiters that arrived in this batch
    seqs: tuple[int, ...] = ()  # the committed events' sequence numbers
    plan_enders: set[int] = field(default_factory=set)  # envelopes that ended a plan's task
    starved: bool = False  # a claim waits for a drained head's next tasks
    # Parked ClaimTasks this batch gave claims to, and how many they had before.
    grown: list[tuple[int, int]] = field(default_factory=list)
    # The revoked task types before the batch first changed them (None: unchanged).
    revoked: dict[str, RevokedTaskType] | None = None
    # Fenced stores: the existing tasks the write fences (sent with the version memory
    # read them at), the waiters the batch took off the parked list with an answer, and
    # whether a conflict may be decided again (else it is answered as an error).
    fenced: list[str] = field(default_factory=list)
    keys_claimed: set[str] = field(default_factory=set)  # concurrency keys it claimed
    unparked: list[tuple[int, _Waiter]] = field(default_factory=list)
    may_retry: bool = False
    # Fenced stores: the parked claims are handed out at the commit, once the ready rows
    # they may take are locked (claims.py, lock_claims): the batch's clock reading and
    # whether the heads could be read (dispatch's ``refilled``); None once handed out.
    dispatch: tuple[datetime, bool] | None = None
