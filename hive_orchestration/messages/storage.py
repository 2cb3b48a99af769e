"""What the storage actor is asked to do. A reply to a :class:`Write` means durable."""

from __future__ import annotations

from datetime import datetime
from typing import Literal, TypeAlias

import msgspec

from ..runtime import Request
from .events import Event
from .plan_data import LoadDependencyResults
from .plans import ExecutionPlan, PlanningRequest, PlanStatus, SubtaskState
from .schedules import Schedule
from .tasks import RevokedTaskType, Run, Task
from .workers import Worker

__all__ = [
    "AppendEvent",
    "CheckDependencies",
    "CheckReaders",
    "CountSubtasks",
    "CountQueued",
    "FetchPlan",
    "FetchPlanningRequest",
    "LoadActivePlans",
    "TakePlan",
    "LoadPlanTasks",
    "LoadPlanningRequests",
    "LoadSubtasks",
    "NextPlannedTask",
    "PutPlan",
    "PutPlanningRequest",
    "PutSubtask",
    "QueryPlanningRequests",
    "QueryPlans",
    "SetPlanStatus",
    "SetRunState",
    "SetTaskState",
    "Committed",
    "DeleteTaskRow",
    "FenceLeader",
    "FenceTask",
    "FenceWorker",
    "DeleteWorkerRow",
    "FetchRun",
    "FetchRuns",
    "FetchTask",
    "FetchTasks",
    "FindIdempotencyKeys",
    "LoadQueueHeads",
    "QueryUnroutable",
    "QueueHead",
    "QueueHeads",
    "TasksWithRuns",
    "LoadLeaseHashes",
    "LoadRuns",
    "LastTaskId",
    "LoadStarts",
    "LoadTasks",
    "LoadTimers",
    "LoadWorkers",
    "PutRun",
    "PutTask",
    "PutWorker",
    "QueryTasks",
    "CountTasks",
    "GetStorageStats",
    "ReadEvents",
    "StorageMessage",
    "StorageStats",
    "StoreFences",
    "COMMIT_BATCH_BOUNDS",
    "COMMIT_SECONDS_BOUNDS",
    "Buckets",
    "Write",
    "WriteOp",
    "CountTasksByType",
    "DeleteRevokedType",
    "LoadRevokedTypes",
    "PutRevokedType",
    "DeleteTaskEvents",
    "TrimEventLog",
    "FindPurgeable",
    "EventTrimPlan",
    "PlanEventTrim",
    "RetentionDue",
    "PutSchedule",
    "SetScheduleSlot",
    "DeleteScheduleRow",
    "LoadSchedules",
]


class AppendEvent(msgspec.Struct, frozen=True, tag="append_event"):
    """Append ``event`` to the log; ``data_json`` is its ``data``, encoded at the boundary.

    The storage actor assigns the sequence number and, once committed, publishes the event.
    """

    event: Event
    data_json: bytes


class PutTask(msgspec.Struct, frozen=True, tag="put_task"):
    """Insert the task, or replace every column of its row: the owner sends whole state."""

    task: Task


class DeleteTaskRow(msgspec.Struct, frozen=True, tag="delete_task"):
    """Delete a task; its runs go with it (ON DELETE CASCADE)."""

    task_id: str


class FenceTask(msgspec.Struct, frozen=True, tag="fence_task"):
    """Bump the task's ``version`` if it is still ``version``; else the whole write fails
    (a conflict: another node changed the task since the writer read it). Sent, on a store
    shared by several nodes (:class:`StoreFences`), for each existing task a write changes
    (or changes a run of), before the write's other statements."""

    task_id: str
    version: int
    #: A claim of a task with a concurrency key: it also fails unless fewer than ``room``
    #: other tasks of ``key`` are claimed (on any node), counted under a lock on the key
    #: held to the commit, so that nodes claiming the key's tasks at once take turns.
    key: str | None = None
    room: int = 0


