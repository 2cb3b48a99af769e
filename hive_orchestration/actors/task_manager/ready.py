"""Which queued task to hand out next, in O(log n), with concurrency limits and backoff.

The TaskManager owns one :class:`ReadyQueue`. Queued tasks sit in one heap per task type,
best first (priority, then age). A task whose retry backoff has not elapsed waits in a
heap ordered by time and joins its type's heap when due. A task whose concurrency group
is full leaves its type's heap for its group's list and comes back when a task of the
group stops holding a slot, so a blocked group never costs a scan.

Entries are never removed from the middle of a heap: each carries the generation of the
task's entry, and an entry whose task left the queue (claimed, cancelled, deleted) or was
queued again since is skipped when it reaches the top.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from ...messages.tasks import Task

__all__ = ["ReadyQueue"]


class _Entry(NamedTuple):
    neg_priority: int
    created: float
    task_id: str
    generation: int
    task_type: str
    key: str | None
    limit: int


class ReadyQueue:
    """The queued tasks, as far as handing them out is concerned."""

    def __init__(self, type_limits: Mapping[str, int] | None = None) -> None:
        self._type_limits = dict(type_limits or {})
        self._heaps: dict[str, list[_Entry]] = {}
        self._delayed: list[tuple[float, _Entry]] = []
        self._blocked: dict[str, list[_Entry]] = {}
        self._generation: dict[str, int] = {}  # task id -> its valid entry; absent: not queued
        self._next_generation = 0
        self._held_types: Counter[str] = Counter()
        self._held_keys: Counter[str] = Counter()
        #: Set when a task may have become claimable; the TaskManager clears it.
        self.changed = False

    def __len__(self) -> int:
        """Queued tasks (ready, delayed or blocked)."""
        return len(self._generation)

    # -- queued tasks -------------------------------------------------------------------

    def add(self, task: Task, now: float) -> None:
        """``task`` is queued: hand it out when it is the best ready one."""
        self._next_generation += 1
        generation = self._next_generation
        self._generation[task.id] = generation
        entry = _Entry(
            -task.priority,
            task.created_at.timestamp(),
            task.id,
            generation,
            task.task_type,
            task.concurrency_key,
            task.concurrency_limit or 1,
        )
        available = task.available_at.timestamp() if task.available_at is not None else None
        if available is not None and available > now:
            heapq.heappush(self._delayed, (available, entry))
        else:
            heapq.heappush(self._heaps.setdefault(task.task_type, []), entry)
            self.changed = True

    def discard(self, task_id: str) -> None:
        """``task_id`` left the queue (its entries are skipped from now on)."""
        self._generation.pop(task_id, None)

    def promote(self, now: float) -> float | None:
        """Move tasks whose backoff is over into their heaps; when the next one is due."""
        delayed = self._delayed
        while delayed and delayed[0][0] <= now:
            _, entry = heapq.heappop(delayed)
            if self._generation.get(entry.task_id) == entry.generation:
                heapq.heappush(self._heaps.setdefault(entry.task_type, []), entry)
                self.changed = True
        return self.next_delayed()

    def next_delayed(self) -> float | None:
        """When the next task in backoff becomes ready, if any."""
        delayed = self._delayed
        while delayed and self._generation.get(delayed[0][1].task_id) != delayed[0][1].generation:
            heapq.heappop(delayed)
        return delayed[0][0] if delayed else None

    def pop(self, task_types: Iterable[str] | None) -> str | None:
        """Take the best ready task of ``task_types`` (any type when ``None``) whose
        concurrency limits leave room; its id, or ``None``."""
        best: _Entry | None = None
        for task_type in list(self._heaps) if task_types is None else task_types:
            entry = self._head(task_type)
            if entry is not None and (best is None or entry < best):
                best = entry
        if best is None:
            return None
        heap = self._heaps[best.task_type]
        heapq.heappop(heap)
        if not heap:
            del self._heaps[best.task_type]
        del self._generation[best.task_id]
        return best.task_id

    def _head(self, task_type: str) -> _Entry | None:
        heap = self._heaps.get(task_type)
        if not heap:
            return None
        limit = self._type_limits.get(task_type)
        if limit is not None and self._held_types[task_type] >= limit:
            return None
        while heap:
            entry = heap[0]
            if self._generation.get(entry.task_id) != entry.generation:
                heapq.heappop(heap)
            elif entry.key is not None and self._held_keys[entry.key] >= entry.limit:
                heapq.heappop(heap)
                self._blocked.setdefault(entry.key, []).append(entry)
            else:
                return entry
        del self._heaps[task_type]
        return None

    # -- concurrency slots ----------------------------------------------------------------

    def hold(self, task: Task) -> None:
        """``task`` is assigned or running: it takes a slot of its type and group."""
        self._held_types[task.task_type] += 1
        if task.concurrency_key is not None:
            self._held_keys[task.concurrency_key] += 1

    def unhold(self, task: Task) -> None:
        """``task`` stopped holding its slots; tasks waiting for them may go."""
        task_type = task.task_type
        self._held_types[task_type] -= 1
        if self._held_types[task_type] <= 0:
            del self._held_types[task_type]
        if task_type in self._type_limits and self._heaps.get(task_type):
            self.changed = True
        key = task.concurrency_key
        if key is not None:
            self._held_keys[key] -= 1
            if self._held_keys[key] <= 0:
                del self._held_keys[key]
            for entry in self._blocked.pop(key, ()):
                if self._generation.get(entry.task_id) == entry.generation:
                    heapq.heappush(self._heaps.setdefault(entry.task_type, []), entry)
                    self.changed = True

    def held(self, task_type: str) -> int:
        return self._held_types[task_type]
