"""The planning queue: requests for a plan, waiting for a planner agent to claim them.

Pending requests are held in a heap, best first (priority, then age, then arrival);
assigned ones are held until planned, cancelled or failed. The planning queue publishes
``planning.requested``, ``planning.assigned``, ``planning.planned``, ``planning.failed``
and ``planning.cancelled``, with the request id as correlation id.

Separate from the plans themselves: a request only meets a plan when the plan that
answers it is created (:mod:`.actor`).

On a store several nodes share (PostgreSQL), the database is the queue: a request queued
on one node is claimed, cancelled or planned on any other, so this node's memory of the
queue would be stale. There, each change of a request is decided on its row as read and
written at once, fenced by what was read (:class:`FencePlanningRequest`): another node's
change since fails the write, and the change is decided again on the row as it is now.
A claim reads the pending requests best first and takes the first no other node took.
"""

from __future__ import annotations

import heapq
from datetime import datetime
from typing import TYPE_CHECKING

import msgspec

from ..._ids import new_id
from ...errors import IllegalTransitionError, NotFoundError, StorageError
from ...messages.events import Event, JsonValue
from ...messages.plans import PlanningRequest, PlanningStatus, QueuePlanningRequest
from ...messages.storage import (
    AppendEvent,
    FencePlanningRequest,
    FetchPlanningRequest,
    LoadPlanningRequests,
    PutPlanningRequest,
    Write,
    WriteOp,
)
from .state import _REQUEST_OPEN, _Work

if TYPE_CHECKING:
    from .actor import PlanExecutor


#: How many times a change of a request is decided again after other nodes changed it.
ATTEMPTS = 16
#: How many of the best pending requests a claim on a shared store reads at a time: a
#: queue of any length costs a claim one short read, not the whole table.
_PAGE = 32

# Writes are waited for without a deadline, as the TaskManager waits for its commits.
_NO_DEADLINE = float("inf")


def _fence(request: PlanningRequest) -> FencePlanningRequest:
    return FencePlanningRequest(request.id, request.status.value, request.assigned_agent or "")


async def write_fenced(pe: PlanExecutor, read: PlanningRequest, ops: list[WriteOp]) -> bool:
    """On a shared store: write ``ops`` at once if ``read`` is still the request's row;
    False if another node changed the request since (nothing written)."""
    try:
        await pe._storage.ask(Write((_fence(read), *ops)), timeout=_NO_DEADLINE)
    except StorageError:
        now = await pe._storage.ask(FetchPlanningRequest(read.id))
        if now is not None and _fence(now) == _fence(read):
            raise  # the fence held: the write failed for a reason of its own
        return False
    return True


def remember_request(pe: PlanExecutor, request: PlanningRequest) -> None:
    if pe._shared:
        return  # the database is the queue (module docstring)
    pe._requests[request.id] = request
    if request.status is PlanningStatus.PENDING:
        pe._arrivals += 1
        entry = (-request.priority, request.created_at, pe._arrivals, request.id)
        heapq.heappush(pe._pending, entry)


async def find_request(pe: PlanExecutor, request_id: str) -> PlanningRequest:
    request = None if pe._shared else pe._requests.get(request_id)
    if request is None:
        request = await pe._storage.ask(FetchPlanningRequest(request_id))
        if request is None:
            raise NotFoundError("planning request", request_id)
    return request


