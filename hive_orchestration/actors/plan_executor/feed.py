"""The PlanExecutor's event feed: :class:`PlanFeed`, the supervisor service that keeps
its subscription to the ends of plan tasks and resyncs it after a gap.

Separate from the actor: it runs as its own service, beside the actor, and speaks to
it only by messages (:class:`Resync`, :class:`PlanTaskEvents`).
"""

from __future__ import annotations

import logging

import anyio

from ...errors import HiveError, RuntimeStoppedError
from ...messages.events import BroadcastMessage, Event, EventFeed, Lagged, Subscribe
from ...messages.plans import (
    PlanExecutorMessage,
    PlanTaskEvents,
    Resync,
    RetryCalls,
)
from ...messages.tasks import PLAN_TASK_ENDINGS
from ...runtime import ActorRef
from .calls import PLAN_CALL, PLAN_CALL_ANSWERED

log = logging.getLogger("hive_orchestration.plans")

#: The task events the feed subscribes to: those that end a subtask, and retries (a task
#: of a stopped plan that goes back to the queue is cancelled); and the calls about a plan
#: made on a node that does not drive it, with their answers (calls.py).
PLAN_EVENT_TYPES = ("task.retrying", *sorted(PLAN_TASK_ENDINGS), PLAN_CALL, PLAN_CALL_ANSWERED)

#: How often the executor is told to re-send the forwarded calls still unanswered.
_RETRY_EVERY = 1.0


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
                    "*",
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
            ticked = anyio.current_time()
            while True:
                item: object = None
                with anyio.move_on_after(_RETRY_EVERY):
                    try:
                        item = await receive.receive()
                    except (anyio.EndOfStream, anyio.ClosedResourceError):
                        return False  # closed without a Lagged marker: the runtime stopped
                if anyio.current_time() - ticked >= _RETRY_EVERY:
                    # Each second: re-send the forwarded calls still unanswered (nothing
                    # to do on one node; dropped if the executor's mailbox is full).
                    ticked = anyio.current_time()
                    self._plans.try_tell(RetryCalls())
                if item is None:
                    continue
                if isinstance(item, Lagged):
                    return True
                assert isinstance(item, Event)
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
