"""The TaskManager's part of retention (docs/RETENTION.md): which completed tasks are
deleted as they complete, and the event a purge chunk logs.

Both go through the TaskManager, the one owner of tasks: a purge deletes the tasks it
holds in memory (the recently finished) as it deletes those it does not, in the same
batch, so that memory never answers for a task storage no longer has.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from ...messages.events import Event, JsonValue
from ...messages.storage import AppendEvent
from ...messages.tasks import PurgeTasks, Task

__all__ = ["EVERY_TYPE", "deletes_on_success", "purged_event"]

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
