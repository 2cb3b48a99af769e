"""Where a queued task stands in the ready queue: its *route* (its task type, or the set of
capabilities it requires), its *queue* as storage indexes it (task type, requirement
list, concurrency key), its heap :class:`Entry`, and the :class:`Bound` of a queue
whose other tasks wait in storage; and whether a worker's capabilities take a task.

Separate from :mod:`.ready`, the data structure that orders these: the TaskManager and
storage speak of queues and bounds too.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import NamedTuple, TypeAlias

from ...messages.tasks import Task

__all__ = ["Bound", "Entry", "QueueId", "Route", "bound_of", "can_take", "queue_of", "route_of"]

#: A task type (tasks without requirements) or a set of required capabilities.
Route: TypeAlias = str | frozenset[str]
#: A queue as storage indexes it: task type, requirement list, concurrency key.
QueueId: TypeAlias = tuple[str, tuple[str, ...], str | None]


class Bound(NamedTuple):
    """The claim-order key of the last task held of a queue whose other tasks are in
    storage (they all come after it): compared with an entry's first three fields."""

    neg_priority: int
    created: float
    task_id: str
    created_at: datetime  # as stored, for storage to resume after it


def queue_of(task: Task) -> QueueId:
    return (task.task_type, task.requires, task.concurrency_key)


def bound_of(task: Task) -> Bound:
    return Bound(-task.priority, task.created_at.timestamp(), task.id, task.created_at)


def route_of(queue: QueueId) -> Route:
    return frozenset(queue[1]) if queue[1] else queue[0]


class Entry(NamedTuple):
    neg_priority: int
    created: float
    task_id: str
    generation: int
    task_type: str
    route: Route
    key: str | None
    limit: int
    queue: QueueId

    def after(self, bound: Bound) -> bool:
        """Whether this entry comes after ``bound`` in claim order."""
        return (self.neg_priority, self.created, self.task_id) > bound[:3]


def can_take(task: Task, capabilities: Collection[str] | None) -> bool:
    """Whether a worker that can do ``capabilities`` (``None``: anything) takes ``task``:
    all of its ``requires`` if it has any, else its task type."""
    if capabilities is None:
        return True
    if task.requires:
        return all(need in capabilities for need in task.requires)
    return task.task_type in capabilities
