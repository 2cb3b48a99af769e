"""Which queued task to hand out next, in O(log n), with routing, limits and backoff.

The TaskManager owns one :class:`ReadyQueue`. Queued tasks sit in heaps, best first
(priority, then age), one per *route*: a task without ``requires`` is routed by its type,
one with ``requires`` by that set of capabilities. A claim that can do a set of things
looks at the heads of the heaps of the types in the set and of the requirement sets
included in it. A task whose retry backoff has not elapsed waits in a heap ordered by time
and joins its route when due. A task whose concurrency group (or whose type, in a mixed
requirement heap) is full leaves its heap for a list of its group and comes back when a
task of the group stops holding a slot, so a blocked group never costs a scan.

Entries are never removed from the middle of a heap: each carries the generation of the
task's entry, and an entry whose task left the queue (claimed, cancelled, deleted) or was
queued again since is skipped when it reaches the top.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Collection, Mapping
from typing import NamedTuple, TypeAlias

from ...messages.tasks import Task

__all__ = ["ReadyQueue", "can_take"]

#: A task type (tasks without requirements) or a set of required capabilities.
Route: TypeAlias = str | frozenset[str]


class _Entry(NamedTuple):
    neg_priority: int
    created: float
    task_id: str
    generation: int
    task_type: str
    route: Route
    key: str | None
    limit: int


def can_take(task: Task, capabilities: Collection[str] | None) -> bool:
    """Whether a worker that can do ``capabilities`` (``None``: anything) takes ``task``:
    all of its ``requires`` if it has any, else its task type."""
    if capabilities is None:
        return True
    if task.requires:
        return all(need in capabilities for need in task.requires)
    return task.task_type in capabilities


class ReadyQueue:
    """The queued tasks, as far as handing them out is concerned."""

    def __init__(self, type_limits: Mapping[str, int] | None = None) -> None:
        self._type_limits = dict(type_limits or {})
        self._heaps: dict[Route, list[_Entry]] = {}
        self._delayed: list[tuple[float, _Entry]] = []
        self._blocked: dict[str, list[_Entry]] = {}  # concurrency key -> entries
        self._type_blocked: dict[str, list[_Entry]] = {}  # task type -> entries
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

    def add(self, task: Task, now: float, available: float | None = None) -> None:
        """``task`` is queued: hand it out when it is the best ready one, not before
        ``available`` (the end of its backoff). ``now``, ``available`` and the times given
        to :meth:`promote` are on the caller's monotonic clock, not ``task.available_at``'s
        wall clock: a wall clock stepped back must not hold a task back for the step."""
        self._next_generation += 1
        generation = self._next_generation
        self._generation[task.id] = generation
        entry = _Entry(
            -task.priority,
            task.created_at.timestamp(),
            task.id,
            generation,
            task.task_type,
            frozenset(task.requires) if task.requires else task.task_type,
            task.concurrency_key,
            task.concurrency_limit or 1,
        )
        if available is not None and available > now:
            heapq.heappush(self._delayed, (available, entry))
        else:
            self._push(entry)

    def discard(self, task_id: str) -> None:
        """``task_id`` left the queue (its entries are skipped from now on)."""
        self._generation.pop(task_id, None)

    def promote(self, now: float) -> float | None:
        """Move tasks whose backoff is over into their heaps; when the next one is due."""
        delayed = self._delayed
        while delayed and delayed[0][0] <= now:
            _, entry = heapq.heappop(delayed)
            if self._valid(entry):
                self._push(entry)
        return self.next_delayed()

    def next_delayed(self) -> float | None:
        """When the next task in backoff becomes ready, if any."""
        delayed = self._delayed
        while delayed and not self._valid(delayed[0][1]):
            heapq.heappop(delayed)
        return delayed[0][0] if delayed else None

    def pop(self, capabilities: Collection[str] | None) -> str | None:
        """Take the best ready task a claim that can do ``capabilities`` (``None``:
        anything) may take, within the concurrency limits; its id, or ``None``."""
        best: _Entry | None = None
        for route in self._routes(capabilities):
            entry = self._head(route)
            if entry is not None and (best is None or entry < best):
                best = entry
        if best is None:
            return None
        heap = self._heaps[best.route]
        heapq.heappop(heap)
        if not heap:
            del self._heaps[best.route]
        del self._generation[best.task_id]
        return best.task_id

    def _routes(self, capabilities: Collection[str] | None) -> list[Route]:
        if capabilities is None:
            return list(self._heaps)
        routes: list[Route] = [c for c in capabilities if c in self._heaps]
        for route in self._heaps:
            if isinstance(route, frozenset) and all(need in capabilities for need in route):
                routes.append(route)
        return routes

    def _head(self, route: Route) -> _Entry | None:
        heap = self._heaps.get(route)
        if not heap:
            return None
        if isinstance(route, str) and self._type_full(route):
            return None  # a whole heap of one type waits for a slot: leave it be
        while heap:
            entry = heap[0]
            if not self._valid(entry):
                heapq.heappop(heap)
            elif entry.key is not None and self._held_keys[entry.key] >= entry.limit:
                heapq.heappop(heap)
                self._blocked.setdefault(entry.key, []).append(entry)
            elif self._type_full(entry.task_type):  # in a mixed heap of requirements
                heapq.heappop(heap)
                self._type_blocked.setdefault(entry.task_type, []).append(entry)
            else:
                return entry
        del self._heaps[route]
        return None

    def _type_full(self, task_type: str) -> bool:
        limit = self._type_limits.get(task_type)
        return limit is not None and self._held_types[task_type] >= limit

    def _valid(self, entry: _Entry) -> bool:
        return self._generation.get(entry.task_id) == entry.generation

    def _push(self, entry: _Entry) -> None:
        heapq.heappush(self._heaps.setdefault(entry.route, []), entry)
        self.changed = True

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
        if task_type in self._type_limits:
            if self._heaps.get(task_type):
                self.changed = True
            for entry in self._type_blocked.pop(task_type, ()):
                if self._valid(entry):
                    self._push(entry)
        key = task.concurrency_key
        if key is not None:
            self._held_keys[key] -= 1
            if self._held_keys[key] <= 0:
                del self._held_keys[key]
            for entry in self._blocked.pop(key, ()):
                if self._valid(entry):
                    self._push(entry)

    def held(self, task_type: str) -> int:
        return self._held_types[task_type]
