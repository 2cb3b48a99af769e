"""Tasks and runs: the public models, and the messages the TaskManager answers.

A *task* is a unit of work; a *run* is one execution attempt of a task by a worker.
The state machine that moves a task between statuses lives with its owner,
:mod:`hive_orchestration.actors.task_manager`.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Literal, TypeAlias

import msgspec

from ..runtime import Request
from .events import JsonValue
from .leader import RecoverClaims

__all__ = [
    "PLAN_TASK_ENDINGS",
    "TERMINAL",
    "CancelTask",
    "CancelTasks",
    "Claim",
    "ClaimTask",
    "ClaimTasks",
    "CompleteTask",
    "CreateRun",
    "CreateTask",
    "CreateTasks",
    "DeleteTask",
    "FailTask",
    "GetQueuedTasks",
    "GetRun",
    "GetRuns",
    "GetTask",
    "GetTasksByStatus",
    "GetUnroutableTasks",
    "Heartbeat",
    "Lease",
    "PlansSettled",
    "QueueTasks",
    "ReleaseTask",
    "ReleaseWorker",
    "Run",
    "RunStatus",
    "ScheduleSlot",
    "StartTask",
    "Task",
    "TaskManagerMessage",
    "TaskStatus",
    "Unclaimed",
    "UpdateRunStatus",
    "UpdateTaskStatus",
    "Wake",
    "FlushQueue",
    "GetRevokedTaskTypes",
    "IdempotencyScope",
    "RestoreTaskType",
    "RetryTask",
    "RevokedTaskType",
    "RevokeTaskType",
    "PurgeOutcome",
    "PurgeTasks",
]

JsonObject: TypeAlias = dict[str, JsonValue]
#: How long a task holds its idempotency key: ``"forever"`` (until the task is deleted)
#: or ``"active"`` (until it ends: completed, failed, timed out or cancelled).
IdempotencyScope: TypeAlias = Literal["forever", "active"]


class TaskStatus(enum.StrEnum):
    """Where a task stands. ``PENDING`` is the extraction plan's name for ``QUEUED``: the
    same status (``TaskStatus.PENDING is TaskStatus.QUEUED``), stored as ``"queued"``, and
    ``TaskStatus("pending")`` works too."""

    QUEUED = "queued"
    PENDING = "queued"
    #: A plan's subtask waiting for its dependencies: not handed out until its plan
    #: queues it (``plan.subtask_ready``).
    BLOCKED = "blocked"
    ASSIGNED = "assigned"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @classmethod
    def _missing_(cls, value: object) -> TaskStatus | None:
        return cls.QUEUED if value == "pending" else None


#: Statuses a task never leaves.
TERMINAL = frozenset(
    {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.TIMED_OUT}
)


class RunStatus(enum.StrEnum):
    """Where one execution attempt stands."""

    ASSIGNED = "assigned"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    LOST = "lost"
    CANCELLED = "cancelled"
    #: Handed back by its worker (shutting down) or never received by it: not an attempt.
    RELEASED = "released"


class Task(msgspec.Struct, frozen=True, kw_only=True):
    """A task as stored. ``type`` is a read-only alias of ``task_type`` (the extraction
    plan's name for it). Timestamps are timezone-aware UTC."""

    id: str
    title: str
    task_type: str
    status: TaskStatus
    priority: int = 1
    description: str | None = None
    current_phase: str = "start"
    workflow: JsonObject | None = None
    payload: JsonObject = {}
    tags: tuple[str, ...] = ()
    max_retries: int = 3
    attempts: int = 0
    due_date: datetime | None = None
    assigned_worker: str | None = None
    result: JsonObject | None = None
    error: str | None = None
    idempotency_key: str | None = None
    #: How long the task holds its idempotency key (see docs/CONTROL.md).
    idempotency_scope: IdempotencyScope = "forever"
    correlation_id: str | None = None
    source_agent: str | None = None
    #: Seconds one run may take from its claim before it ends as timed out.
    timeout: float | None = None
    #: Not handed out before this time (set by retry backoff).
    available_at: datetime | None = None
    #: At most ``concurrency_limit`` tasks with the same key are assigned or running at once.
    concurrency_key: str | None = None
    concurrency_limit: int | None = None
    #: Capabilities a worker must all have to take it (otherwise: its task type).
    requires: tuple[str, ...] = ()
    #: The execution plan this task is a subtask of, and its id in that plan.
    plan_id: str | None = None
    subtask_id: str | None = None
    #: The W3C trace context of the call that created it (``traceparent``, and its
    #: ``tracestate``), when tracing was on there: a worker's run continues that trace.
    traceparent: str | None = None
    tracestate: str | None = None
    created_at: datetime
    updated_at: datetime
    #: A delayed task: not handed out before this time (docs/TIMING.md). Cleared when
    #: it comes due, so a queued task with ``run_at`` set is still waiting for it.
    run_at: datetime | None = None
    #: Never handed out after this time: a task still queued then ends ``cancelled``
    #: with the reason ``expired`` (docs/TIMING.md).
    expires_at: datetime | None = None

    @property
    def type(self) -> str:
        """The task's type (alias of :attr:`task_type`)."""
        return self.task_type


class Run(msgspec.Struct, frozen=True, kw_only=True):
    """One execution attempt of a task by a worker."""

    id: str
    task_id: str
    worker_id: str | None = None
    run_number: int = 1
    status: RunStatus = RunStatus.RUNNING
    phase: str | None = None
    result: JsonObject | None = None
    error: str | None = None
    output_log: str | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    #: For a claimed run: the lease length, and when it expires unless renewed.
    lease_seconds: float | None = None
    lease_expires_at: datetime | None = None
    #: The last progress its worker reported.
    progress: JsonObject | None = None

    @property
    def attempt(self) -> int:
        """The run's number among its task's runs (alias of :attr:`run_number`)."""
        return self.run_number


class Lease(msgspec.Struct, frozen=True):
    """The fencing token of a claim: which run of which task a worker holds, and the
    secret that proves the worker is the one that claimed it.

    Every call a worker makes about its task carries it; once the claim is over (lease
    expired, task cancelled, or handed to another run), the token is refused with
    :class:`~hive_orchestration.errors.LeaseLostError`. So is a token whose ``secret`` is
    not its claim's: the ids and the attempt are in every read of the runs, but the secret
    is handed out once, in the claim's answer, and never shown again (the runtime keeps
    only its hash). Pass the lease as it came; one rebuilt from ids is refused.
    """

    task_id: str
    run_id: str
    attempt: int
    #: Empty in a lease built by hand: refused like a wrong one.
    secret: str = ""

    def __repr__(self) -> str:
        # Not in logs or tracebacks: whoever reads them could act for the worker.
        return (
            f"Lease(task_id={self.task_id!r}, run_id={self.run_id!r},"
            f" attempt={self.attempt!r}, secret=<hidden>)"
        )

    def __rich_repr__(self) -> list[tuple[str, object]]:
        return [
            ("task_id", self.task_id),
            ("run_id", self.run_id),
            ("attempt", self.attempt),
            ("secret", "<hidden>"),
        ]


class Claim(msgspec.Struct, frozen=True):
    """What a claim hands a worker: the task, its lease token and when the lease expires
    unless the worker heartbeats."""

    task: Task
    lease: Lease
    expires_at: datetime


# -- the TaskManager's inbox: every field was validated at the API boundary ---------------


class CreateTask(Request[str], frozen=True, kw_only=True):
    """Create a task (or return the existing one's id for a known idempotency key)."""

    title: str
    task_type: str
    payload: JsonObject
    description: str | None = None
    priority: int = 1
    workflow: JsonObject | None = None
    tags: tuple[str, ...] = ()
    max_retries: int = 3
    due_date: datetime | None = None
    idempotency_key: str | None = None
    correlation_id: str | None = None
    source_agent: str | None = None
    timeout: float | None = None
    concurrency_key: str | None = None
    concurrency_limit: int | None = None
    requires: tuple[str, ...] = ()
    #: Set by the PlanExecutor only: the id it chose, the plan and subtask, and whether
    #: the task starts blocked (waiting for its dependencies) rather than queued.
    task_id: str | None = None
    plan_id: str | None = None
    subtask_id: str | None = None
    blocked: bool = False
    idempotency_scope: IdempotencyScope = "forever"
    #: The creating call's W3C trace context (hive_orchestration/_trace.py).
    traceparent: str | None = None
    tracestate: str | None = None
    #: Not claimable before ``run_at``, or before ``delay`` seconds from its creation
    #: (one of them); never handed out after ``expires_at``, or ``expires_in`` seconds
    #: from its creation (one of them). Relative spans are resolved by the TaskManager
    #: on its monotonic clock, so the caller's clock does not matter.
    run_at: datetime | None = None
    delay: float | None = None
    expires_at: datetime | None = None
    expires_in: float | None = None
    #: Set by the Scheduler only: the schedule slot this task fires. Its advance and its
    #: ``schedule.fired`` event are committed in the very write that creates the task.
    schedule: ScheduleSlot | None = None


class CreateTasks(Request[tuple[str, ...]], frozen=True):
    """Create every task in one commit (a plan's subtasks); the reply lists their ids."""

    tasks: tuple[CreateTask, ...]


class QueueTasks(Request[tuple[str, ...]], frozen=True, kw_only=True):
    """Queue the blocked tasks among ``task_ids`` (their dependencies are done): each
    publishes ``plan.subtask_ready``. Others are left alone; the reply lists those queued."""

    task_ids: tuple[str, ...]
    source_agent: str | None = None


class CancelTasks(Request[tuple[str, ...]], frozen=True, kw_only=True):
    """Cancel the tasks among ``task_ids`` whose status is in ``statuses``; the reply
    lists those cancelled. Unknown or finished tasks are left alone."""

    task_ids: tuple[str, ...]
    statuses: tuple[TaskStatus, ...]
    reason: str
    source_agent: str | None = None


class GetTask(Request["Task | None"], frozen=True):
    task_id: str


class UpdateTaskStatus(Request[bool], frozen=True, kw_only=True):
    """Move a task to ``status`` through the state machine; ``None`` fields are unchanged."""

    task_id: str
    status: TaskStatus
    assigned_worker: str | None = None
    current_phase: str | None = None
    result: JsonObject | None = None
    error: str | None = None
    source_agent: str | None = None


class CancelTask(Request[Task], frozen=True, kw_only=True):
    task_id: str
    reason: str | None = None
    source_agent: str | None = None


class DeleteTask(Request[bool], frozen=True):
    task_id: str


class GetTasksByStatus(Request[list[Task]], frozen=True, kw_only=True):
    """Tasks in ``status``, by priority (highest first), then creation time, then id: at
    most ``limit``, from just after the task ``after`` in that order (see listing.py)."""

    status: TaskStatus
    task_type: str | None = None
    limit: int = 1000
    after: str | None = None


class GetQueuedTasks(Request[list[Task]], frozen=True, kw_only=True):
    limit: int = 10
    task_type: str | None = None
    after: str | None = None


class CreateRun(Request[str], frozen=True, kw_only=True):
    task_id: str
    worker_id: str | None = None
    phase: str | None = None


class GetRun(Request["Run | None"], frozen=True):
    run_id: str


class GetRuns(Request[list[Run]], frozen=True):
    """The runs of a task, oldest first."""

    task_id: str


class UpdateRunStatus(Request[bool], frozen=True, kw_only=True):
    run_id: str
    status: RunStatus
    result: JsonObject | None = None
    error: str | None = None
    phase: str | None = None
    output_log: str | None = None


class ClaimTask(Request["Claim | None"], frozen=True, kw_only=True):
    """Hand the best ready task the worker can take to it, waiting up to ``wait`` seconds
    for one; ``None`` when there was none.

    ``task_types`` are what the worker can do (task types or capabilities; ``None``: any
    task): a task without ``requires`` matches when its type is among them, a task with
    ``requires`` when all of them are."""

    worker_id: str
    task_types: tuple[str, ...] | None = None
    lease: float
    wait: float = 0.0
    #: Also start the task (``task.assigned`` then ``task.started``, one commit).
    start: bool = False


class ClaimTasks(Request["tuple[Claim, ...]"], frozen=True, kw_only=True):
    """:class:`ClaimTask` for up to ``limit`` tasks at once, best first: what is ready
    now, or else the first to arrive within ``wait`` seconds (``()`` if none does)."""

    worker_id: str
    task_types: tuple[str, ...] | None = None
    lease: float
    wait: float = 0.0
    start: bool = False
    limit: int


class Heartbeat(Request[datetime], frozen=True, kw_only=True):
    """Renew a claim's lease (by its length, or ``extend`` seconds); optionally report
    progress (stored on the run, published as ``task.progress``). Returns the new expiry."""

    lease: Lease
    extend: float | None = None
    progress: JsonObject | None = None
    phase: str | None = None


class StartTask(Request[Task], frozen=True):
    lease: Lease


class CompleteTask(Request[Task], frozen=True, kw_only=True):
    lease: Lease
    result: JsonObject | None = None


class FailTask(Request[Task], frozen=True, kw_only=True):
    """Fail the claimed run: retried after a backoff (or ``retry_after`` seconds) while
    attempts remain and ``retryable``, else the task fails for good."""

    lease: Lease
    error: str
    retryable: bool = True
    retry_after: float | None = None


class ReleaseTask(Request[Task], frozen=True, kw_only=True):
    """Hand a claimed task back unfinished (a worker shutting down): requeued at once,
    not counted as an attempt."""

    lease: Lease
    reason: str | None = None


class ReleaseWorker(Request[int], frozen=True, kw_only=True):
    """The worker is gone: every task it holds goes back to the queue (its runs end as
    lost and count an attempt). Returns how many."""

    worker_id: str
    reason: str = "worker offline"


class GetUnroutableTasks(Request[list[Task]], frozen=True):
    """Queued tasks that no worker able to do one of ``capability_sets`` can take: at
    most ``limit``, in the listing order from just after the task ``after``."""

    capability_sets: tuple[tuple[str, ...], ...]
    limit: int = 1000
    after: str | None = None


class Unclaimed(msgspec.Struct, frozen=True):
    """Told back by a claimer that was cancelled after its claims were answered but before
    it received them: nobody holds those tasks, so they go back to the queue."""

    claims: tuple[Claim, ...]


class Wake(msgspec.Struct, frozen=True):
    """The TaskManager's alarm: leases, timeouts, backoffs or claim waits are due."""


#: The events of a plan's task that end its subtask: what its plan reacts to.
PLAN_TASK_ENDINGS = frozenset(
    {"task.completed", "task.failed", "task.timed_out", "task.cancelled", "task.deleted"}
)


class PlansSettled(msgspec.Struct, frozen=True):
    """Told by the PlanExecutor: it has applied (committed) everything that the plan
    tasks' events up to ``seq`` caused, so the answers held back for them can go."""

    seq: int


# -- control by hand (docs/CONTROL.md) ----------------------------------------------------


class RetryTask(Request[Task], frozen=True, kw_only=True):
    """Send a failed, timed-out or cancelled task back to the queue with a fresh attempt
    budget (``task.retried``, naming ``source_agent``); returns it as queued."""

    task_id: str
    reason: str | None = None
    source_agent: str | None = None


class RevokeTaskType(Request[bool], frozen=True, kw_only=True):
    """Hand out no task of ``task_type`` until it is restored: its queued tasks, and those
    created meanwhile, stay queued. ``False`` if it was revoked already."""

    task_type: str
    reason: str | None = None
    source_agent: str | None = None


class RestoreTaskType(Request[bool], frozen=True, kw_only=True):
    """Hand out the tasks of a revoked ``task_type`` again. ``False`` if it was not."""

    task_type: str
    source_agent: str | None = None


class RevokedTaskType(msgspec.Struct, frozen=True, kw_only=True):
    """A task type whose tasks are not handed out: since when, by whom and why."""

    task_type: str
    revoked_at: datetime
    source_agent: str | None = None
    reason: str | None = None


class GetRevokedTaskTypes(Request[list[RevokedTaskType]], frozen=True):
    """The revoked task types, in the order they were revoked."""


class FlushQueue(Request[int], frozen=True, kw_only=True):
    """Delete up to ``limit`` queued tasks of ``task_type`` (any if ``None``) created at or
    before ``before``, in one commit (a ``task.deleted`` each); returns how many."""

    task_type: str | None = None
    before: datetime
    limit: int
    source_agent: str | None = None


class PurgeOutcome(msgspec.Struct, frozen=True):
    """One chunk of a purge: how many tasks it deleted, and whether storage may hold more
    (it found as many as it was asked for)."""

    purged: int
    more: bool


class PurgeTasks(Request[PurgeOutcome], frozen=True, kw_only=True):
    """Delete, with their runs and events, at most ``limit`` finished tasks last changed
    more than ``older_than`` seconds ago by the TaskManager's clock (see FindPurgeable
    for which ones are never purged): one chunk of a purge, one transaction, so that
    other writers go between two chunks."""

    older_than: float
    statuses: tuple[str, ...]
    task_type: str | None = None
    include_keyed: bool = False
    limit: int = 1000
    source_agent: str | None = None
    reason: str = "purge"


TaskManagerMessage: TypeAlias = (
    CreateTask
    | CreateTasks
    | QueueTasks
    | CancelTasks
    | GetTask
    | UpdateTaskStatus
    | CancelTask
    | DeleteTask
    | GetTasksByStatus
    | GetQueuedTasks
    | CreateRun
    | GetRun
    | GetRuns
    | UpdateRunStatus
    | ClaimTask
    | ClaimTasks
    | Heartbeat
    | StartTask
    | CompleteTask
    | FailTask
    | ReleaseTask
    | ReleaseWorker
    | GetUnroutableTasks
    | Unclaimed
    | Wake
    | PlansSettled
    | RetryTask
    | RevokeTaskType
    | RestoreTaskType
    | GetRevokedTaskTypes
    | FlushQueue
    | PurgeTasks
    | RecoverClaims
)


class ScheduleSlot(msgspec.Struct, frozen=True, kw_only=True):
    """A schedule's slot, carried by the :class:`CreateTask` that fires it.

    The TaskManager writes the schedule's advance to ``slot`` (only forward, so a slot
    fired again cannot move it back) and the ``schedule.fired`` event (``data``, plus
    the task's id) in the same write as the task: a crash leaves both or neither.
    """

    schedule_id: str
    name: str
    slot: datetime
    #: The ``schedule.fired`` event's data (who and why), the task id added.
    data: JsonObject
    source_agent: str | None = None
