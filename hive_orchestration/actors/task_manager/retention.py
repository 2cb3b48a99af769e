"""The TaskManager's part of retention (docs/RETENTION.md): which completed tasks are
deleted as they complete, the event a purge chunk logs, and a leader's purge chunk.

All go through the TaskManager, the one owner of tasks: a purge deletes the tasks it
holds in memory (the recently finished) as it deletes those it does not, in the same
batch, so that memory never answers for a task storage no longer has.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

import msgspec

from ...errors import StorageError
from ...messages.events import Event, JsonValue
from ...messages.storage import AppendEvent, FenceLeader, Write, WriteOp
from ...messages.tasks import PurgeOutcome, PurgeTasks, Task
from .state import _Batch

if TYPE_CHECKING:
    from .actor import TaskManager

__all__ = ["EVERY_TYPE", "deletes_on_success", "purge_as_leader", "purged_event"]

#: Tries of a leader's purge chunk: the first fences the tasks it did not hold at -1 (a
#: conflict that reads their versions), the next ones go through unless another node
#: changed them meanwhile, or the epoch is no longer the leader's (then every try fails).
_LEADER_TRIES = 3

#: In ``delete_on_success``: the tasks of every type.
EVERY_TYPE = "*"


def deletes_on_success(task: Task, types: frozenset[str]) -> bool:
    """Whether ``task``, just completed, is deleted with its runs. Never a plan's task
    (its result is its plan's, read by the steps after it), nor one that holds an
    idempotency key for ever (the key is its promise: deleting the task would free it;
    a key held while the task lived, ``active``, is freed as it ends anyway)."""
    if not types or task.plan_id is not None:
        return False
    if task.idempotency_key is not None and task.idempotency_scope != "active":
        return False
    return EVERY_TYPE in types or task.task_type in types


def purged_event(message: PurgeTasks, before: datetime, count: int, now: datetime) -> AppendEvent:
    """``retention.purged``: one per chunk (not one ``task.deleted`` per task: a purge of a
    million tasks must not log a million events), saying who purged what and why."""
    data: dict[str, JsonValue] = {
        "count": count,
        "before": before.isoformat(),
        "statuses": list(message.statuses),
        "reason": message.reason,
    }
    if message.task_type is not None:
        data["task_type"] = message.task_type
    event = Event(
        type="retention.purged",
        timestamp=now.timestamp(),
        source=message.source_agent or "task_manager",
        data=data,
    )
    return AppendEvent(event, msgspec.json.encode(data))


async def purge_as_leader(tm: TaskManager, message: PurgeTasks) -> PurgeOutcome:
    """One chunk of the automatic policy's purge on a database several nodes share: a
    write of its own (not the batch's: a stale epoch must fail this chunk alone), fenced
    by the leader's epoch, so that a leader that lost the role deletes nothing. Raises
    the write's :class:`StorageError` once its tries are spent; memory is as before."""
    assert message.epoch is not None
    for attempt in range(_LEADER_TRIES):
        now = tm._read_clocks()
        work = _Batch()
        outcome = await tm._purge(message, work, now)
        if not work.ops:
            return outcome
        ops: list[WriteOp] = [FenceLeader(message.epoch), *tm._fences(work), *work.ops]
        reply = await tm._storage.request(Write(tuple(ops)))
        try:
            await reply.wait()
        except StorageError:
            tm._restore(work, now)
            if attempt + 1 == _LEADER_TRIES:
                raise
            await tm._refresh(work.fenced)  # their versions as they are now
            continue
        tm._bump(work)
        tm._shed()
        return outcome
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises
