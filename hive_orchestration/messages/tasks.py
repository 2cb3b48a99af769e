"""Tasks and runs: the public models, and the messages the TaskManager answers.

A *task* is a unit of work; a *run* is one execution attempt of a task by a worker.
The state machine that moves a task between statuses lives with its owner,
:mod:`hive_orchestration.actors.task_manager`.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import TypeAlias

import msgspec

from ..runtime import Request
from .events import JsonValue

__all__ = [
    "TERMINAL",
    "CancelTask",
    "CreateRun",
    "CreateTask",
    "DeleteTask",
    "GetQueuedTasks",
    "GetRun",
    "GetRuns",
    "GetTask",
    "GetTasksByStatus",
    "Run",
    "RunStatus",
    "Task",
    "TaskManagerMessage",
    "TaskStatus",
    "UpdateRunStatus",
    "UpdateTaskStatus",
]

JsonObject: TypeAlias = dict[str, JsonValue]


class TaskStatus(enum.StrEnum):
    """Where a task stands. ``PENDING`` is the extraction plan's name for ``QUEUED``: the
    same status (``TaskStatus.PENDING is TaskStatus.QUEUED``), stored as ``"queued"``, and
    ``TaskStatus("pending")`` works too."""

    QUEUED = "queued"
    PENDING = "queued"
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
    correlation_id: str | None = None
    source_agent: str | None = None
    created_at: datetime
    updated_at: datetime

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
    """Tasks in ``status``, by priority (highest first), then creation time."""

    status: TaskStatus
    task_type: str | None = None
    limit: int | None = None


class GetQueuedTasks(Request[list[Task]], frozen=True, kw_only=True):
    limit: int = 10
    task_type: str | None = None


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


TaskManagerMessage: TypeAlias = (
    CreateTask
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
)
