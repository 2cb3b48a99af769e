"""Calls about a plan made on a node that does not drive it (several nodes, one database).

A plan is driven by one node (``execution_plans.node_id``: its creator while it lives,
then the first node to take it: ``TakePlan``), and only its driver changes it: its
memory of the plan is the truth its next decisions are made from, so a write behind its
back (another node cancelling the plan in the database) would be overwritten by what it
decides next from stale memory (a ``plan.failed`` after the ``plan.cancelled``, the next
subtasks queued). So a call that changes a plan (approve, materialize, start, cancel)
made on another node is **forwarded to the driver through the event log**, which every
node follows:

1. The calling node logs ``plan.call`` (the call's id, name and fields) and keeps its
   caller waiting (its actor goes on with other work).
2. Every node sees it; the one that drives the plan (it holds it, or ``TakePlan`` says it
   is its own, no one's or a dead node's, and takes it) handles it exactly as a call of
   its own caller, in its batch loop, in order with the ends of the plan's tasks: no race
   with a subtask completing at the same moment. It logs ``plan.call_answered`` in the
   same write as the change, so the answer is there if and only if the change is.
3. The calling node answers its caller from that event: the same answer as on one node
   (a plan is read back and given the status and times the driver answered with).

The calling node re-sends a call not answered within :data:`RESEND_AFTER` seconds (then
at growing intervals) until it is answered or its caller stops waiting: the driver may
have missed it (its feed lagged) or died before its write (then the re-sent call is
taken by the first node to see it, the caller itself included). A call is applied once:
a re-sent call that its driver (or a driver before it) answered already is answered again
with the first answer, found in memory or in the log.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import anyio
import msgspec

from ..._ids import new_id
from ...errors import (
    ActorFailedError,
    HiveError,
    IllegalTransitionError,
    NotFoundError,
    RuntimeStoppedError,
)
from ...messages.events import Event, JsonValue
from ...messages.plans import (
    PLAN_FINAL,
    ApprovePlan,
    CancelPlan,
    ExecutionPlan,
    MaterializePlan,
    PlanExecutorMessage,
    PlanStatus,
    StartPlan,
)
from ...messages.storage import AppendEvent, FetchPlan, ReadEvents, TakePlan
from ...runtime import Envelope
from .state import _Work

if TYPE_CHECKING:
    from .actor import PlanExecutor

log = logging.getLogger("hive_orchestration.plans")

#: The events of a call forwarded to a plan's driver: ``plan.call`` (``data``:
#: ``call_id``, ``call``: the message's name, ``args``: its fields, ``attempt``) and its
#: answer ``plan.call_answered`` (``call_id``, and ``plan``: the status and times the
#: driver set, ``value``, or ``error``).
PLAN_CALL = "plan.call"
PLAN_CALL_ANSWERED = "plan.call_answered"

#: A forwarded call not answered after this many seconds is sent again; then after twice
#: as long, three times... (a loaded driver answers late: each send is an event every node
#: reads), at most :data:`_RESEND_MAX` apart.
RESEND_AFTER = 2.0
_RESEND_MAX = 10.0
#: A told call (nobody waits for it) is given up after this many sends.
_TOLD_SENDS = 30
#: Answers a driver remembers, to answer a re-sent call without reading the log.
_REMEMBERED = 1000

PlanCall = ApprovePlan | MaterializePlan | StartPlan | CancelPlan
_CALLS: dict[str, type[PlanCall]] = {
    cls.__name__: cls for cls in (ApprovePlan, MaterializePlan, StartPlan, CancelPlan)
}


class DrivenElsewhere(Exception):
    """Raised by the actor's plan lookup: another live node drives the plan."""

    def __init__(self, plan: ExecutionPlan) -> None:
        super().__init__(plan.id)
        self.plan = plan


@dataclass(slots=True)
class Pending:
    """A call forwarded to the plan's driver, waiting for its answer."""

    envelope: Envelope[PlanExecutorMessage]
    message: PlanCall
    plan_id: str
    sent: float  # time.monotonic() of the last send
    sends: int = 1


