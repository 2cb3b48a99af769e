"""Which queued task to hand out next, in O(log n), with routing, limits and backoff.

The TaskManager owns one :class:`ReadyQueue`. Queued tasks sit in heaps, best first
(priority, then age), one per *route*: a task without ``requires`` is routed by its type,
one with ``requires`` by that set of capabilities. A claim that can do a set of things
looks at the heads of the heaps of the types in the set and of the requirement sets
included in it. A task whose retry backoff has not elapsed waits in a heap ordered by time
and joins its route when due. A task whose concurrency group (or whose type, in a mixed
requirement heap) is full leaves its heap to wait aside for its group and comes back when
a task of the group stops holding a slot, so a blocked group never costs a scan.

Within a concurrency key, priority holds across routes: a key's free slots go to its best
ready tasks (priority, then age), whatever their type, so a claimer whose types leave out
the key's best task gets none of the key's tasks while it waits; the key waits for a
claimer that can take that task. Each key keeps a heap of its ready tasks for this; a
task that is not among the best ``free`` of its key waits in the key's blocked heap, and
only the ones that come within reach go back, when a slot frees or a better task leaves
the queue without taking one. Tasks in backoff are not ready and hold nothing back.

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
        self._blocked: dict[str, list[_Entry]] = {}  # concurrency key -> heap of entries
        # concurrency key -> heap of its ready entries (wherever they wait), best first, and
        # the largest limit any of them has had (the most slots the key may free).
        self._by_key: dict[str, list[_Entry]] = {}
        self._key_limit: dict[str, int] = {}
        self._key_of: dict[str, str] = {}  # queued task id -> its concurrency key
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
        previous = self._key_of.pop(task.id, None)  # added again while queued
        if task.concurrency_key is not None:
            self._key_of[task.id] = task.concurrency_key
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
            self._ready(entry)
        if previous is not None:
            self._forget(previous)  # its old entry is stale now

    def discard(self, task_id: str) -> None:
        """``task_id`` left the queue (its entries are skipped from now on)."""
        self._generation.pop(task_id, None)
        key = self._key_of.pop(task_id, None)
        if key is not None:
            self._forget(key)

    def promote(self, now: float) -> float | None:
        """Move tasks whose backoff is over into their heaps; when the next one is due."""
        delayed = self._delayed
        while delayed and delayed[0][0] <= now:
            _, entry = heapq.heappop(delayed)
            if self._valid(entry):
                self._ready(entry)
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
        if best.key is not None:
            del self._key_of[best.task_id]
            self._key_heap(best.key)  # let go of its entry (and of an emptied key)
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
            elif entry.key is not None and not self._key_allows(entry):
                heapq.heappop(heap)
                heapq.heappush(self._blocked.setdefault(entry.key, []), entry)
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

    def _ready(self, entry: _Entry) -> None:
        """``entry`` is ready (queued, past any backoff): into its route and its key."""
        key = entry.key
        if key is not None:
            heapq.heappush(self._by_key.setdefault(key, []), entry)
            self._key_limit[key] = max(self._key_limit.get(key, 0), entry.limit)
        self._push(entry)

    # -- concurrency keys ---------------------------------------------------------------

    def _key_heap(self, key: str) -> list[_Entry]:
        """The key's ready entries with a valid one on top; an emptied key is forgotten
        (its blocked entries are then all stale too)."""
        heap = self._by_key.get(key)
        if heap is None:
            return []
        while heap and not self._valid(heap[0]):
            heapq.heappop(heap)
        if not heap:
            del self._by_key[key]
            self._key_limit.pop(key, None)
            self._blocked.pop(key, None)
        return heap

    def _best_of_key(self, key: str, count: int) -> list[_Entry]:
        """The ``count`` best ready entries of ``key``, best first: a walk down its heap
        from the top that skips stale entries, O(count log count) when few are stale."""
        heap = self._key_heap(key)
        if count <= 1 or len(heap) <= 1:
            return heap[:1] if count >= 1 else []
        best: list[_Entry] = []
        frontier = [(heap[0], 0)]
        while frontier and len(best) < count:
            entry, index = heapq.heappop(frontier)
            if self._valid(entry):
                best.append(entry)
            for child in (2 * index + 1, 2 * index + 2):
                if child < len(heap):
                    heapq.heappush(frontier, (heap[child], child))
        return best

    def _key_allows(self, entry: _Entry) -> bool:
        """Whether ``entry`` may take a slot of its key now: one is free and no better
        ready task of the key is left without one."""
        assert entry.key is not None
        free = entry.limit - self._held_keys[entry.key]
        if free <= 0:
            return False
        best = self._best_of_key(entry.key, free)
        return bool(best) and entry <= best[-1]

    def _forget(self, key: str) -> None:
        """An entry of ``key`` went stale without taking a slot: drop it if on top (and
        an emptied key); it may have been one of the key's best, so the next ones may
        come within reach."""
        self._key_heap(key)
        self._release(key)

    def _release(self, key: str) -> None:
        """Send back to their routes the blocked entries of ``key`` that may now take a
        slot: only those within its best ``free``, so a long wait list costs nothing."""
        blocked = self._blocked.get(key)
        if not blocked:
            return
        free = self._key_limit.get(key, 1) - self._held_keys[key]
        best = self._best_of_key(key, free) if free > 0 else []
        if not best:
            return
        bound = best[-1]
        kept: list[_Entry] = []
        while blocked and blocked[0] <= bound:
            entry = heapq.heappop(blocked)
            if not self._valid(entry):
                continue
            if self._key_allows(entry):
                self._push(entry)
            else:
                kept.append(entry)  # a smaller limit of its own
        for entry in kept:
            heapq.heappush(blocked, entry)
        if not blocked:
            self._blocked.pop(key, None)

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
            self._release(key)

    def held(self, task_type: str) -> int:
        return self._held_types[task_type]
