"""The PlanExecutor actor, one room per concern:

- :mod:`.actor`: the actor itself, its batch loop and the order it applies effects in;
- :mod:`.state`: a plan and its subtask graph in memory, and a batch's effects;
- :mod:`.progress`: how a plan reacts when a subtask ends (ready, policy, finishing);
- :mod:`.reconcile`: making memory agree with the database, after a restart or a gap;
- :mod:`.planning`: the planning queue;
- :mod:`.calls`: calls about a plan made on a node that does not drive it (several nodes);
- :mod:`.feed`: :class:`PlanFeed`, its subscription to the ends of plan tasks.
"""

from .actor import PlanExecutor
from .feed import PLAN_EVENT_TYPES, PlanFeed

__all__ = ["PLAN_EVENT_TYPES", "PlanExecutor", "PlanFeed"]