class _PlanFields(msgspec.Struct, frozen=True):
    """What a call changes in a plan, as the driver answered: the rest of it is as stored."""

    status: PlanStatus
    started_at: datetime | None = None
    completed_at: datetime | None = None
    error: str | None = None


def _event(event_type: str, plan_id: str, data: dict[str, JsonValue]) -> AppendEvent:
    event = Event(
        type=event_type,
        timestamp=time.time(),
        source="plan_executor",
        correlation_id=plan_id,
        plan_id=plan_id,
        data=data,
    )
    return AppendEvent(event, msgspec.json.encode(data))


def _call_event(call_id: str, pending: Pending) -> AppendEvent:
    message = pending.message
    data: dict[str, JsonValue] = {
        "call_id": call_id,
        "call": type(message).__name__,
        "args": msgspec.to_builtins(message),
        "attempt": pending.sends - 1,
    }
    return _event(PLAN_CALL, pending.plan_id, data)


def forward(
    pe: PlanExecutor,
    envelope: Envelope[PlanExecutorMessage],
    message: PlanExecutorMessage,
    plan_id: str,
    work: _Work,
) -> None:
    """Send ``message`` to the node that drives ``plan_id`` (logged with this batch)."""
    assert isinstance(message, ApprovePlan | MaterializePlan | StartPlan | CancelPlan)
    call_id = new_id()
    pending = Pending(envelope, message, plan_id, time.monotonic())
    work.ops.append(_call_event(call_id, pending))
    pe._calls[call_id] = pending
    log.debug("plan %s: %s forwarded to its driver as call %s", plan_id, type(message), call_id)


def resend(pe: PlanExecutor, work: _Work) -> None:
    """Send again the forwarded calls that have waited long enough for their answer."""
    now = time.monotonic()
    for call_id, pending in list(pe._calls.items()):
        reply = pending.envelope.reply
        if (reply is not None and reply.done) or (reply is None and pending.sends >= _TOLD_SENDS):
            del pe._calls[call_id]  # its caller stopped waiting (timed out, cancelled)
            continue
        if now - pending.sent >= min(RESEND_AFTER * pending.sends, _RESEND_MAX):
            pending.sent = now
            pending.sends += 1
            work.ops.append(_call_event(call_id, pending))
            log.info("plan %s: call %s not answered yet, sent again", pending.plan_id, call_id)


async def on_call(pe: PlanExecutor, event: Event, work: _Work) -> None:
    """A node logged a call about a plan: handle it if this node drives the plan."""
    data = event.data
    call_id, name, args, attempt = (data.get(k) for k in ("call_id", "call", "args", "attempt"))
    plan_id = event.plan_id
    kind = _CALLS.get(name) if isinstance(name, str) else None
    if plan_id is None or not isinstance(call_id, str) or kind is None:
        log.warning("event %d: a plan.call this runtime cannot read, ignored", event.seq)
        return
    held = plan_id in pe._plans
    if not held and not await pe._storage.ask(TakePlan(plan_id)):
        return  # another live node drives it: its call
    earlier = pe._answered.get(call_id)
    if earlier is None and (not held or (isinstance(attempt, int) and attempt > 0)):
        # Sent before, or a plan just taken: its driver before this node may have
        # answered this very call (and died) before this node read it.
        earlier = await _logged_answer(pe, plan_id, call_id)
    if earlier is not None:
        work.ops.append(_event(PLAN_CALL_ANSWERED, plan_id, earlier))
        return
    try:
        message = msgspec.convert(args, kind)
    except msgspec.ValidationError as exc:
        answer: dict[str, JsonValue] = {"error": {"type": "HiveError", "message": str(exc)}}
    else:
        try:
            outcome = await pe._handle(message, work, taken=True)
        except HiveError as exc:
            outcome = exc
        answer = _encode(outcome)
    answer["call_id"] = call_id
    pe._answered[call_id] = answer
    while len(pe._answered) > _REMEMBERED:
        pe._answered.popitem(last=False)
    work.ops.append(_event(PLAN_CALL_ANSWERED, plan_id, answer))


