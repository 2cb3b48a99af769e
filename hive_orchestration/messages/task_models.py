"""Tasks and runs as the public API shows them: a task's and a run's statuses, the
stored records, and the lease and claim a worker holds.

A *task* is a unit of work; a *run* is one execution attempt of a task by a worker.
The state machine that moves a task between statuses lives with its owner,
:mod:`hive_orchestration.actors.task_manager`.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Literal, TypeAlias

import msgspec

from ..errors import HiveError, plain_attributes, rebuild_error
from .events import JsonValue

JsonObject: TypeAlias = dict[str, JsonValue]
#: How long a task holds its idempotency key: ``"forever"`` (until the task is deleted)
#: or ``"active"`` (until it ends: completed, failed, timed out or cancelled).
IdempotencyScope: TypeAlias = Literal["forever", "active"]


class TaskStatus(enum.StrEnum):
    """Where a task stands. ``PENDING`` is the extraction plan's name for ``QUEUED``: the
    same status (``TaskStatus.PENDING is TaskStatus.QUEUED``), stored as ``"queued"``, and
    ``TaskStatus("pending")`` works too."""

    QUEUED = "queued"
    PENDING = "queued"
    #: A plan's subtask waiting for its dependencies: not handed out until its plan
    #: queues it (``plan.subtask_ready``).
    BLOCKED = "blocked"
    ASSIGNED = "assigned"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @classmethod
    def _missing_(cls, value: object) -> TaskStatus | None:
        return cls.QUEUED if value == "pending" else None


#: Statuses a task never leaves.
TERMINAL = frozenset(
    {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.TIMED_OUT}
)


class RunStatus(enum.StrEnum):
    """Where one execution attempt stands."""

    ASSIGNED = "assigned"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    LOST = "lost"
    CANCELLED = "cancelled"
    #: Handed back by its worker (shutting down) or never received by it: not an attempt.
    RELEASED = "released"


# ``gc=False`` here and on the other records each task allocates on its way (its runs,
# claims and events, and the write ops that carry them): they hold data only (scalars,
# times, JSON objects the runtime decoded from their encoding, other such records), so
# they can never be part of a reference cycle and the cycle collector need not track
# them. Tracked, they made it run a third more often, and walk them all each time
# (tests/test_untracked.py checks that no field can hold anything else).
class Task(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A task as stored. ``type`` is a read-only alias of ``task_type`` (the extraction
    plan's name for it). Timestamps are timezone-aware UTC."""

    id: str
    title: str
    task_type: str
    status: TaskStatus
    priority: int = 1
    description: str | None = None
    current_phase: str = "start"
    workflow: JsonObject | None = None
    payload: JsonObject = {}
    tags: tuple[str, ...] = ()
    max_retries: int = 3
    attempts: int = 0
    due_date: datetime | None = None
    assigned_worker: str | None = None
    result: JsonObject | None = None
    error: str | None = None
    idempotency_key: str | None = None
    #: How long the task holds its idempotency key (see docs/CONTROL.md).
    idempotency_scope: IdempotencyScope = "forever"
    correlation_id: str | None = None
    source_agent: str | None = None
    #: Seconds one run may take from its claim (its answer) before it ends as timed out.
    timeout: float | None = None
    #: Not handed out before this time (set by retry backoff; on PostgreSQL, by the
    #: database's clock, which every node reads it due by).
    available_at: datetime | None = None
    #: At most ``concurrency_limit`` tasks with the same key are assigned or running at once.
    concurrency_key: str | None = None
    concurrency_limit: int | None = None
    #: Capabilities a worker must all have to take it (otherwise: its task type).
    requires: tuple[str, ...] = ()
    #: The execution plan this task is a subtask of, and its id in that plan.
    plan_id: str | None = None
    subtask_id: str | None = None
    #: The W3C trace context of the call that created it (``traceparent``, and its
    #: ``tracestate``), when tracing was on there: a worker's run continues that trace.
    traceparent: str | None = None
    tracestate: str | None = None
    created_at: datetime
    updated_at: datetime
    #: A delayed task: not handed out before this time (docs/TIMING.md). Cleared when
    #: it comes due, so a queued task with ``run_at`` set is still waiting for it.
    run_at: datetime | None = None
    #: Never handed out after this time: a task still queued then ends ``cancelled``
    #: with the reason ``expired`` (docs/TIMING.md).
    expires_at: datetime | None = None

    @property
    def type(self) -> str:
        """The task's type (alias of :attr:`task_type`)."""
        return self.task_type


