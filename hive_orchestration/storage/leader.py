"""The leader's duties, done by this node's actors (any store with a leader: PostgreSQL).

The store finds what dead nodes left (``storage/pg/leader.py``: :class:`~.port.DeadNodes`);
this hands it to the actors whose code already does it, by message, each write fenced by
the leader's epoch:

- the claims to the TaskManager (:class:`~hive_orchestration.messages.leader.RecoverClaims`),
  which requeues them as recovery on open does; and the claims of live nodes whose lease
  expired by the database's clock (``lease_expired``), which it ends as their owner's
  lease expiry would;
- the workers to the WorkerRegistry
  (:class:`~hive_orchestration.messages.workers.WorkersLost`), which declares them offline
  as a missed heartbeat does;
- the plans to the PlanExecutor (:class:`~hive_orchestration.messages.plans.AdoptPlans`),
  which takes (by a conditional update) and reconciles the executing plans of no live node;
- and at each poll, whether this node leads, to the Scheduler
  (:class:`~hive_orchestration.messages.leader.Leading`): slots fire on the leader only.

Each duty is asked and waited for before the leader looks again, so it is never handed
out twice at once; a failure is logged and the next look finds what is left.
"""

from __future__ import annotations

import logging
from contextlib import suppress

from ..errors import HiveError, RuntimeStoppedError
from ..messages.leader import Leading, RecoverClaims
from ..messages.plans import AdoptPlans, PlanExecutorMessage
from ..messages.schedules import SchedulerMessage
from ..messages.tasks import TaskManagerMessage
from ..messages.workers import WorkerRegistryMessage, WorkersLost, WorkersRecheck
from ..runtime import ActorRef
from .port import DeadNodes

__all__ = ["ActorDuties"]

log = logging.getLogger("hive_orchestration.storage")


class ActorDuties:
    """The :class:`~.port.LeaderDuties` of a runtime whose actors are ``tasks``,
    ``workers``, ``schedules`` and ``plans``."""

    def __init__(
        self,
        tasks: ActorRef[TaskManagerMessage],
        workers: ActorRef[WorkerRegistryMessage],
        schedules: ActorRef[SchedulerMessage],
        plans: ActorRef[PlanExecutorMessage],
    ) -> None:
        self._tasks = tasks
        self._workers = workers
        self._schedules = schedules
        self._plans = plans

    async def leading(self, epoch: int | None) -> None:
        # A full mailbox: the next poll tells it again.
        with suppress(RuntimeStoppedError):
            self._schedules.try_tell(Leading(epoch))

    async def woke(self, seconds: float) -> None:
        # A full mailbox: no recheck (never wait here: the node polls on). A worker the
        # leader declared offline that this node's registry still holds as live is then
        # found so when its deadline comes up here (the registry reads its row first), or
        # its row is made live again by its next heartbeat.
        with suppress(RuntimeStoppedError):
            if not self._workers.try_tell(WorkersRecheck(seconds)):
                log.debug("worker registry busy: no recheck after a %.1fs stall", seconds)

    async def dead(self, found: DeadNodes) -> None:
        try:
            if found.claims:
                duty = RecoverClaims(epoch=found.epoch, claims=found.claims)
                recovered = await self._tasks.ask(duty)
                log.warning(
                    "leader (epoch %d): requeued %d of %d claim(s) of dead node(s) %s",
                    found.epoch,
                    recovered,
                    len(found.claims),
                    ", ".join(found.nodes),
                )
            if found.expired:
                duty = RecoverClaims(epoch=found.epoch, claims=found.expired, lease_expired=True)
                reaped = await self._tasks.ask(duty)
                log.warning(
                    "leader (epoch %d): requeued %d of %d claim(s) whose lease expired by the"
                    " database's clock on live node(s) %s",
                    found.epoch,
                    reaped,
                    len(found.expired),
                    ", ".join(sorted({claim.node_id for claim in found.expired})),
                )
            if found.workers:
                lost = await self._workers.ask(
                    WorkersLost(
                        epoch=found.epoch, workers=found.workers, dead_nodes=found.worker_nodes
                    )
                )
                log.warning(
                    "leader (epoch %d): %d worker(s) of dead or stuck node(s) %s declared offline",
                    found.epoch,
                    lost,
                    ", ".join(sorted({*found.nodes, *found.stuck})),
                )
            if found.plans:
                # Not fenced by the epoch: a take is a conditional update of a dead
                # node's plan, right whoever makes it (two nodes take a plan once).
                adopted = await self._plans.ask(AdoptPlans())
                log.warning(
                    "leader (epoch %d): took %d of %d plan(s) of dead node(s) %s",
                    found.epoch,
                    adopted,
                    found.plans,
                    ", ".join(found.nodes),
                )
        except HiveError as exc:
            log.warning("leader (epoch %d): a duty failed (retried): %s", found.epoch, exc)
