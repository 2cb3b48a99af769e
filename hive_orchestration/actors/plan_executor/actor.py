"""The PlanExecutor actor: the one owner of execution plans and the planning queue.

It turns a plan's subtasks into tasks and drives the plan to an end, by messages only:
it asks the TaskManager to create, queue and cancel tasks, and learns how they end from
the event log, through a subscription that :class:`PlanFeed` keeps for it.

How a plan is created is in :mod:`.creating`, how it progresses in :mod:`.progress`, the
planning queue in :mod:`.planning`, calls about a plan another node drives in :mod:`.calls`.

Durability and recovery. The database holds everything: the plan (``execution_plans``),
one row per subtask (``plan_execution``) and the tasks themselves, which name their
plan and subtask (at most one task per subtask, enforced by a unique index). This actor
handles a batch of messages, then applies what they caused in order: create tasks, queue
tasks, cancel tasks (each one message to the TaskManager, so one commit), then one write
of its own rows and events. A crash between two of those steps loses nothing: on start,
and whenever its event feed may have missed something, each active plan is reconciled
with the database (tasks are linked to their subtasks, subtasks whose task ended are
settled, ready subtasks still blocked are queued, a plan whose subtasks all ended is
finished): :mod:`.reconcile`. Reconciling is idempotent, so a subtask is never created
twice nor forgotten. If an effect fails, the actor fails the batch's requests and
restarts, to reconcile from what the database holds.

Events: ``plan.created``, ``plan.approved``, ``plan.started``, ``plan.completed``,
``plan.failed``, ``plan.cancelled`` (here) and ``plan.subtask_ready`` (the TaskManager,
when it queues a subtask's task), all with the plan id as ``plan_id`` and as
``correlation_id``, which every task of the plan carries too. The planning queue
publishes ``planning.requested``, ``planning.assigned``, ``planning.planned``,
``planning.failed`` and ``planning.cancelled``, with the request id as correlation id.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from ...errors import (
    HiveError,
    IllegalTransitionError,
    NotFoundError,
    RuntimeStoppedError,
)
from ...messages.events import JsonValue
from ...messages.plans import (
    PLAN_FINAL,
    AdoptPlans,
    ApprovePlan,
    CancelPlan,
    CancelPlanningRequest,
    ClaimPlanningRequest,
    CreatePlan,
    ExecutionPlan,
    GetPlan,
    GetPlanStatus,
    MaterializePlan,
    PlanExecutorMessage,
    PlanningRequest,
    PlanStatus,
    PlanTaskEvents,
    QueuePlanningRequest,
    Resync,
    RetryCalls,
    StartPlan,
    SubtaskStatus,
    UnclaimedRequest,
)
from ...messages.storage import (
    FetchPlan,
    GetStorageStats,
    LoadActivePlans,
    LoadPlanningRequests,
    LoadSubtasks,
    PutSubtask,
    StorageMessage,
    StoreFences,
    TakePlan,
    Write,
)
from ...messages.tasks import CreateTasks, PlansSettled, QueueTasks, TaskManagerMessage
from ...runtime import Actor, ActorRef, Envelope, Reply
from .calls import (
    PLAN_CALL,
    PLAN_CALL_ANSWERED,
    DrivenElsewhere,
    Pending,
    fail_pending,
    forward,
    on_answer,
    on_call,
    resend,
)
from .creating import create_plan
from .planning import (
    cancel_request,
    claim_request,
    queue_request,
    release_unclaimed,
    remember_request,
)
from .progress import (
    apply_policy,
    materialize,
    maybe_finish,
    on_task_event,
    queue_ready,
    set_status,
    stop_subtasks,
)
from .reconcile import adopt, reconcile
from .state import _IDLE, _NOT_ENDED, _REQUEST_OPEN, _executing, _Forward, _pending, _Plan, _Work

__all__ = ["PlanExecutor"]

log = logging.getLogger("hive_orchestration.plans")


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
        # Pending and assigned requests, on a store of its own (on one several nodes
        # share, the database is the queue: planning.py).
        self._shared = False
        self._requests: dict[str, PlanningRequest] = {}
        self._pending: list[tuple[int, datetime, int, str]] = []  # heap: best pending first
        self._arrivals = 0  # ties on priority and time go first come, first served
        # The log position up to which every plan task's end has been applied (committed),
        # told to the TaskManager, which holds back the answers of the calls that ended a
        # plan's task until then: the caller's next read of the plan sees what was released.
        self._settled = 0
        # Calls about plans another node drives, forwarded to it and waiting for its
        # answer (by call id); and the answers this node gave to such calls (calls.py).
        self._calls: dict[str, Pending] = {}
        self._answered: OrderedDict[str, dict[str, JsonValue]] = OrderedDict()
        # Plans another live node drives, by when TakePlan said so (progress.py).
        self._elsewhere: OrderedDict[str, float] = OrderedDict()

    # -- start-up and reconciling -----------------------------------------------------------

    async def started(self) -> None:
        # Loading reconciles every active plan with what the database holds by now, so
        # everything logged before the loads is settled once they are applied.
        through = (await self._storage.ask(GetStorageStats())).last_seq
        self._shared = await self._storage.ask(StoreFences())
        if not self._shared:
            for request in await self._storage.ask(LoadPlanningRequests(_REQUEST_OPEN)):
                remember_request(self, request)
        work = _Work()
        for plan in await self._storage.ask(LoadActivePlans()):
            # Another live runtime's plan (a database several nodes share) is its to drive.
            if await self._storage.ask(TakePlan(plan.id)):
                await self._load(plan, work)
        await self._apply(work)
        await self._tell_settled(through)
        log.info("plan executor: %d active plan(s)", len(self._plans))

    async def stopped(self, error: BaseException | None) -> None:
        fail_pending(self, error)

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
        await reconcile(self, held, work)
        return held

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
            except DrivenElsewhere as elsewhere:
                forward(self, envelope, message, elsewhere.plan.id, work)
                continue
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
                await release_unclaimed(self, lost, again, now)
            await self._finish(again)

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

    async def _handle(
        self, message: PlanExecutorMessage, work: _Work, *, taken: bool = False
    ) -> object:
        """Handle one message; ``taken``: a call forwarded by another node about a plan
        this node has just taken (or drives), which must not be forwarded again."""
        now = self._clock()
        match message:
            case PlanTaskEvents(events=events):
                for event in events:
                    if event.type == PLAN_CALL:
                        await on_call(self, event, work)
                    elif event.type == PLAN_CALL_ANSWERED:
                        await on_answer(self, event)
                    else:
                        await on_task_event(self, event, work, now)
                return None
            case RetryCalls():
                resend(self, work)
                return None
            case AdoptPlans():
                self._elsewhere.clear()  # a node died: what it drove is to be taken
                return await adopt(self, work)
            case UnclaimedRequest(request=lost):
                await release_unclaimed(self, lost, work, now)
                return None
            case Resync():
                self._elsewhere.clear()
                for held in list(self._plans.values()):
                    await reconcile(self, held, work)
                return None
            case QueuePlanningRequest():
                return queue_request(self, message, work, now)
            case ClaimPlanningRequest(agent_id=agent_id):
                return await claim_request(self, agent_id, work, now)
            case CancelPlanningRequest(request_id=request_id, reason=reason, failed=failed):
                return await cancel_request(self, request_id, reason, failed, work, now)
            case CreatePlan():
                return await create_plan(self, message, work, now)
            case ApprovePlan(plan_id=plan_id, source_agent=source):
                held = await self._plan(plan_id, work, taken)
                if held.plan.status is not PlanStatus.DRAFT:
                    raise IllegalTransitionError(
                        "plan", plan_id, held.plan.status.value, PlanStatus.APPROVED.value
                    )
                set_status(self, held, PlanStatus.APPROVED, "plan.approved", source, {}, work, now)
                return held.plan
            case MaterializePlan(plan_id=plan_id):
                held = await self._plan(plan_id, work, taken)
                if held.plan.status in PLAN_FINAL:
                    return 0
                created = materialize(held, work)
                return created
            case StartPlan(plan_id=plan_id, source_agent=source):
                held = await self._plan(plan_id, work, taken)
                if held.plan.status not in (PlanStatus.DRAFT, PlanStatus.APPROVED):
                    return False
                data: dict[str, JsonValue] = {"subtask_count": len(held.subs)}
                set_status(
                    self, held, PlanStatus.EXECUTING, "plan.started", source, data, work, now
                )
                materialize(held, work)
                for sub in held.subs.values():
                    if sub.remaining == 0 and sub.state.status is SubtaskStatus.PENDING:
                        queue_ready(held, sub, work, now)
                # A task cancelled (or deleted) while its plan was a draft ended its
                # subtask then; the policy applies now that the plan runs.
                for sub in list(held.subs.values()):
                    failed = sub.state.status in (SubtaskStatus.FAILED, SubtaskStatus.CANCELLED)
                    if failed and _executing(held):  # fail-fast stops at the first
                        apply_policy(self, held, sub, work, now)
                maybe_finish(self, held, work, now)
                return True
            case CancelPlan(plan_id=plan_id, reason=reason, source_agent=source):
                held = await self._plan(plan_id, work, taken)
                if held.plan.status in PLAN_FINAL:
                    raise IllegalTransitionError(
                        "plan", plan_id, held.plan.status.value, PlanStatus.CANCELLED.value
                    )
                note = reason or "plan cancelled"
                stop_subtasks(self, held, _NOT_ENDED, SubtaskStatus.CANCELLED, note, work, now)
                data = {"reason": note}
                set_status(
                    self,
                    held,
                    PlanStatus.CANCELLED,
                    "plan.cancelled",
                    source,
                    data,
                    work,
                    now,
                    note,
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
                    # Only an ended plan's status, read here: another node may drive a
                    # plan not held here and change its status (several nodes).
                    if status in PLAN_FINAL:
                        self._cache(plan_id, status)
                else:
                    self._status.move_to_end(plan_id)
                return status
        raise HiveError(f"the plan executor does not handle {type(message).__name__}")

    # -- plans ------------------------------------------------------------------------------

    async def _plan(self, plan_id: str, work: _Work, taken: bool = False) -> _Plan:
        """The plan, to change it: held here, or loaded if this node may drive it (it is
        its own, no one's or a dead node's: taken); else :class:`DrivenElsewhere`, and
        the call is forwarded to the node that drives it."""
        held = self._plans.get(plan_id)
        if held is not None:
            return held
        plan = await self._storage.ask(FetchPlan(plan_id))
        if plan is None:
            raise NotFoundError("plan", plan_id)
        if not taken and not await self._storage.ask(TakePlan(plan_id)):
            raise DrivenElsewhere(plan)
        return await self._load(plan, work)

    def _cache(self, plan_id: str, status: PlanStatus) -> None:
        self._status[plan_id] = status
        self._status.move_to_end(plan_id)
        while len(self._status) > self._cache_size:
            self._status.popitem(last=False)


class _EffectsFailed(RuntimeError):
    """A batch's effects failed part way: the actor restarts to reconcile."""


# Effects are waited for without a deadline, as the TaskManager waits for its commits:
# giving up early would leave this actor unsure of what landed. They always end.
_NO_DEADLINE = float("inf")