def request_changed(
    pe: PlanExecutor,
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


async def release_unclaimed(
    pe: PlanExecutor, lost: PlanningRequest, work: _Work, now: datetime
) -> None:
    """Its planner stopped waiting before it received the request: nobody holds it."""
    data: dict[str, JsonValue] = {"reason": "the planner stopped waiting"}
    if pe._shared:
        back = msgspec.structs.replace(
            lost, status=PlanningStatus.PENDING, assigned_agent=None, assigned_at=None
        )
        own = _Work()
        request_changed(pe, back, "planning.released", data, own, now)
        await write_fenced(pe, lost, own.ops)  # False: it moved on since, not ours to release
        return
    current = pe._requests.get(lost.id)
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
    remember_request(pe, back)
    request_changed(pe, back, "planning.released", data, work, now)


def queue_request(
    pe: PlanExecutor, message: QueuePlanningRequest, work: _Work, now: datetime
) -> PlanningRequest:
    """A new request joins the queue (``planning.requested``)."""
    request = PlanningRequest(
        id=new_id(),
        task_description=message.task_description,
        priority=message.priority,
        requestor=message.requestor,
        context_data=message.context_data,
        complexity_estimate=message.complexity_estimate,
        created_at=now,
    )
    remember_request(pe, request)
    data: dict[str, JsonValue] = {
        "task_description": request.task_description,
        "priority": request.priority,
    }
    request_changed(pe, request, "planning.requested", data, work, now)
    return request


async def claim_request(
    pe: PlanExecutor, agent_id: str, work: _Work, now: datetime
) -> PlanningRequest | None:
    """Hand the best pending request to ``agent_id`` (``planning.assigned``), if any."""
    if pe._shared:
        return await _claim_shared(pe, agent_id, now)
    while pe._pending:
        *_, request_id = heapq.heappop(pe._pending)
        waiting = pe._requests.get(request_id)
        if waiting is None or waiting.status is not PlanningStatus.PENDING:
            continue
        claimed = msgspec.structs.replace(
            waiting,
            status=PlanningStatus.ASSIGNED,
            assigned_agent=agent_id,
            assigned_at=now,
        )
        pe._requests[request_id] = claimed
        data: dict[str, JsonValue] = {"agent_id": agent_id}
        request_changed(pe, claimed, "planning.assigned", data, work, now, source=agent_id)
        return claimed
    return None


async def _claim_shared(pe: PlanExecutor, agent_id: str, now: datetime) -> PlanningRequest | None:
    """The best pending request no other node took first, read from the database."""
    data: dict[str, JsonValue] = {"agent_id": agent_id}
    for _ in range(ATTEMPTS):
        pending = await pe._storage.ask(
            LoadPlanningRequests((PlanningStatus.PENDING.value,), limit=_PAGE)
        )
        if not pending:
            return None
        for waiting in pending:  # best first: priority, then age
            claimed = msgspec.structs.replace(
                waiting, status=PlanningStatus.ASSIGNED, assigned_agent=agent_id, assigned_at=now
            )
            own = _Work()
            request_changed(pe, claimed, "planning.assigned", data, own, now, source=agent_id)
            if await write_fenced(pe, waiting, own.ops):
                return claimed
        # Other nodes took every one read: read again (they may have queued more).
    return None


async def cancel_request(
    pe: PlanExecutor,
    request_id: str,
    reason: str | None,
    failed: bool,
    work: _Work,
    now: datetime,
) -> PlanningRequest:
    """An open request ends unplanned: cancelled, or failed by its planner."""
    target = PlanningStatus.FAILED if failed else PlanningStatus.CANCELLED
    data: dict[str, JsonValue] = {"reason": reason}
    for _ in range(ATTEMPTS):
        request = await find_request(pe, request_id)
        if request.status.value not in _REQUEST_OPEN:
            raise IllegalTransitionError(
                "planning request", request_id, request.status.value, target.value
            )
        ended = msgspec.structs.replace(request, status=target, completed_at=now, error=reason)
        if not pe._shared:
            pe._requests.pop(request_id, None)
            request_changed(pe, ended, f"planning.{target.value}", data, work, now)
            return ended
        own = _Work()
        request_changed(pe, ended, f"planning.{target.value}", data, own, now)
        if await write_fenced(pe, request, own.ops):
            return ended
    raise StorageError(
        f"planning request {request_id!r} kept changing on other nodes; nothing was changed"
    )
