"""The leader's duties, done by this node's actors (any store with a leader: PostgreSQL).

The store finds what dead nodes left (``storage/pg/leader.py``: :class:`~.port.DeadNodes`);
this hands it to the actors whose code already does it, by message, each write fenced by
the leader's epoch:

- the claims to the TaskManager (:class:`~hive_orchestration.messages.leader.RecoverClaims`),
  which requeues them as recovery on open does;
- the workers to the WorkerRegistry
  (:class:`~hive_orchestration.messages.workers.WorkersLost`), which declares them offline
  as a missed heartbeat does.

Each is asked and waited for before the leader looks again, so a duty is never handed out
twice at once; a failure is logged and the next look finds what is left.
"""

from __future__ import annotations

import logging

from ..errors import HiveError
from ..messages.leader import RecoverClaims
from ..messages.tasks import TaskManagerMessage
from ..messages.workers import WorkerRegistryMessage, WorkersLost
from ..runtime import ActorRef
from .port import DeadNodes, LeaderDuties

__all__ = ["leader_duties"]

log = logging.getLogger("hive_orchestration.storage")


def leader_duties(
    tasks: ActorRef[TaskManagerMessage], workers: ActorRef[WorkerRegistryMessage]
) -> LeaderDuties:
    """The :data:`~.port.LeaderDuties` of a runtime whose actors are ``tasks`` and
    ``workers``."""

    async def run(dead: DeadNodes) -> None:
        try:
            if dead.claims:
                recovered = await tasks.ask(RecoverClaims(epoch=dead.epoch, claims=dead.claims))
                log.warning(
                    "leader (epoch %d): requeued %d of %d claim(s) of dead node(s) %s",
                    dead.epoch,
                    recovered,
                    len(dead.claims),
                    ", ".join(dead.nodes),
                )
            if dead.workers:
                lost = await workers.ask(
                    WorkersLost(
                        epoch=dead.epoch, workers=dead.workers, dead_nodes=dead.worker_nodes
                    )
                )
                log.warning(
                    "leader (epoch %d): %d worker(s) of dead node(s) %s declared offline",
                    dead.epoch,
                    lost,
                    ", ".join(dead.nodes),
                )
        except HiveError as exc:
            log.warning("leader (epoch %d): a duty failed (retried): %s", dead.epoch, exc)

    return run