async def _logged_answer(
    pe: PlanExecutor, plan_id: str, call_id: str
) -> dict[str, JsonValue] | None:
    """The answer a driver before this one logged for ``call_id``, if any."""
    after = 0
    while True:
        found = await pe._storage.ask(
            ReadEvents(after=after, limit=1000, pattern=PLAN_CALL_ANSWERED, plan_id=plan_id)
        )
        for event in found:
            if event.data.get("call_id") == call_id:
                return dict(event.data)
        if len(found) < 1000:
            return None
        after = found[-1].seq


async def on_answer(pe: PlanExecutor, event: Event) -> None:
    """The driver answered a call: answer the caller waiting here, if any."""
    call_id = event.data.get("call_id")
    pending = pe._calls.pop(call_id, None) if isinstance(call_id, str) else None
    if pending is None:
        return  # another node's call, or answered already
    try:
        value = await _decode(pe, pending, event.data)
    except HiveError as exc:
        pending.envelope.fail(exc)
    else:
        pending.envelope.resolve(value)


def _encode(outcome: object) -> dict[str, JsonValue]:
    match outcome:
        case ExecutionPlan():
            fields = _PlanFields(
                outcome.status, outcome.started_at, outcome.completed_at, outcome.error
            )
            return {"plan": msgspec.to_builtins(fields)}
        case bool() | int():
            return {"value": outcome}
        case IllegalTransitionError():
            error: dict[str, JsonValue] = {
                "type": "IllegalTransitionError",
                "kind": outcome.kind,
                "id": outcome.id,
                "current": outcome.current,
                "requested": outcome.requested,
            }
            return {"error": error}
        case NotFoundError():
            return {"error": {"type": "NotFoundError", "kind": outcome.kind, "id": outcome.id}}
        case HiveError():
            return {"error": {"type": "HiveError", "message": str(outcome)}}
    raise AssertionError(f"a plan call answered {outcome!r}")


async def _decode(pe: PlanExecutor, pending: Pending, data: dict[str, JsonValue]) -> object:
    error = data.get("error")
    if isinstance(error, dict):
        kind, text = error.get("type"), error.get("message")
        try:
            if kind == "IllegalTransitionError":
                raise IllegalTransitionError(
                    str(error["kind"]),
                    str(error["id"]),
                    str(error["current"]),
                    str(error["requested"]),
                )
            if kind == "NotFoundError":
                raise NotFoundError(str(error["kind"]), str(error["id"]))
        except KeyError:
            pass
        raise HiveError(f"the node driving plan {pending.plan_id!r} answered: {text or error}")
    if isinstance(pending.message, MaterializePlan | StartPlan):
        value = data.get("value")
        if isinstance(value, bool | int):
            return value
    elif "plan" in data:
        fields = msgspec.convert(data["plan"], _PlanFields)
        plan = await pe._storage.ask(FetchPlan(pending.plan_id))
        if plan is None:
            raise NotFoundError("plan", pending.plan_id)
        if fields.status in PLAN_FINAL:
            pe._cache(plan.id, fields.status)  # never changes again: safe to cache here
        return msgspec.structs.replace(
            plan,
            status=fields.status,
            started_at=fields.started_at,
            completed_at=fields.completed_at,
            error=fields.error,
        )
    raise HiveError(f"the node driving plan {pending.plan_id!r} answered {data!r}")


def fail_pending(pe: PlanExecutor, error: BaseException | None) -> None:
    """The actor stops: the calls it forwarded die with its memory of them, so their
    callers are told now rather than at their deadline (the driver may still apply them,
    as a call to a crashed actor may have been applied)."""
    failure: HiveError
    if error is None or isinstance(error, anyio.get_cancelled_exc_class()):
        failure = RuntimeStoppedError("the plan executor stopped before the driver answered")
    else:
        failure = ActorFailedError(pe.name, error)
    for pending in pe._calls.values():
        pending.envelope.fail(failure)
    pe._calls.clear()
