"""Execution plans and the planning queue: the public models, and the messages the
PlanExecutor answers.

A *planning request* asks a planner agent for a plan ("Deploy to production"). An
*execution plan* is a DAG of *subtasks*; once it executes, each subtask becomes a task,
held ``blocked`` until every subtask it depends on has completed. The rules that drive a
plan live with its owner, :mod:`hive_orchestration.actors.plan_executor`.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any, TypeAlias

import msgspec

from ..runtime import Request
from .events import Event, JsonValue

__all__ = [
    "AdoptPlans",
    "ApprovePlan",
    "CancelPlan",
    "CancelPlanningRequest",
    "ClaimPlanningRequest",
    "CreatePlan",
    "ExecutionPlan",
    "FailurePolicy",
    "GetPlan",
    "GetPlanStatus",
    "MaterializePlan",
    "PlanExecutorMessage",
    "PlanProgress",
    "PlanStatus",
    "PlanTaskEvents",
    "PlanningRequest",
    "PlanningStatus",
    "QueuePlanningRequest",
    "Resync",
    "RetryCalls",
    "StartPlan",
    "Subtask",
    "SubtaskState",
    "SubtaskStatus",
    "UnclaimedRequest",
]

JsonObject: TypeAlias = dict[str, JsonValue]


class PlanningStatus(enum.StrEnum):
    """Where a planning request stands."""

    PENDING = "pending"  # waiting for a planner agent
    ASSIGNED = "assigned"  # a planner agent claimed it
    PLANNED = "planned"  # an execution plan answers it
    FAILED = "failed"
    CANCELLED = "cancelled"


class PlanStatus(enum.StrEnum):
    """Where an execution plan stands: draft -> approved -> executing -> one of the last three
    (draft may go straight to executing; draft, approved and executing to cancelled)."""

    DRAFT = "draft"
    APPROVED = "approved"
    EXECUTING = "executing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: Plan statuses never left.
PLAN_FINAL = frozenset({PlanStatus.COMPLETED, PlanStatus.FAILED, PlanStatus.CANCELLED})


class SubtaskStatus(enum.StrEnum):
    """Where one subtask of a plan stands, as its plan sees it. While it is ``ready`` its
    task has the details (queued, assigned, running)."""

    PENDING = "pending"  # waiting for its dependencies (or for the plan to start)
    READY = "ready"  # its task is queued for a worker, or being worked on
    COMPLETED = "completed"
    FAILED = "failed"  # its task failed or timed out for good
    SKIPPED = "skipped"  # a dependency failed; it will never run
    CANCELLED = "cancelled"  # the plan was cancelled or failed fast, or its task cancelled


SUBTASK_FINAL = frozenset(
    {
        SubtaskStatus.COMPLETED,
        SubtaskStatus.FAILED,
        SubtaskStatus.SKIPPED,
        SubtaskStatus.CANCELLED,
    }
)


class FailurePolicy(enum.StrEnum):
    """What a subtask that fails for good does to its plan.

    ``fail_fast`` (default): the plan fails at once; every subtask not yet started is
    cancelled (running ones finish, and their outcome is recorded). ``continue``:
    independent branches go on; whatever depends on the failed subtask is skipped; the
    plan fails once everything else has ended. Subtasks marked ``always_run`` are neither
    cancelled nor skipped by a failure: they run once their dependencies have ended, and
    a fail-fast plan ends ``failed`` only after them.
    """

    FAIL_FAST = "fail_fast"
    CONTINUE = "continue"


class Subtask(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """One subtask of a plan, as given in its plan data (``plan_data["subtasks"]``).

    Unknown keys are refused, so that a misspelt ``dependencies`` cannot quietly run a
    subtask early. ``type`` is accepted for ``task_type``.
    """

    id: str
    task_type: str
    title: str | None = None
    description: str | None = None
    # Any, not JsonObject: msgspec cannot decode through the recursive JsonValue alias;
    # the payload is checked as JSON at the boundary like a task's.
    payload: dict[str, Any] = {}
    priority: int = 1
    dependencies: tuple[str, ...] = ()
    max_retries: int = 3
    timeout: float | None = None
    requires: tuple[str, ...] = ()
    estimated_duration: float | None = None
    #: Runs once its dependencies have all ended, whatever their outcome (completed,
    #: failed, timed out, cancelled or skipped): a cleanup or report step. Under
    #: ``fail_fast`` the plan waits for such steps before it ends failed.
    always_run: bool = False


class PlanningRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A request for a plan, waiting in the planning queue for a planner agent."""

    id: str
    task_description: str
    status: PlanningStatus = PlanningStatus.PENDING
    priority: int = 50
    requestor: str | None = None
    context_data: JsonObject | None = None
    complexity_estimate: str | None = None
    assigned_agent: str | None = None
    assigned_at: datetime | None = None
    completed_at: datetime | None = None
    error: str | None = None
    created_at: datetime


class ExecutionPlan(msgspec.Struct, frozen=True, kw_only=True):
    """An execution plan as stored. ``plan_data`` is what the planner gave, subtasks
    included; ``subtasks`` is its checked form, in the given order."""

    id: str
    planning_task_id: str
    status: PlanStatus
    plan_data: JsonObject
    subtasks: tuple[Subtask, ...]
    failure_policy: FailurePolicy = FailurePolicy.FAIL_FAST
    estimated_duration: int | None = None
    estimated_complexity: str | None = None
    generated_workflow: str | None = None
    subtask_count: int = 0
    dependency_count: int = 0
    source_agent: str | None = None
    generated_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    error: str | None = None

    @property
    def title(self) -> str:
        """The plan's title: ``plan_data["title"]`` if it has one, else its id."""
        title = self.plan_data.get("title")
        return title if isinstance(title, str) and title else self.id


