"""The PlanExecutor actor: the one owner of execution plans and the planning queue.

It turns a plan's subtasks into tasks and drives the plan to an end, by messages only:
it asks the TaskManager to create, queue and cancel tasks, and learns how they end from
the event log, through a subscription that :class:`PlanFeed` keeps for it.

Lifecycle of a subtask. When a plan starts (``mark_plan_execution_started``), every
subtask becomes a task created ``blocked``. A subtask whose dependencies have all
completed is *ready*: its task is queued (``blocked -> queued``, published as
``plan.subtask_ready``) at once, so agents just claim work; no one polls. When a task of
the plan ends, its subtask ends the same way and the plan reacts:

- completed: each dependent whose dependencies are now all complete is queued;
- failed (for good), timed out or cancelled, with the plan's failure policy:
  ``fail_fast`` fails the plan at once and cancels every subtask not yet started
  (running ones finish; their outcome is recorded); ``continue`` skips everything that
  depends on it, transitively (their tasks are cancelled), and lets the rest go on.

A plan whose subtasks have all ended is completed if they all completed, else failed.
A subtask marked ``always_run`` waits for its dependencies to end, whatever their
outcome, instead of to complete; the rules are in :mod:`hive_orchestration._plan_steps`.

Durability and recovery. The database holds everything: the plan (``execution_plans``),
one row per subtask (``plan_execution``) and the tasks themselves, which name their
plan and subtask (at most one task per subtask, enforced by a unique index). This actor
handles a batch of messages, then applies what they caused in order: create tasks, queue
tasks, cancel tasks (each one message to the TaskManager, so one commit), then one write
of its own rows and events. A crash between two of those steps loses nothing: on start,
and whenever its event feed may have missed something, each active plan is reconciled
with the database (tasks are linked to their subtasks, subtasks whose task ended are
settled, ready subtasks still blocked are queued, a plan whose subtasks all ended is
finished). Reconciling is idempotent, so a subtask is never created twice nor forgotten.
If an effect fails, the actor fails the batch's requests and restarts, to reconcile
from what the database holds.

Events: ``plan.created``, ``plan.approved``, ``plan.started``, ``plan.completed``,
``plan.failed``, ``plan.cancelled`` (here) and ``plan.subtask_ready`` (the TaskManager,
when it queues a subtask's task), all with the plan id as ``plan_id`` and as
``correlation_id``, which every task of the plan carries too. The planning queue
publishes ``planning.requested``, ``planning.assigned``, ``planning.planned``,
``planning.failed`` and ``planning.cancelled``, with the request id as correlation id.
"""

from __future__ import annotations

import heapq
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import anyio
import msgspec

from .._ids import new_id
from .._plan_steps import PLAN_FAILED, blocks, failing, failure_reason, first_failure
from ..errors import (
    HiveError,
    IllegalTransitionError,
    NotFoundError,
    RuntimeStoppedError,
)
from ..messages.events import BroadcastMessage, Event, EventFeed, JsonValue, Lagged, Subscribe
from ..messages.plans import (
    PLAN_FINAL,
    SUBTASK_FINAL,
    ApprovePlan,
    CancelPlan,
    CancelPlanningRequest,
    ClaimPlanningRequest,
    CreatePlan,
    ExecutionPlan,
    FailurePolicy,
    GetPlan,
    GetPlanStatus,
    MaterializePlan,
    PlanExecutorMessage,
    PlanningRequest,
    PlanningStatus,
    PlanStatus,
    PlanTaskEvents,
    QueuePlanningRequest,
    Resync,
    StartPlan,
    SubtaskState,
    SubtaskStatus,
    UnclaimedRequest,
)
from ..messages.storage import (
    AppendEvent,
    FetchPlan,
    FetchPlanningRequest,
    GetStorageStats,
    LoadActivePlans,
    LoadPlanningRequests,
    LoadPlanTasks,
    LoadSubtasks,
    PutPlan,
    PutPlanningRequest,
    PutSubtask,
    SetPlanStatus,
    StorageMessage,
    Write,
    WriteOp,
)
from ..messages.tasks import (
    PLAN_TASK_ENDINGS,
    CancelTasks,
    CreateTask,
    CreateTasks,
    PlansSettled,
    QueueTasks,
    TaskManagerMessage,
    TaskStatus,
)
from ..runtime import Actor, ActorRef, Envelope, Reply, Request

__all__ = ["PLAN_EVENT_TYPES", "PlanExecutor", "PlanFeed"]

log = logging.getLogger("hive_orchestration.plans")

#: The task events the feed subscribes to: those that end a subtask, and retries (a task
#: of a stopped plan that goes back to the queue is cancelled).
PLAN_EVENT_TYPES = ("task.retrying", *sorted(PLAN_TASK_ENDINGS))
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


