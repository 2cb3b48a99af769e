"""The TaskManager actor: the one owner of every task, every run and every claim.

It keeps in memory the claimed tasks (assigned, running), the head of each ready queue
(below), the most recently finished tasks, and the runs of all of these, and is the only
code that changes tasks and runs. It handles a batch of requests at
a time: each is checked against the state machine below and applied in memory, and the
whole batch's changes (task rows, run rows and events, in order) go to the storage actor
as ONE write, so that state and event log are committed together. Only after that commit
does any requester get its answer. If the commit fails, memory is put back exactly as it
was before the batch (an undo record per task and per idempotency key) and every change
of the batch is refused with the storage error.

Reads of tasks that are no longer in memory are forwarded to the storage actor, queued
behind the batch's write, so they always see committed state; so are the listings.

The backlog stays in SQLite. A ready queue is the queued tasks of one task type,
requirement list and concurrency key; memory holds its best ``ready_head`` tasks (the
:class:`ReadyQueue` knows where each head ends, its *bound*) and reads the next ones,
through the partial index ``idx_tasks_ready``, when fewer than half are left: one storage
read before a batch, for every queue that ran low, so claims are answered from memory and
wait for storage only when a head ran dry (a claim that would otherwise get a worse task,
or none, while better ones are in storage waits for that read, made right after the
batch's commit). The reads happen between batches: the last commit is done and no other
is in flight, and the TaskManager is the only writer of tasks, so a read sees exactly the
state memory was built on, and a task created or changed meanwhile cannot be missed or
held twice. A task queued after its queue's bound (created, requeued or released by its
plan) is written and left to storage once committed; a head that grew past twice its
size (better tasks than its bound) lets go of its worst. A task memory does not hold (the
backlog, blocked subtasks, long-finished tasks) is read with its runs when a change is
asked for, in one read per batch, and changes exactly as it would in memory. Opening
loads the claimed tasks and the heads, not the backlog, so its time and memory do not
grow with it.

Idempotency keys. Memory knows the keys of the tasks in memory only; a finished task's key
leaves with it and lives on in SQLite, behind the unique index. Before a batch is handled,
the keys of its creates that memory does not know are looked up in storage, one read for
the whole batch, so a key stays its first task's until that task is deleted, however long
ago it finished and across restarts, and opening a database loads no key. A task created
with ``idempotency_scope="active"`` holds its key only while live: it lets go of it as it
ends, and storage's unique index covers only the keys still held (control.py).

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

Two clocks. Every deadline runs on ``monotonic`` (the event loop's clock, the alarm's
too), which no one steps; the wall clock (``clock``) only stamps what is stored and
shown (``lease_expires_at``, ``available_at``, ``started_at``, event times). A stored
wall time is turned into a deadline once, when it is loaded (at start-up): what remains
of it by the wall clock then, at least nothing and at most the span that was set, so
that a clock stepped while the runtime was down can neither stretch nor revive it.

State machine (``pending`` is the extraction plan's name for ``queued``):

=========  =========  ==================================================  ==============
from       to         caused by                                           event
=========  =========  ==================================================  ==============
(new)      queued     create_task, a schedule's slot (the Scheduler)      task.created
queued     assigned   claim_task, update_task_status(assigned)            task.assigned
queued     running    update_task_status(running)                         task.started
queued     completed  update_task_status(completed): resolved by hand,    task.completed
queued     failed     update_task_status(failed)     with no run          task.failed
assigned   running    start_task, update_task_status(running)             task.started
assigned   queued     fail_task or timeout with attempts left, lease      task.retrying
running    queued     expiry, worker lost, release_task, recovery on
                      open, update_task_status(queued)
assigned   completed  complete_task, update_task_status(completed)        task.completed
running    completed
assigned   failed     fail_task with no attempt left (or not retryable),  task.failed
running    failed     lease expiry or worker lost with none left,
                      update_task_status(failed)
assigned   timed_out  timeout with no attempt left,                       task.timed_out
running    timed_out  update_task_status(timed_out)
queued     cancelled  cancel_task, update_task_status(cancelled), its     task.cancelled
assigned   cancelled  expiry while queued (data.reason: expired;
running    cancelled  delays.py)
(new)      blocked    a plan's subtasks are created (PlanExecutor)        task.created
blocked    queued     its plan's dependencies are all done (PlanExecutor  plan.subtask_ready
                      only, never update_task_status)
blocked    cancelled  cancel_task, its plan failed, was cancelled or      task.cancelled
                      skips it
failed     queued     retry_task only (control.py), attempts reset; not   task.retried
timed_out             a plan's subtask
cancelled
=========  =========  ==================================================  ==============

Everything else is refused with :class:`IllegalTransitionError` and changes nothing:
completed, failed, cancelled and timed_out are terminal (only ``retry_task``, which is not
in :data:`TRANSITIONS`, takes a task out of the last three), and a claimed task is started
before it completes. Setting a task's current status again is refused too, so that each
transition publishes exactly one event, with one exception: asking a finished task for
the status it already has, with nothing that contradicts it (the same result or error,
or none), is a no-op answered ``False`` with no event. An app that publishes a
``TaskCompletedEvent`` for a task it just completed (as the seeds' client does) is
telling the truth, not making a change. A requeue's ``task.retrying`` says why in ``data.reason``
(``failed``, ``timed_out``, ``lease_expired``, ``worker_lost``, ``released``,
``unclaimed``, ``recovered``, ``requeued``). Deleting a task publishes ``task.deleted``
(so does a task of a ``delete_on_success`` type, in the commit that completes it, with
``reason: delete_on_success``); a purge of finished tasks (retention.py) publishes one
``retention.purged`` per chunk instead; a progress report publishes ``task.progress`` (no
status change).

Time (delays.py, limits.py; docs/TIMING.md). A delayed task (``run_at``) is queued but
neither in the ready index nor in memory until it comes due; a queued task past its
expiry is cancelled, and never handed out; a rate-limited type or key is held back while
its window is full. The earliest start times and expiries (read from their indexes a
range at a time) and the rate windows are deadlines of the same alarm.

Attempts: every run that ends without success counts one (failed, timed out, lost),
except a released run (handed back by its worker, or never received by it). While
``attempts <= max_retries`` the task is queued again, after an exponential backoff with
jitter for failures and timeouts, at once for a lost run (lease expired, worker lost,
recovered: the worker went away, the task did nothing wrong); then it ends failed
(timed_out after a timeout) with the last error kept.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import NamedTuple, cast

import anyio
import msgspec

from ..._ids import new_id, new_secret
from ...errors import (
    ActorFailedError,
    HiveError,
    IllegalTransitionError,
    InvalidInputError,
    LeaseLostError,
    NotFoundError,
    RuntimeStoppedError,
    StorageError,
)
from ...messages.events import Event, JsonValue
from ...messages.leader import RecoverClaims
from ...messages.storage import (
    AppendEvent,
    DeleteTaskEvents,
    DeleteTaskRow,
    FenceLeader,
    FenceTask,
    FetchRun,
    FetchRuns,
    FetchTask,
    FetchTasks,
    FindIdempotencyKeys,
    FindPurgeable,
    LastTaskId,
    LoadLeaseHashes,
    LoadQueueHeads,
    LoadRuns,
    LoadStarts,
    LoadTasks,
    LoadTimers,
    PutRun,
    PutTask,
    QueryTasks,
    QueryUnroutable,
    QueueHead,
    QueueHeads,
    SetRunState,
    SetTaskState,
    StorageMessage,
    StoreFences,
    Write,
    WriteOp,
)
from ...messages.tasks import (
    PLAN_TASK_ENDINGS,
    TERMINAL,
    CancelTask,
    CancelTasks,
    Claim,
    ClaimTask,
    ClaimTasks,
    CompleteTask,
    CreateRun,
    CreateTask,
    CreateTasks,
    DeleteTask,
    FailTask,
    FlushQueue,
    GetQueuedTasks,
    GetRevokedTaskTypes,
    GetRun,
    GetRuns,
    GetTask,
    GetTasksByStatus,
    GetUnroutableTasks,
    Heartbeat,
    Lease,
    PlansSettled,
    PurgeOutcome,
    PurgeTasks,
    QueueTasks,
    ReleaseTask,
    ReleaseWorker,
    RestoreTaskType,
    RetryTask,
    RevokedTaskType,
    RevokeTaskType,
    Run,
    RunStatus,
    StartTask,
    Task,
    TaskManagerMessage,
    TaskStatus,
    Unclaimed,
    UpdateRunStatus,
    UpdateTaskStatus,
    Wake,
)
from ...messages.workers import WorkerRegistryMessage, WorkersSeen
from ...runtime import Actor, ActorRef, Alarm, Deadlines, Envelope, Reply, Request
from . import control
from .delays import Frame, Timers
from .limits import RateLimits
from .ready import Bound, QueueId, ReadyQueue, bound_of, queue_of
from .retention import deletes_on_success, purged_event
from .schedule_slots import slot_ops

__all__ = ["LIVE", "TRANSITIONS", "TaskManager"]

log = logging.getLogger("hive_orchestration.tasks")

Q, A, R, B = TaskStatus.QUEUED, TaskStatus.ASSIGNED, TaskStatus.RUNNING, TaskStatus.BLOCKED

#: (from, to) -> the event the transition publishes. The table above, as data.
TRANSITIONS: dict[tuple[TaskStatus, TaskStatus], str] = {
    (Q, A): "task.assigned",
    (Q, R): "task.started",
    (Q, TaskStatus.COMPLETED): "task.completed",
    (Q, TaskStatus.FAILED): "task.failed",
    (A, R): "task.started",
    (A, Q): "task.retrying",
    (R, Q): "task.retrying",
    (A, TaskStatus.COMPLETED): "task.completed",
    (R, TaskStatus.COMPLETED): "task.completed",
    (A, TaskStatus.FAILED): "task.failed",
    (R, TaskStatus.FAILED): "task.failed",
    (A, TaskStatus.TIMED_OUT): "task.timed_out",
    (R, TaskStatus.TIMED_OUT): "task.timed_out",
    (Q, TaskStatus.CANCELLED): "task.cancelled",
    (A, TaskStatus.CANCELLED): "task.cancelled",
    (R, TaskStatus.CANCELLED): "task.cancelled",
    (B, Q): "plan.subtask_ready",
    (B, TaskStatus.CANCELLED): "task.cancelled",
}

#: Statuses that are not terminal (the live tasks).
LIVE = tuple(status.value for status in TaskStatus if status not in TERMINAL)
#: Statuses loaded whole at start-up: the claimed tasks (queued ones are read by head).
_CLAIMED = (A.value, R.value)
#: A task in these statuses holds its concurrency slots.
_HOLDING = frozenset({A, R})
_RUN_OPEN = frozenset({RunStatus.ASSIGNED, RunStatus.RUNNING})
#: What a claimed run becomes when update_task_status moves its task by hand.
_RUN_FOR_TASK = {
    TaskStatus.COMPLETED: RunStatus.COMPLETED,
    TaskStatus.FAILED: RunStatus.FAILED,
    TaskStatus.TIMED_OUT: RunStatus.TIMED_OUT,
    TaskStatus.CANCELLED: RunStatus.CANCELLED,
    Q: RunStatus.RELEASED,
}
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
    FailTask,
    ReleaseTask,
    ReleaseWorker,
    RetryTask,
    RevokeTaskType,
    RestoreTaskType,
    FlushQueue,
    PurgeTasks,
)
#: Requests a worker makes with its lease token: each is a sign of that worker's life.
_LEASED = (Heartbeat, StartTask, CompleteTask, FailTask, ReleaseTask)
#: Requests from outside the plan executor that can end a plan's task: with a plan
#: barrier, their answers wait until the plan executor has applied what the end caused.
#: (The plan executor's own requests are never held: it waits for them.)
_ENDS_PLAN_TASKS = (
    UpdateTaskStatus,
    CancelTask,
    DeleteTask,
    CompleteTask,
    FailTask,
    ReleaseWorker,
    FlushQueue,
)


class CommitOutcomeUnknown(RuntimeError):
    """A commit whose outcome is unknown: the actor crashes on purpose and reloads."""


@dataclass(frozen=True, slots=True)
class _Forward:
    """Answer this request from storage (queued behind the batch's write)."""

    request: Request[object]


@dataclass(frozen=True, slots=True)
class _Undo:
    """A task's memory state before a batch first changed it."""

    task: Task | None
    finished: bool
    run_ids: list[str] | None
    runs: dict[str, Run]
    due: dict[str, _Due] = field(default_factory=dict)  # its claimed run's deadlines
    ready_at: float | None = None  # the end of its backoff


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


class _Due(NamedTuple):
    """A claimed run's deadlines, on the monotonic clock, and the hash of its lease's
    secret: kept here since it lives exactly as long (set at the claim, dropped when the
    claim ends, put back after a failed commit), and never on the :class:`Run`, which
    reads return."""

    lease: float
    timeout: float | None
    lease_hash: bytes | None  # None (a row from before lease secrets): nothing proves it

    def next(self) -> tuple[float, bool]:
        """The earliest, and whether it is the timeout."""
        if self.timeout is not None and self.timeout <= self.lease:
            return self.timeout, True
        return self.lease, False


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


class TaskManager(Actor[TaskManagerMessage]):
    # Requests that arrive while a batch is being committed are handled as the next batch.
    max_batch = 1024

    def __init__(
        self,
        storage: ActorRef[StorageMessage],
        *,
        workers: ActorRef[WorkerRegistryMessage] | None = None,
        alarm: Alarm[TaskManagerMessage] | None = None,
        recover: bool = False,
        on_recovered: Callable[[], None] | None = None,
        recent: int = 10_000,
        retry_backoff: float = 1.0,
        retry_backoff_max: float = 300.0,
        concurrency_limits: Mapping[str, int] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = anyio.current_time,
        rng: random.Random | None = None,
        plan_barrier: bool = False,
        ready_head: int = 1024,
        rate_limits: Mapping[str, tuple[int, float]] | None = None,
        key_rate_limits: Mapping[str, tuple[int, float]] | None = None,
        frame: Frame | None = None,
        delete_on_success: frozenset[str] = frozenset(),
        sweep_interval: float = 1.0,
    ) -> None:
        self._storage = storage
        # Task types whose tasks are deleted as they complete ("*": every type).
        self._delete_on_success = delete_on_success
        # How many of each ready queue's best tasks memory holds; it reads the next ones
        # when fewer than half are left, and lets go of the worst when over twice as many.
        self._head = max(1, ready_head)
        self._low = max(1, self._head // 2)
        # Tasks this batch left out of memory's heads (queued after their queue's bound,
        # or blocked): memory lets go of them once the batch is committed.
        self._spill: set[str] = set()
        self._refilling: _Refill | None = None  # the read of heads in flight, if any
        self._workers = workers
        self._alarm = alarm
        self._recover = recover
        self._on_recovered = on_recovered
        self._clock = clock
        self._monotonic = monotonic  # the alarm's clock: deadlines run on it
        # Both clocks, read together at the start of the batch: a wall time set in the
        # batch (now + a span) is that span after _mono on the monotonic clock.
        self._wall = datetime.fromtimestamp(0, UTC)
        self._mono = 0.0
        self._recent_limit = recent
        self._backoff_base = retry_backoff
        self._backoff_max = retry_backoff_max
        self._type_limits = dict(concurrency_limits or {})
        # Task types whose tasks are not handed out (control.py), durable in their table;
        # the ready queue reads the same dict.
        self._revoked: dict[str, RevokedTaskType] = {}
        self._rng = rng or random.Random()
        self._tasks: dict[str, Task] = {}  # claimed, heads of queues, recently finished
        self._finished: OrderedDict[str, None] = OrderedDict()  # finished, oldest first
        # Idempotency key -> task id, for the tasks in memory only: the keys of tasks that
        # left memory are looked up in storage (see _look_up_keys).
        self._keys: dict[str, str] = {}
        self._runs: dict[str, Run] = {}
        self._runs_of: dict[str, list[str]] = {}
        # Derived from the above (rebuilt by _reindex): what can be handed out, which run
        # holds each claimed task, and the claimed runs' next deadlines.
        self._ready = ReadyQueue(self._type_limits, revoked=self._revoked)
        self._held: dict[str, str] = {}  # task id -> the run holding its claim
        # Run id -> its lease or timeout, one entry per claim (moved, not added to, when a
        # heartbeat moves it; dropped when the claim ends), so it stays O(live claims).
        self._deadlines: Deadlines[str] = Deadlines()
        # Monotonic deadlines of what is stored as wall times: each claimed run's lease and
        # timeout, each queued task's end of backoff (kept across _reindex, and put back
        # with the tasks after a failed commit).
        self._due: dict[str, _Due] = {}  # run id -> its deadlines
        self._ready_at: dict[str, float] = {}  # task id -> when its backoff ends
        # Parked claims, first come first served, and their wait deadlines (one each).
        self._waiters: dict[int, _Waiter] = {}
        self._waits: Deadlines[int] = Deadlines()
        self._next_waiter = 0
        # The plan barrier: answers to requests that ended a plan's task, held until the
        # plan executor says it has applied the events up to their seq (PlansSettled), so
        # that the caller's next read of the plan sees what the end released.
        self._plan_barrier = plan_barrier
        self._plans_settled = 0
        # Delayed tasks' start times and queued tasks' expiries (delays.py): the earliest
        # of each, read from storage a range at a time, with their monotonic deadlines.
        self._starts = Timers("run_at", self._head)
        self._expiries = Timers("expires_at", self._head)
        self._frame = frame or Frame()  # the process's: read at the first start
        self._timers_failed: float | None = None  # when a read of them last failed
        # At most N claims per interval of a task type or concurrency key (limits.py).
        self._limits = RateLimits(rate_limits, key_rate_limits)
        self._held_back: deque[tuple[int, list[tuple[Envelope[TaskManagerMessage], object]]]] = (
            deque()
        )
        # A store shared by several nodes (PostgreSQL; learnt at start-up): another node
        # may change any task at any time, so memory is the truth for this node's own
        # live claims only. Each write of an existing task is fenced by the version
        # memory read it at (task id -> version); a write that finds another version is
        # a conflict: memory reads those tasks again and the batch is decided again
        # (_refresh). The heads are read again from the best every sweep_interval, so
        # that tasks queued by other nodes are handed out here too.
        self._fenced = False
        self._versions: dict[str, int] = {}
        self._sweep_interval = sweep_interval
        self._next_sweep = 0.0
        # Concurrency keys held back after a conflict (maybe held by other nodes to their
        # limit), until the next sweep.
        self._paused_keys: set[str] = set()
        self._conflicted = False

    async def started(self) -> None:
        # The claimed tasks, whole, and the head of each ready queue: not the backlog
        # behind the heads, nor the blocked subtasks, which are read when asked for.
        tasks = list(await self._storage.ask(LoadTasks(_CLAIMED)))
        runs = list(await self._storage.ask(LoadRuns(_CLAIMED)))
        heads = await self._storage.ask(LoadQueueHeads(None, self._head))
        self._fenced = await self._storage.ask(StoreFences())
        if self._fenced:
            self._versions = dict(heads.versions)
            if tasks:  # read again with their versions, as one row each
                stored = await self._storage.ask(FetchTasks(tuple(t.id for t in tasks)))
                tasks = list(stored.tasks)
                self._versions.update(stored.versions)
            self._next_sweep = self._monotonic() + self._sweep_interval
        bounds: dict[QueueId, Bound] = {}
        for head, queued in heads.heads:
            tasks += queued
            if len(queued) >= self._head:
                bounds[(head.task_type, head.requires, head.concurrency_key)] = bound_of(queued[-1])
        runs += heads.runs
        await control.load_revoked(self)
        self._tasks = {task.id: task for task in tasks}
        self._keys = {t.idempotency_key: t.id for t in tasks if t.idempotency_key is not None}
        for run in runs:
            self._remember_run(run)
        self._ready = ReadyQueue(self._type_limits, bounds, self._revoked)
        # A crash's restart keeps the claims, so their secrets must still be proved; on
        # open, recovery ends them all.
        hashes = {} if self._recover else await self._storage.ask(LoadLeaseHashes(LIVE))
        if not self._frame.started:
            watermark = await self._storage.ask(LastTaskId())
            now = self._read_clocks()
            self._frame.start(self._wall, self._mono, watermark)
        now = self._read_clocks()
        if self._recover:
            await self._recover_claims(now)
            if self._on_recovered is not None:
                self._on_recovered()  # a later restart must not requeue live claims
        else:
            # Restarted after a crash: the claims stand. Heartbeats are kept in memory
            # only, so each lease restarts whole (its own length: a longer ``extend`` was
            # a heartbeat's) rather than expire on a stale time, or on a wall clock that
            # was stepped since it was stored.
            for run in list(self._runs.values()):
                if run.status in _RUN_OPEN and run.lease_seconds is not None:
                    renewed = now + timedelta(seconds=run.lease_seconds)
                    self._runs[run.id] = msgspec.structs.replace(run, lease_expires_at=renewed)
        await self._load_starts()
        self._reindex(hashes)
        await self._load_timers(fail=True)
        self._arm()
        log.info(
            "task manager: %d task(s) in memory (%d queue(s) with a backlog in storage),"
            " %d run(s), %d claimed",
            len(self._tasks),
            len(self._ready.bounds()),
            len(self._runs),
            len(self._held),
        )

    async def stopped(self, error: BaseException | None) -> None:
        # Held-back answers are of committed changes: they are true whatever happens next.
        self._release_held_back(None)
        # Parked claims are nobody else's to answer.
        cancelled = anyio.get_cancelled_exc_class()
        for waiter in self._waiters.values():
            if error is None:
                waiter.envelope.resolve(waiter.nothing)  # a clean stop: no task for it
            elif isinstance(error, cancelled):
                waiter.envelope.fail(RuntimeStoppedError("the runtime stopped"))
            else:
                waiter.envelope.fail(ActorFailedError(self.name, error))
        self._waiters.clear()
        self._waits.clear()

    @property
    def deadline_entries(self) -> int:
        """Deadlines kept (leases and timeouts of claims, waits of parked claims): one per
        live claim and parked claim, whatever the heartbeats and claims before."""
        return len(self._deadlines) + len(self._waits)

    async def _recover_claims(self, now: datetime, dead: RecoverClaims | None = None) -> int:
        """On open: the previous process died, and with it every worker it ran, so each
        assigned or running task goes back to the queue; its open runs end as lost.
        ``dead``: the leader's duty instead, those claims of dead nodes only, in a write
        fenced by its epoch (messages/leader.py)."""
        work = _Batch()
        only = None if dead is None else await self._take_dead(dead)
        for task in list(self._tasks.values()):
            if task.status not in _HOLDING or (only is not None and task.id not in only):
                continue
            self._touch(task.id, work)
            lost: Run | None = None
            for run_id in self._runs_of.get(task.id, ()):
                run = self._runs[run_id]
                if run.status in _RUN_OPEN:
                    lost = self._close_run(run, RunStatus.LOST, work, now, error=_RECOVERED)
            self._requeue(task, lost, "recovered", _RECOVERED, work, now, retry_after=0.0)
        if work.ops:
            fence: list[WriteOp] = [] if dead is None else [FenceLeader(dead.epoch)]
            reply = await self._storage.request(Write(tuple(fence + self._fences(work) + work.ops)))
            try:
                await reply.wait()  # a failure fails the start-up; the next start recovers again
            except StorageError:
                if not self._fenced:
                    raise
                # Another node recovered (or changed) them first: they are storage's.
                for task_id in work.undo:
                    self._drop(task_id)
                self._reindex()
                log.warning("%d task(s) to recover were changed by another node", len(work.undo))
                return 0
            else:
                self._bump(work)
                log.warning("recovered %d task(s) held when the runtime stopped", len(work.undo))
        self._shed()
        return len(work.undo)

    async def _take_dead(self, dead: RecoverClaims) -> set[str]:
        """The leader's duty: read the dead nodes' claims, and hold those unchanged since
        the leader read them (so still a dead node's) to be recovered."""
        stored = await self._storage.ask(FetchTasks(tuple(c.task_id for c in dead.claims)))
        found = {task.id: task for task in stored.tasks}
        taken: set[str] = set()
        for claim in dead.claims:
            task = found.get(claim.task_id)
            if task is None or task.status not in _HOLDING or task.id in self._held:
                continue
            if stored.versions.get(task.id) != claim.version:
                continue
            self._drop(task.id)  # a stale copy memory held
            self._tasks[task.id] = task
            self._versions[task.id] = claim.version
            taken.add(task.id)
        for run in stored.runs:
            if run.task_id in taken:
                self._remember_run(run)
        self._reindex()
        return taken

    # -- the batch loop ----------------------------------------------------------------------

    async def receive_batch(self, batch: Sequence[Envelope[TaskManagerMessage]]) -> None:
        # The leader's duty (messages/leader.py): a write of its own, before the batch.
        for envelope in batch:
            if isinstance(envelope.message, RecoverClaims):
                envelope.started = True
                try:
                    recovered = await self._recover_claims(self._read_clocks(), envelope.message)
                except HiveError as exc:  # its read failed: the leader asks again
                    envelope.fail(exc)
                else:
                    envelope.resolve(recovered)
        batch = [e for e in batch if not isinstance(e.message, RecoverClaims)]
        # On a store shared by several nodes a write may conflict with another node's
        # (_refresh): the batch is decided again on the tasks as they are now, up to
        # _ATTEMPTS times; the last attempt answers a conflict as the storage error.
        for attempt in range(_ATTEMPTS):
            if attempt:
                # Nodes that raced for the same tasks try again at different moments
                # (jittered, growing, at most 50 ms), not in step with each other.
                await anyio.sleep(self._rng.random() * min(0.05, 0.001 * 2**attempt))
            if await self._decide(batch, may_retry=self._fenced and attempt + 1 < _ATTEMPTS):
                break
        self._evict()
        # Heads that ran under half: their next tasks are read while the next batches
        # go on (one read at a time), and taken in before the first batch after it.
        if self._refilling is None:
            self._refilling = await self._send_refill(self._ready.low(self._low))
        self._arm()

    async def _decide(
        self, batch: Sequence[Envelope[TaskManagerMessage]], *, may_retry: bool
    ) -> bool:
        """Handle ``batch`` once: decide, commit, answer. ``False``: its write conflicted
        with another node's, nothing of it was applied or answered, and memory was read
        again: decide it again."""
        work = _Batch(may_retry=may_retry)
        refill = self._refilling
        if refill is not None and refill.reply.done:
            await self._take_refill(refill)  # the heads read since the last batch
        if self._fenced and self._monotonic() >= self._next_sweep:
            await self._sweep()
        await self._look_up_keys(batch, work)
        now = self._read_clocks()
        self._settle_due(work, now)
        await self._settle_timers(work, now)
        forwards: list[tuple[Envelope[TaskManagerMessage], Request[object]]] = []
        seen: set[str] = set()  # workers at work in this batch
        for envelope in batch:
            envelope.started = True
            message = envelope.message
            if isinstance(message, ClaimTask | ClaimTasks):
                seen.add(message.worker_id)
                self._park(envelope, message, work, now)
                continue
            mark = len(work.ops)
            try:
                outcome = await self._handle(message, work, now)
            except HiveError as exc:
                outcome = exc
            else:
                if isinstance(message, _LEASED):  # a refused (stale) token is no sign of life
                    run = self._runs.get(message.lease.run_id)
                    if run is not None and run.worker_id is not None:
                        seen.add(run.worker_id)
                if (
                    self._plan_barrier
                    and isinstance(message, _ENDS_PLAN_TASKS)
                    and _ends_a_plan_task(work.ops, mark)
                ):
                    work.plan_enders.add(id(envelope))
            if isinstance(outcome, _Forward):
                forwards.append((envelope, outcome.request))
            else:
                work.answers.append((envelope, outcome))
        if seen and self._workers is not None:
            self._report_seen(seen)  # before the answers: a caller then finds it alive
        self._dispatch(work, now)
        unclaimed: list[Claim] = []
        starved = False
        follow_ups = 0
        while True:
            outcome = await self._finish(work, forwards, now)
            if outcome is None:  # a conflict: memory was read again
                if not follow_ups:
                    return False  # the whole batch again
            else:
                unclaimed, starved = outcome, work.starved
                if not unclaimed and not starved:
                    return True
            # Claims whose askers left before the answer: hand the tasks back (and on to
            # whoever is waiting), as one more batch. Claims that a drained head starved:
            # read its next tasks, then hand them out. (After a conflict: the same again.)
            follow_ups += 1
            work = _Batch(may_retry=self._fenced and follow_ups < _ATTEMPTS)
            forwards = []
            refilled = await self._refill_now() if starved else True
            for claim in unclaimed:
                self._release_unclaimed(claim, work, now)
            self._dispatch(work, now, refilled=refilled)

    async def _look_up_keys(
        self, batch: Sequence[Envelope[TaskManagerMessage]], work: _Batch
    ) -> None:
        """Ask storage, in one read for the whole batch, who owns the idempotency keys of
        its creates that memory does not know. Memory holds the keys of the tasks it holds
        only, so a key found there belongs to a task memory let go of (finished long ago,
        or in a queue's backlog). The TaskManager is the only writer of tasks and its last
        commit is done, so the answer is exact until this batch changes it."""
        keys: set[str] = set()
        for envelope in batch:
            message = envelope.message
            if isinstance(message, CreateTask):
                items: Sequence[CreateTask] = (message,)
            elif isinstance(message, CreateTasks):
                items = message.tasks
            else:
                continue
            for item in items:
                key = item.idempotency_key
                if key is not None and key not in self._keys:
                    keys.add(key)
        if not keys:
            return
        try:
            work.stored_keys = await self._storage.ask(FindIdempotencyKeys(tuple(keys)))
        except HiveError as exc:
            # Without the answer such a create cannot know whether it would be a second
            # task with that key: it fails, and creates nothing, like a failed commit.
            work.key_errors = dict.fromkeys(keys, exc)

    async def _send_refill(self, queues: set[QueueId]) -> _Refill | None:
        """Ask storage for the next tasks of ``queues`` after what memory holds of each,
        in one read; not waited for here."""
        self._ready.wanted.clear()
        bounds = self._ready.bounds()
        heads = tuple(QueueHead(q[0], q[1], q[2], _after(bounds[q])) for q in queues if q in bounds)
        if not heads:
            return None
        try:
            reply = await self._storage.request(LoadQueueHeads(heads, self._head))
        except HiveError as exc:
            log.warning("could not read the next tasks of %d queue(s): %s", len(heads), exc)
            return None
        return _Refill(reply, {(h.task_type, h.requires, h.concurrency_key) for h in heads})

    async def _refill_now(self) -> bool:
        """For claims a drained head starved: take the read in flight, then read what is
        still wanted, and wait for it. Whether the heads could be read."""
        if self._refilling is not None:
            if not await self._take_refill(self._refilling):
                return False
            if not self._ready.wanted:
                return True  # what the claims waited for came with it
        refill = await self._send_refill(self._ready.low(self._low))
        if refill is None:
            return not self._ready.wanted
        self._refilling = refill
        return await self._take_refill(refill)

    async def _take_refill(self, refill: _Refill) -> bool:
        """Add what ``refill`` read. The read was served at some point between its
        sending and now, while batches went on: a task changed since it was sent is known
        better by memory (skipped), and a task memory left to storage since (queued after
        its bound) is added from memory's copy if the new bound takes it in, so none is
        missed nor held twice. A queue trimmed since, or a batch that failed since, voids
        the read (its tasks come again with the next one), and so does a task of the read
        changed since whose state memory does not know: the queue is read again."""
        self._refilling = None
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
        for head, tasks in loaded.heads:
            queue = (head.task_type, head.requires, head.concurrency_key)
            if queue in refill.stale or any(
                task.id in refill.touched
                and task.id not in self._tasks
                and task.id not in refill.spilled
                for task in tasks
            ):
                # Trimmed since, or holding a task changed since whose state memory
                # does not know (deleted, or looked at and left as it was): read again.
                self._ready.wanted.add(queue)
                continue
            queues.append(queue)
            bound = bound_of(tasks[-1]) if len(tasks) >= self._head else None
            self._ready.set_bound(queue, bound)
            for task in tasks:
                if task.id not in self._tasks and task.id not in refill.touched:
                    if task.id in loaded.versions:
                        self._versions[task.id] = loaded.versions[task.id]
                    self._take_in(task, runs.get(task.id, ()))
            for task, task_runs in list(refill.spilled.values()):
                if (
                    queue_of(task) == queue
                    and task.id not in self._tasks
                    and (bound is None or bound_of(task)[:3] <= bound[:3])
                ):
                    self._take_in(task, task_runs)
        self._ready.extended(queues)
        return True

    def _take_in(self, task: Task, runs: Sequence[Run]) -> None:
        """Hold a queued task read back from storage, with its runs."""
        self._tasks[task.id] = task
        for run in runs:
            self._remember_run(run)
        key = task.idempotency_key
        if key is not None:
            self._keys.setdefault(key, task.id)
        self._index(None, task)

    def _shed(self) -> None:
        """After a commit: let go of what the batch left to storage, and of the worst
        tasks of heads that grew past twice their size (new tasks better than their
        bound); all of it is committed, and read back when its turn comes."""
        refill = self._refilling
        for task_id in self._spill:
            task = self._tasks.get(task_id)
            if task is not None and task.status is Q and not self._ready.holds(task_id):
                if refill is not None and queue_of(task) in refill.queues:
                    # The read in flight may have been served before this commit.
                    runs = [self._runs[r] for r in self._runs_of.get(task_id, ())]
                    refill.spilled[task_id] = (task, runs)
                self._drop(task_id)
            elif task is None or task.status is B:
                self._drop(task_id)
        self._spill.clear()
        for queue in self._ready.over(2 * self._head):
            if refill is not None and queue in refill.queues:
                refill.stale.add(queue)  # it read after the old bound: tasks would be lost
            for task_id in self._ready.trim(queue, self._head):
                self._drop(task_id)

    def _drop(self, task_id: str) -> None:
        """Forget a task memory does not need (its committed state is in storage)."""
        task = self._tasks.pop(task_id, None)
        key = None if task is None else task.idempotency_key
        if key is not None and self._keys.get(key) == task_id:
            del self._keys[key]  # answered by storage from now on
        self._ready_at.pop(task_id, None)
        self._versions.pop(task_id, None)  # read again with the task
        for run_id in self._runs_of.pop(task_id, []):
            self._runs.pop(run_id, None)

    async def _fetch(self, task_ids: Sequence[str], work: _Batch) -> dict[str, Task]:
        """The tasks among ``task_ids`` that exist, from memory or else from storage
        (with their runs, which memory then holds: every run of a task in memory is in
        memory). One read for all of those not in memory; what is read is committed
        state, the batch has not changed it (it would be in memory)."""
        found: dict[str, Task] = {}
        missing: list[str] = []
        for task_id in task_ids:
            if task_id in work.deleted:
                continue
            task = self._tasks.get(task_id)
            if task is not None:
                found[task_id] = task
            else:
                missing.append(task_id)
        if missing:
            stored = await self._storage.ask(FetchTasks(tuple(missing)))
            for task in stored.tasks:
                if task.id not in found:
                    found[task.id] = task
                    if task.id in stored.versions:
                        self._versions[task.id] = stored.versions[task.id]
                    # Undo forgets the runs if the batch fails; a commit leaves the task
                    # in memory only if the batch changed it (_shed).
                    self._touch(task.id, work)
                    self._spill.add(task.id)
            for run in stored.runs:
                if run.task_id in work.undo and run.id not in self._runs:
                    self._remember_run(run)
        return found

    def _report_seen(self, seen: set[str]) -> None:
        """Tell the registry who is at work, so a busy worker is not declared offline
        for want of a registry heartbeat. Best effort: with its mailbox full, the next
        batch tells it again."""
        assert self._workers is not None
        with suppress(RuntimeStoppedError):  # shutting down
            self._workers.try_tell(WorkersSeen(tuple(seen)))

    async def _finish(
        self,
        work: _Batch,
        forwards: list[tuple[Envelope[TaskManagerMessage], Request[object]]],
        now: datetime,
    ) -> list[Claim] | None:
        """Commit, then answer; returns the claims no one was there to receive, or
        ``None`` for a conflict to decide again (nothing answered, memory read again)."""
        try:
            error = await self._commit(work, forwards)
        except CommitOutcomeUnknown as exc:
            for envelope, _ in work.answers:  # claims handed out from older batches too
                envelope.fail(ActorFailedError(self.name, exc))
            raise
        if error is not None and work.may_retry and _conflict(error):
            self._restore(work, now)
            self._repark(work)
            self._conflicted = True
            await self._refresh(work.fenced)
            if work.keys_claimed:
                # The conflict may be a key another node holds to its limit: none of its
                # tasks is handed out here until the next sweep looks again.
                self._ready.pause(keys=work.keys_claimed)
                self._paused_keys |= work.keys_claimed
            await self._sweep()  # the heads as they are now: what others took is gone
            return None
        if self._fenced:
            await self._forward(forwards)  # held until the write's outcome was known
        short: list[_Waiter] = []
        if error is not None:
            self._restore(work, now)
            for waiter_id, before in work.grown:
                waiter = self._waiters.get(waiter_id)
                if waiter is not None:  # still parked for more: not with this batch's
                    del waiter.taken[before:]
                    self._unpark(waiter_id)
                    short.append(waiter)
        else:
            self._bump(work)
            self._shed()
        barrier = self._plan_barrier_seq(work) if error is None else 0
        held: list[tuple[Envelope[TaskManagerMessage], object]] = []
        unclaimed: list[Claim] = []
        for envelope, outcome in work.answers:
            if error is not None and isinstance(envelope.message, _WRITES):
                envelope.fail(error)
            elif error is not None:
                # A read answered from state that included the failed changes: read again.
                try:
                    again = await self._handle(envelope.message, _Batch(), now)
                except HiveError as exc:
                    envelope.fail(exc)
                    continue
                if isinstance(again, _Forward):
                    assert envelope.reply is not None
                    await self._storage.forward(again.request, envelope.reply)
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
            self._held_back.append((barrier, held))
        for waiter in short:
            if not waiter.taken:
                waiter.envelope.fail(cast(HiveError, error))
            elif not waiter.envelope.resolve(tuple(waiter.taken), Unclaimed(tuple(waiter.taken))):
                unclaimed += waiter.taken  # those of earlier, committed batches
        return unclaimed

    def _plan_barrier_seq(self, work: _Batch) -> int:
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
        return barrier if barrier > self._plans_settled else 0

    def _release_held_back(self, settled: int | None) -> None:
        """Answer what was held back for plan events up to ``settled`` (None: all)."""
        if settled is not None:
            self._plans_settled = max(self._plans_settled, settled)
        queue = self._held_back
        while queue and (settled is None or queue[0][0] <= settled):
            for envelope, outcome in queue.popleft()[1]:
                envelope.resolve(outcome)

    async def _commit(
        self,
        work: _Batch,
        forwards: list[tuple[Envelope[TaskManagerMessage], Request[object]]],
    ) -> HiveError | None:
        """Write the batch's changes, then queue the forwarded reads behind them (on a
        fenced store, once the write's outcome is known: :meth:`_finish`)."""
        ops = self._fences(work) + work.ops if work.ops else []
        reply = await self._storage.request(Write(tuple(ops))) if ops else None
        if not self._fenced:
            await self._forward(forwards)
        if reply is None:
            return None
        try:
            # No deadline: the storage actor's batch is shielded and always ends, within
            # busy_timeout plus one commit. Giving up earlier would let memory and the
            # database part ways: the write could land after memory was put back.
            work.seqs = (await reply.wait()).seqs
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

    async def _forward(
        self, forwards: list[tuple[Envelope[TaskManagerMessage], Request[object]]]
    ) -> None:
        for envelope, request in forwards:
            assert envelope.reply is not None
            await self._storage.forward(request, envelope.reply)

    # -- several nodes: fenced writes ------------------------------------------------------

    def _fences(self, work: _Batch) -> list[WriteOp]:
        """On a fenced store: a :class:`FenceTask` for each existing task the batch
        changes (its row or a run of it), with the version memory read it at (-1, which
        no row has, for a task whose version memory does not know: a conflict that
        reads it)."""
        if not self._fenced:
            return []
        created: set[str] = set()
        changed: set[str] = set()
        last: dict[str, Task] = {}
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
        work.fenced = sorted(changed - created)
        fences: list[WriteOp] = []
        taken: dict[str, int] = {}  # key -> this batch's claims of it so far
        for task_id in work.fenced:
            version = self._versions.get(task_id, -1)
            now_state = last.get(task_id)
            before = work.undo.get(task_id)
            was = None if before is None or before.task is None else before.task.status
            key = None if now_state is None else now_state.concurrency_key
            if (
                now_state is None
                or key is None
                or now_state.status not in _HOLDING
                or was in _HOLDING
            ):
                fences.append(FenceTask(task_id, version))
                continue
            # A new claim of a task with a concurrency key: the limit holds across nodes.
            room = (now_state.concurrency_limit or 1) - taken.get(key, 0)
            taken[key] = taken.get(key, 0) + 1
            work.keys_claimed.add(key)
            fences.append(FenceTask(task_id, version, key, room))
        return fences

    def _bump(self, work: _Batch) -> None:
        """After a fenced batch committed: the versions its fences moved to."""
        if not self._fenced:
            return
        for op in work.ops:
            if isinstance(op, PutTask):
                self._versions[op.task.id] = 0
        for task_id in work.fenced:
            self._versions[task_id] = self._versions.get(task_id, -1) + 1
        for op in work.ops:
            if isinstance(op, DeleteTaskRow):
                self._versions.pop(op.task_id, None)

    def _repark(self, work: _Batch) -> None:
        """After a conflict: the claims the batch answered wait again as they did before
        it; those it parked are parked again when it is decided again."""
        arrived = set(work.parked)
        for waiter_id, waiter in work.unparked:
            if waiter_id not in arrived:
                self._waiters[waiter_id] = waiter
                if waiter.deadline is not None:
                    self._waits.set(waiter_id, waiter.deadline)
        for waiter_id in arrived:
            self._waiters.pop(waiter_id, None)
            self._waits.discard(waiter_id)
        for waiter_id, before in work.grown:
            grown = self._waiters.get(waiter_id)
            if grown is not None:
                del grown.taken[before:]

    async def _refresh(self, task_ids: Sequence[str]) -> None:
        """After a conflict (memory already put back as before the batch): read the
        batch's tasks again. A claim of this node that is still its own is kept (its
        row, runs and version as they are now); every other task leaves memory, to be
        read again when it is asked for (it may have been claimed, changed or deleted by
        another node). A key the batch raced another node for is read again anyway
        (_look_up_keys)."""
        if not task_ids:
            return
        try:
            stored = await self._storage.ask(FetchTasks(tuple(task_ids)))
        except HiveError as exc:
            log.warning("could not read %d task(s) after a conflict: %s", len(task_ids), exc)
            for task_id in task_ids:
                if task_id not in self._held:
                    self._drop(task_id)
                    self._finished.pop(task_id, None)
            self._reindex()
            return
        found = {task.id: task for task in stored.tasks}
        runs: dict[str, list[Run]] = {}
        for run in stored.runs:
            runs.setdefault(run.task_id, []).append(run)
        for task_id in task_ids:
            task = found.get(task_id)
            held = self._held.get(task_id)
            if (
                task is not None
                and held is not None
                and task.status in _HOLDING
                and any(r.id == held and r.status in _RUN_OPEN for r in runs.get(task_id, ()))
            ):
                for run_id in self._runs_of.pop(task_id, []):
                    self._runs.pop(run_id, None)
                for run in runs[task_id]:
                    self._remember_run(run)
                self._tasks[task_id] = task
                self._versions[task_id] = stored.versions[task_id]
                continue
            self._drop(task_id)
            self._finished.pop(task_id, None)
            if task is not None:
                # Kept though the task left memory: a path that reads it again without
                # its version (a listing's QueryTasks: flush_queue, purges) fences by
                # this one, which only passes if the task has not changed since, so the
                # state it read then is this version's.
                self._versions[task_id] = stored.versions[task_id]
        self._reindex()

    async def _sweep(self) -> None:
        """On a fenced store: read every queue's head again from its best, taking in the
        tasks memory does not hold (queued by other nodes, or left to storage), so that
        no task waits for the node that queued it; every sweep_interval, and after a
        head ran dry. A task memory holds that another node claimed since is found out
        by the claim's fence."""
        self._next_sweep = self._monotonic() + self._sweep_interval
        if self._paused_keys and not self._conflicted:
            self._ready.resume(keys=self._paused_keys)
            self._paused_keys = set()
        self._conflicted = False
        try:
            loaded = await self._storage.ask(LoadQueueHeads(None, self._head))
        except HiveError as exc:
            log.warning("could not read the ready queues: %s", exc)
            return
        if self._refilling is not None:
            self._refilling.void = True  # this read has it all
        runs: dict[str, list[Run]] = {}
        for run in loaded.runs:
            runs.setdefault(run.task_id, []).append(run)
        read: dict[QueueId, Bound | None] = {}
        ids: set[str] = set()
        for head, tasks in loaded.heads:
            queue = (head.task_type, head.requires, head.concurrency_key)
            read[queue] = bound_of(tasks[-1]) if len(tasks) >= self._head else None
            ids.update(task.id for task in tasks)
        # What memory holds as queued and ready that the read does not show (within what
        # it covers) is no longer so: claimed, changed or deleted by another node.
        stale = [
            task.id
            for task in self._tasks.values()
            if task.status is Q
            and task.run_at is None
            and task.id not in ids
            and self._ready.holds(task.id)
            and (
                queue_of(task) not in read
                or (bound := read[queue_of(task)]) is None
                or bound_of(task)[:3] <= bound[:3]
            )
        ]
        for task_id in stale:
            self._drop(task_id)
        if stale:
            self._reindex()
        for head, tasks in loaded.heads:
            queue = (head.task_type, head.requires, head.concurrency_key)
            self._ready.set_bound(queue, read[queue])
            for task in tasks:
                if task.id not in self._tasks:
                    self._versions[task.id] = loaded.versions[task.id]
                    self._take_in(task, runs.get(task.id, ()))
        self._ready.extended(list(read))

    def _touch(self, task_id: str, work: _Batch) -> None:
        """Remember a task's memory state before the batch first changes it."""
        refill = self._refilling
        if refill is not None:
            refill.touched.add(task_id)  # the read in flight may hold an older copy
            refill.spilled.pop(task_id, None)
        if task_id not in work.undo:
            run_ids = self._runs_of.get(task_id)
            work.undo[task_id] = _Undo(
                task=self._tasks.get(task_id),
                finished=task_id in self._finished,
                run_ids=None if run_ids is None else list(run_ids),
                runs={run_id: self._runs[run_id] for run_id in run_ids or ()},
                due={r: self._due[r] for r in run_ids or () if r in self._due},
                ready_at=self._ready_at.get(task_id),
            )

    def _set_key(self, key: str, task_id: str | None, work: _Batch) -> None:
        work.keys.setdefault(key, self._keys.get(key))
        if task_id is None:
            self._keys.pop(key, None)
        else:
            self._keys[key] = task_id

    def _restore(self, work: _Batch, now: datetime) -> None:
        """After a failed commit: put memory back exactly as it was before the batch."""
        self._spill.clear()  # what the batch left to storage is memory's again
        if self._refilling is not None:
            # It may skip tasks the failed batch touched but did not change: read again.
            self._refilling.void = True
        for task_id, undo in work.undo.items():
            for run_id in self._runs_of.pop(task_id, ()):
                self._runs.pop(run_id, None)
                self._due.pop(run_id, None)
            if undo.run_ids is not None:
                self._runs_of[task_id] = undo.run_ids
                self._runs.update(undo.runs)
            self._due.update(undo.due)
            if undo.ready_at is None:
                self._ready_at.pop(task_id, None)
            else:
                self._ready_at[task_id] = undo.ready_at
            if undo.task is None:
                self._tasks.pop(task_id, None)
            else:
                self._tasks[task_id] = undo.task
            if undo.finished:
                self._finished[task_id] = None
            else:
                self._finished.pop(task_id, None)
        for key, owner in work.keys.items():
            if owner is None:
                self._keys.pop(key, None)
            else:
                self._keys[key] = owner
        if work.revoked is not None:
            self._revoked.clear()
            self._revoked.update(work.revoked)
        # They may hold times of tasks the batch made or changed: read again from storage.
        self._starts.clear()
        self._expiries.clear()
        self._reindex()
        log.warning("commit failed; %d task(s) restored in memory", len(work.undo))

    def _reindex(self, hashes: Mapping[str, bytes] | None = None) -> None:
        """Rebuild what is derived from tasks and runs: the ready queue, the claims and
        their deadlines. O(tasks in memory): at start-up (with the stored ``hashes`` of the
        claims' secrets) and after a failed commit only."""
        self._ready = ReadyQueue(self._type_limits, self._ready.bounds(), self._revoked)
        self._ready.pause(self._limits.full_types, self._limits.full_keys)
        self._ready.pause(keys=self._paused_keys)
        self._held = {}
        self._deadlines = Deadlines()
        for task in self._tasks.values():
            self._index(None, task)
        due: dict[str, _Due] = {}
        for run in self._runs.values():
            owner = self._tasks.get(run.task_id)
            if (
                run.status in _RUN_OPEN
                and run.lease_expires_at is not None
                and owner is not None
                and owner.status in _HOLDING
            ):
                self._held[owner.id] = run.id
                # Kept from before a failed commit; at start-up, from the stored times.
                kept = self._due.get(run.id)
                if kept is None:
                    kept = self._due_from_wall(run, owner, (hashes or {}).get(run.id))
                due[run.id] = kept
                self._deadlines.set(run.id, due[run.id].next()[0])
        self._due = due

    def _index(self, old: Task | None, new: Task | None) -> None:
        """Keep the ready queue in step with a task's change from ``old`` to ``new``."""
        if old is not None:
            if old.status is Q:
                self._ready.discard(old.id)
                self._ready_at.pop(old.id, None)
                self._untime(old)
            elif old.status in _HOLDING:
                self._ready.unhold(old)
        if new is not None:
            if new.status is Q:
                self._time(new)
                if new.run_at is not None:
                    self._spill.add(new.id)  # storage's until due: memory keeps its time
                elif not self._ready.add(new, self._mono, self._backoff_end(new)):
                    self._spill.add(new.id)  # after its queue's head: storage's
            elif new.status in _HOLDING:
                self._ready.hold(new)
            elif new.status is B:
                self._spill.add(new.id)  # read back when its plan queues it

    # -- deadlines -----------------------------------------------------------------------------

    def _read_clocks(self) -> datetime:
        """Read both clocks for a batch (or the start-up); returns the wall time, ``now``."""
        self._wall = self._clock()
        self._mono = self._monotonic()
        return self._wall

    def _from_wall(self, at: datetime, longest: float) -> float:
        """The stored wall time ``at`` as a monotonic deadline: what remains of it by the
        wall clock now, at least nothing and at most ``longest`` (the span that was set),
        so that a wall clock stepped since it was set can neither stretch it nor end it
        late. Exact for a time set in this batch (``now`` plus a span)."""
        remaining = (at - self._wall).total_seconds()
        return self._mono + min(max(remaining, 0.0), max(longest, 0.0))

    def _due_from_wall(self, run: Run, task: Task, lease_hash: bytes | None) -> _Due:
        """A claimed run's deadlines, from its stored times (at start-up): its lease, set
        whole when it was loaded, and what remains of its timeout."""
        assert run.lease_expires_at is not None
        timeout = None
        if task.timeout is not None and run.started_at is not None:
            ends = run.started_at + timedelta(seconds=task.timeout)
            timeout = self._from_wall(ends, task.timeout)
        lease = self._from_wall(run.lease_expires_at, run.lease_seconds or 0.0)
        return _Due(lease, timeout, lease_hash)

    def _backoff_end(self, task: Task) -> float | None:
        """When the queued ``task``'s backoff ends (``None``: it has none)."""
        if task.available_at is None:
            return None
        at = self._ready_at.get(task.id)
        if at is None:
            # Set in this batch (updated_at is now), or loaded at start-up.
            whole = (task.available_at - task.updated_at).total_seconds()
            at = self._ready_at[task.id] = self._from_wall(task.available_at, whole)
        return at

    def _settle_due(self, work: _Batch, now: datetime) -> None:
        """End the leases and runs whose time is up, release backoffs, close claim waits."""
        mono = self._mono
        deadlines = self._deadlines
        while (run_id := deadlines.pop_due(mono)) is not None:
            run = self._runs[run_id]  # an entry is dropped when its claim ends
            task = self._tasks[run.task_id]
            due, is_timeout = self._due[run_id].next()
            if due > mono:  # renewed since: look again then
                deadlines.set(run_id, due)
            elif is_timeout:
                error = f"run {run.run_number} exceeded the task's timeout of {task.timeout:g}s"
                self._close_run(run, RunStatus.TIMED_OUT, work, now, error=error)
                self._requeue(task, run, "timed_out", error, work, now)
            else:
                error = (
                    f"lease expired: worker {run.worker_id!r} sent no heartbeat"
                    f" for {run.lease_seconds:g}s"
                )
                self._close_run(run, RunStatus.LOST, work, now, error=error)
                self._requeue(task, run, "lease_expired", error, work, now, retry_after=0.0)
        self._ready.promote(mono)
        if self._limits:
            self._ready.resume(*self._limits.freed(mono))
        while (waiter_id := self._waits.pop_due(mono)) is not None:
            waiter = self._waiters.pop(waiter_id)
            work.unparked.append((waiter_id, waiter))
            work.answers.append((waiter.envelope, waiter.nothing))

    def _arm(self) -> None:
        """Set the alarm to the earliest deadline (only when it changed: setting it wakes
        the alarm's task)."""
        if self._alarm is None:
            return
        times = []
        for first in (self._deadlines.first(), self._waits.first()):
            if first is not None:
                times.append(first[0])
        delayed = self._ready.next_delayed()
        if delayed is not None:
            times.append(delayed)
        times += self._timers_due()
        frees = self._limits.next_free()
        if frees is not None:
            times.append(frees)
        if self._fenced and self._waiters:
            times.append(self._next_sweep)  # tasks queued by other nodes, for the waiters
        wake = min(times) if times else None
        if wake != self._alarm.at:
            self._alarm.set(wake)

    # -- delayed tasks and expiries (delays.py) ----------------------------------------------

    def _times(
        self, message: CreateTask, prefix: str = ""
    ) -> tuple[datetime | None, datetime | None]:
        """A create's start time and expiry as stored (``None``: none, or a start time
        already past), checked against this batch's clocks."""
        wall, mono = self._wall, self._mono
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
                start = self._frame.stored(ready, wall, mono, given)
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
            expiry = self._frame.stored(ends, wall, mono, given)
        return start, expiry

    def _time(self, task: Task) -> None:
        """The queued ``task``'s start time and expiry, if any, to the timers."""
        if task.run_at is not None:
            deadline = self._frame.deadline(task.id, task.run_at, task.created_at)
            self._starts.add(task.id, task.run_at, deadline)
        if task.expires_at is not None:
            deadline = self._frame.deadline(task.id, task.expires_at, task.created_at)
            self._expiries.add(task.id, task.expires_at, deadline)

    def _untime(self, task: Task) -> None:
        if task.run_at is not None:
            self._starts.discard(task.id)
        if task.expires_at is not None:
            self._expiries.discard(task.id)

    async def _load_timers(self, *, fail: bool = False) -> None:
        """Read the next start times and expiries of the timers that ran low. Between
        batches: the last commit is done, so storage holds exactly what memory left it."""
        for timers in (self._starts, self._expiries):
            if not timers.low():
                continue
            try:
                rows = await self._storage.ask(
                    LoadTimers(timers.column, timers.after(), timers.size)
                )
            except HiveError as exc:
                if fail:
                    raise
                log.warning("could not read the queued tasks' %s: %s", timers.column, exc)
                self._timers_failed = self._mono
                return
            frame = self._frame
            timers.take(((i, at, frame.deadline(i, at, made)) for i, at, made in rows), len(rows))
        self._timers_failed = None

    def _timers_due(self) -> list[float]:
        """When the timers want the next batch: their first deadlines, or at once when
        they have to read from storage (a second after a failed read)."""
        if self._starts.low() or self._expiries.low():
            failed = self._timers_failed
            return [self._mono if failed is None else failed + 1.0]
        times = []
        for timers in (self._starts, self._expiries):
            first = timers.first()
            if first is not None:
                times.append(first)
        return times

    async def _settle_timers(self, work: _Batch, now: datetime) -> None:
        """Expire the queued tasks whose expiry is past; queue the delayed tasks that
        came due (they join the ready index and their queue's head)."""
        await self._load_timers()
        mono = self._mono
        expired: list[str] = []
        while (task_id := self._expiries.pop_due(mono)) is not None:
            expired.append(task_id)
        due: list[str] = []
        while (task_id := self._starts.pop_due(mono)) is not None:
            due.append(task_id)
        if not expired and not due:
            return
        try:
            found = await self._fetch(expired + due, work)
        except HiveError as exc:
            log.warning("could not read %d timed task(s): %s", len(expired) + len(due), exc)
            self._starts.clear()  # read again, and these with them
            self._expiries.clear()
            return
        for task_id in expired:
            task = self._tasks.get(task_id, found.get(task_id))
            if task is not None and task.status is Q and task.expires_at is not None:
                self._expire(task, work, now)
        for task_id in due:
            task = self._tasks.get(task_id, found.get(task_id))
            if task is not None and task.status is Q and task.run_at is not None:
                self._touch(task_id, work)
                updated = msgspec.structs.replace(task, run_at=None, updated_at=now)
                self._tasks[task_id] = updated
                self._index(task, updated)
                work.ops.append(SetTaskState(updated))

    def _expire(self, task: Task, work: _Batch, now: datetime) -> None:
        """The queued ``task``'s expiry passed: it ends cancelled, reason ``expired``."""
        assert task.expires_at is not None
        at = task.expires_at.isoformat()
        self._transition(
            task,
            TaskStatus.CANCELLED,
            work,
            now,
            None,
            {"error": f"expired: not handed out by {at}"},
            {"reason": "expired", "expires_at": at},
        )

    def _pop(self, task_types: Sequence[str] | None, work: _Batch, now: datetime) -> str | None:
        """The ready queue's next task for a claim, never one past its expiry (those end
        here, should their timer not have come up yet)."""
        while (task_id := self._ready.pop(task_types)) is not None:
            task = self._tasks[task_id]
            if task.expires_at is None:
                return task_id
            deadline = self._expiries.deadline(task_id)
            if deadline is None:
                deadline = self._frame.deadline(task_id, task.expires_at, task.created_at)
            if deadline > self._mono:
                return task_id
            self._expire(task, work, now)
        return None

    # -- rate limits (limits.py) ---------------------------------------------------------------

    async def _load_starts(self) -> None:
        """At start-up: the rate limits' windows, from the claims of the last ``per``
        seconds (each a deadline from now, at most ``per`` away: see limits.py)."""
        if not self._limits:
            return
        types, keys = self._limits.limited()
        since = self._wall - timedelta(seconds=self._limits.longest())
        rows = await self._storage.ask(LoadStarts(types, keys, since))
        by_type: dict[str, list[float]] = {}
        by_key: dict[str, list[float]] = {}
        for task_type, key, started in rows:
            ago = max((self._wall - started).total_seconds(), 0.0)
            at = self._mono - ago
            by_type.setdefault(task_type, []).append(at)
            if key is not None:
                by_key.setdefault(key, []).append(at)
        self._limits.load(by_type, by_key, self._mono)

    def _count_start(self, task: Task) -> None:
        """``task`` was claimed: a full window holds its type or key back."""
        type_full, key_full = self._limits.started(task, self._mono)
        if type_full or key_full:
            self._ready.pause(
                (task.task_type,) if type_full else (),
                (task.concurrency_key,) if key_full and task.concurrency_key else (),
            )

    # -- claims --------------------------------------------------------------------------------

    def _park(
        self,
        envelope: Envelope[TaskManagerMessage],
        claim: ClaimTask | ClaimTasks,
        work: _Batch,
        now: datetime,
    ) -> None:
        self._next_waiter += 1
        waiter_id = self._next_waiter
        deadline = self._mono + claim.wait if claim.wait > 0 else None
        self._waiters[waiter_id] = _Waiter(envelope, claim, deadline)
        if deadline is not None:
            self._waits.set(waiter_id, deadline)
        work.parked.append(waiter_id)

    def _dispatch(self, work: _Batch, now: datetime, *, refilled: bool = True) -> None:
        """Hand ready tasks to parked claims, oldest claim first.

        Only the claims parked in this batch can find something if nothing became ready
        since the last dispatch; claims that do not wait are answered now either way,
        unless a drained head starved them: they stay parked for its next tasks, read
        once the batch is committed (not when that read just failed: ``refilled``).
        """
        if self._ready.changed:
            candidates = list(self._waiters)
            self._ready.changed = False
        else:
            candidates = work.parked
        for waiter_id in candidates:
            waiter = self._waiters.get(waiter_id)
            if waiter is None:
                continue
            reply = waiter.envelope.reply
            if reply is not None and reply.done:  # the claimer stopped waiting
                self._unpark(waiter_id, work)
                for claim in waiter.taken:  # committed, never received: hand them back
                    self._release_unclaimed(claim, work, now)
                continue
            request = waiter.claim
            task_id = self._pop(request.task_types, work, now)
            if task_id is None:
                if self._ready.starved and refilled:
                    work.starved = True
                    continue
                if waiter.deadline is None or waiter.taken:
                    self._unpark(waiter_id, work)
                    work.answers.append((waiter.envelope, waiter.nothing))
                continue
            if isinstance(request, ClaimTask):
                self._unpark(waiter_id, work)
                work.answers.append((waiter.envelope, self._assign(task_id, request, work, now)))
                continue
            work.grown.append((waiter_id, len(waiter.taken)))
            claims = waiter.taken
            claims.append(self._assign(task_id, request, work, now))
            while len(claims) < request.limit:
                task_id = self._pop(request.task_types, work, now)
                if task_id is None:
                    break
                claims.append(self._assign(task_id, request, work, now))
            if len(claims) < request.limit and self._ready.starved and refilled:
                # A head ran dry mid-claim: the rest once its next tasks are read.
                work.starved = True
                continue
            self._unpark(waiter_id, work)
            work.answers.append((waiter.envelope, tuple(claims)))

    def _unpark(self, waiter_id: int, work: _Batch | None = None) -> None:
        waiter = self._waiters.pop(waiter_id)
        self._waits.discard(waiter_id)
        if work is not None:
            work.unparked.append((waiter_id, waiter))  # parked again if the batch conflicts

    def _assign(
        self, task_id: str, claim: ClaimTask | ClaimTasks, work: _Batch, now: datetime
    ) -> Claim:
        task = self._tasks[task_id]
        self._touch(task_id, work)
        expires = now + timedelta(seconds=claim.lease)
        run = Run(
            id=new_id(),
            task_id=task_id,
            worker_id=claim.worker_id,
            run_number=len(self._runs_of.get(task_id, ())) + 1,
            status=RunStatus.ASSIGNED,
            started_at=now,
            lease_seconds=claim.lease,
            lease_expires_at=expires,
        )
        self._remember_run(run)
        timeout = None if task.timeout is None else self._mono + task.timeout
        # The secret goes to the claimer, in the answer, and nowhere else: memory and the
        # database keep its hash.
        secret = new_secret()
        lease_hash = _hash(secret)
        self._due[run.id] = _Due(self._mono + claim.lease, timeout, lease_hash)
        work.ops.append(PutRun(run, lease_hash))
        updated = self._transition(
            task,
            A,
            work,
            now,
            claim.worker_id,
            {"assigned_worker": claim.worker_id, "available_at": None},
            {"run_id": run.id, "attempt": run.run_number},
        )
        self._held[task_id] = run.id
        if self._limits:
            self._count_start(updated)
        if claim.start:
            updated = self._start(updated, run, work, now)
            run = self._runs[run.id]
        self._deadlines.set(run.id, self._due[run.id].next()[0])
        return Claim(updated, Lease(task_id, run.id, run.run_number, secret), expires)

    def _start(self, task: Task, run: Run, work: _Batch, now: datetime) -> Task:
        """The claimed ``task`` (assigned) starts running on its ``run``."""
        if task.status is not A:
            raise IllegalTransitionError("task", task.id, task.status.value, R.value)
        self._touch(task.id, work)
        started = msgspec.structs.replace(run, status=RunStatus.RUNNING)
        self._runs[run.id] = started
        work.ops.append(SetRunState(started))
        return self._transition(task, R, work, now, run.worker_id, {}, _run_data(run))

    def _release_unclaimed(self, claim: Claim, work: _Batch, now: datetime) -> None:
        task = self._tasks.get(claim.lease.task_id)
        if task is None or self._held.get(task.id) != claim.lease.run_id:
            return
        if not _proves(claim.lease, self._due[claim.lease.run_id].lease_hash):
            return  # not the claim that was answered: it frees no one's task
        run = self._runs[claim.lease.run_id]
        note = "the claimer stopped waiting before it received the task"
        self._close_run(run, RunStatus.RELEASED, work, now, error=note)
        self._requeue(task, run, "unclaimed", None, work, now, count=False)

    def _holding(self, lease: Lease, work: _Batch) -> tuple[Task, Run]:
        """The task and run ``lease`` holds, or :class:`LeaseLostError` saying why not."""
        task = self._tasks.get(lease.task_id)
        run_id = self._held.get(lease.task_id)
        if task is not None and run_id == lease.run_id and lease.task_id not in work.deleted:
            held = self._runs[run_id]
            if held.run_number == lease.attempt:
                if _proves(lease, self._due[run_id].lease_hash):
                    return task, held
                # The ids and attempt are in every read of the runs; the secret is not.
                raise _lost(lease, _NOT_THE_CLAIMER, task.status)
        run = self._runs.get(lease.run_id)
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

    def _close_run(
        self,
        run: Run,
        status: RunStatus,
        work: _Batch,
        now: datetime,
        *,
        error: str | None = None,
        result: dict[str, JsonValue] | None = None,
    ) -> Run:
        self._touch(run.task_id, work)
        changes: dict[str, object] = {"status": status, "completed_at": now}
        if error is not None:
            changes["error"] = error
        if result is not None:
            changes["result"] = result
        closed = msgspec.structs.replace(run, **changes)
        self._runs[run.id] = closed
        if self._held.get(run.task_id) == run.id:
            del self._held[run.task_id]
            self._deadlines.discard(run.id)
            del self._due[run.id]
        work.ops.append(SetRunState(closed))
        return closed

    def _requeue(
        self,
        task: Task,
        run: Run | None,
        reason: str,
        error: str | None,
        work: _Batch,
        now: datetime,
        *,
        count: bool = True,
        retryable: bool = True,
        retry_after: float | None = None,
        source: str | None = None,
    ) -> Task:
        """After a run ended without success: queue the task again (after a backoff) while
        attempts remain, else end it failed (timed_out after a timeout)."""
        attempts = task.attempts + 1 if count else task.attempts
        changes: dict[str, object] = {"attempts": attempts, "assigned_worker": None}
        if error is not None:
            changes["error"] = error
        data: dict[str, JsonValue] = {"reason": reason, "attempts": attempts}
        if run is not None:
            data["run_id"] = run.id
            if run.worker_id is not None:
                data["worker_id"] = run.worker_id
        if error is not None:
            data["error"] = error
        if count and (not retryable or attempts > task.max_retries):
            final = TaskStatus.TIMED_OUT if reason == "timed_out" else TaskStatus.FAILED
            if not retryable:  # why it ended with attempts left (an agent's fail_on, say)
                data["retryable"] = False
            return self._transition(task, final, work, now, source, changes, data)
        delay = 0.0
        if count:
            delay = self._backoff(attempts) if retry_after is None else retry_after
        changes["available_at"] = now + timedelta(seconds=delay) if delay > 0 else None
        data["retry_in"] = delay
        return self._transition(task, Q, work, now, source, changes, data)

    def _backoff(self, attempts: int) -> float:
        """Exponential, capped, with jitter (half fixed, half random) so that tasks that
        failed together do not all come back at the same instant."""
        delay = min(self._backoff_max, self._backoff_base * 2.0 ** min(attempts - 1, 60))
        return delay * (0.5 + 0.5 * self._rng.random())

    # -- requests ----------------------------------------------------------------------------

    async def _handle(self, message: TaskManagerMessage, work: _Batch, now: datetime) -> object:
        match message:
            case CreateTask():
                _refuse_unknown_keys((message,), work)
                return self._create(message, work, now, self._times(message))
            case CreateTasks(tasks=items):
                _refuse_unknown_keys(items, work)  # before any is created: all or nothing
                times = [self._times(item, f"tasks[{i}].") for i, item in enumerate(items)]
                pairs = zip(items, times, strict=True)
                return tuple(self._create(item, work, now, when) for item, when in pairs)
            case QueueTasks(task_ids=task_ids, source_agent=source):
                queued = []
                known = await self._fetch(task_ids, work)
                for task_id in task_ids:
                    task = known.get(task_id)
                    if task is not None:
                        task = self._tasks.get(task_id, task)  # changed by an earlier item
                    if task is not None and task.status is B and task_id not in work.deleted:
                        extra: dict[str, JsonValue] = {"subtask_id": task.subtask_id}
                        self._transition(task, Q, work, now, source, {}, extra)
                        queued.append(task_id)
                return tuple(queued)
            case CancelTasks(task_ids=task_ids, statuses=statuses, reason=reason):
                cancelled = []
                known = await self._fetch(task_ids, work)
                for task_id in task_ids:
                    task = known.get(task_id)
                    if task is not None:
                        task = self._tasks.get(task_id, task)  # changed by an earlier item
                    if task is None or task.status not in statuses or task_id in work.deleted:
                        continue
                    self._end_claim(task, RunStatus.CANCELLED, work, now, reason)
                    self._transition(
                        task,
                        TaskStatus.CANCELLED,
                        work,
                        now,
                        message.source_agent,
                        {"error": reason},
                    )
                    cancelled.append(task_id)
                return tuple(cancelled)
            case GetTask(task_id=task_id):
                task = self._tasks.get(task_id)
                return task if task is not None else _Forward(FetchTask(task_id))
            case UpdateTaskStatus():
                return self._update(message, await self._find(message.task_id, work), work, now)
            case CancelTask(task_id=task_id, reason=reason, source_agent=source):
                task = await self._find(task_id, work)
                changes: dict[str, object] = {"error": reason} if reason else {}
                if task.status not in TERMINAL:
                    self._end_claim(task, RunStatus.CANCELLED, work, now, reason)
                return self._transition(task, TaskStatus.CANCELLED, work, now, source, changes)
            case DeleteTask(task_id=task_id):
                return await self._delete(task_id, work, now)
            case GetTasksByStatus(status=status, task_type=task_type, limit=limit, after=after):
                return await self._list(status, task_type, limit, after)
            case GetQueuedTasks(limit=limit, task_type=task_type, after=after):
                return await self._list(TaskStatus.QUEUED, task_type, limit, after)
            case CreateRun():
                return self._create_run(message, await self._find(message.task_id, work), work, now)
            case GetRun(run_id=run_id):
                run = self._runs.get(run_id)
                return run if run is not None else _Forward(FetchRun(run_id))
            case GetRuns(task_id=task_id):
                if task_id in self._tasks:  # every run of a task in memory is in memory
                    return [self._runs[run_id] for run_id in self._runs_of.get(task_id, [])]
                return _Forward(FetchRuns(task_id))
            case UpdateRunStatus(run_id=run_id):
                run = self._runs.get(run_id)
                if run is None:
                    # A run of a task that finished long ago: look it up (rare), not cached.
                    run = await self._storage.ask(FetchRun(run_id))
                if run is None or run.task_id in work.deleted:
                    raise NotFoundError("run", run_id)
                return self._update_run(message, run, work, now)
            case Heartbeat():
                return self._heartbeat(message, work, now)
            case StartTask(lease=lease):
                return self._start(*self._holding(lease, work), work, now)
            case CompleteTask(lease=lease, result=result):
                task, run = self._holding(lease, work)
                self._close_run(run, RunStatus.COMPLETED, work, now, result=result)
                # Earlier attempts' errors stay on their runs; a completed task has none.
                changes = {"error": None} if result is None else {"error": None, "result": result}
                return self._transition(
                    task, TaskStatus.COMPLETED, work, now, run.worker_id, changes, _run_data(run)
                )
            case FailTask(lease=lease, error=error):
                task, run = self._holding(lease, work)
                self._close_run(run, RunStatus.FAILED, work, now, error=error)
                return self._requeue(
                    task,
                    run,
                    "failed",
                    error,
                    work,
                    now,
                    retryable=message.retryable,
                    retry_after=message.retry_after,
                    source=run.worker_id,
                )
            case ReleaseTask(lease=lease, reason=reason):
                task, run = self._holding(lease, work)
                note = reason or "released by its worker"
                self._close_run(run, RunStatus.RELEASED, work, now, error=note)
                return self._requeue(
                    task, run, "released", None, work, now, count=False, source=run.worker_id
                )
            case ReleaseWorker(worker_id=worker_id, reason=reason):
                return self._release_worker(worker_id, reason, work, now)
            case GetUnroutableTasks(capability_sets=sets, limit=limit, after=after):
                # Memory holds only the heads of the queues: storage scans them all.
                start = None if after is None else await self._cursor(after)
                key = None if start is None else (start.priority, start.created_at, start.id)
                return _Forward(QueryUnroutable(sets, limit=limit, after=key))
            case Wake():
                return None  # what was due was settled when the batch began
            case PlansSettled(seq=seq):
                self._release_held_back(seq)
                return None
            case PurgeTasks():
                return await self._purge(message, work, now)
            case Unclaimed(claims=claims):
                for claim in claims:
                    self._release_unclaimed(claim, work, now)
                return None
            case RetryTask() | RevokeTaskType() | RestoreTaskType() | FlushQueue():
                return await control.handle(self, message, work, now)
            case GetRevokedTaskTypes():
                return list(self._revoked.values())
            case ClaimTask() | ClaimTasks():  # pragma: no cover - parked by receive_batch
                raise HiveError("claims are parked, not handled")
        raise HiveError(f"the task manager does not handle {type(message).__name__}")

    def _heartbeat(self, message: Heartbeat, work: _Batch, now: datetime) -> datetime:
        task, run = self._holding(message.lease, work)
        assert run.lease_seconds is not None
        assert run.lease_expires_at is not None
        span = message.extend or run.lease_seconds
        expires = now + timedelta(seconds=span)  # shown; the deadline is on the monotonic clock
        changes: dict[str, object] = {"lease_expires_at": expires}
        if message.progress is not None:
            changes["progress"] = message.progress
        if message.phase is not None:
            changes["phase"] = message.phase
        if len(changes) > 1:
            # Progress is durable and published; a bare heartbeat only moves the lease,
            # which lives as long as this process, so it is kept in memory.
            self._touch(task.id, work)
        renewed = msgspec.structs.replace(run, **changes)
        self._runs[run.id] = renewed
        self._due[run.id] = self._due[run.id]._replace(lease=self._mono + span)
        due = self._due[run.id].next()[0]
        # Moved earlier only: a later deadline is found when the entry comes up (one
        # entry per claim either way), so that a heartbeat costs no sift.
        entry = self._deadlines.get(run.id)
        if entry is None or due < entry:
            self._deadlines.set(run.id, due)
        if len(changes) > 1:
            work.ops.append(SetRunState(renewed))
            data = _run_data(run)
            if message.progress is not None:
                data["progress"] = message.progress
            if message.phase is not None:
                data["phase"] = message.phase
            work.ops.append(self._event("task.progress", task, now, run.worker_id, data))
        return expires

    def _end_claim(
        self, task: Task, status: RunStatus, work: _Batch, now: datetime, note: str | None
    ) -> None:
        """A task that a claim holds is being moved by hand: end the claim's run too."""
        run_id = self._held.get(task.id)
        if run_id is not None:
            self._close_run(self._runs[run_id], status, work, now, error=note)

    def _release_worker(self, worker_id: str, reason: str, work: _Batch, now: datetime) -> int:
        released = 0
        for task_id, run_id in list(self._held.items()):
            run = self._runs[run_id]
            if run.worker_id != worker_id:
                continue
            error = f"worker {worker_id!r} lost: {reason}"
            self._close_run(run, RunStatus.LOST, work, now, error=error)
            # A lost run says nothing against the task: claimable again at once.
            self._requeue(
                self._tasks[task_id], run, "worker_lost", error, work, now, retry_after=0.0
            )
            released += 1
        return released

    def _create(
        self,
        message: CreateTask,
        work: _Batch,
        now: datetime,
        times: tuple[datetime | None, datetime | None] = (None, None),
    ) -> str:
        key = message.idempotency_key
        if key is not None:
            owner = control.key_owner(self, key, work)
            if owner is not None:
                if message.schedule is not None:
                    work.ops += slot_ops(message.schedule, owner, None, now)
                return owner  # the first task's id; nothing is created
        task = Task(
            id=message.task_id or new_id(),
            title=message.title,
            description=message.description,
            task_type=message.task_type,
            status=B if message.blocked else Q,
            priority=message.priority,
            workflow=message.workflow,
            payload=message.payload,
            tags=message.tags,
            max_retries=message.max_retries,
            due_date=message.due_date,
            idempotency_key=key,
            idempotency_scope=message.idempotency_scope,
            correlation_id=message.correlation_id,
            source_agent=message.source_agent,
            timeout=message.timeout,
            concurrency_key=message.concurrency_key,
            concurrency_limit=message.concurrency_limit,
            requires=message.requires,
            plan_id=message.plan_id,
            subtask_id=message.subtask_id,
            traceparent=message.traceparent,
            tracestate=message.tracestate,
            created_at=now,
            updated_at=now,
            run_at=times[0],
            expires_at=times[1],
        )
        self._touch(task.id, work)
        self._tasks[task.id] = task
        self._index(None, task)
        if key is not None:
            self._set_key(key, task.id, work)
        work.ops.append(PutTask(task))
        data: dict[str, JsonValue] = {
            "task_type": task.task_type,
            "title": task.title,
            "priority": task.priority,
        }
        if task.run_at is not None:
            data["run_at"] = task.run_at.isoformat()
        if task.expires_at is not None:
            data["expires_at"] = task.expires_at.isoformat()
        work.ops.append(self._event("task.created", task, now, message.source_agent, data))
        if message.schedule is not None:  # the slot's advance: in this very write
            work.ops += slot_ops(message.schedule, task.id, task, now)
        return task.id

    def _update(self, message: UpdateTaskStatus, task: Task, work: _Batch, now: datetime) -> bool:
        if task.status is message.status and task.status in TERMINAL and _agrees(task, message):
            return False  # already so: nothing to change, nothing to publish
        if task.status is B and message.status is not TaskStatus.CANCELLED:
            # Only its plan queues a blocked subtask, once its dependencies are done.
            raise IllegalTransitionError("task", task.id, task.status.value, message.status.value)
        changes: dict[str, object] = {}
        if message.assigned_worker is not None:
            changes["assigned_worker"] = message.assigned_worker
        if message.current_phase is not None:
            changes["current_phase"] = message.current_phase
        if message.result is not None:
            changes["result"] = message.result
        if message.error is not None:
            changes["error"] = message.error
        data: dict[str, JsonValue] = {}
        if message.status is Q:
            data["reason"] = "requeued"
            changes["available_at"] = None
            if message.assigned_worker is None:
                changes["assigned_worker"] = None  # back in the queue: nobody holds it
                if task.assigned_worker is not None:
                    data["worker_id"] = task.assigned_worker
        if (task.status, message.status) in TRANSITIONS:
            run_status = _RUN_FOR_TASK.get(message.status)
            held = self._held.get(task.id)
            if run_status is not None:
                self._end_claim(task, run_status, work, now, f"task set to {message.status.value}")
            elif message.status is R and held is not None:
                self._touch(task.id, work)
                started = msgspec.structs.replace(self._runs[held], status=RunStatus.RUNNING)
                self._runs[held] = started
                work.ops.append(SetRunState(started))
        self._transition(task, message.status, work, now, message.source_agent, changes, data)
        return True

    def _transition(
        self,
        task: Task,
        status: TaskStatus,
        work: _Batch,
        now: datetime,
        source: str | None,
        changes: dict[str, object],
        extra: dict[str, JsonValue] | None = None,
    ) -> Task:
        event_type = TRANSITIONS.get((task.status, status))
        if event_type is None:
            raise IllegalTransitionError("task", task.id, task.status.value, status.value)
        updated = msgspec.structs.replace(task, status=status, updated_at=now, **changes)
        self._touch(task.id, work)
        self._tasks[task.id] = updated
        self._index(task, updated)
        if status in TERMINAL:
            self._finished[task.id] = None
            control.let_go_of_key(self, updated, work)
        work.ops.append(SetTaskState(updated))
        data: dict[str, JsonValue] = {
            "status": status.value,
            "previous": task.status.value,
            "task_type": task.task_type,
        }
        if updated.assigned_worker is not None:
            data["worker_id"] = updated.assigned_worker
        if status is TaskStatus.COMPLETED and updated.result is not None:
            data["result"] = updated.result
        if status in TERMINAL and updated.error is not None:
            data["error"] = updated.error
        if extra:
            data.update(extra)
        work.ops.append(self._event(event_type, updated, now, source, data))
        if status is TaskStatus.COMPLETED and deletes_on_success(updated, self._delete_on_success):
            # Its completion is logged and answered; the row goes in the same commit.
            self._remove(updated.id, work, None)
            deleted = {"task_type": updated.task_type, "reason": "delete_on_success"}
            work.ops.append(self._event("task.deleted", updated, now, source, dict(deleted)))
        return updated

    async def _delete(self, task_id: str, work: _Batch, now: datetime) -> bool:
        return self._delete_task(await self._find(task_id, work), work, now)

    def _delete_task(
        self,
        task: Task,
        work: _Batch,
        now: datetime,
        source: str | None = None,
        extra: dict[str, JsonValue] | None = None,
    ) -> bool:
        self._remove(task.id, work, task.idempotency_key)
        data: dict[str, JsonValue] = {"task_type": task.task_type, **(extra or {})}
        work.ops.append(self._event("task.deleted", task, now, source, data))
        return True

    async def _purge(self, message: PurgeTasks, work: _Batch, now: datetime) -> PurgeOutcome:
        """One chunk of a purge (docs/RETENTION.md): storage names the candidates, memory
        has the last word on those it holds (the recently finished), and the tasks go with
        their runs and events, in this batch's one commit."""
        before = now - timedelta(seconds=message.older_than)
        found = await self._storage.ask(
            FindPurgeable(
                before,
                message.statuses,
                message.task_type,
                message.include_keyed,
                message.limit,
            )
        )
        purged: list[str] = []
        for task_id, key in found:
            if task_id in work.deleted or task_id in work.undo:
                continue  # changed by this batch: the next chunk judges it again
            known = self._tasks.get(task_id)
            if known is not None and (known.status not in TERMINAL or known.updated_at >= before):
                continue
            self._remove(task_id, work, key)
            purged.append(task_id)
        if purged:
            work.ops.append(DeleteTaskEvents(tuple(purged)))
            work.ops.append(purged_event(message, before, len(purged), now))
        return PurgeOutcome(len(purged), len(found) >= message.limit)

    def _remove(self, task_id: str, work: _Batch, key: str | None) -> None:
        """Delete a task and its runs, in memory and (in this batch's write) in storage."""
        self._touch(task_id, work)
        task = self._tasks.pop(task_id, None)
        self._index(task, None)
        held = self._held.pop(task_id, None)
        if held is not None:
            self._deadlines.discard(held)
            del self._due[held]
        self._finished.pop(task_id, None)
        for run_id in self._runs_of.pop(task_id, []):
            self._runs.pop(run_id, None)
        if key is not None and self._keys.get(key) == task_id:
            self._set_key(key, None, work)
        elif key is not None and work.stored_keys.get(key) == task_id:
            del work.stored_keys[key]  # a later create in this batch may take the key
        work.deleted.add(task_id)
        work.ops.append(DeleteTaskRow(task_id))

    async def _cursor(self, after: str) -> Task:
        """The task a page starts after: in memory, or read (a task that left memory)."""
        start = self._tasks.get(after) or await self._storage.ask(FetchTask(after))
        if start is None:
            raise InvalidInputError(
                "after",
                f"no task has the id {after!r} (deleted since?): pass the id of the last"
                " task of the previous page, or start again without after",
            )
        return start

    async def _list(
        self, status: TaskStatus, task_type: str | None, limit: int, after: str | None
    ) -> object:
        """A page of a status's tasks (see listing.py) in (priority, created_at, id) order
        from ``after``. Memory holds only the heads of the queues, so storage answers,
        behind the batch's commit: the page sees the batch's changes."""
        start = None if after is None else await self._cursor(after)
        key = None if start is None else (start.priority, start.created_at, start.id)
        return _Forward(
            QueryTasks(status=status.value, task_type=task_type, limit=limit, after=key)
        )

    def _create_run(self, message: CreateRun, task: Task, work: _Batch, now: datetime) -> str:
        if task.status in TERMINAL:
            raise IllegalTransitionError("task", task.id, task.status.value, "a new run")
        runs = self._runs_of.get(task.id, [])
        run = Run(
            id=new_id(),
            task_id=task.id,
            worker_id=message.worker_id,
            run_number=len(runs) + 1,
            status=RunStatus.RUNNING,
            phase=message.phase,
            started_at=now,
        )
        self._touch(task.id, work)
        self._remember_run(run)
        work.ops.append(PutRun(run))
        return run.id

    def _update_run(self, message: UpdateRunStatus, run: Run, work: _Batch, now: datetime) -> bool:
        if run.status not in _RUN_OPEN or message.status is run.status:
            raise IllegalTransitionError("run", run.id, run.status.value, message.status.value)
        if self._held.get(run.task_id) == run.id:
            # The claim's own calls (complete, fail, release) also move its task.
            raise IllegalTransitionError(
                "run", run.id, "held by a claim", f"{message.status.value} by update_run_status"
            )
        changes: dict[str, object] = {"status": message.status}
        for name in ("result", "error", "phase", "output_log"):
            value = getattr(message, name)
            if value is not None:
                changes[name] = value
        if message.status not in _RUN_OPEN:
            changes["completed_at"] = now
        updated = msgspec.structs.replace(run, **changes)
        if run.id in self._runs:  # a run fetched from storage is not cached
            self._touch(run.task_id, work)
            self._runs[run.id] = updated
        work.ops.append(SetRunState(updated))
        return True

    # -- helpers -----------------------------------------------------------------------------

    async def _find(self, task_id: str, work: _Batch) -> Task:
        """The task, from memory or else from storage: one of a queue's backlog, a
        blocked subtask, or one that finished long ago (with its runs: see _fetch)."""
        if task_id in work.deleted:  # deleted earlier in this batch, not yet committed
            raise NotFoundError("task", task_id)
        task = self._tasks.get(task_id)
        if task is None:
            task = (await self._fetch((task_id,), work)).get(task_id)
            if task is None:
                raise NotFoundError("task", task_id)
        return task

    def _event(
        self,
        event_type: str,
        task: Task,
        now: datetime,
        source: str | None,
        data: dict[str, JsonValue],
    ) -> AppendEvent:
        worker = data.get("worker_id")
        event = Event(
            type=event_type,
            timestamp=now.timestamp(),
            source=source or task.source_agent or "task_manager",
            correlation_id=task.correlation_id,
            task_id=task.id,
            plan_id=task.plan_id,
            worker_id=worker if isinstance(worker, str) else None,
            data=data,
        )
        return AppendEvent(event, msgspec.json.encode(data))

    def _remember_run(self, run: Run) -> None:
        if run.id not in self._runs:
            self._runs_of.setdefault(run.task_id, []).append(run.id)
        self._runs[run.id] = run

    def _evict(self) -> None:
        """Keep at most ``recent`` finished tasks in memory (their state is committed)."""
        while len(self._finished) > self._recent_limit:
            task_id, _ = self._finished.popitem(last=False)
            task = self._tasks.pop(task_id, None)
            key = None if task is None else task.idempotency_key
            if key is not None and self._keys.get(key) == task_id:
                # The task still owns its key, now answered by storage (it is committed).
                del self._keys[key]
            for run_id in self._runs_of.pop(task_id, []):
                self._runs.pop(run_id, None)


_RECOVERED = "the runtime stopped while a worker held the task"


#: How many times a batch is decided on a fenced store before a conflict is its answer.
_ATTEMPTS = 32


def _conflict(error: HiveError) -> bool:
    """Whether a failed write may be decided again: another node changed a task it
    fenced, took an idempotency key it created, or a lock it waited on chose it as a
    deadlock's victim (a constraint's refusal has no fault of its own)."""
    return isinstance(error, StorageError) and error.fault in (None, "locked")


def _ends_a_plan_task(ops: list[WriteOp], start: int) -> bool:
    """Whether ``ops[start:]`` log the end of a plan's task."""
    for op in ops[start:]:
        if isinstance(op, AppendEvent):
            event = op.event
            if event.plan_id is not None and event.type in PLAN_TASK_ENDINGS:
                return True
    return False


def _agrees(task: Task, message: UpdateTaskStatus) -> bool:
    """Whether every field ``message`` sets already holds on ``task`` (an empty result
    agrees with none: the seeds publish ``result={}`` for a task completed without one)."""
    result = message.result or None
    return (
        (result is None or result == task.result)
        and (message.error is None or message.error == task.error)
        and (message.assigned_worker is None or message.assigned_worker == task.assigned_worker)
        and (message.current_phase is None or message.current_phase == task.current_phase)
    )


def _refuse_unknown_keys(items: Sequence[CreateTask], work: _Batch) -> None:
    """Raise the error of a key storage could not look up for this batch, if any."""
    if work.key_errors:
        for item in items:
            key = item.idempotency_key
            if key is not None and key in work.key_errors:
                raise work.key_errors[key]


def _after(bound: Bound) -> tuple[int, datetime, str]:
    """A bound as storage resumes after it: (priority, created_at, id)."""
    return (-bound.neg_priority, bound.created_at, bound.task_id)


def _claims(outcome: object) -> tuple[Claim, ...]:
    """The claims in a claim's answer (one claim, or a tuple of them)."""
    if isinstance(outcome, Claim):
        return (outcome,)
    assert isinstance(outcome, tuple)
    return outcome


def _run_data(run: Run) -> dict[str, JsonValue]:
    return {"run_id": run.id, "attempt": run.run_number}


_NOT_THE_CLAIMER = (
    "this lease's secret does not match the claim's: only the worker that claimed the task"
    " can act on it, with the lease its claim returned, passed on as it came (a lease"
    " rebuilt from get_runs has no secret)"
)


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
