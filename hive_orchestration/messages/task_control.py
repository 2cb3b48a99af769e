"""The TaskManager's messages for control by hand (docs/CONTROL.md): retry a task,
revoke and restore a task type, flush a queue, purge finished tasks."""

from __future__ import annotations

from datetime import datetime

import msgspec

from ..runtime import Request
from .task_models import Task


class RetryTask(Request[Task], frozen=True, kw_only=True):
    """Send a failed, timed-out or cancelled task back to the queue with a fresh attempt
    budget (``task.retried``, naming ``source_agent``); returns it as queued."""

    task_id: str
    reason: str | None = None
    source_agent: str | None = None


class RevokeTaskType(Request[bool], frozen=True, kw_only=True):
    """Hand out no task of ``task_type`` until it is restored: its queued tasks, and those
    created meanwhile, stay queued. ``False`` if it was revoked already."""

    task_type: str
    reason: str | None = None
    source_agent: str | None = None


class RestoreTaskType(Request[bool], frozen=True, kw_only=True):
    """Hand out the tasks of a revoked ``task_type`` again. ``False`` if it was not."""

    task_type: str
    source_agent: str | None = None


class RevokedTaskType(msgspec.Struct, frozen=True, kw_only=True):
    """A task type whose tasks are not handed out: since when, by whom and why."""

    task_type: str
    revoked_at: datetime
    source_agent: str | None = None
    reason: str | None = None


class GetRevokedTaskTypes(Request[list[RevokedTaskType]], frozen=True):
    """The revoked task types, in the order they were revoked."""


class FlushQueue(Request[int], frozen=True, kw_only=True):
    """Delete up to ``limit`` queued tasks of ``task_type`` (any if ``None``) created at or
    before ``before``, in one commit (a ``task.deleted`` each); returns how many."""

    task_type: str | None = None
    before: datetime
    limit: int
    source_agent: str | None = None


class PurgeOutcome(msgspec.Struct, frozen=True):
    """One chunk of a purge: how many tasks it deleted, and whether storage may hold more
    (it found as many as it was asked for)."""

    purged: int
    more: bool


class PurgeTasks(Request[PurgeOutcome], frozen=True, kw_only=True):
    """Delete, with their runs and events, at most ``limit`` finished tasks last changed
    more than ``older_than`` seconds ago by the TaskManager's clock (see FindPurgeable
    for which ones are never purged): one chunk of a purge, one transaction, so that
    other writers go between two chunks.

    ``epoch``: a pass of the automatic policy on a database several nodes share, which
    runs on the leader only (storage/pg/leader.py): the chunk is a write of its own,
    fenced by the leader's epoch (``FenceLeader``), so that a leader that lost the role
    deletes nothing. None: a user's purge, on any node."""

    older_than: float
    statuses: tuple[str, ...]
    task_type: str | None = None
    include_keyed: bool = False
    limit: int = 1000
    source_agent: str | None = None
    reason: str = "purge"
    epoch: int | None = None
