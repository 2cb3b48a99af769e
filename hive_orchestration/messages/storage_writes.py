"""What a :class:`Write` applies, in one group commit: its ops (rows of tasks, runs,
workers, plans, control, retention and schedules, and the events appended), and its reply.
A reply to a :class:`Write` means durable."""

from __future__ import annotations

from datetime import datetime
from typing import TypeAlias

import msgspec

from ..runtime import Reply, Request
from .events import Event
from .plans import ExecutionPlan, PlanningRequest, PlanStatus, SubtaskState
from .schedules import Schedule
from .storage_reads import LockedHeads, QueueHead
from .tasks import RevokedTaskType, Run, Task
from .workers import Worker


# The ops of the task path hold data only, so they are untracked by the cycle collector
# (``gc=False``: see messages/task_models.py).
class AppendEvent(msgspec.Struct, frozen=True, gc=False, tag="append_event"):
    """Append ``event`` to the log; ``data_json`` is its ``data``, encoded at the boundary.

    The storage actor assigns the sequence number and, once committed, publishes the event.
    """

    event: Event
    data_json: bytes


class PutTask(msgspec.Struct, frozen=True, gc=False, tag="put_task"):
    """Insert the task, or replace every column of its row: the owner sends whole state."""

    task: Task


class DeleteTaskRow(msgspec.Struct, frozen=True, tag="delete_task"):
    """Delete a task; its runs go with it (ON DELETE CASCADE)."""

    task_id: str


class FenceTask(msgspec.Struct, frozen=True, tag="fence_task"):
    """Bump the task's ``version`` if it is still ``version``; else the whole write fails
    (a conflict: another node changed the task since the writer read it). Sent, on a store
    shared by several nodes (:class:`StoreFences`), for each existing task a write changes
    (or changes a run of), before the write's other statements."""

    task_id: str
    version: int
    #: A claim of a task with a concurrency key: it also fails unless fewer than ``room``
    #: other tasks of ``key`` are claimed (on any node), counted under a lock on the key
    #: held to the commit, so that nodes claiming the key's tasks at once take turns.
    key: str | None = None
    room: int = 0


class FenceLeader(msgspec.Struct, frozen=True, tag="fence_leader"):
    """The write is a duty of the leader of several nodes (``messages/leader.py``): it
    fails whole unless ``epoch`` is still the leader's epoch (PostgreSQL's ``hive_leader``
    row), so that a leader that lost its role and has not noticed changes nothing. The
    row stays locked to the commit: a new leader's bump of the epoch waits for it."""

    epoch: int


class LeaseClock(msgspec.Struct, frozen=True, tag="lease_clock"):
    """The wall time ``at`` the write's leases were set from (a claim's or a heartbeat's
    ``lease_expires_at`` is ``at`` plus its span). On a store several nodes share
    (PostgreSQL, schema version 18) the database keeps each lease's deadline by its own
    clock, its now plus that span, which the leader reaps by; sent first in each write of
    the TaskManager there (never to a store of one owner)."""

    at: datetime


class FenceWorker(msgspec.Struct, frozen=True, tag="fence_worker"):
    """The write fails whole unless the worker's row is still watched by ``node_id``
    (a dead node's worker that came back on a live node is that node's again)."""

    worker_id: str
    node_id: str


class FencePlanningRequest(msgspec.Struct, frozen=True, tag="fence_planning_request"):
    """The write fails whole unless the planning request is still ``status``, held by
    ``agent`` ("" for none): on a store several nodes share, each change of a request is
    decided on the row as read, and another node's change since is a conflict."""

    request_id: str
    status: str
    agent: str = ""


class SetTaskState(msgspec.Struct, frozen=True, gc=False, tag="set_task_state"):
    """Write the state columns of a task already written (its status and what moves with
    it); the columns fixed at creation are left alone. The row must exist: a missing one
    fails the write."""

    task: Task


class PutRun(msgspec.Struct, frozen=True, gc=False, tag="put_run"):
    """Insert the run, or replace every column of its row."""

    run: Run
    #: The hash of its lease's secret, for a run a claim opens (kept off :class:`Run`,
    #: which every read returns).
    lease_hash: bytes | None = None


class SetRunState(msgspec.Struct, frozen=True, gc=False, tag="set_run_state"):
    """Write the state columns of a run already written. The row must exist."""

    run: Run


class PutWorker(msgspec.Struct, frozen=True, tag="put_worker"):
    """Insert the worker, or replace every column of its row."""

    worker: Worker


class DeleteWorkerRow(msgspec.Struct, frozen=True, tag="delete_worker"):
    worker_id: str


class PutPlanningRequest(msgspec.Struct, frozen=True, tag="put_planning_request"):
    request: PlanningRequest


class PutPlan(msgspec.Struct, frozen=True, tag="put_plan"):
    """Insert a new plan; ``plan_data_json`` is its plan data, encoded at the boundary."""

    plan: ExecutionPlan
    plan_data_json: bytes


class SetPlanStatus(msgspec.Struct, frozen=True, tag="set_plan_status"):
    """Change a plan's status and times, leaving its (possibly large) plan data alone."""

    plan_id: str
    status: PlanStatus
    started_at: datetime | None
    completed_at: datetime | None
    error: str | None