class Run(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One execution attempt of a task by a worker."""

    id: str
    task_id: str
    worker_id: str | None = None
    run_number: int = 1
    status: RunStatus = RunStatus.RUNNING
    phase: str | None = None
    result: JsonObject | None = None
    error: str | None = None
    output_log: str | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    #: For a claimed run: the lease length, and when it expires unless renewed.
    lease_seconds: float | None = None
    lease_expires_at: datetime | None = None
    #: The last progress its worker reported.
    progress: JsonObject | None = None

    @property
    def attempt(self) -> int:
        """The run's number among its task's runs (alias of :attr:`run_number`)."""
        return self.run_number


class Lease(msgspec.Struct, frozen=True, gc=False):
    """The fencing token of a claim: which run of which task a worker holds, and the
    secret that proves the worker is the one that claimed it.

    Every call a worker makes about its task carries it; once the claim is over (lease
    expired, task cancelled, or handed to another run), the token is refused with
    :class:`~hive_orchestration.errors.LeaseLostError`. So is a token whose ``secret`` is
    not its claim's: the ids and the attempt are in every read of the runs, but the secret
    is handed out once, in the claim's answer, and never shown again (the runtime keeps
    only its hash). Pass the lease as it came; one rebuilt from ids is refused.
    """

    task_id: str
    run_id: str
    attempt: int
    #: Empty in a lease built by hand: refused like a wrong one.
    secret: str = ""

    def __repr__(self) -> str:
        # Not in logs or tracebacks: whoever reads them could act for the worker.
        return (
            f"Lease(task_id={self.task_id!r}, run_id={self.run_id!r},"
            f" attempt={self.attempt!r}, secret=<hidden>)"
        )

    def __rich_repr__(self) -> list[tuple[str, object]]:
        return [
            ("task_id", self.task_id),
            ("run_id", self.run_id),
            ("attempt", self.attempt),
            ("secret", "<hidden>"),
        ]


class Claim(msgspec.Struct, frozen=True, gc=False):
    """What a claim hands a worker: the task, its lease token and when the lease expires
    unless the worker heartbeats."""

    task: Task
    lease: Lease
    expires_at: datetime


#: A plain attribute of an error, as it travels.
Scalar: TypeAlias = str | int | float | bool | None


class Refusal(msgspec.Struct, frozen=True):
    """Why one item of a batch call (``complete_tasks``, ``fail_tasks``) changed nothing:
    the error the same call for that item alone would raise, as values, so that it
    travels to another process as it is.

    ``error`` is its class's name in :mod:`hive_orchestration.errors` (``LeaseLostError``
    for a lease that no longer holds its task: expired, already completed, wrong run or
    secret), ``field`` the item's argument it is about (``items[3].lease``), ``message``
    its text and ``attributes`` its fields (a ``LeaseLostError``'s ``task_id``,
    ``run_id``, ``attempt``, ``status`` and ``reason``). :meth:`exception` makes the
    error itself."""

    error: str
    field: str
    message: str
    attributes: dict[str, Scalar] = {}

    @classmethod
    def of(cls, error: HiveError, field: str) -> Refusal:
        return cls(type(error).__name__, field, str(error), plain_attributes(error))

    def exception(self) -> HiveError:
        """The package's error this refusal describes: of its class, with its fields."""
        return rebuild_error(self.error, self.message, self.attributes)


class TaskOutcome(msgspec.Struct, frozen=True, omit_defaults=True):
    """One item's outcome in a batch call (``complete_tasks``, ``fail_tasks``): ``task``,
    the task as the item left it (committed), or ``refused``, why this item changed
    nothing. :meth:`result` gives the task or raises the item's error, as the call for
    that item alone would have."""

    task: Task | None = None
    refused: Refusal | None = None

    def result(self) -> Task:
        """The task, or the item's error raised (``LeaseLostError``, say)."""
        if self.refused is not None:
            raise self.refused.exception()
        if self.task is None:  # never from this package: a peer's that is not one of ours
            raise HiveError("this outcome holds neither a task nor a refusal")
        return self.task
