"""What the leader of the nodes of one database tells the other actors of its node.

Several runtimes (nodes) may share a PostgreSQL database; one of them at a time is the
*leader* (``storage/pg/leader.py``): it holds an advisory lock and an *epoch*, a number
bumped each time the role changes hands. The duties a dead node leaves behind are the
leader's: its claims go back to the queue (:class:`RecoverClaims`, to the TaskManager)
and its workers are declared lost (``WorkersLost``, to the WorkerRegistry). Each duty's
write is fenced by the epoch (``FenceLeader``): a leader that lost its role and has not
noticed yet changes nothing.
"""

from __future__ import annotations

import msgspec

from ..runtime import Request

__all__ = ["DeadClaim", "Leading", "RecoverClaims"]


class DeadClaim(msgspec.Struct, frozen=True):
    """A claimed task whose node is dead (or whose lease expired by the database's
    clock), and the version the leader read it at: it is recovered only if it has not
    changed since (nothing else touched it)."""

    task_id: str
    version: int
    node_id: str


class Leading(msgspec.Struct, frozen=True):
    """To the Scheduler, at each of the leader's polls: whether this node leads now
    (``epoch``, else None). On a database several nodes share, schedules fire on the
    leader only (else each node fires each slot: a slot's key is free again once its
    task ended), which reads them back as it takes the role, and every second while it
    holds it (a schedule made or changed on another node is learnt so)."""

    epoch: int | None


class RecoverClaims(Request[int], frozen=True, kw_only=True):
    """To the TaskManager of the leader: put these claims of dead nodes back in the queue
    as recovery on open does (their open runs end lost, ``task.retrying`` or the dead
    letter by the retry policy), in one write fenced by ``epoch``. Answers how many were
    recovered (0: all changed since, or the epoch is no longer the leader's).

    ``lease_expired``: the claims are instead of live nodes, whose leases passed their
    deadline by the database's clock while their node did not act (its event loop stuck,
    its process stopped): each is ended as its owner's lease expiry would (its run lost,
    reason ``lease_expired``, ``task.retrying`` or the dead letter by the retry policy)."""

    epoch: int
    claims: tuple[DeadClaim, ...]
    lease_expired: bool = False