class SubtaskState(msgspec.Struct, frozen=True, kw_only=True):
    """One subtask of a plan as it runs (a ``plan_execution`` row): its task, once created."""

    plan_id: str
    subtask_id: str
    status: SubtaskStatus = SubtaskStatus.PENDING
    task_id: str | None = None
    dependencies: tuple[str, ...] = ()
    started_at: datetime | None = None  # when it became ready
    completed_at: datetime | None = None
    error: str | None = None


class PlanProgress(msgspec.Struct, frozen=True, kw_only=True):
    """Counts of a plan's subtasks by status. A subtask that is ready is counted by its
    task's status (``queued``, ``assigned``, ``running``); ``pending`` ones wait for their
    dependencies."""

    plan_id: str
    status: PlanStatus
    total: int
    counts: dict[str, int]

    @property
    def done(self) -> int:
        """Subtasks that ended, one way or another."""
        return sum(self.counts.get(status.value, 0) for status in SUBTASK_FINAL)

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0


# -- the PlanExecutor's inbox: every field was validated at the API boundary ---------------


class QueuePlanningRequest(Request[PlanningRequest], frozen=True, kw_only=True):
    task_description: str
    priority: int = 50
    requestor: str | None = None
    context_data: JsonObject | None = None
    complexity_estimate: str | None = None


class ClaimPlanningRequest(Request["PlanningRequest | None"], frozen=True, kw_only=True):
    """Hand the best pending request (priority, then age) to ``agent_id``, if any."""

    agent_id: str


class CancelPlanningRequest(Request[PlanningRequest], frozen=True, kw_only=True):
    request_id: str
    reason: str | None = None
    failed: bool = False  # ended by its planner (failed) rather than withdrawn (cancelled)


class CreatePlan(Request[ExecutionPlan], frozen=True, kw_only=True):
    """Store a checked plan as a draft (or approved); ``planning_task_id`` None creates a
    planning request for it, already planned."""

    planning_task_id: str | None
    plan_data: JsonObject
    plan_data_json: bytes
    subtasks: tuple[Subtask, ...]
    failure_policy: FailurePolicy
    estimated_duration: int | None = None
    estimated_complexity: str | None = None
    generated_workflow: str | None = None
    approved: bool = False
    source_agent: str | None = None


class ApprovePlan(Request[ExecutionPlan], frozen=True, kw_only=True):
    plan_id: str
    source_agent: str | None = None


class MaterializePlan(Request[int], frozen=True, kw_only=True):
    """Create a task for every subtask that has none (blocked); the reply counts them."""

    plan_id: str


class StartPlan(Request[bool], frozen=True, kw_only=True):
    """Move a draft or approved plan to executing (False for any other status)."""

    plan_id: str
    source_agent: str | None = None


class CancelPlan(Request[ExecutionPlan], frozen=True, kw_only=True):
    plan_id: str
    reason: str | None = None
    source_agent: str | None = None


class GetPlan(Request["ExecutionPlan | None"], frozen=True):
    plan_id: str


class GetPlanStatus(Request["PlanStatus | None"], frozen=True):
    """From the PlanExecutor's memory: its cache, which it updates as it commits."""

    plan_id: str


class PlanTaskEvents(msgspec.Struct, frozen=True):
    """Told by the feed: committed events of plan tasks, in log order."""

    events: tuple[Event, ...]


class UnclaimedRequest(msgspec.Struct, frozen=True):
    """Told back by a planner that was cancelled after its claim was answered but before
    it received the request: nobody holds it, so it goes back to the queue."""

    request: PlanningRequest


class Resync(msgspec.Struct, frozen=True):
    """Told by the feed when it (re)subscribed: events may have been missed, so every
    active plan is reconciled with the database."""


class AdoptPlans(Request[int], frozen=True):
    """Take and reconcile every active plan whose driver is no longer alive.

    On a database several nodes share, a plan is driven by one node (its creator while it
    lives). A plan whose driver died waits until a node takes it: on a call about it, on
    the end of one of its tasks, or on this message, which the leader sends a live node
    when it finds a node dead. The node takes each executing plan (or ended plan with
    tasks still running) that is no node's or a dead node's, by the same conditional
    update as any take (so two nodes told at once take each plan once), reconciles it
    with the database and drives it from then on. The reply counts the plans taken; may
    be told. On SQLite (one node) it takes nothing and answers 0.
    """


class RetryCalls(msgspec.Struct, frozen=True):
    """Told by the feed every second: re-send the calls forwarded to another node that
    have waited too long for their answer (the driver missed them, or died before its
    write)."""


PlanExecutorMessage: TypeAlias = (
    QueuePlanningRequest
    | ClaimPlanningRequest
    | CancelPlanningRequest
    | CreatePlan
    | ApprovePlan
    | MaterializePlan
    | StartPlan
    | CancelPlan
    | GetPlan
    | GetPlanStatus
    | PlanTaskEvents
    | Resync
    | UnclaimedRequest
    | AdoptPlans
    | RetryCalls
)
