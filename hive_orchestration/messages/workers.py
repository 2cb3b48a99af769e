"""Workers: the public model, and the messages the WorkerRegistry answers."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import TypeAlias

import msgspec

from ..runtime import Request
from .tasks import JsonObject

__all__ = [
    "GetActiveWorkers",
    "GetWorker",
    "GetWorkers",
    "RegisterWorker",
    "RegistryWake",
    "UnregisterWorker",
    "Worker",
    "WorkerHeartbeat",
    "WorkerRegistryMessage",
    "WorkerStatus",
    "WorkersLost",
    "WorkersRecheck",
    "WorkersSeen",
]


class WorkerStatus(enum.StrEnum):
    """Where a worker stands. Every status but ``OFFLINE`` is alive: it heartbeats."""

    ACTIVE = "active"
    IDLE = "idle"
    BUSY = "busy"
    OFFLINE = "offline"


class Worker(msgspec.Struct, frozen=True, kw_only=True):
    """A registered worker. ``incarnation`` changes each time it registers: a worker that
    restarts under the same id is a new incarnation and does not inherit the old one's
    claims. Timestamps are timezone-aware UTC."""

    id: str
    role: str
    status: WorkerStatus = WorkerStatus.ACTIVE
    capabilities: tuple[str, ...] = ()
    metadata: JsonObject = {}
    current_task_id: str | None = None
    incarnation: str
    last_heartbeat: datetime
    registered_at: datetime

    @property
    def worker_id(self) -> str:
        """The worker's id (alias of :attr:`id`)."""
        return self.id


class RegisterWorker(Request[Worker], frozen=True, kw_only=True):
    """Register (or register again: a new incarnation, same id) a worker."""

    worker_id: str
    role: str
    capabilities: tuple[str, ...]
    metadata: JsonObject


class GetWorker(Request["Worker | None"], frozen=True):
    worker_id: str


class GetActiveWorkers(Request[list[Worker]], frozen=True):
    """Live workers (not offline), of one role or all, newest heartbeat first."""

    role: str | None = None


class GetWorkers(Request[list[Worker]], frozen=True):
    """Every registered worker of ``status`` (all if None), offline ones too, newest
    heartbeat first."""

    status: WorkerStatus | None = None


class WorkerHeartbeat(Request[bool], frozen=True, kw_only=True):
    """The worker is alive (optionally: now in ``status``). False for an unknown worker."""

    worker_id: str
    status: WorkerStatus | None = None


class UnregisterWorker(Request[bool], frozen=True):
    """Remove the worker; what it held goes back to the queue. False if unknown."""

    worker_id: str


class WorkersSeen(msgspec.Struct, frozen=True):
    """Told by the TaskManager: these workers just claimed, heartbeat a lease, started,
    completed, failed or released a task. Working is a sign of life, as a heartbeat is."""

    worker_ids: tuple[str, ...]


class WorkersLost(Request[int], frozen=True, kw_only=True):
    """To the WorkerRegistry of the leader of several nodes (``messages/leader.py``):
    these workers were watched by a node that died, so no one hears their heartbeats:
    declare each offline as a missed heartbeat does (``worker.offline``), in one write
    fenced by ``epoch`` and by each row still naming its dead node (``dead_nodes[i]``
    for ``workers[i]``: a worker that meanwhile came back on a live node is left alone).
    Answers how many were declared offline."""

    epoch: int
    workers: tuple[Worker, ...]
    dead_nodes: tuple[str, ...]


class WorkersRecheck(msgspec.Struct, frozen=True):
    """To the WorkerRegistry of a node of a shared store that did not act for ``seconds``
    (its process stopped, its event loop blocked): meanwhile the leader may have taken the
    node for stuck and declared its workers offline (``WorkersLost``). Those whose rows
    say offline are offline here too, written and logged by the leader already (nothing
    is written or logged twice), and what they held is released; a worker that calls
    again is live again, as after any missed heartbeat."""

    seconds: float


class RegistryWake(msgspec.Struct, frozen=True):
    """The registry's alarm: some worker's heartbeat deadline is due."""


WorkerRegistryMessage: TypeAlias = (
    RegisterWorker
    | GetWorker
    | GetActiveWorkers
    | GetWorkers
    | WorkerHeartbeat
    | UnregisterWorker
    | WorkersSeen
    | RegistryWake
    | WorkersLost
    | WorkersRecheck
)