class PutSubtask(msgspec.Struct, frozen=True, tag="put_subtask"):
    """Insert or replace the ``plan_execution`` row of one subtask."""

    state: SubtaskState


class PutRevokedType(msgspec.Struct, frozen=True, tag="put_revoked_type"):
    """Record that the tasks of a type are not handed out (docs/CONTROL.md)."""

    revoked: RevokedTaskType


class DeleteRevokedType(msgspec.Struct, frozen=True, tag="delete_revoked_type"):
    """A revoked task type is restored."""

    task_type: str


# -- retention (docs/RETENTION.md) --------------------------------------------------------


class DeleteTaskEvents(msgspec.Struct, frozen=True, tag="delete_task_events"):
    """Delete the events of these tasks (a purge: the tasks go in the same write)."""

    task_ids: tuple[str, ...]


class TrimEventLog(msgspec.Struct, frozen=True, tag="trim_event_log"):
    """Delete every event with ``seq <= through`` and remember that the log was trimmed
    that far (it never goes back: a lower ``through`` than before trims nothing)."""

    through: int


class PutSchedule(msgspec.Struct, frozen=True, tag="put_schedule"):
    """Insert a schedule, or write its definition and pause state over the row of its
    name. What it fired (``last_slot``, ``last_task_id``, ``fired``) is written only on
    insert: afterwards only :class:`SetScheduleSlot` moves it, so a redefinition can
    never move a schedule back to a slot it already fired."""

    schedule: Schedule


class SetScheduleSlot(msgspec.Struct, frozen=True, tag="set_schedule_slot"):
    """A schedule (by id) fired ``slot`` with task ``task_id``: moves its last slot
    forward, never back (a slot at or before it changes nothing)."""

    schedule_id: str
    slot: datetime
    task_id: str
    at: datetime


class DeleteScheduleRow(msgspec.Struct, frozen=True, tag="delete_schedule"):
    schedule_id: str


WriteOp: TypeAlias = (
    AppendEvent
    | PutTask
    | SetTaskState
    | DeleteTaskRow
    | FenceTask
    | FenceLeader
    | LeaseClock
    | FenceWorker
    | FencePlanningRequest
    | PutRun
    | SetRunState
    | PutWorker
    | DeleteWorkerRow
    | PutPlanningRequest
    | PutPlan
    | SetPlanStatus
    | PutSubtask
    | PutRevokedType
    | DeleteRevokedType
    | DeleteTaskEvents
    | TrimEventLog
    | PutSchedule
    | SetScheduleSlot
    | DeleteScheduleRow
)


class Committed(msgspec.Struct, frozen=True, gc=False):
    """The write is durable. ``seqs``: the sequence number of each appended event, in order."""

    seqs: tuple[int, ...]


class LockReady(msgspec.Struct, frozen=True):
    """Take the best ready rows of ``heads`` in the write's own transaction, before its
    ops are decided: up to ``limit`` of each queue in claim order (priority, then age),
    ready (no backoff left by the database's clock), with ``SELECT ... FOR UPDATE SKIP
    LOCKED`` on a store several nodes share, so that rows another node's transaction
    holds are passed over, never waited for, and two nodes' claims never take one task
    (``ready`` are taken whatever their ``available_at`` says). The rows stay locked to
    the commit; the answer also says when a queue's next task still in a backoff comes
    due (``LockedHeads.due_in``).

    The decision stays the writer's, made in its own task: the storage actor answers
    ``locked`` with what it took (tasks, their runs and versions; ``None`` when nothing
    could be locked for this write), the writer, waiting for it, decides and answers
    ``decided`` with the write's ops, which the same transaction then applies. A writer
    that fails ``decided`` (it stopped, or its decision failed) adds nothing to the
    batch; the other writes of the batch go on. An in-process message only: the slots
    are the two ends of one exchange between a writer and the storage actor."""

    heads: tuple[QueueHead, ...]
    limit: int
    #: Tasks the writer holds as ready whose stored ``available_at`` (the end of a retry
    #: backoff, a wall time) may say otherwise: taken whatever it says. Only the tasks
    #: whose backoff the writer decided itself, on its own monotonic clock, which a
    #: stepped wall clock does not move; a backoff it read from storage ends by the
    #: database's clock (claims.lock_claims).
    ready: tuple[str, ...] = ()
    #: Task id -> version, of the tasks of ``heads`` the writer holds: a locked row of
    #: one of them at that version comes back as its key only (not read in full).
    known: dict[str, int] = msgspec.field(default_factory=dict)
    locked: Reply[LockedHeads | None] = msgspec.field(default_factory=Reply)
    decided: Reply[tuple[WriteOp, ...]] = msgspec.field(default_factory=Reply)


class Write(Request[Committed], frozen=True):
    """Apply ``ops`` in order, all or nothing, in the next group commit; with ``lock``,
    the ops are those the writer answers in ``lock.decided`` once the ready rows are
    locked (``ops`` is then empty)."""

    ops: tuple[WriteOp, ...]
    lock: LockReady | None = None
