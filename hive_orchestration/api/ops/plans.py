"""The plan operations of the seeds, as messages to the PlanExecutor (and, for reads
that need no owner, to the storage actor): create, approve, start, cancel, read and wait
for execution plans, and read what a plan step's dependencies gave.

Plan data is checked whole (``plan_checks.py``) before anything is sent: the types and
bounds of every subtask field (each error names it, ``plan_data.subtasks[2].priority``),
then the graph (an empty plan, a duplicate id, a dependency on an unknown subtask, a
cycle).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import anyio
import msgspec

from ..._validate import (
    MIN_DEADLINE,
    YEAR,
    check_bool,
    check_choice,
    check_identifier,
    check_int,
    check_optional_text,
    check_seconds,
    check_str,
    encode_json_object,
)
from ...errors import InvalidInputError, NotFoundError, RequestTimeoutError
from ...listing import check_after, check_limit
from ...messages.plan_data import DependencyResults, LoadDependencyResults
from ...messages.plans import (
    PLAN_FINAL,
    ApprovePlan,
    CancelPlan,
    CreatePlan,
    ExecutionPlan,
    FailurePolicy,
    GetPlan,
    GetPlanStatus,
    MaterializePlan,
    PlanProgress,
    PlanStatus,
    StartPlan,
    SubtaskState,
)
from ...messages.storage import (
    CheckDependencies,
    CountSubtasks,
    LoadSubtasks,
    NextPlannedTask,
    QueryPlans,
)
from ...messages.tasks import Task
from .plan_base import PlanCalls
from .plan_checks import check_payloads, check_subtasks

if TYPE_CHECKING:
    pass

__all__ = ["PlanOps"]

_MAX_LIST = 10_000
#: Dependencies in one page of get_dependency_results.
_MAX_DEPENDENCY_PAGE = 1000
_PLAN_KEYS = ("subtasks",)


class PlanOps(PlanCalls):
    """Mixed into :class:`Runtime` (see :class:`PlanCalls`)."""

    # -- plans ------------------------------------------------------------------------------

    async def create_execution_plan(
        self,
        plan_data: Mapping[str, object],
        *,
        planning_task_id: str | None = None,
        estimated_duration: int | None = None,
        estimated_complexity: str | None = None,
        generated_workflow: str | None = None,
        failure_policy: FailurePolicy | str = FailurePolicy.FAIL_FAST,
        approved: bool = False,
        source_agent: str | None = None,
    ) -> str:
        """Store a plan (a draft, or approved) and return its id; durable when this returns.

        ``plan_data`` is a JSON object with ``subtasks``: a list of objects with ``id``,
        ``task_type`` (or ``type``) and optionally ``title``, ``description``, ``payload``,
        ``priority``, ``dependencies`` (ids of subtasks of the plan), ``max_retries``,
        ``timeout``, ``requires``, ``estimated_duration`` and ``always_run`` (run once the
        dependencies have ended, whatever their outcome: a cleanup step; see
        docs/PLAN_DATA.md); its other keys (``title``,
        for one) are kept as given. The whole plan is checked first: a bad field, a
        duplicate id, an unknown dependency, an empty plan or a cycle (named) is an
        :class:`InvalidInputError`, and nothing is written. ``planning_task_id`` links
        the plan to the request it answers (which becomes ``planned``).
        """
        self._check_open()
        # Each subtask's payload has a limit of its own, far below the plan's: checked
        # first, so that an oversized payload is refused without reading the whole plan.
        check_payloads(plan_data, self._config)
        data, encoded = encode_json_object(
            plan_data,
            "plan_data",
            max_bytes=self._config.max_plan_bytes,
            max_depth=self._config.max_payload_depth + 3,
            setting="max_plan_bytes",
        )
        subtasks = check_subtasks(data)
        # Stored (and returned) as normalized, in plain JSON types whatever the source.
        encoded = msgspec.json.encode(data)
        data = msgspec.json.decode(encoded)
        if estimated_duration is not None:
            estimated_duration = check_int(estimated_duration, "estimated_duration", minimum=0)
        message = CreatePlan(
            planning_task_id=check_optional_text(planning_task_id, "planning_task_id"),
            plan_data=data,
            plan_data_json=encoded,
            subtasks=subtasks,
            failure_policy=check_choice(failure_policy, FailurePolicy, "failure_policy"),
            estimated_duration=estimated_duration,
            estimated_complexity=check_optional_text(estimated_complexity, "estimated_complexity"),
            generated_workflow=None
            if generated_workflow is None
            else check_str(generated_workflow, "generated_workflow", limit=1_000_000),
            approved=check_bool(approved, "approved"),
            source_agent=check_optional_text(self._agent(source_agent), "source_agent"),
        )
        plan = await self._plans.ask(message)
        return plan.id

    async def approve_plan(self, plan_id: str, *, source_agent: str | None = None) -> ExecutionPlan:
        """draft -> approved (``plan.approved``); any other status is refused."""
        self._check_open()
        return await self._plans.ask(
            ApprovePlan(
                plan_id=check_identifier(plan_id, "plan_id"),
                source_agent=check_optional_text(self._agent(source_agent), "source_agent"),
            )
        )

    async def create_planned_subtasks_from_plan(self, plan_id: str) -> int:
        """Create a task for each subtask of the plan that has none, and return how many.

        Idempotent: a second call creates nothing and returns 0. The tasks are
        ``blocked`` until the plan executes and their dependencies are done; starting a
        plan creates them anyway, so calling this first is optional.
        """
        self._check_open()
        return await self._plans.ask(MaterializePlan(plan_id=check_identifier(plan_id, "plan_id")))

    async def mark_plan_execution_started(
        self, plan_id: str, *, source_agent: str | None = None
    ) -> bool:
        """Start a draft or approved plan (``plan.started``): its subtasks become tasks
        and those with no dependencies are queued at once. False, and nothing changes,
        for a plan in any other status."""
        self._check_open()
        return await self._plans.ask(
            StartPlan(
                plan_id=check_identifier(plan_id, "plan_id"),
                source_agent=check_optional_text(self._agent(source_agent), "source_agent"),
            )
        )

    async def cancel_plan(
        self, plan_id: str, reason: str | None = None, *, source_agent: str | None = None
    ) -> ExecutionPlan:
        """Cancel a plan that has not ended (``plan.cancelled``): every task of it that
        has not ended is cancelled, running ones included."""
        self._check_open()
        return await self._plans.ask(
            CancelPlan(
                plan_id=check_identifier(plan_id, "plan_id"),
                reason=None if reason is None else check_str(reason, "reason"),
                source_agent=check_optional_text(self._agent(source_agent), "source_agent"),
            )
        )

    async def get_execution_plan(self, plan_id: str) -> ExecutionPlan | None:
        self._check_open()
        return await self._plans.ask(GetPlan(check_identifier(plan_id, "plan_id")))

    async def get_execution_plans(
        self, status: PlanStatus | str | None = None, *, limit: int = 100, after: str | None = None
    ) -> list[ExecutionPlan]:
        """Plans in ``status`` (all if None), newest first (then by id): at most ``limit``
        (at most 10 000), from just after the plan ``after`` (the last of the previous
        page; see :mod:`hive_orchestration.listing`)."""
        self._check_open()
        return await self._storage.ask(
            QueryPlans(
                status=None if status is None else check_choice(status, PlanStatus, "status"),
                limit=check_limit(limit),
                after=check_after(after),
            )
        )

    async def get_execution_plan_status(self, plan_id: str) -> str | None:
        """The plan's status as stored (``"executing"``...), or None for an unknown plan."""
        self._check_open()
        plan = await self._plans.ask(GetPlan(check_identifier(plan_id, "plan_id")))
        return None if plan is None else plan.status.value

    async def get_execution_plan_status_cached(self, plan_id: str) -> str | None:
        """The plan's status from the PlanExecutor's cache: no database read for a plan it
        has seen. Never stale: the PlanExecutor is the only writer of a plan's status and
        updates its entry with each write that changes it (which publishes the plan's
        event)."""
        self._check_open()
        status = await self._plans.ask(GetPlanStatus(check_identifier(plan_id, "plan_id")))
        return None if status is None else status.value

    async def get_plan_subtasks(self, plan_id: str) -> list[SubtaskState]:
        """Each subtask of the plan: its status, its task once created, its dependencies."""
        self._check_open()
        return list(await self._storage.ask(LoadSubtasks(check_identifier(plan_id, "plan_id"))))

    async def get_plan_progress(self, plan_id: str) -> PlanProgress:
        """The plan's subtasks counted by status (one query)."""
        self._check_open()
        plan_id = check_identifier(plan_id, "plan_id")
        status = await self._plans.ask(GetPlanStatus(plan_id))
        if status is None:
            raise NotFoundError("plan", plan_id)
        counts = await self._storage.ask(CountSubtasks(plan_id))
        return PlanProgress(
            plan_id=plan_id, status=status, total=sum(counts.values()), counts=counts
        )

    async def check_subtask_dependencies(self, task_id: str) -> bool:
        """Whether every subtask the task's subtask depends on has completed (True for a
        task of no plan). :class:`NotFoundError` for an unknown task."""
        self._check_open()
        task_id = check_identifier(task_id, "task_id")
        found = await self._storage.ask(CheckDependencies((task_id,)))
        if task_id not in found:
            raise NotFoundError("task", task_id)
        return found[task_id]

    async def check_subtask_dependencies_batch(self, task_ids: Iterable[str]) -> dict[str, bool]:
        """:meth:`check_subtask_dependencies` for many tasks (at most 10 000), in one query.
        Unknown task ids are left out of the result."""
        self._check_open()
        if isinstance(task_ids, str) or not isinstance(task_ids, Iterable):
            raise InvalidInputError("task_ids", "must be a list of task ids")
        checked: list[str] = []
        for i, task_id in enumerate(task_ids):
            if i == _MAX_LIST:  # an iterator is read no further than the limit
                raise InvalidInputError(
                    "task_ids", f"holds more than {_MAX_LIST} ids: ask in several calls"
                )
            checked.append(check_identifier(task_id, f"task_ids[{i}]"))
        ids = tuple(dict.fromkeys(checked))
        if not ids:
            return {}
        return await self._storage.ask(CheckDependencies(ids))

    async def get_next_planned_subtask(self, plan_id: str) -> Task | None:
        """The plan's best task ready to run (queued: its dependencies are done), by
        priority then age, or None. Agents normally just :meth:`claim_task`."""
        self._check_open()
        return await self._storage.ask(NextPlannedTask(check_identifier(plan_id, "plan_id")))

    async def wait_for_plan(
        self,
        plan_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - a convenience with a documented bound
    ) -> ExecutionPlan:
        """Wait until the plan has ended (completed, failed or cancelled) and return it.

        Woken by the plan's own events; raises :class:`RequestTimeoutError` (a
        :class:`TimeoutError`) after ``timeout`` seconds and :class:`NotFoundError` for an
        unknown plan.
        """
        self._check_open()
        plan_id = check_identifier(plan_id, "plan_id")
        limit = (
            math.inf
            if timeout is None
            else check_seconds(timeout, "timeout", minimum=MIN_DEADLINE, maximum=YEAR)
        )
        with anyio.move_on_after(limit):
            changes = self.subscribe("plan.*", buffer=1, overflow="drop", plan_id=plan_id)
            async with changes as changed:
                while True:
                    plan = await self._plans.ask(GetPlan(plan_id))
                    if plan is None:
                        raise NotFoundError("plan", plan_id)
                    if plan.status in PLAN_FINAL:
                        return plan
                    await changed.receive()
        raise RequestTimeoutError("plans", f"wait_for_plan({plan_id!r})", limit)

    # -- data between plan steps ------------------------------------------------------------

    async def get_dependency_results(
        self,
        task_id: str,
        subtask_ids: Iterable[str] | None = None,
        *,
        after: str | None = None,
        limit: int = 100,
    ) -> DependencyResults:
        """What the dependencies of a plan subtask gave: for the subtask whose task is
        ``task_id``, each dependency (those in ``subtask_ids``, else all) with how it
        ended, its task and that task's result (or error), by subtask id.

        One page: at most ``limit`` dependencies (at most 1000), and no more results than
        half a frame (``max_frame_bytes``, at least one dependency); ``next_after`` says
        where the next page starts (None: that was the last). A handler calls it with its
        own task's id (``TaskContext.dependency_results`` reads every page). A task that
        is not a plan's subtask, or a name that is not one of its dependencies, is an
        :class:`InvalidInputError`; an unknown task, :class:`NotFoundError`.
        """
        self._check_open()
        names: tuple[str, ...] | None = None
        if subtask_ids is not None:
            if isinstance(subtask_ids, str) or not isinstance(subtask_ids, Iterable):
                raise InvalidInputError("subtask_ids", "must be a list of subtask ids")
            checked: list[str] = []
            for i, name in enumerate(subtask_ids):
                if i == _MAX_DEPENDENCY_PAGE:
                    raise InvalidInputError(
                        "subtask_ids", f"holds more than {_MAX_DEPENDENCY_PAGE} ids"
                    )
                checked.append(check_identifier(name, f"subtask_ids[{i}]"))
            names = tuple(checked)
        config = self._config
        return await self._storage.ask(
            LoadDependencyResults(
                task_id=check_identifier(task_id, "task_id"),
                subtask_ids=names,
                after=check_after(after),
                limit=check_int(limit, "limit", minimum=1, maximum=_MAX_DEPENDENCY_PAGE),
                max_bytes=max(config.max_payload_bytes, config.max_frame_bytes // 2),
            )
        )