class PlanExecutor(Actor[PlanExecutorMessage]):
    max_batch = 512

    def __init__(
        self,
        storage: ActorRef[StorageMessage],
        tasks: ActorRef[TaskManagerMessage],
        *,
        cache_size: int = 10_000,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._storage = storage
        self._tasks = tasks
        self._clock = clock
        self._plans: dict[str, _Plan] = {}  # plans with subtasks still to end, and drafts
        # get_execution_plan_status_cached answers from here. This actor is the only
        # writer of a plan's status and updates the entry with the write that changes it,
        # so it is never stale; the entries of plans not in memory are bounded (LRU).
        self._status: OrderedDict[str, PlanStatus] = OrderedDict()
        self._cache_size = cache_size
        self._requests: dict[str, PlanningRequest] = {}  # pending and assigned
        self._pending: list[tuple[int, datetime, int, str]] = []  # heap: best pending first
        self._arrivals = 0  # ties on priority and time go first come, first served
        # The log position up to which every plan task's end has been applied (committed),
        # told to the TaskManager, which holds back the answers of the calls that ended a
        # plan's task until then: the caller's next read of the plan sees what was released.
        self._settled = 0

    # -- start-up and reconciling -----------------------------------------------------------

    async def started(self) -> None:
        # Loading reconciles every active plan with what the database holds by now, so
        # everything logged before the loads is settled once they are applied.
        through = (await self._storage.ask(GetStorageStats())).last_seq
        for request in await self._storage.ask(LoadPlanningRequests(_REQUEST_OPEN)):
            self._remember_request(request)
        work = _Work()
        for plan in await self._storage.ask(LoadActivePlans()):
            await self._load(plan, work)
        await self._apply(work)
        await self._tell_settled(through)
        log.info("plan executor: %d active plan(s)", len(self._plans))

    async def _tell_settled(self, through: int) -> None:
        """Tell the TaskManager that plan task ends up to ``through`` are applied."""
        if through <= self._settled:
            return
        self._settled = through
        try:
            if not self._tasks.try_tell(PlansSettled(through)):
                # Waiting for room is safe: the TaskManager never waits for this actor.
                await self._tasks.tell(PlansSettled(through))
        except RuntimeStoppedError:
            pass  # stopping: it answers what it held back as it stops

    async def _load(self, plan: ExecutionPlan, work: _Work) -> _Plan:
        """Bring a stored plan into memory and reconcile it with its tasks."""
        states = await self._storage.ask(LoadSubtasks(plan.id))
        held = _Plan.build(plan, states)
        self._plans[plan.id] = held
        work.touched.add(plan.id)  # leaves memory after this batch if it has ended
        self._cache(plan.id, plan.status)
        for state in states:
            if state.subtask_id not in held.subs:  # pragma: no cover - rows match the plan
                log.warning("plan %s: row for unknown subtask %r", plan.id, state.subtask_id)
        await self._reconcile(held, work)
        return held

    async def _reconcile(self, held: _Plan, work: _Work) -> None:
        """Make memory agree with the tasks in the database; idempotent."""
        plan_id = held.plan.id
        now = self._clock()
        task_status: dict[str, str] = {}
        for task_id, subtask_id, status in await self._storage.ask(LoadPlanTasks(plan_id)):
            sub = held.subs.get(subtask_id)
            if sub is None:  # pragma: no cover - tasks are only created for known subtasks
                continue
            task_status[subtask_id] = status
            if sub.state.task_id != task_id:
                self._update(held, sub, work, task_id=task_id)
                held.by_task[task_id] = subtask_id
        if held.failure is None and failing(held.plan.failure_policy, _statuses(held)):
            # Failed fast before a restart, its always-run steps still to end: the cause
            # is read back from the rows, before settling what it cancelled meanwhile.
            cause = first_failure(sub.state for sub in held.subs.values())
            if cause is not None:
                held.failure_subtask, held.failure = cause
        if held.plan.status not in (PlanStatus.DRAFT, PlanStatus.APPROVED):
            # A started plan's subtasks all got their tasks in the write that started it
            # (their rows name them), so an unfinished subtask without a task had it
            # deleted (the row's task_id was set to NULL): it is withdrawn, not re-created.
            for sub in held.subs.values():
                state = sub.state
                if state.status in SUBTASK_FINAL or state.subtask_id in task_status:
                    continue
                if state.task_id is not None:
                    held.by_task.pop(state.task_id, None)
                    self._update(held, sub, work, task_id=None)
                self._settle(held, sub, SubtaskStatus.CANCELLED, "its task was deleted", work, now)
        plan_status = held.plan.status
        stray: list[str] = []  # tasks this plan meant to cancel, not cancelled yet
        for subtask_id, status in task_status.items():
            sub = held.subs[subtask_id]
            if sub.state.status in SUBTASK_FINAL:
                if status == "blocked" and sub.state.status is not SubtaskStatus.COMPLETED:
                    stray.append(sub.state.task_id or "")
                continue
            if (status in _TASK_WORKING or status == "blocked") and plan_status in _STOPPING.get(
                status, ()
            ):
                stray.append(sub.state.task_id or "")
            ended = _TASK_ENDED.get(status)
            if ended is not None:
                self._settle(held, sub, ended, None, work, now)
            elif status in _TASK_WORKING and sub.state.status is SubtaskStatus.PENDING:
                self._update(held, sub, work, status=SubtaskStatus.READY, started_at=now)
        if _executing(held) and failing(held.plan.failure_policy, _statuses(held)):
            # Failed fast, waiting for its always-run steps: what the failure cancels
            # may not all have been cancelled when the process died.
            note = PLAN_FAILED + (held.failure or "a subtask did not complete")
            self._stop_subtasks(held, _NOT_STARTED, SubtaskStatus.CANCELLED, note, work, now, True)
        if held.plan.status is PlanStatus.EXECUTING:
            for sub in held.subs.values():
                state = sub.state
                if sub.remaining or task_status.get(state.subtask_id, "blocked") != "blocked":
                    continue
                if state.status is SubtaskStatus.PENDING:
                    self._ready(held, sub, work, now)
                elif state.status is SubtaskStatus.READY and state.task_id is not None:
                    work.release[state.task_id] = (plan_id, state.subtask_id)  # not queued yet
        if stray:
            reason = held.plan.error or f"plan {plan_status.value}"
            statuses = _NOT_ENDED if plan_status is PlanStatus.CANCELLED else _NOT_STARTED
            work.cancels.append(
                CancelTasks(task_ids=tuple(stray), statuses=statuses, reason=reason)
            )
        self._maybe_finish(held, work, now)

    # -- the batch loop ---------------------------------------------------------------------

    async def receive_batch(self, batch: Sequence[Envelope[PlanExecutorMessage]]) -> None:
        work = _Work()
        through = self._settled
        for envelope in batch:
            envelope.started = True
            message = envelope.message
            if isinstance(message, PlanTaskEvents) and message.events:
                through = max(through, message.events[-1].seq)
            elif isinstance(message, Resync):
                if _pending(work):
                    # Reconciling compares memory with the database: apply what this batch
                    # has done so far first, or its tasks would look deleted.
                    await self._finish(work)
                    work = _Work()
                # What was logged before now is read back from the database below.
                last = (await self._storage.ask(GetStorageStats())).last_seq
                through = max(through, last)
            try:
                outcome = await self._handle(message, work)
            except HiveError as exc:
                if envelope.reply is None:
                    # A told message (events, a resync) cannot be refused to anyone, and
                    # dropping it could leave a plan waiting forever: restart instead,
                    # which reconciles every active plan with the database.
                    await self._finish(work)
                    raise _EffectsFailed(f"handling {type(message).__name__}: {exc}") from exc
                outcome = exc
            if isinstance(outcome, _Forward):
                work.forwards.append((envelope, outcome.request))
            else:
                work.answers.append((envelope, outcome))
        await self._finish(work)
        await self._tell_settled(through)

    async def _finish(self, work: _Work) -> None:
        """Apply the effects of what was handled, then answer."""
        try:
            await self._apply(work)
        except HiveError as exc:
            # Some effects may have landed, some not: say so to every asker, then restart
            # and reconcile with what the database holds.
            for envelope, _ in work.answers:
                envelope.fail(exc)
            for envelope, _ in work.forwards:
                envelope.fail(exc)
            raise _EffectsFailed(f"applying a batch failed ({exc}); reconciling") from exc
        for envelope, request in work.forwards:
            assert envelope.reply is not None
            await self._storage.forward(request, envelope.reply)
        unclaimed: list[PlanningRequest] = []
        for envelope, outcome in work.answers:
            if isinstance(outcome, HiveError):
                envelope.fail(outcome)
            elif isinstance(outcome, PlanningRequest) and isinstance(
                envelope.message, ClaimPlanningRequest
            ):
                # Only one planner may hold it: if the planner left before taking it, it
                # is handed back now (closed reply) or told back later (UnclaimedRequest).
                if not envelope.resolve(outcome, UnclaimedRequest(outcome)):
                    unclaimed.append(outcome)
            else:
                envelope.resolve(outcome)
        if unclaimed:
            again = _Work()
            now = self._clock()
            for lost in unclaimed:
                self._release_unclaimed(lost, again, now)
            await self._finish(again)

    def _release_unclaimed(self, lost: PlanningRequest, work: _Work, now: datetime) -> None:
        """Its planner stopped waiting before it received the request: nobody holds it."""
        current = self._requests.get(lost.id)
        if (
            current is None
            or current.status is not PlanningStatus.ASSIGNED
            or current.assigned_agent != lost.assigned_agent
            or current.assigned_at != lost.assigned_at
        ):
            return  # it moved on since (cancelled, say): not this claim's to release
        back = msgspec.structs.replace(
            current, status=PlanningStatus.PENDING, assigned_agent=None, assigned_at=None
        )
        self._remember_request(back)
        data: dict[str, JsonValue] = {"reason": "the planner stopped waiting"}
        self._request_changed(back, "planning.released", data, work, now)

    async def _apply(self, work: _Work) -> None:
        """Create tasks, write this actor's rows and events, then queue and cancel tasks.

        Tasks are created first, so that the subtask rows may name them. This actor's
        write is committed before any task is queued or cancelled, so that a plan whose
        write failed never has tasks running (and ``plan.started`` comes before the first
        ``plan.subtask_ready``, ``plan.failed`` before the cancellations it causes). The
        queueing and cancelling requests are then sent together and awaited together.
        A crash between two steps is repaired by :meth:`_reconcile`."""
        if work.creates:
            await self._tasks.ask(CreateTasks(tuple(work.creates)), timeout=_NO_DEADLINE)
        ops = work.ops
        for plan_id, subtask_id in work.dirty:
            held = self._plans.get(plan_id)
            if held is not None:
                ops.append(PutSubtask(held.subs[subtask_id].state))
        release = [
            task_id
            for task_id, (plan_id, subtask_id) in work.release.items()
            if (held := self._plans.get(plan_id)) is not None
            and held.plan.status is PlanStatus.EXECUTING
            and held.subs[subtask_id].state.status is SubtaskStatus.READY
        ]
        # No deadline on these, as the TaskManager waits for its commits: giving up early
        # would leave this actor unsure of what landed. They always end.
        if ops:
            await self._storage.ask(Write(tuple(ops)), timeout=_NO_DEADLINE)
        pending: list[Reply[object]] = []
        if release:
            pending.append(await self._tasks.request(QueueTasks(task_ids=tuple(release))))
        for cancel in work.cancels:
            pending.append(await self._tasks.request(cancel))
        for reply in pending:
            await reply.wait()
        # Plans with nothing left to run, and plans not started, leave memory (their
        # status stays cached).
        for plan_id in work.touched:
            held = self._plans.get(plan_id)
            if held is None:
                continue
            status = held.plan.status
            if status in _IDLE or (held.unfinished == 0 and status in PLAN_FINAL):
                del self._plans[plan_id]  # reloaded on demand

    async def _handle(self, message: PlanExecutorMessage, work: _Work) -> object:
        now = self._clock()
        match message:
            case PlanTaskEvents(events=events):
                for event in events:
                    await self._on_task_event(event, work, now)
                return None
            case UnclaimedRequest(request=lost):
                self._release_unclaimed(lost, work, now)
                return None
            case Resync():
                for held in list(self._plans.values()):
                    await self._reconcile(held, work)
                return None
            case QueuePlanningRequest():
                request = PlanningRequest(
                    id=new_id(),
                    task_description=message.task_description,
                    priority=message.priority,
                    requestor=message.requestor,
                    context_data=message.context_data,
                    complexity_estimate=message.complexity_estimate,
                    created_at=now,
                )
                self._remember_request(request)
                data: dict[str, JsonValue] = {
                    "task_description": request.task_description,
                    "priority": request.priority,
                }
                self._request_changed(request, "planning.requested", data, work, now)
                return request
            case ClaimPlanningRequest(agent_id=agent_id):
                while self._pending:
                    *_, request_id = heapq.heappop(self._pending)
                    waiting = self._requests.get(request_id)
                    if waiting is None or waiting.status is not PlanningStatus.PENDING:
                        continue
                    claimed = msgspec.structs.replace(
                        waiting,
                        status=PlanningStatus.ASSIGNED,
                        assigned_agent=agent_id,
                        assigned_at=now,
                    )
                    self._requests[request_id] = claimed
                    data = {"agent_id": agent_id}
                    self._request_changed(
                        claimed, "planning.assigned", data, work, now, source=agent_id
                    )
                    return claimed
                return None
            case CancelPlanningRequest(request_id=request_id, reason=reason, failed=failed):
                request = await self._request(request_id)
                target = PlanningStatus.FAILED if failed else PlanningStatus.CANCELLED
                if request.status.value not in _REQUEST_OPEN:
                    raise IllegalTransitionError(
                        "planning request", request_id, request.status.value, target.value
                    )
                ended = msgspec.structs.replace(
                    request, status=target, completed_at=now, error=reason
                )
                self._requests.pop(request_id, None)
                data = {"reason": reason}
                self._request_changed(ended, f"planning.{target.value}", data, work, now)
                return ended
            case CreatePlan():
                return await self._create(message, work, now)
            case ApprovePlan(plan_id=plan_id, source_agent=source):
                held = await self._plan(plan_id, work)
                if held.plan.status is not PlanStatus.DRAFT:
                    raise IllegalTransitionError(
                        "plan", plan_id, held.plan.status.value, PlanStatus.APPROVED.value
                    )
                self._set_status(held, PlanStatus.APPROVED, "plan.approved", source, {}, work, now)
                return held.plan
            case MaterializePlan(plan_id=plan_id):
                held = await self._plan(plan_id, work)
                if held.plan.status in PLAN_FINAL:
                    return 0
                created = self._materialize(held, work)
                return created
            case StartPlan(plan_id=plan_id, source_agent=source):
                held = await self._plan(plan_id, work)
                if held.plan.status not in (PlanStatus.DRAFT, PlanStatus.APPROVED):
                    return False
                data = {"subtask_count": len(held.subs)}
                self._set_status(
                    held, PlanStatus.EXECUTING, "plan.started", source, data, work, now
                )
                self._materialize(held, work)
                for sub in held.subs.values():
                    if sub.remaining == 0 and sub.state.status is SubtaskStatus.PENDING:
                        self._ready(held, sub, work, now)
                # A task cancelled (or deleted) while its plan was a draft ended its
                # subtask then; the policy applies now that the plan runs.
                for sub in list(held.subs.values()):
                    failed = sub.state.status in (SubtaskStatus.FAILED, SubtaskStatus.CANCELLED)
                    if failed and _executing(held):  # fail-fast stops at the first
                        self._apply_policy(held, sub, work, now)
                self._maybe_finish(held, work, now)
                return True
            case CancelPlan(plan_id=plan_id, reason=reason, source_agent=source):
                held = await self._plan(plan_id, work)
                if held.plan.status in PLAN_FINAL:
                    raise IllegalTransitionError(
                        "plan", plan_id, held.plan.status.value, PlanStatus.CANCELLED.value
                    )
                note = reason or "plan cancelled"
                self._stop_subtasks(held, _NOT_ENDED, SubtaskStatus.CANCELLED, note, work, now)
                data = {"reason": note}
                self._set_status(
                    held, PlanStatus.CANCELLED, "plan.cancelled", source, data, work, now, note
                )
                return held.plan
            case GetPlan(plan_id=plan_id):
                known = self._plans.get(plan_id)
                return known.plan if known is not None else _Forward(FetchPlan(plan_id))
            case GetPlanStatus(plan_id=plan_id):
                known = self._plans.get(plan_id)
                if known is not None:
                    return known.plan.status
                status = self._status.get(plan_id)
                if status is None:
                    plan = await self._storage.ask(FetchPlan(plan_id))
                    if plan is None:
                        return None
                    status = plan.status
                    self._cache(plan_id, status)
                else:
                    self._status.move_to_end(plan_id)
                return status
        raise HiveError(f"the plan executor does not handle {type(message).__name__}")

    # -- plans ------------------------------------------------------------------------------

    async def _create(self, message: CreatePlan, work: _Work, now: datetime) -> ExecutionPlan:
        plan_id = new_id()
        request_id = message.planning_task_id
        if request_id is None:
            # Every plan answers a request: one made for it, already planned.
            title = message.plan_data.get("title")
            request = PlanningRequest(
                id=new_id(),
                task_description=title if isinstance(title, str) and title else "execution plan",
                requestor=message.source_agent,
                status=PlanningStatus.PLANNED,
                completed_at=now,
                created_at=now,
            )
            work.ops.append(PutPlanningRequest(request))
            request_id = request.id
        else:
            request = await self._request(request_id)
            if request.status.value in _REQUEST_OPEN:
                planned = msgspec.structs.replace(
                    request, status=PlanningStatus.PLANNED, completed_at=now
                )
                self._requests.pop(request_id, None)
                data: dict[str, JsonValue] = {"plan_id": plan_id}
                self._request_changed(planned, "planning.planned", data, work, now)
        plan = ExecutionPlan(
            id=plan_id,
            planning_task_id=request_id,
            status=PlanStatus.APPROVED if message.approved else PlanStatus.DRAFT,
            plan_data=message.plan_data,
            subtasks=message.subtasks,
            failure_policy=message.failure_policy,
            estimated_duration=message.estimated_duration,
            estimated_complexity=message.estimated_complexity,
            generated_workflow=message.generated_workflow,
            subtask_count=len(message.subtasks),
            dependency_count=sum(len(spec.dependencies) for spec in message.subtasks),
            source_agent=message.source_agent,
            generated_at=now,
        )
        work.ops.append(PutPlan(plan, message.plan_data_json))
        held = _Plan.build(plan, ())
        self._plans[plan_id] = held
        for sub in held.subs.values():
            work.dirty[plan_id, sub.state.subtask_id] = None
        self._cache(plan_id, plan.status)
        data = {
            "status": plan.status.value,
            "planning_task_id": request_id,
            "subtask_count": plan.subtask_count,
            "dependency_count": plan.dependency_count,
            "failure_policy": plan.failure_policy.value,
        }
        work.ops.append(self._event("plan.created", plan, message.source_agent, data, now))
        return plan

    async def _plan(self, plan_id: str, work: _Work) -> _Plan:
        held = self._plans.get(plan_id)
        if held is not None:
            return held
        plan = await self._storage.ask(FetchPlan(plan_id))
        if plan is None:
            raise NotFoundError("plan", plan_id)
        return await self._load(plan, work)

    def _materialize(self, held: _Plan, work: _Work) -> int:
        """Create a blocked task for every subtask that has none; returns how many."""
        plan = held.plan
        created = 0
        for spec in plan.subtasks:
            sub = held.subs[spec.id]
            if sub.state.task_id is not None or sub.state.status in SUBTASK_FINAL:
                continue
            task_id = new_id()
            work.creates.append(
                CreateTask(
                    title=spec.title or spec.id,
                    task_type=spec.task_type,
                    payload=spec.payload,
                    description=spec.description,
                    priority=spec.priority,
                    max_retries=spec.max_retries,
                    timeout=spec.timeout,
                    requires=spec.requires,
                    correlation_id=plan.id,
                    source_agent=plan.source_agent,
                    task_id=task_id,
                    plan_id=plan.id,
                    subtask_id=spec.id,
                    blocked=True,
                )
            )
            self._update(held, sub, work, task_id=task_id)
            held.by_task[task_id] = spec.id
            created += 1
        return created

    def _ready(self, held: _Plan, sub: _Sub, work: _Work, now: datetime) -> None:
        """Its dependencies are done: queue its task (published as plan.subtask_ready)."""
        self._update(held, sub, work, status=SubtaskStatus.READY, started_at=now)
        task_id = sub.state.task_id
        assert task_id is not None  # an executing plan's subtasks all have tasks
        work.release[task_id] = (held.plan.id, sub.state.subtask_id)

    async def _on_task_event(self, event: Event, work: _Work, now: datetime) -> None:
        if event.plan_id is None or event.task_id is None:
            return
        held = self._plans.get(event.plan_id)
        if held is None:
            status = self._status.get(event.plan_id)
            if status in PLAN_FINAL:
                return  # an ended plan not in memory has no task left running
            # A plan not in memory (a draft whose task was cancelled, say): load it, which
            # reconciles it, this task included.
            plan = await self._storage.ask(FetchPlan(event.plan_id))
            if plan is None:
                return
            self._cache(plan.id, plan.status)
            if plan.status not in PLAN_FINAL and plan.id not in self._plans:
                await self._load(plan, work)
            return
        subtask_id = held.by_task.get(event.task_id)
        if subtask_id is None:
            return  # the link is written after the task: a Resync reconciles it
        sub = held.subs[subtask_id]
        if sub.state.status in SUBTASK_FINAL:
            return  # settled already (skipped or cancelled by this plan, or reconciled)
        if event.type == "task.retrying":
            # (held.failure: failed fast, its always-run steps still to run)
            if held.plan.status in PLAN_FINAL or (held.failure is not None and not sub.always):
                # It was running when the plan stopped and now goes back to the queue:
                # the plan will not run it again.
                reason = held.plan.error or f"plan {held.plan.status.value}"
                work.cancels.append(
                    CancelTasks(
                        task_ids=(event.task_id,), statuses=(TaskStatus.QUEUED,), reason=reason
                    )
                )
            return
        ended = _ENDED[event.type]
        error = event.data.get("error")
        if event.type == "task.deleted":
            # The row's task_id is already NULL (ON DELETE SET NULL): keep it so.
            error = "its task was deleted"
            self._update(held, sub, work, task_id=None)
            held.by_task.pop(event.task_id, None)
        self._settle(held, sub, ended, error if isinstance(error, str) else None, work, now)

    def _settle(
        self,
        held: _Plan,
        sub: _Sub,
        status: SubtaskStatus,
        error: str | None,
        work: _Work,
        now: datetime,
    ) -> None:
        """A subtask's task ended: record it, then let the plan react."""
        self._update(held, sub, work, status=status, completed_at=now, error=error)
        held.unfinished -= 1
        plan = held.plan
        self._ended(held, sub, work, now)
        if status is SubtaskStatus.COMPLETED:
            for dependent_id in sub.dependents:
                dependent = held.subs[dependent_id]
                if dependent.always:
                    continue  # counted by _ended
                dependent.remaining -= 1
                if (
                    dependent.remaining == 0
                    and dependent.state.status is SubtaskStatus.PENDING
                    and plan.status is PlanStatus.EXECUTING
                ):
                    self._ready(held, dependent, work, now)
        elif plan.status is PlanStatus.EXECUTING:
            self._apply_policy(held, sub, work, now)
        self._maybe_finish(held, work, now)

    def _apply_policy(self, held: _Plan, sub: _Sub, work: _Work, now: datetime) -> None:
        """A subtask of an executing plan ended without completing: fail fast, or skip
        what depends on it."""
        subtask_id = sub.state.subtask_id
        why = failure_reason(sub.state)
        if held.plan.failure_policy is FailurePolicy.FAIL_FAST:
            self._stop_subtasks(
                held, _NOT_STARTED, SubtaskStatus.CANCELLED, PLAN_FAILED + why, work, now, True
            )
            if any(s.always and s.state.status not in SUBTASK_FINAL for s in held.subs.values()):
                # Its always-run steps run first; the plan fails when they have ended.
                if held.failure is None:
                    held.failure, held.failure_subtask = why, subtask_id
                return
            if held.failure is not None:  # the first failure's, not its cleanup's
                subtask_id, why = held.failure_subtask or subtask_id, held.failure
            data: dict[str, JsonValue] = {"subtask_id": subtask_id, "reason": why}
            self._set_status(held, PlanStatus.FAILED, "plan.failed", None, data, work, now, why)
        else:
            self._skip_dependents(held, sub, work, now)

    def _skip_dependents(self, held: _Plan, failed: _Sub, work: _Work, now: datetime) -> None:
        """Continue policy: everything downstream of ``failed`` will never run."""
        reason = f"skipped: dependency {failed.state.subtask_id!r} did not complete"
        skipped: list[str] = []
        stack = list(failed.dependents)
        while stack:
            sub = held.subs[stack.pop()]
            if sub.state.status is not SubtaskStatus.PENDING or sub.always:
                continue  # an always-run step is not skipped: it runs once they all ended
            self._update(
                held, sub, work, status=SubtaskStatus.SKIPPED, completed_at=now, error=reason
            )
            held.unfinished -= 1
            self._ended(held, sub, work, now)
            if sub.state.task_id is not None:
                skipped.append(sub.state.task_id)
            stack.extend(sub.dependents)
        if skipped:
            work.cancels.append(
                CancelTasks(task_ids=tuple(skipped), statuses=(TaskStatus.BLOCKED,), reason=reason)
            )

    def _stop_subtasks(
        self,
        held: _Plan,
        statuses: tuple[TaskStatus, ...],
        status: SubtaskStatus,
        reason: str,
        work: _Work,
        now: datetime,
        spare_always: bool = False,
    ) -> None:
        """Cancel the plan's tasks in ``statuses``. Subtasks still pending (never queued,
        so never started) end at once; ready ones end when their task's cancellation (or
        its own end, if it had started) comes back as an event. With ``spare_always``
        (failing fast), always-run subtasks are left to run once their dependencies end."""
        task_ids: list[str] = []
        for sub in held.subs.values():
            state = sub.state
            if state.status in SUBTASK_FINAL or (spare_always and sub.always):
                continue
            if state.task_id is not None:
                task_ids.append(state.task_id)
            if state.status is SubtaskStatus.PENDING:
                self._update(held, sub, work, status=status, completed_at=now, error=reason)
                held.unfinished -= 1
                self._ended(held, sub, work, now, ready=spare_always)
        if task_ids:
            work.cancels.append(
                CancelTasks(task_ids=tuple(task_ids), statuses=statuses, reason=reason)
            )

    def _ended(
        self, held: _Plan, sub: _Sub, work: _Work, now: datetime, *, ready: bool = True
    ) -> None:
        """``sub`` has just ended, one way or another: its always-run dependents have one
        dependency less to wait for, and run once they wait for none (not ``ready``: the
        plan is being cancelled, they are cancelled too)."""
        for dependent_id in sub.dependents:
            dependent = held.subs[dependent_id]
            if not dependent.always:
                continue
            dependent.remaining -= 1
            if (
                ready
                and dependent.remaining == 0
                and dependent.state.status is SubtaskStatus.PENDING
                and _executing(held)
            ):
                self._ready(held, dependent, work, now)

    def _maybe_finish(self, held: _Plan, work: _Work, now: datetime) -> None:
        if held.unfinished or held.plan.status is not PlanStatus.EXECUTING:
            return
        not_done = [
            sub.state.subtask_id
            for sub in held.subs.values()
            if sub.state.status is not SubtaskStatus.COMPLETED
        ]
        counts: dict[str, JsonValue] = dict(
            Counter(sub.state.status.value for sub in held.subs.values())
        )
        if not not_done:
            self._set_status(
                held, PlanStatus.COMPLETED, "plan.completed", None, {"counts": counts}, work, now
            )
        elif held.failure is not None:  # failed fast, then ran its always-run steps
            failed: dict[str, JsonValue] = {
                "counts": counts,
                "subtask_id": held.failure_subtask,
                "reason": held.failure,
            }
            self._set_status(
                held, PlanStatus.FAILED, "plan.failed", None, failed, work, now, held.failure
            )
        else:
            why = f"{len(not_done)} subtask(s) did not complete: {', '.join(not_done[:5])}"
            if len(not_done) > 5:
                why += ", ..."
            data: dict[str, JsonValue] = {"counts": counts, "reason": why}
            self._set_status(held, PlanStatus.FAILED, "plan.failed", None, data, work, now, why)

    def _set_status(
        self,
        held: _Plan,
        status: PlanStatus,
        event_type: str,
        source: str | None,
        data: dict[str, JsonValue],
        work: _Work,
        now: datetime,
        error: str | None = None,
    ) -> None:
        previous = held.plan.status
        changes: dict[str, object] = {"status": status}
        if status is PlanStatus.EXECUTING:
            changes["started_at"] = now
        if status in PLAN_FINAL:
            changes["completed_at"] = now
            changes["error"] = error
        plan = held.plan = msgspec.structs.replace(held.plan, **changes)
        self._cache(plan.id, status)
        work.ops.append(
            SetPlanStatus(plan.id, status, plan.started_at, plan.completed_at, plan.error)
        )
        work.touched.add(plan.id)
        event_data: dict[str, JsonValue] = {"status": status.value, "previous": previous.value}
        event_data.update(data)
        work.ops.append(self._event(event_type, plan, source, event_data, now))

    def _update(self, held: _Plan, sub: _Sub, work: _Work, **changes: object) -> None:
        sub.state = msgspec.structs.replace(sub.state, **changes)
        work.dirty[held.plan.id, sub.state.subtask_id] = None
        work.touched.add(held.plan.id)

    def _event(
        self,
        event_type: str,
        plan: ExecutionPlan,
        source: str | None,
        data: dict[str, JsonValue],
        now: datetime,
    ) -> AppendEvent:
        event = Event(
            type=event_type,
            timestamp=now.timestamp(),
            source=source or plan.source_agent or "plan_executor",
            correlation_id=plan.id,
            plan_id=plan.id,
            data=data,
        )
        return AppendEvent(event, msgspec.json.encode(data))

    def _cache(self, plan_id: str, status: PlanStatus) -> None:
        self._status[plan_id] = status
        self._status.move_to_end(plan_id)
        while len(self._status) > self._cache_size:
            self._status.popitem(last=False)

    # -- the planning queue -----------------------------------------------------------------

    def _remember_request(self, request: PlanningRequest) -> None:
        self._requests[request.id] = request
        if request.status is PlanningStatus.PENDING:
            self._arrivals += 1
            entry = (-request.priority, request.created_at, self._arrivals, request.id)
            heapq.heappush(self._pending, entry)

    async def _request(self, request_id: str) -> PlanningRequest:
        request = self._requests.get(request_id)
        if request is None:
            request = await self._storage.ask(FetchPlanningRequest(request_id))
            if request is None:
                raise NotFoundError("planning request", request_id)
        return request

    def _request_changed(
        self,
        request: PlanningRequest,
        event_type: str,
        data: dict[str, JsonValue],
        work: _Work,
        now: datetime,
        *,
        source: str | None = None,
    ) -> None:
        """Store ``request`` and log its event, from ``source`` (by default the agent
        that requested the plan: the request is its, whoever moved it)."""
        work.ops.append(PutPlanningRequest(request))
        event = Event(
            type=event_type,
            timestamp=now.timestamp(),
            source=source or request.requestor or "plan_executor",
            correlation_id=request.id,
            data=data,
        )
        work.ops.append(AppendEvent(event, msgspec.json.encode(data)))


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


class _EffectsFailed(RuntimeError):
    """A batch's effects failed part way: the actor restarts to reconcile."""


# Effects are waited for without a deadline, as the TaskManager waits for its commits:
# giving up early would leave this actor unsure of what landed. They always end.
_NO_DEADLINE = float("inf")


class PlanFeed:
    """Keeps the PlanExecutor's subscription to the ends of plan tasks.

    A supervisor service: it subscribes to the broadcast actor, tells the executor
    :class:`Resync` (whatever ended before the subscription is read from the database),
    then forwards events in batches. If the subscription lags or the broadcast actor
    restarts, it subscribes again and resyncs; it ends when the runtime stops.
    """

    def __init__(
        self,
        broadcast: ActorRef[BroadcastMessage],
        plans: ActorRef[PlanExecutorMessage],
        *,
        capacity: int = 10_000,
    ) -> None:
        self._broadcast = broadcast
        self._plans = plans
        self._capacity = capacity

    async def run(self) -> None:
        while True:
            try:
                if not await self._follow():
                    return
            except RuntimeStoppedError:
                return
            except HiveError as exc:
                # The broadcast actor crashed under the subscribe, say: its supervisor
                # restarts it; try again shortly (what ends meanwhile, Resync reads).
                log.warning("plan feed: %s; subscribing again", exc)
                await anyio.sleep(0.1)

    async def _follow(self) -> bool:
        """One subscription; True to subscribe again, False once the runtime stops."""
        with EventFeed() as receive:
            await self._broadcast.ask(
                Subscribe(
                    "task.*",
                    (),
                    receive,
                    self._capacity,
                    "error",
                    types=PLAN_EVENT_TYPES,
                    require=("plan_id",),
                    internal=True,
                )
            )
            await self._plans.tell(Resync())
            while True:
                try:
                    item = await receive.receive()
                except (anyio.EndOfStream, anyio.ClosedResourceError):
                    return False  # closed without a Lagged marker: the runtime stopped
                if isinstance(item, Lagged):
                    return True
                events = [item]
                lagged = False
                while len(events) < 1024:
                    try:
                        more = receive.receive_nowait()
                    except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                        break
                    if isinstance(more, Lagged):
                        lagged = True
                        break
                    events.append(more)
                await self._plans.tell(PlanTaskEvents(tuple(events)))
                if lagged:
                    return True
