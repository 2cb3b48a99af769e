"""The data models, where the extraction plan put them (``hive_orchestration.models``).

They are frozen msgspec Structs, the same objects the package root exports.
"""

from .messages.events import Event
from .messages.plans import (
    ExecutionPlan,
    FailurePolicy,
    PlanningRequest,
    PlanningStatus,
    PlanProgress,
    PlanStatus,
    Subtask,
    SubtaskState,
    SubtaskStatus,
)
from .messages.tasks import Claim, Lease, Refusal, Run, RunStatus, Task, TaskOutcome, TaskStatus
from .messages.workers import Worker, WorkerStatus

__all__ = [
    "Claim",
    "Event",
    "ExecutionPlan",
    "FailurePolicy",
    "Lease",
    "PlanProgress",
    "PlanStatus",
    "PlanningRequest",
    "PlanningStatus",
    "Refusal",
    "Run",
    "RunStatus",
    "Subtask",
    "SubtaskState",
    "SubtaskStatus",
    "Task",
    "TaskOutcome",
    "TaskStatus",
    "Worker",
    "WorkerStatus",
]
