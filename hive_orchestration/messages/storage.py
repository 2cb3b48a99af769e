"""What the storage actor is asked to do. A reply to a :class:`Write` means durable.

Three rooms, whose names are all importable from here: ``storage_writes.py`` (a
:class:`Write` and its ops, and its reply :class:`Committed`), ``storage_reads.py`` (the
reads: the event log, tasks, runs, queues, workers, plans, control, timers, schedules,
retention) and ``storage_stats.py`` (the actor's statistics, and a reader's crash check).
This module adds the union of the storage actor's messages.
"""

from __future__ import annotations

from typing import TypeAlias

from .plan_data import LoadDependencyResults
from .storage_reads import (
    CheckDependencies,
    CountQueued,
    CountSubtasks,
    CountTasks,
    CountTasksByType,
    DatabaseClock,
    EventTrimPlan,
    FetchPlan,
    FetchPlanningRequest,
    FetchRun,
    FetchRuns,
    FetchTask,
    FetchTasks,
    FindIdempotencyKeys,
    FindPurgeable,
    LastTaskId,
    LoadActivePlans,
    LoadLeaseHashes,
    LoadPlanningRequests,
    LoadPlanTasks,
    LoadQueueHeads,
    LoadRevokedTypes,
    LoadRuns,
    LoadSchedules,
    LoadStarts,
    LoadSubtasks,
    LoadTasks,
    LoadTimers,
    LoadWorkers,
    LockedHeads,
    NextPlannedTask,
    PlanEventTrim,
    QueryPlanningRequests,
    QueryPlans,
    QueryTasks,
    QueryUnroutable,
    QueueHead,
    QueueHeads,
    ReadEvents,
    RetentionDue,
    StoreFences,
    TakePlan,
    TasksWithRuns,
)
from .storage_stats import (
    COMMIT_BATCH_BOUNDS,
    COMMIT_SECONDS_BOUNDS,
    Buckets,
    CheckReaders,
    GetStorageStats,
    StorageStats,
)
from .storage_writes import (
    AppendEvent,
    Committed,
    DeleteRevokedType,
    DeleteScheduleRow,
    DeleteTaskEvents,
    DeleteTaskRow,
    DeleteWorkerRow,
    FenceLeader,
    FencePlanningRequest,
    FenceTask,
    FenceWorker,
    LeaseClock,
    LockReady,
    PutPlan,
    PutPlanningRequest,
    PutRevokedType,
    PutRun,
    PutSchedule,
    PutSubtask,
    PutTask,
    PutWorker,
    SetPlanStatus,
    SetRunState,
    SetScheduleSlot,
    SetTaskState,
    TrimEventLog,
    Write,
    WriteOp,
)

__all__ = [
    "AppendEvent",
    "CheckDependencies",
    "CheckReaders",
    "CountSubtasks",
    "CountQueued",
    "DatabaseClock",
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
    "LeaseClock",
    "FenceTask",
    "FencePlanningRequest",
    "FenceWorker",
    "DeleteWorkerRow",
    "FetchRun",
    "FetchRuns",
    "FetchTask",
    "FetchTasks",
    "FindIdempotencyKeys",
    "LoadQueueHeads",
    "LockedHeads",
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
    "LockReady",
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
