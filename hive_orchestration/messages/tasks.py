"""Tasks and runs: the public models, and the messages the TaskManager answers.

A *task* is a unit of work; a *run* is one execution attempt of a task by a worker.
The state machine that moves a task between statuses lives with its owner,
:mod:`hive_orchestration.actors.task_manager`.

Three rooms, whose names are all importable from here: ``task_models.py`` (the public
models: statuses, :class:`Task`, :class:`Run`, :class:`Lease`, :class:`Claim`),
``task_requests.py`` (the TaskManager's inbox: tasks, runs, claims, and what the other
actors tell it) and ``task_control.py`` (control by hand). This module adds the union of
the TaskManager's messages.
"""

from __future__ import annotations

from typing import TypeAlias

from .leader import RecoverClaims
from .task_control import (
    FlushQueue,
    GetRevokedTaskTypes,
    PurgeOutcome,
    PurgeTasks,
    RestoreTaskType,
    RetryTask,
    RevokedTaskType,
    RevokeTaskType,
)
from .task_models import (
    TERMINAL,
    Claim,
    IdempotencyScope,
    JsonObject,
    Lease,
    Refusal,
    Run,
    RunStatus,
    Task,
    TaskOutcome,
    TaskStatus,
)
from .task_requests import (
    PLAN_TASK_ENDINGS,
    CancelTask,
    CancelTasks,
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
    GetQueuedTasks,
    GetRun,
    GetRuns,
    GetTask,
    GetTasksByStatus,
    GetUnroutableTasks,
    Heartbeat,
    PlansSettled,
    QueueTasks,
    ReadyElsewhere,
    ReleaseTask,
    ReleaseWorker,
    ScheduleSlot,
    StartTask,
    Unclaimed,
    UpdateRunStatus,
    UpdateTaskStatus,
    Wake,
)

__all__ = [
    "PLAN_TASK_ENDINGS",
    "TERMINAL",
    "CancelTask",
    "CancelTasks",
    "Claim",
    "ClaimTask",
    "ClaimTasks",
    "CompleteTask",
    "CompleteTasks",
    "CreateRun",
    "CreateTask",
    "CreateTasks",
    "DeleteTask",
    "FailTask",
    "FailTasks",
    "GetQueuedTasks",
    "GetRun",
    "GetRuns",
    "GetTask",
    "GetTasksByStatus",
    "GetUnroutableTasks",
    "Heartbeat",
    "Lease",
    "Refusal",
    "PlansSettled",
    "QueueTasks",
    "ReleaseTask",
    "ReleaseWorker",
    "Run",
    "RunStatus",
    "ScheduleSlot",
    "StartTask",
    "Task",
    "TaskOutcome",
    "TaskManagerMessage",
    "TaskStatus",
    "Unclaimed",
    "UpdateRunStatus",
    "UpdateTaskStatus",
    "ReadyElsewhere",
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
    "JsonObject",
]

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
    | CompleteTasks
    | FailTask
    | FailTasks
    | ReleaseTask
    | ReleaseWorker
    | GetUnroutableTasks
    | Unclaimed
    | Wake
    | ReadyElsewhere
    | PlansSettled
    | RetryTask
    | RevokeTaskType
    | RestoreTaskType
    | GetRevokedTaskTypes
    | FlushQueue
    | PurgeTasks
    | RecoverClaims
)
