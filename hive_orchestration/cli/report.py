"""What each command shows, gathered from a :class:`~.reader.Reader` (the runtime that
owns the database, or the file) as plain msgspec structs.

The same struct is printed as JSON (``--json``) or drawn for a person by
:mod:`hive_orchestration.cli.views`; nothing here needs ``rich``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import msgspec

from ..errors import NotFoundError
from ..messages.events import Event
from ..messages.plans import ExecutionPlan, PlanProgress, PlanStatus, SubtaskState
from ..messages.tasks import Run, Task, TaskStatus
from ..messages.workers import Worker, WorkerStatus
from ..remote.status import ConnectionStatus

if TYPE_CHECKING:
    from .reader import Reader

__all__ = [
    "OwnerView",
    "PlanReport",
    "PlanSummary",
    "Progress",
    "StatusReport",
    "SubtaskView",
    "TaskReport",
    "dependency_layers",
    "plan_report",
    "plan_summaries",
    "status_report",
    "task_report",
]


class Progress(msgspec.Struct, frozen=True, kw_only=True):
    """A plan's subtasks counted by status, with what a progress bar needs."""

    total: int
    done: int
    percent: float
    counts: dict[str, int]

    @classmethod
    def of(cls, progress: PlanProgress) -> Progress:
        return cls(
            total=progress.total,
            done=progress.done,
            percent=round(progress.percent, 1),
            counts=dict(sorted(progress.counts.items())),
        )


class PlanSummary(msgspec.Struct, frozen=True, kw_only=True):
    """A plan in a listing: everything but its plan data and subtasks."""

    id: str
    title: str
    status: PlanStatus
    failure_policy: str
    subtask_count: int
    dependency_count: int
    source_agent: str | None
    generated_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    error: str | None
    progress: Progress


class OwnerView(msgspec.Struct, frozen=True, kw_only=True):
    """The runtime that owns the database, as it says through its socket."""

    pid: int
    address: str | None
    clients: list[ConnectionStatus]  # connected now, the command itself left out
    #: What the clients' requests are counted as holding, of the server's budget for
    #: them (max_held_bytes), and the clients waiting for a share now.
    held_bytes: int = 0
    max_held_bytes: int = 0
    held_back: int = 0


class StatusReport(msgspec.Struct, frozen=True, kw_only=True):
    db: str
    schema_version: int
    last_seq: int
    total_tasks: int
    tasks: dict[str, int]  # by status, every status listed
    workers: list[Worker]  # every worker not offline
    plans: list[PlanSummary]  # executing
    owner: OwnerView | None = None  # None: no runtime serves it now


class TaskReport(msgspec.Struct, frozen=True, kw_only=True):
    task: Task
    runs: list[Run]
    events: list[Event]  # the newest ones about the task, oldest first


class SubtaskView(msgspec.Struct, frozen=True, kw_only=True):
    """One node of a plan's DAG as it runs: its subtask status and its task's."""

    id: str
    task_type: str
    layer: int  # 1 for a subtask with no dependencies, else 1 + its deepest dependency's
    dependencies: tuple[str, ...]
    status: str
    task_id: str | None
    task_status: TaskStatus | None


class PlanReport(msgspec.Struct, frozen=True, kw_only=True):
    plan: ExecutionPlan
    progress: Progress
    layers: list[list[SubtaskView]]


def _summary(plan: ExecutionPlan, progress: PlanProgress) -> PlanSummary:
    return PlanSummary(
        id=plan.id,
        title=plan.title,
        status=plan.status,
        failure_policy=plan.failure_policy.value,
        subtask_count=plan.subtask_count,
        dependency_count=plan.dependency_count,
        source_agent=plan.source_agent,
        generated_at=plan.generated_at,
        started_at=plan.started_at,
        completed_at=plan.completed_at,
        error=plan.error,
        progress=Progress.of(progress),
    )


async def plan_summaries(reader: Reader, plans: Sequence[ExecutionPlan]) -> list[PlanSummary]:
    summaries = []
    for plan in plans:
        try:
            progress = await reader.plan_progress(plan.id)
        except NotFoundError:
            continue  # deleted between the listing and this read
        summaries.append(_summary(plan, progress))
    return summaries


