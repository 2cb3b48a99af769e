"""What a store shared by several runtimes (nodes) brings beside its driver (PostgreSQL):
the log feed that publishes every node's events, and this node's part in electing one
leader and doing what dead nodes leave behind. Part of the storage port
(:mod:`.port` re-exports every name); nothing here imports a database library."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..messages.events import Publish
from ..messages.leader import DeadClaim
from ..messages.workers import Worker

__all__ = ["DeadNodes", "LeaderDuties", "Leadership", "LogFeed"]


class LogFeed(Protocol):
    """What feeds the broadcast actor where several runtimes write one log (PostgreSQL):
    a log tailer beside the storage actor, running for the runtime's whole life (across
    restarts of the storage actor) as a supervisor service.

    Each node publishes every committed event, its own and the other nodes', once and in
    seq order: its own commits from memory when they are next, the others' read from the
    log when a wake-up (or a slow safety poll) says there are some.
    """

    #: Names this runtime in its wake-ups (it skips its own: it was told directly).
    origin: str

    def begin(self, last_seq: int) -> None:
        """Publish what commits after ``last_seq`` (the log's end as the storage actor
        first opened); later calls (a restarted actor) change nothing."""

    async def committed(self, message: Publish) -> None:
        """One commit of this runtime's, its events numbered: published before it
        returns when it is next in the log (so before the writers are answered, as where
        the storage actor publishes itself), else queued for the feed (waiting while the
        queue is full)."""

    async def drain(self) -> None:
        """Wait until everything :meth:`committed` was given is published."""

    async def run(self) -> None:
        """Follow the log until cancelled (then stop its threads and connections)."""


@dataclass(frozen=True, slots=True)
class DeadNodes:
    """What the leader found left behind by dead nodes, to be done under ``epoch``: their
    claims (:class:`~hive_orchestration.messages.leader.RecoverClaims`), their workers
    still marked live, each with the dead node that watched it
    (:class:`~hive_orchestration.messages.workers.WorkersLost`), and the dead nodes' ids
    (for the log), and how many executing plans they drove (to be adopted:
    :class:`~hive_orchestration.messages.plans.AdoptPlans`); and the claims of live nodes
    whose leases expired by the database's clock (``expired``). ``stuck``: the live
    nodes that stopped acting (for the log); ``workers`` holds their live workers too."""

    epoch: int
    nodes: tuple[str, ...]
    claims: tuple[DeadClaim, ...] = ()
    workers: tuple[Worker, ...] = ()
    worker_nodes: tuple[str, ...] = ()
    plans: int = 0
    #: Claims of live nodes whose lease passed its deadline by the database's clock
    #: (:class:`~hive_orchestration.messages.leader.RecoverClaims`, ``lease_expired``).
    expired: tuple[DeadClaim, ...] = ()
    #: Live nodes that have not polled for the worker liveness bound: their workers are
    #: in ``workers`` (declared offline), their claims left to their leases.
    stuck: tuple[str, ...] = ()


class LeaderDuties(Protocol):
    """What a node's actors do as its :class:`Leadership` finds (``storage/leader.py``)."""

    async def leading(self, epoch: int | None) -> None:
        """At each poll: the node's term as leader (None: it does not lead). Never waits
        on a busy actor."""
        ...

    async def dead(self, found: DeadNodes) -> None:
        """Do ``found``'s duties; returns once they are done (or failed: the leader
        looks again at its next poll)."""
        ...

    async def woke(self, seconds: float) -> None:
        """This node did not poll for ``seconds`` (its process stopped, its event loop
        blocked): the leader may have taken it for stuck meanwhile and declared its
        workers offline. Never waits on a busy actor."""
        ...


class Leadership(Protocol):
    """Where several runtimes (nodes) share one database (PostgreSQL): this node's part
    in electing one leader at a time, and the leader's duties. A supervisor service, for
    the runtime's whole life; it never fails the runtime (a database fault only ends the
    node's turn as leader, until it wins the role again)."""

    @property
    def epoch(self) -> int | None:
        """The epoch of this node's term as leader (None: it is not the leader)."""
        ...

    async def run(self) -> None:
        """Contend for the role, and do its duties while it is held, until cancelled
        (then let the role go, and close its connection)."""
        ...

    async def polled(self) -> None:
        """Returns once the node has tried for the role once and told its actors the
        outcome (``Runtime.open`` waits for it: a node alone on its database leads, and
        fires its schedules, from the moment it is open)."""
        ...
