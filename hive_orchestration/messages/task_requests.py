"""The TaskManager's inbox: creating, reading and moving tasks and runs, a worker's
claims, and what the other actors tell it. Every field was validated at the API boundary.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from ..runtime import Request
from .task_models import (
    Claim,
    IdempotencyScope,
    JsonObject,
    Lease,
    Run,
    RunStatus,
    Task,
    TaskOutcome,
    TaskStatus,
)


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


class CompleteTasks(Request[tuple[TaskOutcome, ...]], frozen=True):
    """Several :class:`CompleteTask` in one commit, each decided on its own: an item
    whose lease no longer holds its task is refused (its :class:`TaskOutcome` says why)
    and the others complete."""

    items: tuple[CompleteTask, ...]


class FailTasks(Request[tuple[TaskOutcome, ...]], frozen=True):
    """Several :class:`FailTask` in one commit, each decided on its own, as
    :class:`CompleteTasks`."""

    items: tuple[FailTask, ...]


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


class ReadyElsewhere(msgspec.Struct, frozen=True):
    """Told by the node's log feed (PostgreSQL): other nodes' commits made tasks of
    these ready queues (task type, requirement list, concurrency key) claimable; at most
    one per burst of their notifications. ``None``: which is not known (notifications
    may have been lost while the listener reconnected): read every queue's head."""

    queues: tuple[tuple[str, tuple[str, ...], str | None], ...] | None


#: The events of a plan's task that end its subtask: what its plan reacts to.
PLAN_TASK_ENDINGS = frozenset(
    {"task.completed", "task.failed", "task.timed_out", "task.cancelled", "task.deleted"}
)


class PlansSettled(msgspec.Struct, frozen=True):
    """Told by the PlanExecutor: it has applied (committed) everything that the plan
    tasks' events up to ``seq`` caused, so the answers held back for them can go."""

    seq: int


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
