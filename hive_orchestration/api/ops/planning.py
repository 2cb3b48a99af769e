"""The planning queue of the seeds, as messages to the PlanExecutor (and, for reads
that need no owner, to the storage actor): a request for a plan waits there for a
planner agent, which takes it, and answers it with a plan or fails it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import anyio

from ..._validate import (
    check_choice,
    check_delay,
    check_identifier,
    check_int,
    check_optional_text,
    check_str,
    encode_json_object,
)
from ...listing import check_after, check_limit
from ...messages.plans import (
    CancelPlanningRequest,
    ClaimPlanningRequest,
    PlanningRequest,
    PlanningStatus,
    QueuePlanningRequest,
)
from ...messages.storage import (
    FetchPlanningRequest,
    QueryPlanningRequests,
)
from .plan_base import PlanCalls

if TYPE_CHECKING:
    pass

__all__ = ["PlanningOps"]

_MAX_PRIORITY = 2**31 - 1


class PlanningOps(PlanCalls):
    """Mixed into :class:`Runtime` (see :class:`PlanCalls`)."""

    async def queue_planning_request(
        self,
        task_description: str,
        *,
        priority: int = 50,
        requestor: str | None = None,
        context_data: Mapping[str, object] | None = None,
        complexity_estimate: str | None = None,
    ) -> PlanningRequest:
        """Ask for a plan ("Deploy to production"): queued for a planner agent, which
        takes it with :meth:`claim_planning_request`. Publishes ``planning.requested``."""
        self._check_open()
        context = None
        if context_data is not None:
            context, _ = encode_json_object(
                context_data,
                "context_data",
                max_bytes=self._config.max_payload_bytes,
                max_depth=self._config.max_payload_depth,
            )
        message = QueuePlanningRequest(
            task_description=check_str(task_description, "task_description", empty=False),
            priority=check_int(priority, "priority", minimum=0, maximum=_MAX_PRIORITY),
            requestor=check_optional_text(self._agent(requestor), "requestor"),
            context_data=context,
            complexity_estimate=check_optional_text(complexity_estimate, "complexity_estimate"),
        )
        return await self._plans.ask(message)

    async def claim_planning_request(
        self, agent_id: str, *, wait: float = 0.0
    ) -> PlanningRequest | None:
        """Take the best pending planning request (priority, then age) for ``agent_id``.

        With ``wait``, a planner with nothing to do waits up to that many seconds for a
        request, woken by ``planning.requested`` events rather than polling. ``None`` if
        none came.
        """
        self._check_open()
        agent_id = check_identifier(agent_id, "agent_id")
        wait = check_delay(wait, "wait")
        claim = ClaimPlanningRequest(agent_id=agent_id)
        if wait == 0:
            return await self._plans.ask(claim)
        with anyio.move_on_after(wait):
            # Subscribe before the first try, so a request queued in between wakes us.
            async with self.subscribe("planning.requested", buffer=1, overflow="drop") as new:
                while True:
                    request = await self._plans.ask(claim)
                    if request is not None:
                        return request
                    await new.receive()
        return None

    async def get_planning_request(self, request_id: str) -> PlanningRequest | None:
        self._check_open()
        return await self._storage.ask(
            FetchPlanningRequest(check_identifier(request_id, "request_id"))
        )

    async def get_planning_queue(
        self,
        status: PlanningStatus | str | None = PlanningStatus.PENDING,
        *,
        limit: int = 100,
        after: str | None = None,
    ) -> list[PlanningRequest]:
        """Planning requests in ``status`` (all if None), by priority, then age, then id:
        at most ``limit`` (at most 10 000), from just after the request ``after`` (the
        last of the previous page; see :mod:`hive_orchestration.listing`)."""
        self._check_open()
        checked = None if status is None else check_choice(status, PlanningStatus, "status")
        return await self._storage.ask(
            QueryPlanningRequests(
                status=None if checked is None else checked.value,
                limit=check_limit(limit),
                after=check_after(after),
            )
        )

    async def cancel_planning_request(
        self, request_id: str, reason: str | None = None
    ) -> PlanningRequest:
        """Withdraw a pending or assigned request (``planning.cancelled``)."""
        self._check_open()
        return await self._plans.ask(
            CancelPlanningRequest(
                request_id=check_identifier(request_id, "request_id"),
                reason=None if reason is None else check_str(reason, "reason"),
            )
        )

    async def fail_planning_request(self, request_id: str, error: str) -> PlanningRequest:
        """A planner could not plan it (``planning.failed``, with ``error``)."""
        self._check_open()
        return await self._plans.ask(
            CancelPlanningRequest(
                request_id=check_identifier(request_id, "request_id"),
                reason=check_str(error, "error", empty=False),
                failed=True,
            )
        )
