"""The rows of control by hand (docs/CONTROL.md): revoked task types, and tasks counted
by status and type."""

from __future__ import annotations

from typing import cast

from ..messages.storage import (
    CountTasksByType,
    DeleteRevokedType,
    LoadRevokedTypes,
    PutRevokedType,
    StorageMessage,
)
from ..messages.tasks import TERMINAL, RevokedTaskType, Task
from .port import Driver, Statement
from .rows import EPOCH, parse_time, time_text

__all__ = ["CONTROL_QUERIES", "frees_key", "query_control", "revoked_statement"]

CONTROL_QUERIES = (LoadRevokedTypes, CountTasksByType)

_PUT = (
    "INSERT INTO revoked_task_types (task_type, revoked_at, source_agent, reason)"
    " VALUES (?, ?, ?, ?) ON CONFLICT (task_type) DO UPDATE SET revoked_at ="
    " excluded.revoked_at, source_agent = excluded.source_agent, reason = excluded.reason"
)
_DELETE = "DELETE FROM revoked_task_types WHERE task_type = ?"
_LOAD = (
    "SELECT task_type, revoked_at, source_agent, reason FROM revoked_task_types"
    " ORDER BY revoked_at, task_type"
)
# One pass over the table (idx_tasks_status cannot give the type): a count is the
# operator's look, not a worker's hot path.
_COUNT = "SELECT status, task_type, COUNT(*) FROM tasks GROUP BY status, task_type"


def frees_key(task: Task) -> bool:
    """Whether writing ``task``'s state lets go of its idempotency key (it ended, and held
    it only while live)."""
    return (
        task.idempotency_key is not None
        and task.idempotency_scope == "active"
        and task.status in TERMINAL
    )


def revoked_statement(op: PutRevokedType | DeleteRevokedType) -> Statement:
    if isinstance(op, DeleteRevokedType):
        return _DELETE, (op.task_type,)
    revoked = op.revoked
    return _PUT, (
        revoked.task_type,
        time_text(revoked.revoked_at),
        revoked.source_agent,
        revoked.reason,
    )


async def query_control(db: Driver, message: StorageMessage) -> object:
    match message:
        case LoadRevokedTypes():
            rows = await db.fetchall(_LOAD)
            return tuple(
                RevokedTaskType(
                    task_type=str(task_type),
                    revoked_at=parse_time(revoked_at) or EPOCH,
                    source_agent=cast("str | None", source_agent),
                    reason=cast("str | None", reason),
                )
                for task_type, revoked_at, source_agent, reason in rows
            )
        case CountTasksByType():
            counts: dict[str, dict[str, int]] = {}
            for status, task_type, count in await db.fetchall(_COUNT):
                counts.setdefault(str(status), {})[str(task_type)] = cast(int, count)
            return counts
    raise AssertionError(f"not a control query: {message!r}")
