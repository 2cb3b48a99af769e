"""What the storage actor is asked to read: the event log, tasks, runs and the ready
queues, workers, plans and the planning queue, control, timers and rate windows,
schedules, and what retention may take."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from ..runtime import Request
from .events import Event
from .plans import ExecutionPlan, PlanningRequest, PlanStatus, SubtaskState
from .schedules import Schedule
from .tasks import RevokedTaskType, Run, Task
from .workers import Worker


class ReadEvents(Request[tuple[Event, ...]], frozen=True):
    """Durable events with ``seq > after``, oldest first, at most ``limit``.

    Narrowed by every filter given (all ANDed): ``pattern`` is a glob over the event type
    (SQLite ``GLOB``, case-sensitive: ``*`` and ``?`` match as in the live subscriptions'
    :func:`fnmatch.fnmatchcase`; a bracket class is SQLite's, negated with ``[^...]``),
    ``task_id``, ``plan_id`` and ``correlation_id`` must equal the event's field.
    ``newest`` returns the newest ``limit`` matching events instead of the oldest ones,
    still in ``seq`` order.
    """

    after: int = 0
    limit: int = 1000
    pattern: str = "*"
    task_id: str | None = None
    plan_id: str | None = None
    correlation_id: str | None = None
    newest: bool = False


class LoadTasks(Request[tuple[Task, ...]], frozen=True):
    """Every task in one of ``statuses`` (the TaskManager's live set, at start-up)."""

    statuses: tuple[str, ...]


class LoadRuns(Request[tuple[Run, ...]], frozen=True):
    """Every run of the tasks in one of ``statuses``, oldest first."""

    statuses: tuple[str, ...]


class LoadLeaseHashes(Request[dict[str, bytes]], frozen=True):
    """run id -> the hash of its lease's secret, for each open run of the tasks in one of
    ``statuses`` that a claim opened (the TaskManager's claims, at start-up)."""

    statuses: tuple[str, ...]


class FindIdempotencyKeys(Request[dict[str, str]], frozen=True):
    """key -> task id for each of ``keys`` that a stored task holds; the others are left
    out. The TaskManager asks once per batch, for the keys of its creates that are not in
    memory; the unique index on ``tasks.idempotency_key`` answers each key in O(log n)."""

    keys: tuple[str, ...]


class QueryTasks(Request[list[Task]], frozen=True, kw_only=True):
    """Tasks in ``status`` (any if None) and of ``task_type`` (any if None): by priority
    (highest first), then creation time, then id; or, with ``newest_first``, newest first.
    ``after``: the page starts after the task with this (priority, created_at, id) key,
    in the priority order (``status`` given, not ``newest_first``)."""

    status: str | None = None
    task_type: str | None = None
    limit: int | None = None
    newest_first: bool = False
    after: tuple[int, datetime, str] | None = None


class CountTasks(Request[dict[str, int]], frozen=True):
    """Every task counted by status (statuses without a task are left out)."""


class CountQueued(Request[dict[str, tuple[int, datetime]]], frozen=True):
    """The queued tasks by type: how many, and since when the one that has waited longest
    has been claimable (its last transition, or its ``available_at`` if later). One
    aggregate over ``idx_tasks_ready``: no row is decoded, whatever the depth.

    ``wall`` is the asker's wall time as it sends the read (``None``: unknown). On a
    store several nodes share, ``available_at`` is by the database's clock
    (``DatabaseClock``) and the other times by the nodes' wall clocks: the read turns
    ``available_at`` into the asker's clock, by how far the two were apart when the
    statement started, before it compares the two, so that ``since`` is by the asker's
    clock throughout (by the database's alone, it was off by the skew between them)."""

    wall: datetime | None = None


class FetchTask(Request["Task | None"], frozen=True):
    task_id: str


class FetchRun(Request["Run | None"], frozen=True):
    run_id: str


class FetchRuns(Request[list[Run]], frozen=True):
    task_id: str


class TasksWithRuns(msgspec.Struct, frozen=True):
    """Tasks and every run of them, oldest run first."""

    tasks: tuple[Task, ...]
    runs: tuple[Run, ...]
    #: task id -> its version, on a store whose writes are fenced (else empty).
    versions: dict[str, int] = msgspec.field(default_factory=dict)


class StoreFences(Request[bool], frozen=True):
    """Whether the store is shared by several nodes, so that the TaskManager fences its
    writes of existing tasks (:class:`FenceTask`) and reads their versions (PostgreSQL:
    yes; a SQLite file has one owner: no)."""


class DatabaseClock(Request["datetime | None"], frozen=True):
    """The database's clock now, on a store several nodes share (PostgreSQL's
    ``clock_timestamp()``): a TaskManager there stores the end of each retry backoff by
    that clock, the one every node's claims read it due by, and reads it at start-up
    (then at each lock of ready rows, ``LockedHeads.now``). ``None`` on a store of one
    owner (SQLite), whose own clock is the only one."""


class FetchTasks(Request[TasksWithRuns], frozen=True):
    """The tasks among ``task_ids`` that exist, with their runs: for the TaskManager, to
    act on tasks its memory does not hold (the backlog beyond the ready queues' heads,
    blocked subtasks, tasks that finished long ago)."""

    task_ids: tuple[str, ...]


class QueueHead(msgspec.Struct, frozen=True):
    """One ready queue (the queued tasks of one task type, requirement list and
    concurrency key, as stored) and where the part memory holds ends: ``after`` is the
    (priority, created_at, id) of the last task of the queue, in claim order (priority
    highest first, then created_at, then id), that memory holds; ``None``: from the best."""

    task_type: str
    requires: tuple[str, ...]
    concurrency_key: str | None
    after: tuple[int, datetime, str] | None = None


class QueueHeads(msgspec.Struct, frozen=True):
    """Each queue asked for, with its next tasks in claim order, and every run of them."""

    heads: tuple[tuple[QueueHead, tuple[Task, ...]], ...]
    runs: tuple[Run, ...]
    #: task id -> its version, on a store whose writes are fenced (else empty).
    versions: dict[str, int] = msgspec.field(default_factory=dict)


class LockedHeads(msgspec.Struct, frozen=True):
    """The ready rows a write locked (``storage_writes.LockReady``): each queue's, in
    claim order, as (id, version, priority, created_at); and, in full with their runs,
    those among them the writer did not say it holds at that version."""

    heads: tuple[tuple[QueueHead, tuple[tuple[str, int, int, datetime], ...]], ...]
    tasks: tuple[Task, ...]
    runs: tuple[Run, ...]
    #: For a queue of which fewer than the limit were locked: in how many seconds (by
    #: the database's clock, from the lock) its first task still in a retry backoff
    #: comes due. No write marks that moment, so the writer looks again then.
    due_in: tuple[tuple[QueueHead, float], ...] = ()
    #: The database's clock as the rows were locked (the transaction's ``now()``, the
    #: clock every lock reads a stored backoff by); None when nothing was read.
    now: datetime | None = None


class LoadQueueHeads(Request[QueueHeads], frozen=True):
    """The next ``limit`` queued tasks of each of ``heads`` after its ``after``, in claim
    order; ``heads=None``: of every queue that has a queued task, from its best (the
    TaskManager's start-up). A range scan of ``idx_tasks_ready`` per queue."""

    heads: tuple[QueueHead, ...] | None
    limit: int


class QueryUnroutable(Request[list[Task]], frozen=True):
    """Queued tasks that no worker able to do one of ``capability_sets`` can take, in
    claim order: one scan of the queues (``idx_tasks_ready``), then the tasks of the
    queues no set covers. At most ``limit``, after the task whose (priority, created_at,
    id) is ``after``."""

    capability_sets: tuple[tuple[str, ...], ...]
    limit: int | None = None
    after: tuple[int, datetime, str] | None = None


class LoadWorkers(Request[tuple[Worker, ...]], frozen=True):
    """Every registered worker; with ``watched``, only those this runtime watches (the
    WorkerRegistry's state, at start-up): on a database shared by several nodes, a live
    node's workers are that node's to watch, not this one's."""

    watched: bool = False


class FetchPlan(Request["ExecutionPlan | None"], frozen=True):
    plan_id: str


class QueryPlans(Request[list[ExecutionPlan]], frozen=True, kw_only=True):
    """Plans in ``status`` (any if None), newest first (generation time, then id), from
    just after the plan ``after``; an unknown ``after`` is an InvalidInputError."""

    status: PlanStatus | None = None
    limit: int | None = None
    after: str | None = None


class LoadActivePlans(Request[tuple[ExecutionPlan, ...]], frozen=True):
    """Plans executing, or ended with subtasks still running (the PlanExecutor's state)."""


class TakePlan(Request[bool], frozen=True):
    """Whether this runtime may drive the plan, taking it if no live runtime does (on a
    database shared by several nodes, each plan is driven by one: its creator while it
    lives, then the first node to take it; a SQLite file's one owner drives them all)."""

    plan_id: str


class LoadSubtasks(Request[tuple[SubtaskState, ...]], frozen=True):
    """The ``plan_execution`` rows of a plan."""

    plan_id: str


class LoadPlanTasks(Request[tuple[tuple[str, str, str], ...]], frozen=True):
    """(task id, subtask id, task status) of every task created for the plan."""

    plan_id: str


class FetchPlanningRequest(Request["PlanningRequest | None"], frozen=True):
    request_id: str


class QueryPlanningRequests(Request[list[PlanningRequest]], frozen=True, kw_only=True):
    """Requests in ``status`` (any if None), by priority (highest first), then age, then
    id, from just after the request ``after``; an unknown ``after`` is an
    InvalidInputError."""

    status: str | None = None
    limit: int | None = None
    after: str | None = None


class LoadPlanningRequests(Request[tuple[PlanningRequest, ...]], frozen=True):
    """The requests in ``statuses``, best first (priority, then age); at most ``limit``."""

    statuses: tuple[str, ...]
    limit: int | None = None


class CheckDependencies(Request[dict[str, bool]], frozen=True):
    """For each task: are all the subtasks it depends on completed? One query for all;
    a task of no plan has no dependencies. Unknown task ids are left out of the reply."""

    task_ids: tuple[str, ...]


class NextPlannedTask(Request["Task | None"], frozen=True):
    """The plan's best queued task (priority, then age), or None."""

    plan_id: str


class CountSubtasks(Request[dict[str, int]], frozen=True):
    """A plan's subtasks counted by status (a ready one by its task's status)."""

    plan_id: str


class LoadRevokedTypes(Request[tuple[RevokedTaskType, ...]], frozen=True):
    """Every revoked task type, oldest revocation first (the TaskManager, at start-up)."""


class CountTasksByType(Request[dict[str, dict[str, int]]], frozen=True):
    """status -> task type -> how many tasks, in one query (empty ones left out)."""


class LoadTimers(Request[tuple[tuple[str, datetime, datetime], ...]], frozen=True):
    """The next ``limit`` queued tasks by ``column`` (``run_at``: delayed tasks by start
    time; ``expires_at``: by expiry) after ``after`` (a (time, task id), ``None``: from
    the first), in that order, as (task id, time, created_at). A range scan of
    ``idx_tasks_delayed`` (``idx_tasks_expiring``)."""

    column: Literal["run_at", "expires_at"]
    after: tuple[datetime, str] | None
    limit: int


class LastTaskId(Request["str | None"], frozen=True):
    """The greatest id of the last tasks inserted (``None``: no task): what tells the
    tasks made before the TaskManager's start from those made after
    (actors/task_manager/delays.py)."""


class LoadStarts(Request[tuple[tuple[str, str | None, datetime], ...]], frozen=True):
    """The claims made since ``since`` of tasks of ``task_types`` or with a concurrency
    key of ``keys``, as (task type, concurrency key, the run's started_at), oldest first:
    the rate limits' windows at open. A range of ``idx_runs_started``."""

    task_types: tuple[str, ...]
    keys: tuple[str, ...]
    since: datetime


class LoadSchedules(Request[tuple[Schedule, ...]], frozen=True):
    """Every schedule, by name."""


# -- retention (docs/RETENTION.md) --------------------------------------------------------


class FindPurgeable(Request[tuple[tuple[str, str | None], ...]], frozen=True):
    """At most ``limit`` ids (with their idempotency keys) of finished tasks last changed
    before ``before``, oldest first, in one of ``statuses`` (terminal ones), of
    ``task_type`` if given; never a task
    of a plan that has not ended or still has a live task, nor (unless ``include_keyed``)
    one that holds an idempotency key."""

    before: datetime
    statuses: tuple[str, ...]
    task_type: str | None
    include_keyed: bool
    limit: int


class EventTrimPlan(msgspec.Struct, frozen=True):
    """Where the log starts and the last seq a trim would delete (0: none)."""

    first_seq: int
    through: int


class PlanEventTrim(Request[EventTrimPlan], frozen=True):
    """The last seq to trim so that no event older than ``before`` (a Unix time) is kept,
    at most ``max_events`` are kept, and at most ``max_bytes`` (see docs/RETENTION.md)."""

    before: float | None
    max_events: int | None
    max_bytes: int | None


class RetentionDue(Request["tuple[datetime | None, float | None]"], frozen=True):
    """When the oldest purgeable finished task last changed and the oldest kept event's
    time (None: there is none), for the retention policy's next wake-up."""

    include_keyed: bool