class FenceLeader(msgspec.Struct, frozen=True, tag="fence_leader"):
    """The write is a duty of the leader of several nodes (``messages/leader.py``): it
    fails whole unless ``epoch`` is still the leader's epoch (PostgreSQL's ``hive_leader``
    row), so that a leader that lost its role and has not noticed changes nothing. The
    row stays locked to the commit: a new leader's bump of the epoch waits for it."""

    epoch: int


class FenceWorker(msgspec.Struct, frozen=True, tag="fence_worker"):
    """The write fails whole unless the worker's row is still watched by ``node_id``
    (a dead node's worker that came back on a live node is that node's again)."""

    worker_id: str
    node_id: str


class SetTaskState(msgspec.Struct, frozen=True, tag="set_task_state"):
    """Write the state columns of a task already written (its status and what moves with
    it); the columns fixed at creation are left alone. The row must exist: a missing one
    fails the write."""

    task: Task


class PutRun(msgspec.Struct, frozen=True, tag="put_run"):
    """Insert the run, or replace every column of its row."""

    run: Run
    #: The hash of its lease's secret, for a run a claim opens (kept off :class:`Run`,
    #: which every read returns).
    lease_hash: bytes | None = None


class SetRunState(msgspec.Struct, frozen=True, tag="set_run_state"):
    """Write the state columns of a run already written. The row must exist."""

    run: Run


class PutWorker(msgspec.Struct, frozen=True, tag="put_worker"):
    """Insert the worker, or replace every column of its row."""

    worker: Worker


class DeleteWorkerRow(msgspec.Struct, frozen=True, tag="delete_worker"):
    worker_id: str


class PutPlanningRequest(msgspec.Struct, frozen=True, tag="put_planning_request"):
    request: PlanningRequest


class PutPlan(msgspec.Struct, frozen=True, tag="put_plan"):
    """Insert a new plan; ``plan_data_json`` is its plan data, encoded at the boundary."""

    plan: ExecutionPlan
    plan_data_json: bytes


class SetPlanStatus(msgspec.Struct, frozen=True, tag="set_plan_status"):
    """Change a plan's status and times, leaving its (possibly large) plan data alone."""

    plan_id: str
    status: PlanStatus
    started_at: datetime | None
    completed_at: datetime | None
    error: str | None


class PutSubtask(msgspec.Struct, frozen=True, tag="put_subtask"):
    """Insert or replace the ``plan_execution`` row of one subtask."""

    state: SubtaskState


class PutRevokedType(msgspec.Struct, frozen=True, tag="put_revoked_type"):
    """Record that the tasks of a type are not handed out (docs/CONTROL.md)."""

    revoked: RevokedTaskType


class DeleteRevokedType(msgspec.Struct, frozen=True, tag="delete_revoked_type"):
    """A revoked task type is restored."""

    task_type: str


# -- retention (docs/RETENTION.md) --------------------------------------------------------


class DeleteTaskEvents(msgspec.Struct, frozen=True, tag="delete_task_events"):
    """Delete the events of these tasks (a purge: the tasks go in the same write)."""

    task_ids: tuple[str, ...]


class TrimEventLog(msgspec.Struct, frozen=True, tag="trim_event_log"):
    """Delete every event with ``seq <= through`` and remember that the log was trimmed
    that far (it never goes back: a lower ``through`` than before trims nothing)."""

    through: int


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


class PutSchedule(msgspec.Struct, frozen=True, tag="put_schedule"):
    """Insert a schedule, or write its definition and pause state over the row of its
    name. What it fired (``last_slot``, ``last_task_id``, ``fired``) is written only on
    insert: afterwards only :class:`SetScheduleSlot` moves it, so a redefinition can
    never move a schedule back to a slot it already fired."""

    schedule: Schedule


class SetScheduleSlot(msgspec.Struct, frozen=True, tag="set_schedule_slot"):
    """A schedule (by id) fired ``slot`` with task ``task_id``: moves its last slot
    forward, never back (a slot at or before it changes nothing)."""

    schedule_id: str
    slot: datetime
    task_id: str
    at: datetime