async def status_report(reader: Reader) -> StatusReport:
    counts = await reader.task_counts()
    workers = [w for w in await reader.workers() if w.status is not WorkerStatus.OFFLINE]
    executing = await reader.plans(PlanStatus.EXECUTING, limit=1000)
    schema_version = await reader.schema_version()
    last_seq = await reader.last_seq()
    # Every status, in lifecycle order, so that a zero reads as zero rather than missing;
    # a status written by another tool is kept after them.
    known = {status.value: counts.get(status.value, 0) for status in TaskStatus}
    return StatusReport(
        db=reader.path,
        schema_version=schema_version,
        last_seq=last_seq,
        total_tasks=sum(counts.values()),
        tasks=known | {k: v for k, v in counts.items() if k not in known},
        workers=workers,
        plans=await plan_summaries(reader, executing),
    )


async def task_report(reader: Reader, task_id: str, *, events: int) -> TaskReport:
    task = await reader.task(task_id)
    if task is None:
        raise NotFoundError("task", task_id)
    return TaskReport(
        task=task,
        runs=await reader.runs(task_id),
        events=await reader.events(task_id=task_id, limit=events, newest=True),
    )


async def plan_report(reader: Reader, plan_id: str) -> PlanReport:
    plan = await reader.plan(plan_id)
    if plan is None:
        raise NotFoundError("plan", plan_id)
    progress = await reader.plan_progress(plan_id)
    states = {state.subtask_id: state for state in await reader.plan_subtasks(plan_id)}
    task_statuses = await reader.plan_task_statuses(plan_id)
    return PlanReport(
        plan=plan,
        progress=Progress.of(progress),
        layers=dependency_layers(plan, states, task_statuses),
    )


def dependency_layers(
    plan: ExecutionPlan,
    states: dict[str, SubtaskState],
    task_statuses: dict[str, TaskStatus],
) -> list[list[SubtaskView]]:
    """The plan's subtasks in dependency layers: each subtask one layer below its deepest
    dependency, so that every layer can run once the layers above it have completed.

    Within a layer, subtasks keep the plan's order. A stored plan was checked to be a DAG;
    should a row written by another tool hold a cycle or an unknown dependency, the
    subtasks it leaves unplaced go in one last layer rather than being hidden.
    """
    order = [subtask.id for subtask in plan.subtasks]
    types = {subtask.id: subtask.task_type for subtask in plan.subtasks}
    deps = {subtask.id: tuple(subtask.dependencies) for subtask in plan.subtasks}
    for subtask_id, state in states.items():  # rows the plan data does not list
        if subtask_id not in deps:
            order.append(subtask_id)
            types[subtask_id] = "?"
            deps[subtask_id] = state.dependencies
    layer: dict[str, int] = {}
    waiting = {sid: sum(1 for d in deps[sid] if d in deps) for sid in order}
    dependents: dict[str, list[str]] = {sid: [] for sid in order}
    for sid in order:
        for dep in deps[sid]:
            if dep in dependents:
                dependents[dep].append(sid)
    ready = [sid for sid in order if waiting[sid] == 0]
    for sid in ready:
        layer[sid] = 1
    while ready:  # Kahn's algorithm, iterative: a 100 000-subtask chain is fine
        following: list[str] = []
        for sid in ready:
            for child in dependents[sid]:
                layer[child] = max(layer.get(child, 1), layer[sid] + 1)
                waiting[child] -= 1
                if waiting[child] == 0:
                    following.append(child)
        ready = following
    deepest = max(layer.values(), default=0)
    for sid in order:
        if waiting[sid] > 0:
            layer[sid] = deepest + 1
    layers: list[list[SubtaskView]] = [[] for _ in range(max(layer.values(), default=0))]
    for sid in order:
        row = states.get(sid)
        layers[layer[sid] - 1].append(
            SubtaskView(
                id=sid,
                task_type=types[sid],
                layer=layer[sid],
                dependencies=deps[sid],
                status="pending" if row is None else row.status.value,
                task_id=None if row is None else row.task_id,
                task_status=task_statuses.get(sid),
            )
        )
    return layers
