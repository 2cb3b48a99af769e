"""The PlanExecutor's memory: a plan and its subtask graph (:class:`_Plan`, :class:`_Sub`),
what one batch causes (:class:`_Work`), and the tables that map a task's status to its
subtask's.

Separate from the actor so that the rules (:mod:`.progress`, :mod:`.reconcile`) and the
batch loop (:mod:`.actor`) share one model of a plan without importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..._plan_steps import blocks
from ...messages.plans import (
    SUBTASK_FINAL,
    ExecutionPlan,
    PlanExecutorMessage,
    PlanningStatus,
    PlanStatus,
    SubtaskState,
    SubtaskStatus,
)
from ...messages.storage import WriteOp
from ...messages.tasks import CancelTasks, CreateTask, TaskStatus
from ...runtime import Envelope, Request

_ENDED = {
    "task.completed": SubtaskStatus.COMPLETED,
    "task.failed": SubtaskStatus.FAILED,
    "task.timed_out": SubtaskStatus.FAILED,
    "task.cancelled": SubtaskStatus.CANCELLED,
    "task.deleted": SubtaskStatus.CANCELLED,  # deleting a plan's task withdraws its subtask
}
_TASK_ENDED = {
    TaskStatus.COMPLETED.value: SubtaskStatus.COMPLETED,
    TaskStatus.FAILED.value: SubtaskStatus.FAILED,
    TaskStatus.TIMED_OUT.value: SubtaskStatus.FAILED,
    TaskStatus.CANCELLED.value: SubtaskStatus.CANCELLED,
}
_TASK_WORKING = frozenset({TaskStatus.QUEUED.value, TaskStatus.ASSIGNED.value, "running"})
#: A task in one of these has not started: fail-fast cancels it.
_NOT_STARTED = (TaskStatus.BLOCKED, TaskStatus.QUEUED, TaskStatus.ASSIGNED)
_NOT_ENDED = (TaskStatus.BLOCKED, TaskStatus.QUEUED, TaskStatus.ASSIGNED, TaskStatus.RUNNING)
_IDLE = (PlanStatus.DRAFT, PlanStatus.APPROVED)
#: A task in this status, of a plan in one of these, should have been cancelled.
_STOPPING = {
    "blocked": (PlanStatus.FAILED, PlanStatus.CANCELLED),
    "queued": (PlanStatus.FAILED, PlanStatus.CANCELLED),
    "assigned": (PlanStatus.FAILED, PlanStatus.CANCELLED),
    "running": (PlanStatus.CANCELLED,),
}
_REQUEST_OPEN = (PlanningStatus.PENDING.value, PlanningStatus.ASSIGNED.value)


@dataclass(slots=True)
class _Sub:
    """One subtask in memory: its row, plus the graph around it."""

    state: SubtaskState
    dependents: list[str] = field(default_factory=list)
    remaining: int = 0  # dependencies not completed yet (not ended yet, if always)
    always: bool = False  # always_run: waits for its dependencies to end, not complete


@dataclass(slots=True)
class _Plan:
    plan: ExecutionPlan
    subs: dict[str, _Sub]
    by_task: dict[str, str]  # task id -> subtask id
    unfinished: int
    # Why a fail-fast plan failed while its always-run steps still run (it ends then).
    failure: str | None = None
    failure_subtask: str | None = None

    @classmethod
    def build(cls, plan: ExecutionPlan, states: Sequence[SubtaskState]) -> _Plan:
        known = {state.subtask_id: state for state in states}
        subs: dict[str, _Sub] = {}
        for spec in plan.subtasks:
            state = known.get(spec.id) or SubtaskState(
                plan_id=plan.id, subtask_id=spec.id, dependencies=spec.dependencies
            )
            subs[spec.id] = _Sub(state, always=spec.always_run)
        for spec in plan.subtasks:
            for need in spec.dependencies:
                subs[need].dependents.append(spec.id)
        for sub in subs.values():
            sub.remaining = sum(
                blocks(subs[need].state.status, always_run=sub.always)
                for need in sub.state.dependencies
            )
        by_task = {s.state.task_id: k for k, s in subs.items() if s.state.task_id is not None}
        unfinished = sum(sub.state.status not in SUBTASK_FINAL for sub in subs.values())
        return cls(plan, subs, by_task, unfinished)


@dataclass(slots=True)
class _Work:
    """What one batch causes, applied in order once the batch is handled."""

    creates: list[CreateTask] = field(default_factory=list)
    release: dict[str, tuple[str, str]] = field(default_factory=dict)  # task -> (plan, sub)
    cancels: list[CancelTasks] = field(default_factory=list)
    ops: list[WriteOp] = field(default_factory=list)
    dirty: dict[tuple[str, str], None] = field(default_factory=dict)  # subtask rows to write
    touched: set[str] = field(default_factory=set)  # plans changed
    answers: list[tuple[Envelope[PlanExecutorMessage], object]] = field(default_factory=list)
    forwards: list[tuple[Envelope[PlanExecutorMessage], Request[object]]] = field(
        default_factory=list
    )


@dataclass(frozen=True, slots=True)
class _Forward:
    request: Request[object]


def _pending(work: _Work) -> bool:
    """Whether ``work`` holds anything still to apply or answer."""
    return bool(
        work.creates
        or work.release
        or work.cancels
        or work.ops
        or work.dirty
        or work.answers
        or work.forwards
    )


def _executing(held: _Plan) -> bool:
    return held.plan.status is PlanStatus.EXECUTING


def _statuses(held: _Plan) -> list[SubtaskStatus]:
    return [sub.state.status for sub in held.subs.values()]