class DeleteScheduleRow(msgspec.Struct, frozen=True, tag="delete_schedule"):
    schedule_id: str


WriteOp: TypeAlias = (
    AppendEvent
    | PutTask
    | SetTaskState
    | DeleteTaskRow
    | FenceTask
    | FenceLeader
    | FenceWorker
    | PutRun
    | SetRunState
    | PutWorker
    | DeleteWorkerRow
    | PutPlanningRequest
    | PutPlan
    | SetPlanStatus
    | PutSubtask
    | PutRevokedType
    | DeleteRevokedType
    | DeleteTaskEvents
    | TrimEventLog
    | PutSchedule
    | SetScheduleSlot
    | DeleteScheduleRow
)


class Committed(msgspec.Struct, frozen=True):
    """The write is durable. ``seqs``: the sequence number of each appended event, in order."""

    seqs: tuple[int, ...]


class Write(Request[Committed], frozen=True):
    """Apply ``ops`` in order, all or nothing, in the next group commit."""

    ops: tuple[WriteOp, ...]


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
    aggregate over ``idx_tasks_ready``: no row is decoded, whatever the depth."""


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


#: Upper bounds of the commit-duration buckets (seconds): an fsync on a fast disk is tens
#: of microseconds, a commit stalled on a busy or network disk seconds.
COMMIT_SECONDS_BOUNDS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip
#: Upper bounds of the batch-size buckets (writes grouped into one commit), up to the
#: default ``max_batch`` (1024).
COMMIT_BATCH_BOUNDS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0)


class Buckets(msgspec.Struct, frozen=True):
    """A histogram: ``counts[i]`` observations at most ``bounds[i]`` and above the bound
    before it (not cumulative); the last count is above every bound."""

    bounds: tuple[float, ...] = ()
    counts: tuple[int, ...] = ()
    sum: float = 0.0


class StorageStats(msgspec.Struct, frozen=True):
    path: str
    driver: str
    synchronous: Literal["FULL", "NORMAL"]
    schema_version: int
    transactions: int
    writes: int
    failed_writes: int
    largest_batch: int
    last_seq: int
    #: How long each committed transaction took (its statements and COMMIT, fsync
    #: included), and how many writes each grouped (``COMMIT_*_BOUNDS``).
    commit_seconds: Buckets = Buckets()
    commit_batch_size: Buckets = Buckets()
    #: Every event up to this sequence number was trimmed by retention (0: none was).
    trimmed_through: int = 0


class GetStorageStats(Request[StorageStats], frozen=True):
    pass


class CheckReaders(msgspec.Struct, frozen=True):
    """Told by a read-only reader whose read crashed: the storage actor crashes on it
    (see ``storage/readers.py``), so that it is restarted and reported as ever."""


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
    statuses: tuple[str, ...]


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


StorageMessage: TypeAlias = (
    Write
    | ReadEvents
    | GetStorageStats
    | CheckReaders
    | LoadTasks
    | LoadRuns
    | LoadLeaseHashes
    | FindIdempotencyKeys
    | QueryTasks
    | CountTasks
    | CountQueued
    | FetchTask
    | FetchTasks
    | LoadQueueHeads
    | QueryUnroutable
    | FetchRun
    | FetchRuns
    | LoadWorkers
    | FetchPlan
    | QueryPlans
    | LoadActivePlans
    | TakePlan
    | LoadSubtasks
    | LoadPlanTasks
    | FetchPlanningRequest
    | QueryPlanningRequests
    | LoadPlanningRequests
    | CheckDependencies
    | NextPlannedTask
    | CountSubtasks
    | LoadRevokedTypes
    | CountTasksByType
    | LoadDependencyResults
    | LoadTimers
    | LoadStarts
    | LastTaskId
    | FindPurgeable
    | PlanEventTrim
    | RetentionDue
    | LoadSchedules
)
